"""The #3 IMDb experiment on this machine: 1,000 LLM-labelled train reviews (seed 0), 500 LLM-labelled extra
(unsup) reviews, 2,000 gold test reviews (seed 0); variants llm, gold, llm+extra (and combined if asked).

    python -m bench.imdb_pipeline [--variants llm,gold,llm+extra,combined] [--name RUN] [--set KEY=VALUE ...]
                                  [--reuse-annotations RUN_DIR]

--reuse-annotations copies an earlier run's annotations (and their manifest entries) so only training onwards
reruns, e.g. `--name imdb-cpu-const --set train.lr_schedule=constant --reuse-annotations bench/results/imdb-cpu`.

Reads ../shared/data/imdb (development data, not a product dependency); the run folder is bench/results/imdb-cpu.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from llambert_ray.config_load import load_config
from llambert_ray.pipeline import run_pipeline
from llambert_ray.report import headline_table

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"


def _seed_annotation_cache(src: Path, dst: Path) -> None:
    """Put an earlier run's LLM answers into this run's annotation cache (keyed by model + prompt hash), so the
    annotate stages read them instead of asking the LLM again even when the config hash changed."""
    from llambert_ray.annotate import make_plan, plan_hash
    from llambert_ray.config import AnnotateConfig
    from llambert_ray.models import resolve_model
    from llambert_ray.tasks import load_task

    cfg = AnnotateConfig()
    folder = dst / "cache" / "annotate" / plan_hash(make_plan(load_task("imdb-sentiment"), cfg,
                                                              resolve_model(cfg.model)), cfg.model)
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("annotations.parquet", "annotations_extra.parquet"):
        if (src / f).exists():
            pd.read_parquet(src / f).to_parquet(folder / f"reused-{f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="llm,gold,llm+extra,combined")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="imdb-cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (YAML value), e.g. train.lr_schedule=constant; repeatable")
    ap.add_argument("--reuse-annotations", metavar="RUN_DIR")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train = pd.read_parquet(IMDB / "imdb_labeled.parquet").query("split == 'train'").sample(1000, random_state=0)
    corpus = out / "imdb_train1000.parquet"
    train[["source_path", "text", "label"]].rename(columns={"source_path": "id"}).to_parquet(corpus)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if a.reuse_annotations:
        src, dst = Path(a.reuse_annotations), out / a.name
        _seed_annotation_cache(src, dst)
        dst.mkdir(parents=True, exist_ok=True)
        stages = json.loads((src / "manifest.json").read_text())["stages"]
        keep = {k: v for k, v in stages.items() if k.startswith("annotate")}
        for f in ("annotations.parquet", "annotations_extra.parquet"):
            if (src / f).is_dir():
                shutil.copytree(src / f, dst / f, dirs_exist_ok=True)
            elif (src / f).exists():
                shutil.copy(src / f, dst)
        manifest = dst / "manifest.json"
        old = json.loads(manifest.read_text()) if manifest.exists() else {"stages": {}}
        old["stages"] = {**old.get("stages", {}), **keep}
        manifest.write_text(json.dumps(old, indent=2))
    cfg = load_config(None, {
        "name": a.name, "output_dir": str(out), "task": "imdb-sentiment", "corpus.path": str(corpus),
        "extra": {"path": str(IMDB / "imdb_unsup.parquet"), "id_column": "source_path", "label_column": None,
                  "sample": 500, "seed": 0},
        "test": {"path": str(IMDB / "imdb_labeled.parquet"), "id_column": "source_path",
                 "filters": {"split": ["test"]}, "sample": 2000, "seed": 0},
        "train.variants": a.variants.split(","), "train.epochs": 2, "train.batch_size": 8,
        "train.max_length": 256, "train.workers": 2, "label.batch_size": 128, "cluster.num_cpus": 2,
        **overrides})
    metrics = run_pipeline(cfg)
    print(headline_table(metrics))


if __name__ == "__main__":
    main()
