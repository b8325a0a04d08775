"""`llambert annotate`: a corpus's seeded sample (with its gold rows where the config asks for them) annotated by
the LLM, written as one folder."""

from __future__ import annotations

import json
from pathlib import Path

from llambert_ray.annotate.gold import gold_for_annotate, run_gold_set
from llambert_ray.annotate.prompts import make_plan
from llambert_ray.annotate.stage import AnnotationSummary, annotate
from llambert_ray.config import RunConfig
from llambert_ray.data import check_corpus_path, read_corpus, sample_corpus
from llambert_ray.models import resolve_model
from llambert_ray.ray_env import init_ray, is_local, require_shared_path
from llambert_ray.storage import write_parquet
from llambert_ray.tasks import load_task


def annotate_corpus(cfg: RunConfig, output_dir: str | Path) -> AnnotationSummary:
    """Read cfg.corpus, take its seeded sample, annotate it; write OUTPUT/annotations.parquet,
    OUTPUT/annotate_summary.json and OUTPUT/logs/ (answers stream into OUTPUT/.annotate_cache/)."""
    # a wrong path, task, model or mode fails here, in seconds, before Ray starts
    task = load_task(cfg.task)
    check_corpus_path(cfg.corpus)
    model_path = resolve_model(cfg.annotate.model, check_hub=is_local(cfg.cluster.address))
    make_plan(task, cfg.annotate, model_path)
    out = Path(output_dir)
    init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=out / "logs")
    require_shared_path(output_dir, "--output")
    ds, _ = read_corpus(cfg.corpus, task)
    subset = sample_corpus(ds, cfg.corpus)
    gold_set = run_gold_set(ds, task, cfg.annotate, encoder=cfg.select.model or cfg.train.model, seed=cfg.corpus.seed)
    subset, gold = gold_for_annotate(subset, gold_set)
    df, summary = annotate(subset, task, cfg.annotate, cache_dir=out / ".annotate_cache", gold=gold)
    write_parquet(df, out / "annotations.parquet")
    (out / "annotate_summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary
