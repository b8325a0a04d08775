"""The annotation stage: annotate() labels the rows of a Ray Dataset with the LLM through an engine, the answer
cache and calibration, and sums up what it did."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray.annotate.cache import ATTEMPTS, annotate_cached
from llambert_ray.annotate.calibration import (
    CONTENT_FREE_TEXTS,
    apply_calibration,
    apply_gold_calibration,
    apply_prior_calibration,
)
from llambert_ray.annotate.columns import OUTPUT_COLUMNS, SHOTS_COLUMN, AnnotationError
from llambert_ray.annotate.endpoint import EndpointEngine, EndpointUsage
from llambert_ray.annotate.engines import AnnotationEngine, VLLMEngine
from llambert_ray.annotate.prompts import PromptPlan, make_plan
from llambert_ray.annotate.served import ENGINE_FIELDS, ServedVLLMEngine
from llambert_ray.config import AnnotateConfig
from llambert_ray.metrics import llm_label_warnings
from llambert_ray.models import resolve_model
from llambert_ray.progress import Progress
from llambert_ray.ray_env import from_frames
from llambert_ray.tasks import Task

_GOLD_PREFIX = "__llambert_gold_"
_CF_PREFIX = "__llambert_content_free_"


@dataclass
class AnnotationSummary:
    rows_in: int
    labelled: int
    dropped: int
    failed: int
    seconds: float
    rows_per_s: float
    prompt_tokens: int
    prompt_tokens_per_s: float
    mode: str
    style: str
    shots: int
    model: str
    label_counts: dict[str, int]
    accuracy: float | None = None  # against gold labels, over the rows with one (dropped rows count as wrong)
    gold_rows: int = 0  # rows with a gold label, the ones accuracy is measured on
    calibration: dict[str, float] | None = None  # log-prob offsets subtracted per label (content-free / prior)
    cached: int = 0  # rows whose answers were reused from the cache of an earlier (interrupted) run
    attempts: int = 1  # engine runs (> 1: a run failed, the rows it left were sent again; 0: all were cached)
    resent: int = 0  # rows sent to the engine again after a failed run
    calibration_report: dict[str, Any] | None = None  # calibration gold: before / after on held-out gold rows
    shots_from: str = "fixed"  # where each row's examples came from: fixed (the task's) or gold-knn (nearest gold)
    warnings: list[str] = field(default_factory=list)  # why these labels may not be worth training on (metrics)
    endpoint: dict[str, Any] | None = None  # an endpoint's traffic in this call: requests, retries, 429s, tokens, usd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        acc = f", accuracy vs gold {self.accuracy:.2%}" if self.accuracy is not None else ""
        if acc and self.gold_rows < self.rows_in:  # a corpus mixing labelled and unlabelled rows
            acc += (f" (on the {self.gold_rows} of {self.rows_in} rows that have a gold label: the rest are not "
                    f"measured)")
        return [f"annotated {self.rows_in} rows with {self.model} ({self.mode} mode, {self.style} prompt, "
                f"{self.shots} shots{f' ({self.shots_from})' if self.shots else ''}) in {self.seconds:.1f}s",
                f"  labelled {self.labelled}, dropped {self.dropped} (unparseable), failed {self.failed}{acc}"
                + (f"; {self.cached} reused from the cache" if self.cached else "")
                + (f"; {self.attempts} attempts ({self.resent} rows sent again after a failed run)"
                   if self.attempts > 1 else ""),
                f"  {self.rows_per_s:.2f} rows/s, {self.prompt_tokens_per_s:.0f} prompt tokens/s; "
                f"labels {self.label_counts}"] + self._endpoint_lines() + self._calibration_lines() \
            + [f"  WARNING: {w}" for w in self.warnings]

    def _endpoint_lines(self) -> list[str]:
        e = self.endpoint
        if not e:
            return []
        usd = f", ${e['usd']:.4f}" if e.get("usd") is not None else ""
        return [f"  endpoint: {e['requests']} requests ({e['retries']} retries: {e['rate_limited']} rate-limited, "
                f"{e['server_errors']} server errors, {e['timeouts']} timeouts, {e['malformed']} malformed), "
                f"{e['prompt_tokens']} prompt + {e['completion_tokens']} answer tokens{usd}"]

    def _calibration_lines(self) -> list[str]:
        r = self.calibration_report
        if not r:
            return []
        b, a = r["before"], r["after"]
        return [f"  gold calibration, on {r['held_out']} held-out gold rows: accuracy {b['accuracy']:.2%} -> "
                f"{a['accuracy']:.2%}, macro F1 {b['macro_f1']:.2%} -> {a['macro_f1']:.2%}"
                + ("" if r.get("applied", True) else "; not applied (worse on gold it was not fitted on): the "
                   "labels are the LLM's own; fix: more gold rows (annotate.gold_rows) or calibration: none")]


def annotate(ds, task: Task, cfg: AnnotateConfig, *, engine: AnnotationEngine | None = None,
             cache_dir: str | Path | None = None, attempts: int = ATTEMPTS, gold: pd.DataFrame | None = None):
    """Label every row of `ds` (columns id, text, label?) with the LLM. Returns (pandas frame, summary).

    Rows keep their ids; unparseable answers get llm_label null; engine failures are recorded per row in
    llm_error instead of failing the run. With cache_dir, answers are streamed to
    CACHE_DIR/<model + prompt hash>/ as the engine finishes each chunk of rows, and rows already answered there
    (by an interrupted run with the same model and prompt) are not sent to the engine again. An engine actor
    that dies is restarted by Ray Data, which retries its batches; if a run fails anyway after answering some
    rows, the rows it left are sent again (up to `attempts` runs, needs cache_dir). Every input row comes out
    exactly once.

    With cfg.calibration "gold", `gold` (columns id, text, label[, llm_shots]: e.g. annotate.gold.gold_rows)
    is sent to the LLM with the rows (ids prefixed, left out of the output); per-label offsets are fitted to the
    LLM's scores on it and applied to every row (summary.calibration; summary.calibration_report: before / after
    on held-out gold rows).
    """
    if engine is None and cfg.endpoint is not None:
        with EndpointEngine(cfg) as client:  # one call's client, closed after it
            return annotate(ds, task, cfg, engine=client, cache_dir=cache_dir, attempts=attempts, gold=gold)
    model_path = resolve_model(cfg.model) if cfg.endpoint is None else None  # an endpoint's model is its own
    plan = make_plan(task, cfg, model_path)
    engine = engine or VLLMEngine(cfg, model_path)
    usage = getattr(engine, "usage", None)
    usage = replace(usage) if isinstance(usage, EndpointUsage) else None  # this call's traffic: what it adds
    calibrate = cfg.calibration == "content-free" and plan.mode == "score"
    if calibrate:
        ds = ds.union(_content_free_rows(ds))
    if cfg.calibration == "gold":
        if gold is None or gold.empty:
            raise AnnotationError("annotate.calibration gold needs gold-labelled rows, and none were given; fix: "
                                  "a corpus with a label column (annotate.gold_rows of them are used)")
        ds = ds.union(_gold_rows_for(ds, gold))
    t0 = time.time()
    cached, runs, resent = 0, 1, 0
    if cache_dir is None:
        with Progress("annotate", None) as bar:
            df = bar.count(engine.run(ds, plan)).to_pandas()
            bar.update(len(df))
    else:
        df, cached, runs, resent = annotate_cached(engine, plan, ds, cfg, Path(cache_dir), attempts)
    seconds = time.time() - t0
    for col in OUTPUT_COLUMNS:
        if col not in df:
            df[col] = None
    offsets = report = None
    if cfg.calibration == "gold":
        is_gold = df["id"].astype(str).str.startswith(_GOLD_PREFIX)
        df, offsets, report = apply_gold_calibration(df[~is_gold].copy(), df[is_gold], task.labels,
                                                     temperature=cfg.calibration_temperature)
    if calibrate:
        cf = df["id"].astype(str).str.startswith(_CF_PREFIX)
        df, offsets = apply_calibration(df[~cf].copy(), df[cf], task.labels)
    elif cfg.calibration == "prior" and plan.mode == "score":
        df, offsets = apply_prior_calibration(df, task.labels, cfg.label_prior)
    summary = _summary(df, plan, cfg.model, seconds, offsets=offsets, cached=cached, attempts=runs, resent=resent,
                       calibration_report=report, shots_from=cfg.shots_from,
                       endpoint=engine.usage.minus(usage).to_dict(cfg.endpoint) if usage is not None else None)
    return df.sort_values("id", kind="stable").reset_index(drop=True), summary


def _summary(df: pd.DataFrame, plan: PromptPlan, model: str, seconds: float, **done: Any) -> AnnotationSummary:
    """What an annotate() call did, from its answers (`done`: cached, attempts, resent, offsets, calibration_report)."""
    failed = int(df["llm_error"].notna().sum())
    labelled = int(df["llm_label"].notna().sum())
    tokens = int(df["prompt_tokens"].fillna(0).sum())
    acc, n_gold = None, 0
    if "label" in df and df["label"].notna().any():
        gold = df[df["label"].notna()]
        acc, n_gold = float((gold["llm_label"] == gold["label"]).fillna(False).astype(bool).mean()), len(gold)
    return AnnotationSummary(
        rows_in=len(df), labelled=labelled, dropped=len(df) - labelled - failed, failed=failed,
        seconds=seconds, rows_per_s=len(df) / seconds if seconds else 0.0, prompt_tokens=tokens,
        prompt_tokens_per_s=tokens / seconds if seconds else 0.0, mode=plan.mode, style=plan.style,
        shots=plan.shots, model=model,
        label_counts={str(k): int(v) for k, v in df["llm_label"].value_counts().items()}, accuracy=acc,
        gold_rows=n_gold,
        calibration=done.pop("offsets"), warnings=llm_label_warnings(df, plan.task.labels), **done)


def _content_free_rows(ds):
    """The content-free rows, with the same (string) columns as the corpus rows (id, text[, label])."""
    cols = ds.columns()
    rows = [{c: (f"{_CF_PREFIX}{i}" if c == "id" else t if c == "text" else None) for c in cols}
            for i, t in enumerate(CONTENT_FREE_TEXTS)]
    return from_frames(pd.DataFrame(rows, columns=cols).astype("string"))


def _gold_rows_for(ds, gold: pd.DataFrame):
    """The gold rows as extra rows of `ds`: ids prefixed, the same (string) columns (llm_shots kept)."""
    cols = list(dict.fromkeys([*ds.columns(), *(c for c in (SHOTS_COLUMN,) if c in gold)]))
    g = gold.reindex(columns=cols).copy()
    g["id"] = _GOLD_PREFIX + gold["id"].astype(str)
    return from_frames(g.astype("string"))


@contextmanager
def run_engine(cfg: AnnotateConfig, engine: ServedVLLMEngine | None = None
               ) -> Iterator[ServedVLLMEngine | EndpointEngine | None]:
    """The engine a pipeline run passes to each of its annotate() calls: with annotate.endpoint one endpoint client
    for the whole run (its rate limits and usage shared by every call); else one served engine for the whole run with
    engine_lifetime run, else None (each call starts its own). `engine`: one the caller started and keeps (a
    notebook's or a test's, across runs): used as it is, not stopped here; it must be the engine cfg describes."""
    if engine is not None:
        if cfg.engine_lifetime != "run":
            raise ValueError("an engine passed to a run needs annotate.engine_lifetime: run; fix: set it in the "
                             "config, or pass no engine")
        have = {f: getattr(engine.cfg, f) for f in ENGINE_FIELDS}
        have["device"] = getattr(engine, "device", have["device"])  # as resolved when it was made
        differ = {f: (have[f], getattr(cfg, f)) for f in ENGINE_FIELDS
                  if have[f] != getattr(cfg, f) and "auto" not in (have[f], getattr(cfg, f))}
        if differ:
            raise ValueError(f"the engine passed to the run is not the one annotate describes: "
                             f"{', '.join(f'{k} {a!r} (engine) vs {b!r} (config)' for k, (a, b) in differ.items())}; "
                             f"fix: start the engine from the run's annotate config, or pass none")
        yield engine
        return
    if cfg.endpoint is not None:
        with EndpointEngine(cfg) as client:
            yield client
        return
    if cfg.engine_lifetime != "run":
        yield None
        return
    with ServedVLLMEngine(cfg, resolve_model(cfg.model)) as engine:
        yield engine
