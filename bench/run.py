"""`make bench`: every comparison side by side in one run, on this machine, as ratios.

1. ceiling   fp32 matmul GFLOP/s with torch on all cores (the machine's ceiling for the stages below)
2. annotate  the paper's method (transformers `generate`, batch 1, sampling T=1 / top_k 50 as published, and
             greedy, 10 new tokens, the paper's chat prompt) vs ours (vLLM in Ray Data: the same prompt in
             `generate` mode, the default `score` mode, and score mode on reviews cut to 1000 / 500 / 250
             characters) on the same IMDb test
             reviews: rows/s, prompt tokens/s, accuracy, drop rate, ratios, and tokens/s as a fraction of the
             ceiling (2 x non-embedding parameters FLOPs per token); each setting --repeats times (median, min,
             max), the settings alternating
3. label     ours (Ray Data actor, length-sorted batches) vs a plain transformers `pipeline` loop, same reviews
4. train     samples/s for 1 vs 2 Ray Train workers and ZeRO 0 / 2 / 3
5. serve     requests/s and p50/p99 with dynamic batching vs batch size 1, same load
6. quantize  the encoder in int8 vs fp32 on the same reviews: rows/s (median, min, max of 3) and accuracy
             (bench/quantize.py)
7. fixed_cost  a 200-row annotation call's fixed cost and the engine's work, tokenizing in the engine vs Ray Data's
             tokenize stages, 3 fresh processes each (bench/fixed_cost.py)
8. active_cost  an active-selection annotate stage (4 rounds) on one engine, and with an engine per round, against
             one random call of the same LLM budget: whole-stage wall times, 3 fresh processes each
             (bench/active_cost.py)
9. cost_accuracy  LLM seconds and total seconds to reach a test accuracy of the encoder on IMDb and tweets: the
             paper's recipe (random rows, HF generate loop, whole texts) vs ours (one served engine, score mode,
             head_tail; random and active rows) (bench/cost_accuracy.py)

    python -m bench.run [--only ceiling,annotate,label,train,serve,quantize,fixed_cost,active_cost,cost_accuracy]
                        [--annotate-rows 200] [--annotate-settings a,b] [--repeats 3] [--label-rows 2000]

Writes bench/results/bench.json and bench/results/bench.md. Reads IMDb from ../shared/data (development data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.active_cost import bench_active_cost
from bench.annotate_modes import IMDB
from bench.cost_accuracy import bench_cost_accuracy
from bench.fixed_cost import bench_fixed_cost
from bench.harness import RESULTS
from bench.paper_loop import paper_loop
from bench.quantize import bench_quantize
from bench.run_report import summary_md

SHARED = IMDB.parents[1]
PARAMS = {"smollm2-135m-instruct": 1.06e8, "minilm-l6": 1.1e7}  # non-embedding parameters (hardware.yaml)


def imdb_test(rows: int, seed: int = 0) -> pd.DataFrame:
    df = pd.read_parquet(IMDB).query("split == 'test'").sample(rows, random_state=seed)
    return pd.DataFrame({"id": df["source_path"].astype(str), "text": df["text"],
                         "label": df["label"].map({1: "positive", 0: "negative"})}).reset_index(drop=True)


def mesh_terms(rows: int, seed: int = 0) -> pd.DataFrame:
    """MeSH 2017 descriptors (test split) with gold anatomy labels as yes / no."""
    df = pd.read_parquet(SHARED / "mesh_anatomy" / "mesh2017_anatomy.parquet").query("split == 'test'")
    df = df.sample(rows, random_state=seed)
    return pd.DataFrame({"id": df["mesh_ui"].astype(str), "text": df["text"],
                         "label": df["label"].map({1: "yes", 0: "no"})}).reset_index(drop=True)


def ceiling(n: int = 2048, reps: int = 10) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    secs = time.perf_counter() - t0
    return {"gflops": 2 * n**3 * reps / secs / 1e9, "threads": torch.get_num_threads(), "matrix": n}


def _frac(tokens_per_s: float, model: str, ceil_gflops: float) -> float:
    return tokens_per_s * 2 * PARAMS[model] / (ceil_gflops * 1e9)


# ------------------------------------------------------------------------------------------ annotation
def annotate_paper(df: pd.DataFrame, task, seed: int = 0, sample: bool = True) -> dict[str, Any]:
    """The paper's loop on `df` (sampling as published, or greedy so its speed compares with our greedy engine
    without decoding mixed in); its model load is not counted."""
    preds, seconds, tokens, _ = paper_loop(list(df["text"]), task, seed, sample)
    return _annotation_result(df, pd.Series(preds), sum(seconds), tokens)


def annotate_ours(df: pd.DataFrame, task, **kw) -> dict[str, Any]:
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        out, s = annotate(ray.data.from_pandas(df), task, AnnotateConfig(**kw), cache_dir=cache)
    out = out.set_index("id").loc[df["id"]].reset_index()
    r = _annotation_result(df, out["llm_label"], s.seconds, s.prompt_tokens)
    r["seconds_incl_engine_start"] = time.perf_counter() - t0
    return r


def engine_start(task, rows: pd.DataFrame) -> dict[str, Any]:
    """What an annotate call costs before its first useful row: the same call on 2 short rows (engine actor
    start, model load, warm-up, Ray Data set-up). Every `annotate()` call pays it once, whatever its size."""
    short = rows.assign(n=rows["text"].str.len()).nsmallest(2, "n").drop(columns="n")
    r = annotate_ours(short, task)
    return {"seconds": r["seconds"], "rows": len(short)}


def _excl_start(r: dict[str, Any], start_s: float) -> dict[str, Any] | None:
    """The run's rates with the engine's start-up taken out: the throughput a long run approaches. (An earlier
    version timed the cache's part files after the first one; the engine works on many rows at once, so they
    finish together at the end and that over-counted several-fold.)"""
    secs = r["seconds"] - start_s
    if secs <= 0.1 * r["seconds"]:
        return None
    return {"seconds": secs, "rows_per_s": r["rows"] / secs, "prompt_tokens_per_s": r["prompt_tokens"] / secs}


def _annotation_result(df, preds: pd.Series, secs: float, prompt_tokens: int) -> dict[str, Any]:
    preds = pd.Series(list(preds))
    gold = df["label"].reset_index(drop=True)
    return {"rows": len(df), "seconds": secs, "rows_per_s": len(df) / secs, "prompt_tokens": int(prompt_tokens),
            "prompt_tokens_per_s": prompt_tokens / secs,
            "accuracy": float((preds == gold).mean()), "drop_rate": float(preds.isna().mean())}


def annotate_settings(df: pd.DataFrame) -> dict[str, Any]:
    """Every annotation setting of the comparison: name -> a call returning its result."""
    from llambert_ray.tasks import load_task

    task, mesh = load_task("imdb-sentiment"), load_task("mesh-anatomy")
    terms = mesh_terms(2 * len(df))
    out = {"paper_hf_generate_bs1": lambda: annotate_paper(df, task),
           "paper_hf_generate_bs1_greedy": lambda: annotate_paper(df, task, sample=False),
           "ours_generate_chat_0": lambda: annotate_ours(df, task, mode="generate", prompt_style="chat", shots=0),
           "ours_score_default": lambda: annotate_ours(df, task),
           "ours_score_no_prefix_cache": lambda: annotate_ours(df, task, enable_prefix_caching=False)}
    # fewer tokens per prompt: each review cut to its start and end (`annotate.truncate: head_tail`) or its start
    for chars in (1000, 500, 250):
        out[f"ours_score_head_tail_{chars}"] = (
            lambda c=chars: annotate_ours(df, task, max_text_chars=c, truncate="head_tail"))
    out["ours_score_head_500"] = lambda: annotate_ours(df, task, max_text_chars=500)
    # short texts (MeSH terms): the shared few-shot prefix is most of each prompt, so reusing it matters most
    out["mesh_ours_score_block32_prefix_cache"] = lambda: annotate_ours(terms, mesh)
    out["mesh_ours_score_block128_vllm_cpu_default"] = lambda: annotate_ours(terms, mesh, block_size=128)
    # last, so it runs with the same warm caches as the calls it is subtracted from
    out["engine_start"] = lambda: engine_start(task, df)
    return out


def _repeated(calls: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Each call `repeats` times, the settings alternating (drift in the machine's load hits all alike); per
    setting the run with the median time, plus `spread` (median / min / max of rows/s and of seconds)."""
    from bench.quantize import spread

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in calls}
    for i in range(repeats):
        for name, call in calls.items():
            runs[name].append(call())
            print(f"annotate {name} run {i + 1}/{repeats}: {runs[name][-1]['seconds']:.1f} s", flush=True)
    out = {}
    for name, rs in runs.items():
        by_time = sorted(rs, key=lambda r: r["seconds"])
        out[name] = dict(by_time[len(by_time) // 2])
        out[name]["spread"] = {"seconds": spread([r["seconds"] for r in rs])}
        if "rows_per_s" in rs[0]:
            out[name]["spread"]["rows_per_s"] = spread([r["rows_per_s"] for r in rs])
    return out


def bench_annotate(rows: int, ceil: float, settings: list[str] | None = None, repeats: int = 3) -> dict[str, Any]:
    calls = annotate_settings(imdb_test(rows))
    unknown = set(settings or []) - set(calls)
    if unknown:
        raise SystemExit(f"unknown annotate settings {sorted(unknown)}; known: {', '.join(calls)}")
    res = _repeated({k: v for k, v in calls.items() if not settings or k in settings}, repeats)
    paper = res.get("paper_hf_generate_bs1")
    start = res.get("engine_start")
    mesh_base = res.get("mesh_ours_score_block128_vllm_cpu_default")
    mesh_base_ex = _excl_start(mesh_base, start["seconds"]) if mesh_base and start else None
    if paper:
        paper["speedup_vs_paper"] = 1.0
    for k, r in res.items():
        if k == "engine_start" or r is paper:
            continue
        r["ceiling_fraction"] = _frac(r["prompt_tokens_per_s"], "smollm2-135m-instruct", ceil)
        ex = _excl_start(r, start["seconds"]) if start and k.startswith(("ours", "mesh")) else None
        r["excl_engine_start"] = ex
        if ex:
            ex["ceiling_fraction"] = _frac(ex["prompt_tokens_per_s"], "smollm2-135m-instruct", ceil)
        if k.startswith("mesh_"):  # another corpus: compared with itself at vLLM's CPU block size
            if mesh_base:
                r["speedup_vs_block128"] = r["rows_per_s"] / mesh_base["rows_per_s"]
            if ex and mesh_base_ex:
                ex["speedup_vs_block128"] = ex["rows_per_s"] / mesh_base_ex["rows_per_s"]
            continue
        if paper:  # whole calls (engine start included) against the paper's loop
            r["speedup_vs_paper"] = r["rows_per_s"] / paper["rows_per_s"]
            if ex:
                ex["speedup_vs_paper"] = ex["rows_per_s"] / paper["rows_per_s"]
    if paper:
        paper["ceiling_fraction"] = _frac(paper["prompt_tokens_per_s"], "smollm2-135m-instruct", ceil)
    return res


# ------------------------------------------------------------------------------------------- labelling
def _classifier_dir(tmp: Path) -> Path:
    """A MiniLM sequence classifier (untrained head: speed does not depend on the weights)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.models import resolve_model

    src, out = resolve_model("minilm-l6"), tmp / "classifier"
    if not (out / "config.json").exists():
        m = AutoModelForSequenceClassification.from_pretrained(
            src, num_labels=2, id2label={0: "positive", 1: "negative"}, label2id={"positive": 0, "negative": 1})
        m.save_pretrained(out)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def bench_label(rows: int, ceil: float, max_length: int = 256) -> dict[str, Any]:
    import ray
    import torch
    from transformers import AutoTokenizer, pipeline

    from llambert_ray.config import LabelConfig
    from llambert_ray.label import label_dataset

    df = imdb_test(rows, seed=1)
    model = _classifier_dir(RESULTS / "bench_tmp")
    tok = AutoTokenizer.from_pretrained(model)
    tokens = int(sum(min(len(x), max_length) for x in tok(list(df["text"]), truncation=True,
                                                          max_length=max_length)["input_ids"]))
    torch.set_num_threads(os.cpu_count() or 1)
    clf = pipeline("text-classification", model=str(model), device=-1)
    t0 = time.perf_counter()
    for text in df["text"]:
        clf(text, truncation=True, max_length=max_length)
    plain = time.perf_counter() - t0
    from llambert_ray.label import Classifier

    bare = Classifier(str(model), max_length=max_length, sub_batch=32, threads=os.cpu_count() or 1)
    bare.predict_proba(list(df["text"][:32]))  # warm-up
    t0 = time.perf_counter()
    bare.predict_proba(list(df["text"]))
    bare_s = time.perf_counter() - t0
    del bare
    cfg = LabelConfig(batch_size=64, max_length=max_length, cpus_per_actor=1.5)
    t0 = time.perf_counter()
    out = label_dataset(ray.data.from_pandas(df[["id", "text"]]), model, cfg).to_pandas()
    ours = time.perf_counter() - t0
    assert len(out) == len(df) and out["id"].is_unique
    res = {"rows": rows, "tokens": tokens,
           "plain_pipeline_loop": {"seconds": plain, "rows_per_s": rows / plain, "tokens_per_s": tokens / plain},
           "ours_ray_data_actor": {"seconds": ours, "rows_per_s": rows / ours, "tokens_per_s": tokens / ours,
                                   "note": "includes actor start-up"},
           "ours_classifier_steady": {"seconds": bare_s, "rows_per_s": rows / bare_s, "tokens_per_s": tokens / bare_s,
                                      "note": "the actor's Classifier in process, warm: length-sorted sub-batches "
                                              "of 32"}}
    for k in ("plain_pipeline_loop", "ours_ray_data_actor", "ours_classifier_steady"):
        res[k]["ceiling_fraction"] = _frac(res[k]["tokens_per_s"], "minilm-l6", ceil)
    res["speedup"] = plain / ours
    res["speedup_steady"] = plain / bare_s
    return res


# -------------------------------------------------------------------------------------------- training
def bench_train(rows: int) -> dict[str, Any]:
    from llambert_ray.config import TrainConfig
    from llambert_ray.train import fit

    df = imdb_test(rows, seed=2)
    res = {}
    for workers, zero in [(1, 0), (2, 0), (2, 2), (2, 3)]:
        cfg = TrainConfig(epochs=1, batch_size=8, max_length=128, workers=workers, zero_stage=zero,
                          cpus_per_worker=0.9 if workers == 2 else 1.8)
        r = fit(df, ["positive", "negative"], cfg, RESULTS / "bench_tmp" / f"train_w{workers}_z{zero}",
                name=f"bench-w{workers}-z{zero}-{int(time.time())}")
        res[f"workers_{workers}_zero_{zero}"] = {"rows": rows, "seconds": r.seconds,
                                                  "samples_per_s": r.samples_per_s}
        print("train", workers, zero, res[f"workers_{workers}_zero_{zero}"], flush=True)
    return res


def bench_serve(requests: int) -> dict[str, Any]:
    from bench.serve_load import compare

    return compare(str(_classifier_dir(RESULTS / "bench_tmp")), requests, 16, 300)


# ------------------------------------------------------------------------------------------------ main
def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            out[prefix + k] = v
    return out


def repeat_step(fn, repeats: int) -> dict[str, Any]:
    """A step's result over `repeats` runs: every float is the median of the runs (ratios: the median of each run's
    own side-by-side ratio), and `spread` holds each float's median / min / max."""
    import copy

    from bench.quantize import spread

    runs = [fn() for _ in range(repeats)]
    flat = [_leaves(r) for r in runs]
    out = copy.deepcopy(runs[0])
    out["spread"] = {}
    for path in flat[0]:
        values = [f[path] for f in flat if path in f]
        sp = spread(values)
        out["spread"][path] = sp
        node = out
        *parents, leaf = path.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = sp["median"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ceiling,annotate,label,train,serve,quantize,fixed_cost,active_cost,"
                                      "cost_accuracy")
    ap.add_argument("--annotate-rows", type=int, default=200)
    ap.add_argument("--annotate-settings", default="", help="comma-separated annotate settings (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each annotate setting and of the label, train "
                                                              "and serve steps (median, min, max)")
    ap.add_argument("--label-rows", type=int, default=2000)
    ap.add_argument("--train-rows", type=int, default=256)
    ap.add_argument("--serve-requests", type=int, default=600)
    ap.add_argument("--out", default=str(RESULTS / "bench.json"))
    a = ap.parse_args()
    only = set(a.only.split(","))
    from llambert_ray.ray_env import init_ray

    out = Path(a.out)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    res["ceiling"] = ceiling()  # always: every fraction below is relative to this run's ceiling
    print("ceiling", res["ceiling"], flush=True)
    init_ray(None, num_cpus=2)
    ceil = res["ceiling"]["gflops"]
    settings = [x for x in a.annotate_settings.split(",") if x]
    steps = {"annotate": lambda: bench_annotate(a.annotate_rows, ceil, settings, a.repeats),
             "label": lambda: repeat_step(lambda: bench_label(a.label_rows, ceil), a.repeats),
             "train": lambda: repeat_step(lambda: bench_train(a.train_rows), a.repeats),
             "serve": lambda: repeat_step(lambda: bench_serve(a.serve_requests), a.repeats),
             "quantize": lambda: bench_quantize(a.label_rows), "fixed_cost": lambda: bench_fixed_cost(),
             "active_cost": lambda: bench_active_cost(), "cost_accuracy": lambda: bench_cost_accuracy()}
    for name, fn in steps.items():
        if name in only:
            res[name] = fn()
            print(name, json.dumps(res[name], indent=1), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
    out.write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(summary_md(res))
    print(summary_md(res))


if __name__ == "__main__":
    main()
