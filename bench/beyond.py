"""#8 measured on two domains with the same code: LLM label calibration, confidence-filtered / -weighted training,
and active vs random selection of the rows the LLM labels.

    python -m bench.beyond [--domains imdb,mesh] [--budget 400] [--rounds 4] [--seeds 3]

- IMDb (sentiment): the pool is the LLM-labelled rows of `python -m bench.imdb_pipeline` (1,000 train reviews with
  gold + 500 unlabelled extra; run that first), test = the same 2,000 gold test reviews.
- MeSH anatomy (term classification, 6 % positives): 2,000 train terms (seed 0) annotated here by SmolLM2 through
  the real vLLM engine (content-free calibration on, raw scores kept), test = 1,000 test terms.

Classifier for the curves and the filtering table: the selection probe of `llambert_ray.active` (softmax regression
on frozen MiniLM embeddings), trained on LLM labels only, scored on gold test labels. Active vs random replays the
rounds on the pool's LLM answers (score mode at temperature 0 is deterministic, so a row's answer is the same
whichever round asks for it): "LLM calls" = rows whose answer the strategy used.
Writes bench/results/beyond.{json,md} and bench/results/beyond_active_<domain>.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llambert_ray.active import plot_curves, run_rounds
from llambert_ray.annotate import annotate, apply_offsets, apply_prior_calibration
from llambert_ray.annotate.calibration import label_logsoftmax
from llambert_ray.config import AnnotateConfig, CorpusConfig, SelectConfig
from llambert_ray.data import read_corpus, sample_corpus
from llambert_ray.embeddings import Probe, embed
from llambert_ray.metrics import classification_metrics
from llambert_ray.models import resolve_model
from llambert_ray.ray_env import init_ray
from llambert_ray.tasks import load_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path("bench/results")


def _rows(cfg: CorpusConfig, task) -> pd.DataFrame:
    ds, _ = read_corpus(cfg, task)
    return sample_corpus(ds, cfg).to_pandas().sort_values("id").reset_index(drop=True)


def load_imdb(task) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float] | None]:
    run = OUT / "imdb-cpu"
    if not (run / "annotations.parquet").exists():
        raise SystemExit("bench/results/imdb-cpu/annotations.parquet is missing; fix: run "
                         "`python -m bench.imdb_pipeline` first")
    pool = pd.concat([pd.read_parquet(run / "annotations.parquet"),
                      pd.read_parquet(run / "annotations_extra.parquet")], ignore_index=True)
    test = _rows(CorpusConfig(path=str(DATA / "imdb" / "imdb_labeled.parquet"), id_column="source_path",
                              filters={"split": ["test"]}, sample=2000, seed=0), task)
    # content-free offsets: the engine scores only the content-free inputs (plus one real row)
    _, s = annotate(_rows(CorpusConfig(path=str(DATA / "imdb" / "imdb_labeled.parquet"), id_column="source_path",
                                       filters={"split": ["test"]}, sample=1, seed=1), task).pipe(_ds),
                    task, AnnotateConfig(calibration="content-free"))
    return pool, test, s.calibration


def load_mesh(task, pool_rows: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float] | None]:
    path = str(DATA / "mesh_anatomy" / "mesh2017_anatomy.parquet")
    train = _rows(CorpusConfig(path=path, id_column="mesh_ui", filters={"split": ["train"]}, sample=pool_rows,
                               seed=0), task)
    test = _rows(CorpusConfig(path=path, id_column="mesh_ui", filters={"split": ["test"]}, sample=1000, seed=0), task)
    pool, s = annotate(_ds(train), task, AnnotateConfig(calibration="content-free", batch_size=32),
                       cache_dir=OUT / "beyond_cache")
    print("\n".join(s.lines()), flush=True)
    # the default labels are the uncalibrated ones: rebuild them from the raw scores the calibrated run kept
    raw = [label_logsoftmax(r, task.labels) for r in pool["llm_raw"]]
    pool["llm_label"] = [task.labels[int(np.argmax(v))] if v is not None else None for v in raw]
    pool["llm_confidence"] = [float(np.exp(v).max()) if v is not None else None for v in raw]
    return pool, test, s.calibration


def _ds(df: pd.DataFrame):
    import ray

    return ray.data.from_pandas(df)


def with_offsets(pool: pd.DataFrame, labels: list[str], offsets: dict[str, float] | None) -> pd.DataFrame:
    """The pool's labels with per-label log-prob offsets subtracted (the product's own relabelling)."""
    return apply_offsets(pool.copy(), labels, offsets) if offsets else pool.copy()


def label_quality(df: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    g = df[df["label"].notna()] if "label" in df else df.iloc[:0]
    m = classification_metrics(g["label"], g["llm_label"], labels)  # a missing LLM label counts as wrong
    return {"rows": len(g), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            f"share_{labels[0]}": float((df["llm_label"] == labels[0]).mean())}


def probe_score(x_tr, y_tr, w, x_te, y_te, n) -> dict[str, float]:
    pr = Probe.fit(x_tr, y_tr, n, sample_weight=w).proba(x_te).argmax(1)
    m = classification_metrics(list(y_te), list(pr), list(range(n)))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def _calibration(pool: pd.DataFrame, labels: list[str], cf_offsets) -> dict:
    """1. calibration of the LLM's labels (on the pool rows with gold labels)."""
    gold_share = pool["label"].dropna().value_counts(normalize=True).to_dict() if "label" in pool else {}
    cal = {"none": label_quality(pool, labels)}
    if cf_offsets:
        cal["content-free"] = {**label_quality(with_offsets(pool, labels, cf_offsets), labels), "offsets": cf_offsets}
    for tag, prior in (("prior (equal shares)", None), ("prior (gold shares of the pool)", gold_share)):
        df, off = apply_prior_calibration(pool.copy(), labels, prior)
        cal[tag] = {**label_quality(df, labels), "offsets": off}
    return cal


def _filtering(ok: pd.DataFrame, x_ok, y_llm, conf, x_t, y_te, labels: list[str]) -> dict:
    """2. confidence filtering / weighting at equal LLM calls (all pool rows were asked)."""
    filt = {"all rows, unweighted": {**probe_score(x_ok, y_llm, None, x_t, y_te, len(labels)), "rows": len(ok)},
            "all rows, weighted by confidence": {**probe_score(x_ok, y_llm, conf, x_t, y_te, len(labels)),
                                                 "rows": len(ok)}}
    for keep in (0.9, 0.8, 0.7, 0.5):
        thr = float(np.quantile(conf, 1 - keep))
        m = conf >= thr
        q = label_quality(ok[m], labels) if "label" in ok else {}
        filt[f"top {int(keep * 100)} % by confidence (>= {thr:.3f})"] = {
            **probe_score(x_ok[m], y_llm[m], None, x_t, y_te, len(labels)), "rows": int(m.sum()),
            "llm_accuracy_of_kept": q.get("accuracy")}
    return filt


def _active_curves(pool: pd.DataFrame, x_p, x_t, test: pd.DataFrame, labels: list[str], sel, a) -> list[dict]:
    """3. active vs random selection, same budget and rounds, several seeds (mean curve per strategy)."""
    answers = pool.set_index(pool["id"].astype(str))

    def llm(ids):
        return answers.loc[list(ids), ["llm_label", "llm_confidence"]].reset_index(names="id")

    curves = []
    pool_ids = pool["id"].astype(str).to_numpy()
    for strategy, label, kw in (("random", "random (the paper)", {}),
                               ("active", "active: uncertainty + diversity", {"diversity": True}),
                               ("active", "active: uncertainty only", {"diversity": False})):
        runs = []
        for seed in range(a.seeds):
            _, r = run_rounds(pool_ids, x_p, labels, a.budget, sel.model_copy(update=kw), llm, strategy=strategy,
                              x_test=x_t, y_test=test["label"].tolist(), seed=seed, log=lambda s: None)
            runs.append(r.to_dict()["rounds"])
        mean = [{"round": i + 1, "llm_calls": runs[0][i]["llm_calls"],
                 "probe_accuracy": float(np.mean([r[i]["probe_accuracy"] or 0 for r in runs])),
                 "probe_macro_f1": float(np.mean([r[i]["probe_macro_f1"] or 0 for r in runs])),
                 "accuracy_per_seed": [r[i]["probe_accuracy"] for r in runs]} for i in range(len(runs[0]))]
        curves.append({"name": label, "strategy": strategy, "rounds": mean})
    return curves


def run_domain(name: str, task, pool: pd.DataFrame, test: pd.DataFrame, cf_offsets, a) -> dict:
    labels = task.labels
    idx = {lab: i for i, lab in enumerate(labels)}
    res: dict = {"pool_rows": len(pool), "test_rows": len(test)}
    t0 = time.time()
    sel = SelectConfig(max_length=a.max_length, rounds=a.rounds, cpus_per_actor=1.0)
    model = resolve_model("minilm-l6")
    ids_p, x_p = embed(_ds(pool[["id", "text"]].astype({"id": str})), model, sel)
    ids_t, x_t = embed(_ds(test[["id", "text"]].astype({"id": str})), model, sel)
    x_p = x_p[pd.Series(np.arange(len(ids_p)), index=ids_p)[pool["id"].astype(str)].to_numpy()]
    x_t = x_t[pd.Series(np.arange(len(ids_t)), index=ids_t)[test["id"].astype(str)].to_numpy()]
    y_te = test["label"].map(idx).to_numpy()
    res["embed_s"] = round(time.time() - t0, 1)
    res["calibration"] = _calibration(pool, labels, cf_offsets)
    ok = pool[pool["llm_label"].isin(labels)].reset_index(drop=True)
    rows = pool.index[pool["llm_label"].isin(labels)].to_numpy()
    y_llm = ok["llm_label"].map(idx).to_numpy()
    conf = ok["llm_confidence"].astype(float).to_numpy()
    res["confidence_filtering"] = _filtering(ok, x_p[rows], y_llm, conf, x_t, y_te, labels)
    curves = _active_curves(pool, x_p, x_t, test, labels, sel, a)
    full = probe_score(x_p[rows], y_llm, conf, x_t, y_te, len(labels))
    res["active"] = {"budget": a.budget, "rounds": a.rounds, "seeds": a.seeds, "curves": curves,
                     "whole_pool": {"llm_calls": len(pool), **full}}
    plot_curves(curves, OUT / f"beyond_active_{name}.png",
                title=f"{name}: probe accuracy vs LLM calls ({a.seeds} seeds; whole pool of {len(pool)}: "
                      f"{full['accuracy']:.1%})")
    return res


def to_markdown(results: dict) -> str:
    out = ["# Beyond the paper: calibration, confidence filtering, active selection (`python -m bench.beyond`)", ""]
    for dom, r in results["domains"].items():
        out += [f"## {dom} (pool {r['pool_rows']} LLM-labelled rows, test {r['test_rows']} gold rows)", "",
                "LLM labels vs gold on the pool's gold-labelled rows:", "",
                "| calibration | accuracy | macro F1 | share of first label |", "|---|---:|---:|---:|"]
        for k, v in r["calibration"].items():
            share = [x for x in v if x.startswith("share_")][0]
            out.append(f"| {k} | {v['accuracy']:.2%} | {v['macro_f1']:.2%} | {v[share]:.1%} |")
        out += ["", "Probe classifier trained on LLM labels (equal LLM calls), scored on gold test labels:", "",
                "| training rows | rows | test accuracy | test macro F1 | LLM accuracy of kept rows |",
                "|---|---:|---:|---:|---:|"]
        for k, v in r["confidence_filtering"].items():
            la = v.get("llm_accuracy_of_kept")
            out.append(f"| {k} | {v['rows']} | {v['accuracy']:.2%} | {v['macro_f1']:.2%} | "
                       f"{'' if la is None else f'{la:.2%}'} |")
        act = r["active"]
        calls = [x["llm_calls"] for x in act["curves"][0]["rounds"]]
        out += ["", f"Active vs random ({act['rounds']} rounds, mean of {act['seeds']} seeds; test accuracy / macro "
                    f"F1 of the probe after each round):", "",
                "| strategy | " + " | ".join(f"{c} calls" for c in calls) + " |",
                "|---|" + "---:|" * len(calls)]
        for c in act["curves"]:
            out.append(f"| {c['name']} | " + " | ".join(f"{x['probe_accuracy']:.2%} / {x['probe_macro_f1']:.2%}"
                                                         for x in c["rounds"]) + " |")
        w = act["whole_pool"]
        out += ["", f"Whole pool ({w['llm_calls']} calls): {w['accuracy']:.2%} / {w['macro_f1']:.2%}. "
                    f"Plot: `bench/results/beyond_active_{dom}.png`.", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="imdb,mesh")
    ap.add_argument("--budget", type=int, default=400, help="LLM calls for active vs random")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--mesh-pool", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128, help="embedding tokens per text")
    a = ap.parse_args()
    init_ray(None, num_cpus=2)
    path = OUT / "beyond.json"
    results = json.loads(path.read_text()) if path.exists() else {"domains": {}}
    for dom in a.domains.split(","):
        t0 = time.time()
        if dom == "imdb":
            task = load_task("imdb-sentiment")
            pool, test, cf = load_imdb(task)
        elif dom == "mesh":
            task = load_task("mesh-anatomy")
            pool, test, cf = load_mesh(task, a.mesh_pool)
        else:
            raise SystemExit(f"unknown domain {dom!r}; fix: imdb or mesh")
        results["domains"][dom] = {**run_domain(dom, task, pool, test, cf, a), "seconds": round(time.time() - t0)}
        path.write_text(json.dumps(results, indent=2, default=str))
        (OUT / "beyond.md").write_text(to_markdown(results))
        print(to_markdown({"domains": {dom: results["domains"][dom]}}), flush=True)


if __name__ == "__main__":
    main()
