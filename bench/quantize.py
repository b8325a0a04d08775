"""The encoder in int8 (dynamic quantization of its Linear layers) against fp32, side by side on the same IMDb
test reviews: rows/s (median, min and max of `--runs` runs, fp32 and int8 alternating so load drift hits both)
at 1 and 2 torch threads, and the accuracy of each.

The encoder is MiniLM-L6 fine-tuned by `llambert_ray.train.fit` (Ray Train, 1 epoch) on `--train-rows` gold IMDb
train reviews, cached under bench/results/bench_tmp/. Each run labels every review with the label stage's own
`Classifier` (length-sorted sub-batches of 32, 256 tokens), warm: the Ray actor's start is the same for both.

    python -m bench.quantize [--rows 2000] [--runs 3] [--threads 1,2]     (also: python -m bench.run --only quantize)

Writes bench/results/quantize.json. Reads IMDb from ../shared/data (development data).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.annotate_modes import IMDB
from bench.harness import RESULTS, save_results, spread

LABELS = ["positive", "negative"]


def trained_encoder(rows: int, out: Path) -> Path:
    """MiniLM fine-tuned on `rows` gold IMDb train reviews (made once, then reused)."""
    model = out / "model"
    if (model / "config.json").exists():
        return model
    from llambert_ray.config import TrainConfig
    from llambert_ray.ray_env import init_ray
    from llambert_ray.train import fit

    df = pd.read_parquet(IMDB).query("split == 'train'").sample(rows, random_state=3)
    train = pd.DataFrame({"text": df["text"].to_numpy(), "label": df["label"].map({1: "positive", 0: "negative"})})
    init_ray(None, num_cpus=2)
    fit(train, LABELS, TrainConfig(epochs=1, max_length=128, batch_size=16, cpus_per_worker=1.5), out,
        name=f"bench-quantize-{int(time.time())}")
    return model


def bench_quantize(rows: int = 2000, runs: int = 3, threads: tuple[int, ...] = (1, 2),
                   train_rows: int = 1000) -> dict[str, Any]:
    import numpy as np

    from llambert_ray.label import Classifier

    test = pd.read_parquet(IMDB).query("split == 'test'").sample(rows, random_state=1)
    texts, gold = test["text"].tolist(), test["label"].map({1: "positive", 0: "negative"}).to_numpy()
    model = trained_encoder(train_rows, RESULTS / "bench_tmp" / f"minilm-imdb-gold{train_rows}")
    res: dict[str, Any] = {"rows": rows, "train_rows": train_rows, "max_length": 256, "model": "minilm-l6"}
    for n in threads:
        clfs = {p: Classifier(str(model), max_length=256, sub_batch=32, threads=n,
                              quantize="int8" if p == "int8" else "none") for p in ("float32", "int8")}
        rates: dict[str, list[float]] = {p: [] for p in clfs}
        for run in range(runs):
            for p, clf in clfs.items():
                clf.predict_proba(texts[:32])  # warm-up
                t0 = time.perf_counter()
                probs = clf.predict_proba(texts)
                rates[p].append(rows / (time.perf_counter() - t0))
                acc = float((np.array(clf.labels)[probs.argmax(1)] == gold).mean())
                res.setdefault("accuracy", {})[p] = acc
                print(f"threads {n} run {run + 1} {p}: {rates[p][-1]:.1f} rows/s, accuracy {acc:.2%}", flush=True)
        res[f"threads_{n}"] = {p: {"rows_per_s": spread(v)} for p, v in rates.items()}
        res[f"threads_{n}"]["speedup_median"] = (statistics.median(rates["int8"])
                                                 / statistics.median(rates["float32"]))
    res["accuracy_change_points"] = 100 * (res["accuracy"]["int8"] - res["accuracy"]["float32"])
    return res


def summary_md(r: dict[str, Any]) -> str:
    lines = [f"## Encoder precision on CPU ({r['rows']} IMDb test reviews, MiniLM-L6 fine-tuned on "
             f"{r['train_rows']} gold reviews, 256 tokens)", "",
             "| threads | precision | rows/s median | min | max | speed-up (medians) | accuracy |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for key in sorted(k for k in r if k.startswith("threads_")):
        for p in ("float32", "int8"):
            s = r[key][p]["rows_per_s"]
            up = f"{r[key]['speedup_median']:.2f}x" if p == "int8" else "1.00x"
            lines.append(f"| {key.removeprefix('threads_')} | {p} | {s['median']:.1f} | {s['min']:.1f} | "
                         f"{s['max']:.1f} | {up} | {r['accuracy'][p]:.2%} |")
    lines.append(f"\naccuracy change int8 - fp32: {r['accuracy_change_points']:+.2f} points\n")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--train-rows", type=int, default=1000)
    a = ap.parse_args()
    r = bench_quantize(a.rows, a.runs, tuple(int(t) for t in a.threads.split(",")), a.train_rows)
    save_results("quantize", r, summary_md(r))


if __name__ == "__main__":
    main()
