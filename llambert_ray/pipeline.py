"""The whole LlamBERT run: annotate -> train (each variant) -> label the corpus -> evaluate -> report.

One run directory per run (`runs/<name>/`): annotations.parquet, models/<variant>/model, labels.parquet,
metrics.json, report.md / report.html, plots/*.png and manifest.json. Every stage records the hash of the config
it ran with; a rerun skips the stages whose hash and outputs are unchanged, so an interrupted run resumes.

`run_pipeline` is the paper's flow, one stage function a line. Each stage says what its hash covers and which
files it writes, and hands its work, `(config, run) -> record`, to `_run_stage`: the one place that skips, hashes,
times and counts device-seconds. `Run` holds what stages share: the corpus read once, its sample, the test split.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray.accounting import labeller_speeds, stage_cost
from llambert_ray.config import RunConfig, config_hash
from llambert_ray.manifest import Manifest
from llambert_ray.preflight import check_run_inputs
from llambert_ray.tasks import Task


@dataclass
class Run:
    """One pipeline run: what every stage reads (the config, the task, the corpus read once, its seeded sample,
    the gold test split) and what earlier stages leave for later ones (annotations, model folders)."""

    cfg: RunConfig  # what the stages run: annotate.device resolved
    written: RunConfig  # the config as written: what the stage hashes cover
    task: Task
    manifest: Manifest
    log: Callable[[str], None]
    corpus: Any  # the whole corpus, a Ray Dataset
    corpus_rows: int
    test_df: pd.DataFrame | None  # the sampled gold test split; None without one, or without gold labels
    llm_on_test: bool  # the LLM also labels evaluate.llm_test_sample test rows
    started: float
    annotations: pd.DataFrame | None = None  # the LLM's labels of the sample, as it gave them
    train_annotations: pd.DataFrame | None = None  # the same rows after train.label_issues screening
    extra_df: pd.DataFrame | None = None
    model_dirs: dict[str, Path] = field(default_factory=dict)
    engine: Any = None  # annotate.engine_lifetime run: the one engine every annotation call of the run uses
    engine_runs: int = 0  # per-call engines started (each annotate() attempt that reached the engine)

    def path(self, name: str) -> Path:
        return self.cfg.run_dir / name

    def hash_of(self, stage: str) -> str | None:
        return self.manifest.data["stages"].get(stage, {}).get("hash")

    def log_lines(self, lines: list[str], indent: str = "  ") -> None:
        for line in lines:
            self.log(indent + line)

    @cached_property
    def sample(self):
        """The seeded sample of the corpus the LLM annotates (select.strategy random)."""
        from llambert_ray.data import sample_corpus

        return sample_corpus(self.corpus, self.cfg.corpus)

    @cached_property
    def gold(self):
        """The run's gold rows for annotate (gold-knn shots, calibration gold), made once for all its annotate
        calls, never a test row; None when the config asks for none."""
        from llambert_ray.annotate.gold import run_gold_set

        cfg = self.cfg
        test_ids = None if self.test_df is None else set(self.test_df["id"].astype(str))
        return run_gold_set(self.corpus, self.task, cfg.annotate, encoder=cfg.select.model or cfg.train.model,
                            seed=cfg.corpus.seed, exclude=test_ids)


StageWork = Callable[[RunConfig, Run], dict[str, Any]]


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print, *, preflight: bool = True,
                 engine: Any = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline for cfg; returns the metrics (also in run_dir/metrics.json).
    With preflight (the default), `llambert preflight`'s checks run first and a failure stops the run before any
    stage (PreflightError). `engine`: a started `annotate.ServedVLLMEngine` the caller keeps across runs (a
    notebook's: the model loads once for several runs), for annotate.engine_lifetime run; else the run starts its
    own engine(s)."""
    run = _open_run(cfg, log, preflight)
    annotate_stage(run, engine)  # the LLM labels a seeded sample of the corpus (and the extra rows)
    for variant in run.cfg.train.variants:  # the encoder learns from those labels (and/or gold), per variant
        train_stage(run, variant)
    label_stage(run)  # the first variant's model labels the whole corpus
    evaluate_stage(run)  # every variant on the gold test split
    return _finish(run)


def _run_stage(run: Run, name: str, key: tuple[Any, ...], outputs: list[Path], work: StageWork) -> None:
    """Run `work` unless the manifest has `name` done for the same hash of `key` with its outputs present.
    `work` returns the record (rows, tokens, summary..; seconds, else the wall time is taken); the devices the
    stage reserves and their device-seconds are added here, and the record goes into the manifest."""
    stage_hash = config_hash(*key)
    if run.manifest.done(name, stage_hash, outputs):
        run.log(f"[{name}] up to date (hash {stage_hash}), skipped")
        return
    run.log(f"[{name}] running")
    t0 = time.time()
    record = work(run.cfg, run)
    record.setdefault("seconds", time.time() - t0)
    paid = ((record.get("summary") or {}).get("endpoint") or {}).get("usd")  # an endpoint LLM's tokens
    record.update(stage_cost(name, record["seconds"], run.cfg.annotate, run.cfg.train, run.cfg.label, paid))
    run.manifest.record(name, stage_hash, **record)
    run.log(f"[{name}] done in {record['seconds']:.1f}s")


# ------------------------------------------------------------------------------------------ opening a run
def _open_run(cfg: RunConfig, log: Callable[[str], None], preflight: bool) -> Run:
    """Check the inputs (seconds, before Ray starts), start Ray, run the preflight, read the corpus and the test
    split: once per run, for every stage."""
    from llambert_ray.data import read_corpus
    from llambert_ray.ray_env import init_ray, resolve_device

    task = check_run_inputs(cfg)
    started = time.time()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cfg.run_dir, cfg)
    init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=cfg.run_dir / "logs")
    if preflight:
        from llambert_ray.preflight import preflight_or_raise

        preflight_or_raise(cfg, log=log)
    # device: auto on an autoscaling cluster whose GPU groups are at 0: the run's other stages say whether it is a
    # GPU run. The engine gets the resolved device; the stage hashes keep the config as written.
    device = resolve_device(cfg.annotate.device, gpu_elsewhere=cfg.train.use_gpu or cfg.label.gpus_per_actor > 0)
    written, cfg = cfg, cfg.model_copy(update={"annotate": cfg.annotate.model_copy(update={"device": device})})
    test_df = _read_test_split(cfg, task, log)  # first: the LLM may label a sample of it in the same engine call
    corpus, info = read_corpus(cfg.corpus, task)
    llm_on_test = cfg.evaluate.llm_test_sample is not None and test_df is not None
    return Run(cfg=cfg, written=written, task=task, manifest=manifest, log=log, corpus=corpus,
               corpus_rows=info.rows, test_df=test_df, llm_on_test=llm_on_test, started=started)


def _read_test_split(cfg: RunConfig, task: Task, log: Callable[[str], None]) -> pd.DataFrame | None:
    """The sampled gold test split as a frame; None without a `test:` section or without gold labels."""
    from llambert_ray.data import read_corpus, sample_corpus

    if cfg.test is None:
        return None
    test_ds, _ = read_corpus(cfg.test, task)
    test_df = sample_corpus(test_ds, cfg.test).to_pandas()
    if "label" not in test_df or test_df["label"].isna().all():
        log("[evaluate] the test split has no gold labels; classifier accuracy is not measured")
        return None
    return test_df


# ------------------------------------------------------------------------------------------ the stages
ANNOTATIONS, TEST_ANNOTATIONS, EXTRA_ANNOTATIONS = ("annotations.parquet", "test_annotations.parquet",
                                                    "annotations_extra.parquet")
LABELS, TEST_PREDICTIONS = "labels.parquet", "test_predictions.parquet"


def annotate_stage(run: Run, engine: Any = None) -> None:
    """The LLM labels the seeded sample (select.strategy active: rows a probe picks, in rounds), with
    evaluate.llm_test_sample also that many test rows in the same engine call; then the extra rows. `engine`: the
    caller's served engine (run_pipeline), else the run's own."""
    from llambert_ray.annotate import run_engine
    from llambert_ray.screening import screen_for_training
    from llambert_ray.storage import read_parquet_frame

    cfg, written, task_hash = run.cfg, run.written, config_hash(run.task)
    # how the engine runs, not what it answers: left out of the stage hashes
    how: dict[str, Any] = {"engine_lifetime": "call", "tokenize_in_engine": True}
    if written.annotate.endpoint is not None:  # of an endpoint, what shapes its answers: where, and score's tokens
        ep = written.annotate.endpoint
        how["endpoint"] = type(ep)(base_url=ep.base_url, tokenizer=ep.tokenizer, top_logprobs=ep.top_logprobs)
    key = (cfg.corpus, written.annotate.model_copy(update=how), task_hash)
    with run_engine(cfg.annotate, engine) as run.engine:
        if cfg.select.strategy == "active":
            _run_stage(run, "annotate", (*key, cfg.select, cfg.select.model or cfg.train.model),
                       [run.path(ANNOTATIONS)], _annotate_active)
        elif run.llm_on_test:
            _run_stage(run, "annotate", (*key, cfg.test, cfg.evaluate.llm_test_sample),
                       [run.path(ANNOTATIONS), run.path(TEST_ANNOTATIONS)], _annotate_with_test)
        else:
            _run_stage(run, "annotate", key, [run.path(ANNOTATIONS)], _annotate_sample)
        # train.label_issues: LLM labels flagged by cross-validated confident learning dropped / relabelled
        run.annotations = read_parquet_frame(run.path(ANNOTATIONS))
        run.train_annotations = screen_for_training(run.annotations, run.task.labels, cfg.train,
                                                    encoder=cfg.select.model or cfg.train.model,
                                                    max_length=cfg.select.max_length, run_dir=cfg.run_dir, log=run.log)
        if cfg.extra is not None:
            _run_stage(run, "annotate_extra", (cfg.extra, key[1], task_hash), [run.path(EXTRA_ANNOTATIONS)],
                       _annotate_extra)
            run.extra_df = read_parquet_frame(run.path(EXTRA_ANNOTATIONS))
        starts = run.engine.starts if run.engine is not None else run.engine_runs
    if {"annotate", "annotate_extra"} & set(run.manifest.ran):
        # the model loads this many times for the run's annotation calls (1 with engine_lifetime run)
        run.manifest.data["engine_starts"] = {"lifetime": cfg.annotate.engine_lifetime, "starts": starts}
        run.manifest.save()


def _annotate(cfg: RunConfig, run: Run, ds, acfg=None):
    """One annotate() call of the run: its cache, its engine (the run's, or one of its own)."""
    from llambert_ray.annotate import annotate
    from llambert_ray.annotate.gold import gold_for_annotate

    ds, gold = gold_for_annotate(ds, run.gold)  # gold-knn shots / calibration gold
    df, s = annotate(ds, run.task, acfg or cfg.annotate, cache_dir=run.path("cache") / "annotate",
                     engine=run.engine, gold=gold)
    run.engine_runs += s.attempts if run.engine is None else 0
    return df, s


def train_stage(run: Run, variant: str) -> None:
    """Fine-tune the encoder for one of the paper's variants into models/<variant>/model."""
    vdir = run.path("models") / variant.replace("+", "_")
    key = (run.cfg.train.model_copy(update={"variants": [variant]}), run.hash_of("annotate"),
           run.hash_of("annotate_extra"))
    _run_stage(run, f"train[{variant}]", key, [vdir / "model"],
               lambda cfg, run: _train_variant(cfg, run, variant, vdir))
    run.model_dirs[variant] = vdir / "model"


def label_stage(run: Run) -> None:
    """The first variant's model labels every row of the corpus into labels.parquet."""
    cfg = run.cfg
    key = (cfg.label, cfg.corpus.model_copy(update={"sample": None, "fraction": None}),
           run.hash_of(f"train[{cfg.train.variants[0]}]"))
    _run_stage(run, "label", key, [run.path(LABELS)], _label_corpus)


def evaluate_stage(run: Run) -> None:
    """Every variant's predictions on the gold test split (test_predictions.parquet), when there is one."""
    if run.test_df is None:
        return
    cfg = run.cfg
    key = (cfg.test, run.hash_of("label"), *[run.hash_of(f"train[{v}]") for v in cfg.train.variants])
    _run_stage(run, "evaluate", key, [run.path(TEST_PREDICTIONS)], _predict_test)


# ------------------------------------------------------------------------------------------ the stages' work
def _annotate_rows(cfg: RunConfig, run: Run, ds, path: Path) -> dict[str, Any]:
    from llambert_ray.storage import write_parquet

    # answers stream into the cache as they come, so an interrupted run resumes without redoing them
    df, s = _annotate(cfg, run, ds)
    write_parquet(df, path)
    run.log_lines(s.lines())
    return {"rows": s.rows_in, "tokens": s.prompt_tokens, "seconds": s.seconds, "summary": s.to_dict()}


def _annotate_sample(cfg: RunConfig, run: Run) -> dict[str, Any]:
    return _annotate_rows(cfg, run, run.sample, run.path(ANNOTATIONS))


def _annotate_extra(cfg: RunConfig, run: Run) -> dict[str, Any]:
    from llambert_ray.data import read_corpus, sample_corpus

    assert cfg.extra is not None and run.annotations is not None
    ds, _ = read_corpus(cfg.extra, run.task)
    rows = sample_corpus(ds, cfg.extra, exclude=set(run.annotations["id"]))
    return _annotate_rows(cfg, run, rows, run.path(EXTRA_ANNOTATIONS))


def _annotate_with_test(cfg: RunConfig, run: Run) -> dict[str, Any]:
    """The sample and the LLM's test rows in one engine call (one engine start), written apart."""
    from llambert_ray.annotate import apply_offsets, apply_prior_calibration
    from llambert_ray.data import sample_ids
    from llambert_ray.ray_env import from_frames
    from llambert_ray.storage import write_parquet

    assert cfg.test is not None and run.test_df is not None and cfg.evaluate.llm_test_sample is not None
    test_df, labels = run.test_df, run.task.labels
    test_rows = test_df[test_df["id"].isin(set(sample_ids(
        test_df["id"], n=min(cfg.evaluate.llm_test_sample, len(test_df)), seed=cfg.test.seed)))]
    sample = run.sample.to_pandas()
    both = pd.concat([sample, test_rows[sample.columns.intersection(test_rows.columns)]],
                     ignore_index=True).drop_duplicates("id")
    prior = cfg.annotate.calibration == "prior" and cfg.annotate.mode == "score"
    # prior calibration is fitted on the annotated sample alone, then the same offsets label the test rows
    acfg = cfg.annotate.model_copy(update={"calibration": "none"}) if prior else cfg.annotate
    df, s = _annotate(cfg, run, from_frames(both), acfg)
    ann, test_ann = df[df["id"].isin(set(sample["id"]))].copy(), df[df["id"].isin(set(test_rows["id"]))].copy()
    offsets = s.calibration
    if prior:
        ann, offsets = apply_prior_calibration(ann, labels, cfg.annotate.label_prior)
        if offsets:
            test_ann = apply_offsets(test_ann, labels, offsets)
    write_parquet(ann.reset_index(drop=True), run.path(ANNOTATIONS))
    write_parquet(test_ann.reset_index(drop=True), run.path(TEST_ANNOTATIONS))
    run.log_lines(s.lines())
    acc = _llm_accuracy(run, ann, test_ann, offsets)
    return {"rows": s.rows_in, "tokens": s.prompt_tokens, "seconds": s.seconds,
            "annotated_rows": len(ann), "test_rows": len(test_ann),
            "summary": {**s.to_dict(), "calibration": offsets, "accuracy": acc.get("annotated"),
                        "test_accuracy": acc.get("test"),
                        "label_counts": {str(k): int(v) for k, v in ann["llm_label"].value_counts().items()}}}


def _llm_accuracy(run: Run, ann: pd.DataFrame, test_ann: pd.DataFrame, offsets) -> dict[str, Any]:
    """The LLM's accuracy against gold on its annotated rows and its test rows, logged."""
    from llambert_ray.metrics import classification_metrics

    acc = {name: classification_metrics(part["label"], part["llm_label"], run.task.labels)["accuracy"]
           for name, part in (("annotated", ann), ("test", test_ann)) if "label" in part}
    run.log(f"  of these: {len(ann)} rows to train on, {len(test_ann)} test rows; LLM accuracy vs gold "
            + ", ".join(f"{k} {v:.2%}" for k, v in acc.items() if v is not None)
            + (f" (calibration offsets {({k: round(v, 3) for k, v in offsets.items()})})" if offsets else ""))
    return acc


def _annotate_active(cfg: RunConfig, run: Run) -> dict[str, Any]:
    """select.strategy active: corpus.sample LLM calls spent in select.rounds rounds, each round's rows chosen by
    a probe on encoder embeddings (llambert_ray.active). Writes annotations.parquet and active_rounds.json (the
    probe's test accuracy after each round, when the run has a gold test split)."""
    from llambert_ray.active import run_rounds
    from llambert_ray.data import sample_corpus
    from llambert_ray.embeddings import embed_in_order
    from llambert_ray.models import resolve_model
    from llambert_ray.ray_env import from_frames
    from llambert_ray.storage import write_parquet

    sel = cfg.select
    pool_ds = run.corpus if sel.pool_rows is None else sample_corpus(
        run.corpus, cfg.corpus.model_copy(update={"sample": sel.pool_rows, "fraction": None}))
    pool = pool_ds.to_pandas()
    test = run.test_df if run.test_df is not None else pool.iloc[:0]
    if run.engine is not None and run.engine.start_soon(spare_cpus=sel.cpus_per_actor):
        run.log("  the run's engine starts meanwhile")
    run.log(f"  embedding the candidate pool{' and the test rows' if len(test) else ''} with "
            f"{sel.model or cfg.train.model}")
    # one pass, one model load, for both
    x_all = embed_in_order(pd.concat([pool[["text"]], test[["text"]]]), resolve_model(sel.model or cfg.train.model),
                           sel)
    ids, x = pool["id"].to_numpy(), x_all[:len(pool)]
    x_test = x_all[len(pool):] if len(test) else None
    y_test = test["label"].tolist() if len(test) else None
    pool = pool.set_index("id")
    summaries = []

    def llm(round_ids: list[Any]):
        sub = from_frames(pool.loc[round_ids].reset_index())
        df, s = _annotate(cfg, run, sub)
        run.log_lines(s.lines(), "    ")
        summaries.append(s)
        return df

    budget = cfg.corpus.sample or len(ids)
    answers, result = run_rounds(ids, x, run.task.labels, budget, sel, llm, x_test=x_test, y_test=y_test,
                                 seed=cfg.corpus.seed, log=run.log)
    write_parquet(answers.sort_values("id", kind="stable").reset_index(drop=True), run.path(ANNOTATIONS))
    run.path("active_rounds.json").write_text(json.dumps(result.to_dict(), indent=2))
    return {"rows": len(answers), "tokens": sum(s.prompt_tokens for s in summaries),
            "seconds": sum(s.seconds for s in summaries), "rounds": result.to_dict()["rounds"],
            "summary": {"rows_in": len(answers), "labelled": sum(s.labelled for s in summaries),
                        "failed": sum(s.failed for s in summaries), "strategy": "active"}}


def _train_variant(cfg: RunConfig, run: Run, variant: str, vdir: Path) -> dict[str, Any]:
    from llambert_ray.train import fit_variant

    if variant == "combined" and "llm" in run.model_dirs and run.extra_df is None:
        results, reuses = [_continue_from_llm(cfg, run, vdir)], {"reuses": "train[llm]"}
    else:
        _, results = fit_variant(variant, run.train_annotations, run.task.labels, cfg.train, vdir, extra=run.extra_df,
                                 log=run.log)
        reuses = {}
    return {"rows": sum(r.rows for r in results), "seconds": sum(r.seconds for r in results),
            "stages": [r.to_dict() for r in results], **reuses}


def _continue_from_llm(cfg: RunConfig, run: Run, vdir: Path):
    """combined's first stage is the llm variant itself (same rows, same config): continue from its model."""
    from llambert_ray.train import fit, variant_stages

    gold = variant_stages("gold", run.train_annotations)[0][1]
    run.log(f"  combined: stage 1/2 = the llm variant's model; stage 2/2 on {len(gold)} gold-labelled rows")
    r = fit(gold, run.task.labels, cfg.train, vdir / "stage2", init_model=str(run.model_dirs["llm"].resolve()),
            name="combined-stage2")
    shutil.rmtree(vdir / "model", ignore_errors=True)
    os.replace(r.model_dir, vdir / "model")
    if not cfg.train.keep_checkpoints:  # as fit_variant: the stage's checkpoints go once the model is in
        shutil.rmtree(vdir / "stage2", ignore_errors=True)
    return r


def _label_corpus(cfg: RunConfig, run: Run) -> dict[str, Any]:
    from llambert_ray.label import label

    s = label(run.corpus, run.model_dirs[cfg.train.variants[0]], cfg.label, run.path(LABELS))
    run.log_lines(s.lines())
    return {"rows": s.rows, "failed": s.failed, "seconds": s.seconds, "summary": s.to_dict()}


def _predict_test(cfg: RunConfig, run: Run) -> dict[str, Any]:
    from llambert_ray.evaluate import predict_gold
    from llambert_ray.label import frame_blocks
    from llambert_ray.ray_env import from_frames
    from llambert_ray.storage import write_parquet

    assert run.test_df is not None
    test_ds = from_frames(frame_blocks(run.test_df[["id", "text", "label"]], cfg.label))  # work for every actor
    write_parquet(predict_gold(test_ds, run.model_dirs, cfg.label), run.path(TEST_PREDICTIONS))
    return {"rows": len(run.test_df) * len(run.model_dirs)}


# ------------------------------------------------------------------------------------------ metrics and report
def _finish(run: Run) -> dict[str, Any]:
    """metrics.json, label_issues.parquet and the report, from the stages' outputs (whether they ran now or were
    up to date)."""
    from llambert_ray.report import write_report

    cfg, manifest = run.cfg, run.manifest
    metrics = _quality_metrics(run)
    metrics["labels_summary"] = manifest.data["stages"]["label"].get("summary")
    metrics["speed"] = labeller_speeds(manifest.data["stages"], cfg.annotate, cfg.train, cfg.label)
    metrics["run"] = {"seconds": time.time() - run.started, "stages_ran": list(manifest.ran),
                      "stages_reused": [st for st in manifest.data["stages"] if st not in manifest.ran],
                      "aims": cfg.evaluate.model_dump(exclude={"llm_test_sample"})}
    issues = _label_issues(run, metrics)
    metrics["report"] = str(write_report(cfg.run_dir, metrics, manifest.data, run.annotations, issues=issues))
    manifest.save()
    return metrics


def _quality_metrics(run: Run) -> dict[str, Any]:
    """The run's quality metrics (evaluate.quality_metrics) from its annotations and test predictions."""
    from llambert_ray.evaluate import quality_metrics
    from llambert_ray.metrics import llm_label_warnings
    from llambert_ray.storage import read_parquet_frame

    cfg, ann = run.cfg, run.annotations
    assert ann is not None
    test_ann = read_parquet_frame(run.path(TEST_ANNOTATIONS)) if run.llm_on_test else None
    preds = read_parquet_frame(run.path(TEST_PREDICTIONS)) if run.test_df is not None else None
    return {"task": run.task.name, "llm_model": cfg.annotate.model, "encoder": cfg.train.model,
            "corpus_rows": run.corpus_rows, "annotated_rows": len(ann),
            "llm_warnings": llm_label_warnings(ann, run.task.labels),
            **quality_metrics(ann, run.task.labels, cfg.train.variants, test_ann, preds)}


def _label_issues(run: Run, metrics: dict[str, Any]) -> pd.DataFrame | None:
    """LLM labels the trained classifier contradicts with confidence: label_issues.parquet and their summary."""
    from llambert_ray.screening import label_issue_summary, label_issues
    from llambert_ray.storage import read_parquet_frame, write_parquet

    try:
        # the annotated rows' probabilities only: labels.parquet holds the whole corpus, the annotations a sample
        preds = read_parquet_frame(run.path(LABELS), ["id", *[f"prob_{c}" for c in run.task.labels]],
                                   ids=run.annotations["id"])
        issues = label_issues(run.annotations, preds, run.task.labels)
    except ValueError as e:  # a model trained with other label names than the task's: nothing to compare
        run.log(f"[label issues] skipped: {e}")
        return None
    write_parquet(issues, run.path("label_issues.parquet"))
    metrics["label_issues"] = label_issue_summary(issues, run.annotations)
    return issues
