"""The #3 IMDb experiment on this machine: 1,000 LLM-labelled train reviews (seed 0), 500 LLM-labelled extra
(unsup) reviews, 2,000 gold test reviews (seed 0); variants llm, gold, llm+extra (and combined if asked).

    python -m bench.imdb_pipeline [--variants llm,gold,llm+extra,combined]

Reads ../shared/data/imdb (development data, not a product dependency); the run folder is bench/results/imdb-cpu.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from llambert_ray.config import load_config
from llambert_ray.pipeline import run_pipeline
from llambert_ray.report import headline_table

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="llm,gold,llm+extra,combined")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train = pd.read_parquet(IMDB / "imdb_labeled.parquet").query("split == 'train'").sample(1000, random_state=0)
    corpus = out / "imdb_train1000.parquet"
    train[["source_path", "text", "label"]].rename(columns={"source_path": "id"}).to_parquet(corpus)
    cfg = load_config(None, {
        "name": "imdb-cpu", "output_dir": str(out), "task": "imdb-sentiment", "corpus.path": str(corpus),
        "extra": {"path": str(IMDB / "imdb_unsup.parquet"), "id_column": "source_path", "label_column": None,
                  "sample": 500, "seed": 0},
        "test": {"path": str(IMDB / "imdb_labeled.parquet"), "id_column": "source_path",
                 "filters": {"split": ["test"]}, "sample": 2000, "seed": 0},
        "train.variants": a.variants.split(","), "train.epochs": 2, "train.batch_size": 8,
        "train.max_length": 256, "train.workers": 2, "label.batch_size": 128, "cluster.num_cpus": 2})
    metrics = run_pipeline(cfg)
    print(headline_table(metrics))


if __name__ == "__main__":
    main()
