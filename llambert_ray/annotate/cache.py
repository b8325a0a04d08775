"""The answer cache: answers stream into CACHE_DIR/<model + prompt hash>/ as parquet parts while the engine
works, rows answered there are never sent again, and a run that fails after answering some rows is run again on
the rows it left."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from llambert_ray.annotate.columns import OUTPUT_COLUMNS, PROMPT_KEY, AnnotationError
from llambert_ray.annotate.engines import AnnotationEngine
from llambert_ray.annotate.prompts import PromptPlan, plan_hash, prompt_keys
from llambert_ray.config import AnnotateConfig
from llambert_ray.progress import Progress

# Runs of the engine over the rows still without an answer, when a run fails after answering some (see annotate).
ATTEMPTS = 3
log = logging.getLogger(__name__)


def _answer_keys(df: pd.DataFrame) -> pd.Series:
    """(id, prompt key) per row; an answer cached without a key (an older cache) matches no row."""
    keys = df[PROMPT_KEY] if PROMPT_KEY in df else pd.Series(None, index=df.index, dtype=object)
    return pd.Series(list(zip(df["id"], keys, strict=True)), index=df.index, dtype=object)


def read_cache(folder: Path, *, errors: bool = False, parts: list[Path] | None = None) -> pd.DataFrame:
    """Every readable part of an annotation cache folder (or just `parts`); parts cut short by a crash are
    deleted. Rows with an engine error are left out (they are retried, not reused) unless `errors`: then an id
    gets its successful answer if it has one, else its latest error."""
    frames = []
    if parts is None:
        parts = sorted(folder.glob("*.parquet"), key=lambda f: f.stat().st_mtime) if folder.is_dir() else []
    for part in parts:
        try:
            frames.append(pd.read_parquet(part))
        except Exception:  # a part being written when the process died: its rows will be redone
            part.unlink(missing_ok=True)
    if not frames:
        return pd.DataFrame(columns=["id", *OUTPUT_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    if "llm_error" in df:
        ok = df["llm_error"].isna()
        # engine failures are retried, not reused; kept (errors=True), a success outranks any error
        df = pd.concat([df[~ok], df[ok]]) if errors else df[ok]
    return df.drop_duplicates(["id", PROMPT_KEY] if PROMPT_KEY in df else "id", keep="last")


def _run_cached(engine: AnnotationEngine, plan: PromptPlan, rows: pd.DataFrame, folder: Path, chunk: int,
                attempts: int, bar: Progress | None = None) -> tuple[int, int]:
    """Send the rows without a cached answer to the engine, streaming answers into `folder`; when a run fails
    (an engine actor lost for good, a node gone, ...) after answering some rows, run again on the rows it left
    without an answer, up to `attempts` runs. Returns (runs, rows sent again). Raises AnnotationError, answers
    so far cached, when a run fails having answered nothing new or the attempts are used up."""
    done = set(_answer_keys(read_cache(folder)))  # answered before, successfully (earlier failures are retried)
    want = _answer_keys(rows)
    before = set(folder.glob("*.parquet")) if folder.is_dir() else set()
    answered: set = set()  # ids this call got an answer (or a per-row engine error) for
    resent = 0
    for attempt in range(1, attempts + 1):
        todo = rows[~want.isin(done | answered)]
        if not len(todo):
            return attempt - 1, resent
        if bar is not None:
            bar.rebase(len(rows) - len(todo))  # answers counted in a failed run are not counted twice
        if attempt > 1:
            resent += len(todo)
            log.warning("annotation run %d/%d: sending the %d rows the last run left without an answer",
                        attempt, attempts, len(todo))
        try:
            engine.write_answers(todo, plan, folder, chunk, bar)
            error = None
        except Exception as e:  # what Ray raises when the run failed; the finished chunks are on disk
            error = e
        new = [f for f in folder.glob("*.parquet") if f not in before] if folder.is_dir() else []
        got = set(_answer_keys(read_cache(folder, errors=True, parts=new))) if new else set()
        progress = len(got - answered)
        answered |= got
        if error is not None:
            left = int((~want.isin(done | answered)).sum())
            if getattr(error, "final", False):  # running again at once would not help (an endpoint down)
                raise AnnotationError(f"annotation stopped with {left} of {len(rows)} rows unanswered: {error}; "
                                      f"every answer so far is cached in {folder}, so rerunning the same "
                                      f"command resumes from there") from error
            log.warning("annotation run %d/%d failed with %s: %s; %d rows answered in it, %d left",
                        attempt, attempts, type(error).__name__, str(error)[:300], progress, left)
            if not progress or attempt == attempts:
                raise AnnotationError(
                    f"annotation failed ({type(error).__name__}: {str(error)[:300]}) with {left} of {len(rows)} "
                    f"rows unanswered after {attempt} run(s); every answer so far is cached in {folder}, so "
                    f"rerunning the same command resumes from there") from error
    left = int((~want.isin(done | answered)).sum())
    if left:  # every run "succeeded" and rows are still missing: never retry that silently
        raise AnnotationError(f"{left} of {len(rows)} rows got no answer in {attempts} annotation runs; the "
                              f"answers so far are cached in {folder}")
    return attempts, resent


def annotate_cached(engine: AnnotationEngine, plan: PromptPlan, ds, cfg: AnnotateConfig, cache_dir: Path,
                     attempts: int) -> tuple[pd.DataFrame, int, int, int]:
    """annotate through the answer cache: (answers, rows found cached, engine runs, rows sent again)."""
    folder = cache_dir / plan_hash(plan, cfg.model)
    rows = ds.to_pandas()  # the rows sent to an LLM: a sample, small enough to hold
    rows[PROMPT_KEY] = prompt_keys(rows)
    cached = len(set(_answer_keys(read_cache(folder))) & set(_answer_keys(rows)))
    with Progress("annotate", len(rows), done=cached) as bar:
        runs, resent = _run_cached(engine, plan, rows, folder, max(cfg.batch_size * 4, 32), attempts, bar)
        bar.update(len(rows))
    df = read_cache(folder, errors=True)  # this run's per-row failures stay in the output, counted
    df = df[_answer_keys(df).isin(set(_answer_keys(rows)))].drop(columns=[PROMPT_KEY])
    meta = rows.set_index("id")
    for col in ("text", "label"):  # keep the input's columns as they are, whatever a part stored
        if col in meta:
            df[col] = df["id"].map(meta[col])
    return df, cached, runs, resent
