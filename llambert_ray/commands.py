"""The single-stage commands (`llambert annotate`, `llambert train`, `llambert label`, and their Ray jobs): each
checks its inputs before Ray starts, reads them, runs its stage with the stage's own settings and writes one
folder (or table). `llambert run` is llambert_ray.pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray import ray_env  # called by its module: tests stand in for init_ray there
from llambert_ray.annotate.gold import gold_for_annotate, run_gold_set, wants_gold, warn_gold_overlap
from llambert_ray.annotate.prompts import make_plan
from llambert_ray.annotate.stage import AnnotationSummary, annotate
from llambert_ray.config import CorpusConfig, RunConfig, SqlConfig
from llambert_ray.data import check_corpus_path, read_corpus, sample_corpus
from llambert_ray.label import LabelError, check_sink, label, model_labels
from llambert_ray.label_counts import LabelSummary
from llambert_ray.models import resolve_model
from llambert_ray.ray_env import from_frames
from llambert_ray.storage import is_uri, write_parquet
from llambert_ray.tasks import load_task
from llambert_ray.train import TrainResult, fit_variant, read_training_frame


def annotate_corpus(cfg: RunConfig, output_dir: str | Path, gold_path: str | None = None) -> AnnotationSummary:
    """Read cfg.corpus, take its seeded sample, annotate it; write OUTPUT/annotations.parquet,
    OUTPUT/annotate_summary.json and OUTPUT/logs/ (answers stream into OUTPUT/.annotate_cache/).

    Gold rows (gold-knn shots, calibration gold) come from `gold_path` (a labelled corpus, read with cfg.corpus's
    columns), else from the corpus's own labelled rows that are not being annotated; never a row being annotated,
    and a gold row with the same text as one is warned about."""
    # a wrong path, task, model or mode fails here, in seconds, before Ray starts
    task = load_task(cfg.task)
    check_corpus_path(cfg.corpus)
    gold_cfg = None
    if gold_path is not None:
        gold_cfg = cfg.corpus.model_copy(update={"path": gold_path, "sql": None, "sample": None, "fraction": None,
                                                 "filters": {}})
        check_corpus_path(gold_cfg, "--gold")
    model_path = (resolve_model(cfg.annotate.model, check_hub=ray_env.is_local(cfg.cluster.address))
                  if cfg.annotate.endpoint is None else None)  # an endpoint's model is the endpoint's
    make_plan(task, cfg.annotate, model_path)
    out = Path(output_dir)
    ray_env.init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=out / "logs")
    ray_env.require_shared_path(output_dir, "--output")
    ds, _ = read_corpus(cfg.corpus, task)
    subset = sample_corpus(ds, cfg.corpus)
    gold_set = None
    if wants_gold(cfg.annotate):
        rows = subset.to_pandas()  # the sample sent to the LLM: small enough to hold
        source = read_corpus(gold_cfg, task)[0] if gold_cfg is not None else ds
        gold_set = run_gold_set(source, task, cfg.annotate, encoder=cfg.select.model or cfg.train.model,
                                seed=cfg.corpus.seed, exclude=set(rows["id"].astype(str)))
        warn_gold_overlap(gold_set.rows, rows, "--gold" if gold_cfg is not None else "--input")
        subset = from_frames(rows)
    subset, gold = gold_for_annotate(subset, gold_set)
    df, summary = annotate(subset, task, cfg.annotate, cache_dir=out / ".annotate_cache", gold=gold)
    write_parquet(df, out / "annotations.parquet")
    (out / "annotate_summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


def train_from_files(cfg: RunConfig, train_path: str | Path, output: str | Path, *, extra_path: str | None = None,
                     eval_path: str | None = None, evaluate: Callable[[Path], dict[str, Any]] | None = None
                     ) -> tuple[TrainResult, dict[str, Any] | None]:
    """The `llambert train` command: train cfg.train.variants[0] from files. With eval_path (checked before Ray
    starts), `evaluate(model_dir)` scores the model on it: the caller's, as evaluating needs the labelling stage,
    which comes after this one."""

    # a wrong path, task or model fails here, in seconds, before Ray starts
    task = load_task(cfg.task)
    for flag, path in (("--train", train_path), ("--extra", extra_path), ("--eval", eval_path)):
        if path is not None:
            check_corpus_path(CorpusConfig(path=str(path)), flag)  # type: ignore[arg-type]
    resolve_model(cfg.train.model, check_hub=ray_env.is_local(cfg.cluster.address))
    ray_env.init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=Path(output) / "logs")
    ray_env.require_shared_path(output, "--output")  # workers on every node write checkpoints there
    annotations = read_training_frame(train_path, task)
    extra = read_training_frame(extra_path, task) if extra_path else None
    variant = cfg.train.variants[0]
    model_dir, results = fit_variant(variant, annotations, task.labels, cfg.train, output, extra=extra)
    summary = TrainResult(model_dir=str(model_dir), rows=sum(r.rows for r in results), epochs=cfg.train.epochs,
                          seconds=sum(r.seconds for r in results),
                          samples_per_s=float(pd.Series([r.samples_per_s for r in results]).mean()),
                          metrics={"stages": [r.to_dict() for r in results]})
    metrics = evaluate(model_dir) if eval_path and evaluate else None
    Path(output, "train_summary.json").write_text(json.dumps({**summary.to_dict(), "eval": metrics}, indent=2,
                                                             default=str))
    return summary, metrics


def label_corpus(cfg: RunConfig, model_dir: str | Path, output: str | Path | None, report_dir: str | Path | None = None
                 ) -> LabelSummary:
    """The `llambert label` command: read cfg.corpus (all rows) and label it with the model folder into OUTPUT
    (labels.parquet: a local / shared-disk path, or s3:// / gs://, published by a manifest), or into the table
    cfg.label.sql when OUTPUT is None. label_summary.json and logs/ go to REPORT_DIR (default: OUTPUT's folder;
    ./label-report for a table or a bucket, where label_summary.json is also written beside labels.parquet)."""

    model_labels(model_dir)  # a wrong model folder, path or task fails here, before Ray starts
    check_corpus_path(cfg.corpus)
    sink: str | Path | SqlConfig
    if cfg.label.incremental and (output is not None or cfg.label.sql is None):
        raise LabelError("label.incremental (--incremental) keeps what a labels table already holds; this run "
                         "writes a parquet folder (written whole); fix: --output a database URL (or set "
                         "label.sql), or leave it off")
    if output is None:
        if cfg.label.sql is None:
            raise LabelError("no output given; fix: pass --output FOLDER or a database URL, or set label.sql")
        sink = cfg.label.sql
        check_sink(sink)
    else:
        sink = output

    if report_dir is not None:
        report = Path(report_dir)
    else:
        report = Path("label-report") if output is None or is_uri(output) else Path(str(output)).parent
    task = load_task(cfg.task) if cfg.task else None
    ray_env.init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=report / "logs")
    if isinstance(sink, SqlConfig):
        if sink.dialect == "sqlite":
            from llambert_ray.sql import sqlite_path

            ray_env.require_shared_path(sqlite_path(sink.url), "the SQLite file of label.sql.url")
    else:
        ray_env.require_shared_path(sink, "--output")
    ds, info = read_corpus(cfg.corpus, task, hold=False)  # one pass: streamed, never held whole
    summary = label(ds, model_dir, cfg.label, sink, rows=info.rows or None)
    summary.dropped = info.dropped
    report.mkdir(parents=True, exist_ok=True)
    (report / "label_summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    if not isinstance(sink, SqlConfig) and is_uri(sink):  # beside the labels in the bucket too
        from llambert_ray.storage import join_path, write_text

        head, sep, query = str(sink).partition("?")
        write_text(join_path(head.rstrip("/").rsplit("/", 1)[0] + sep + query, "label_summary.json"),
                   json.dumps(summary.to_dict(), indent=2))
    return summary
