"""Labelling the whole corpus with the trained encoder: Ray Data `map_batches` over an actor pool.

Each actor loads the model once; each batch is split into length-sorted sub-batches so short texts are not
padded to the longest one. Output rows: `id, label, prob_<class>..., error` (+ the gold `label` as `gold` if
present). A row the model cannot process does not fail the run: a sub-batch that raises is retried row by row,
and a row that still fails comes out with label None, NaN probabilities and the reason in `error` (None for
every row that was labelled), so every input id comes out exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from llambert_ray.config import LabelConfig, SqlConfig
from llambert_ray.label_counts import REASON_CHARS, LabelSummary, OutputCounts, output_counts
from llambert_ray.progress import Progress
from llambert_ray.ray_env import torch_threads


class LabelError(ValueError):
    """The model folder or input cannot be labelled; the message says why and what to change."""


def model_labels(model_dir: str | Path) -> list[str]:
    """The label names a trained model folder predicts, in output order."""
    path = Path(model_dir)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise LabelError(f"{path} is not a trained model folder (no config.json); fix: pass the model/ folder "
                         f"written by `llambert train`")
    id2label = json.loads(cfg_path.read_text()).get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)]
    if not labels:
        raise LabelError(f"{path}/config.json has no id2label; fix: train it with `llambert train`")
    return labels


def encoder_precision(device: str, dtype: str = "auto", quantize: str = "none") -> str:
    """The precision the encoder runs at: int8 (dynamic quantization of its Linear layers) where asked and on a
    CPU; else `dtype`, where auto = bfloat16 on a GPU (tensor cores, ~2x fp32 there) and float32 on a CPU (bf16
    matmuls are ~5x slower on AVX2). int8 is a CPU path: on a GPU the encoder keeps bf16."""
    if quantize == "int8" and device == "cpu":
        return "int8"
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def quantize_int8(model):
    """`model` with every nn.Linear dynamically quantized to int8 (weights per output channel, activations per
    batch; fbgemm/onednn kernels on x86). Per-channel weights: per-tensor ones flipped 9 % of a fine-tuned MiniLM's
    IMDb answers (-1.8 points), per-channel 2.4 % (no accuracy lost) at the same speed (bench/quantize.py).
    torch 2.13 marks torch.ao.quantization deprecated, torchao being its successor (not measured here yet); the
    API still works in 2.13, the pinned torch, so its warnings are silenced here."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


class Classifier:
    """A trained sequence classifier, loaded once per Ray actor (or per Serve replica)."""

    # Rows failing one after another with none labelled in between mean the model itself is broken (not some
    # rows): past this many the batch raises, so the run fails instead of writing a corpus of failed rows.
    max_consecutive_failures = 256

    def __init__(self, model_dir: str, max_length: int = 256, sub_batch: int = 32, threads: int | None = None,
                 dtype: str = "auto", device: str | None = None, quantize: str = "none",
                 progress: Callable[[pd.DataFrame], Any] | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        # device None = any GPU this process sees. Callers that know their Ray GPU share pass it: Ray 2.60 leaves
        # CUDA_VISIBLE_DEVICES alone for actors with num_gpus=0, so they would otherwise use a GPU not given them.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = encoder_precision(self.device, dtype, quantize)
        if self.precision == "bfloat16" and self.device == "cuda" and not torch.cuda.is_bf16_supported():
            self.precision = "float32"  # pre-Ampere GPUs
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32 if self.precision == "int8" else getattr(torch, self.precision)
        ).to(self.device).eval()
        if self.precision == "int8":
            self.model = quantize_int8(self.model)
        self.labels = model_labels(model_dir)
        self.max_length = max_length
        self.sub_batch = sub_batch
        self._failing = 0  # rows failed since the last labelled one
        self.progress = progress  # called with each finished batch (the driver's progress line)

    def _forward(self, texts: list[str]) -> np.ndarray:
        """Class probabilities of one sub-batch (one padded forward pass)."""
        import torch

        enc = self.tok(texts, truncation=True, max_length=self.max_length, padding=True,
                       return_tensors="pt").to(self.device)
        return torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu().numpy()

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, shape (len(texts), n_labels), in input order. Raises if any row fails."""
        return self.predict_rows(texts, retry_rows=False)[0]

    def predict_rows(self, texts: list[str], *, retry_rows: bool = True) -> tuple[np.ndarray, list[str | None]]:
        """Class probabilities and a per-row error (None where the row was labelled), in input order.

        With retry_rows, a sub-batch whose forward pass raises is redone one row at a time; a row that fails on
        its own gets NaN probabilities and `"<ExceptionType>: <message>"` as its error. Without it the first
        failure is raised.
        """
        import torch

        errors: list[str | None] = [None] * len(texts)
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32), errors
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.full((len(texts), len(self.labels)), np.nan, dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.sub_batch):
                idx = order[start:start + self.sub_batch]
                try:
                    out[idx] = self._forward([texts[i] for i in idx])
                    self._failing = 0
                    continue
                except Exception:
                    if not retry_rows:
                        raise
                for i in idx:  # one bad row must not take the rows padded with it down
                    try:
                        out[i] = self._forward([texts[i]])[0]
                        self._failing = 0
                    except Exception as e:
                        errors[i] = f"{type(e).__name__}: {str(e)[:500]}"
                        self._failing += 1
                        if self._failing > self.max_consecutive_failures:
                            raise RuntimeError(f"{self._failing} rows in a row failed and none was labelled; "
                                               f"the model, not the rows, is failing. Last: {errors[i]}") from e
        return out, errors

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        probs, errors = self.predict_rows(batch["text"].astype(str).tolist())
        out = prediction_frame(batch, probs, errors, self.labels)
        if self.progress is not None:
            self.progress(out)
        return _typed_table(out)


def prediction_frame(batch: pd.DataFrame, probs: np.ndarray, errors: list[str | None], labels: list[str]
                     ) -> pd.DataFrame:
    """The output rows of a batch: id, label (None where the row failed), prob_<class>..., gold (the batch's
    `label`, when it has one), error, and text_hash passed through (a table sink's: sql.UnlabelledRows)."""
    failed = np.array([e is not None for e in errors], dtype=bool)
    names = np.array(labels, dtype=object)[np.nan_to_num(probs, nan=-1.0).argmax(1)] if len(probs) else \
        np.array([], dtype=object)
    names[failed] = None
    out = pd.DataFrame({"id": batch["id"].to_numpy(), "label": pd.Series(names, dtype="string")})
    for j, name in enumerate(labels):
        out[f"prob_{name}"] = probs[:, j]
    if "label" in batch:
        out["gold"] = batch["label"].to_numpy()
    out["error"] = pd.Series(errors, dtype="string")
    if "text_hash" in batch:
        out["text_hash"] = batch["text_hash"].to_numpy()
    return out


class ServedClassifier:
    """A Ray Data callable that labels batches through a running Ray Serve application (`llambert serve`) by its
    deployment handle: the deployed model (its replicas, scaled by Serve's autoscaler) labels the backlog beside
    its online requests. Same rows out as Classifier: a batch whose call fails is redone row by row, and a row that
    still fails gets its reason in `error`."""

    def __init__(self, app_name: str, labels: list[str], progress: Callable[[pd.DataFrame], Any] | None = None):
        from ray import serve

        self.handle = serve.get_app_handle(app_name)
        self.labels, self.progress = labels, progress

    def _probs(self, texts: list[str]) -> np.ndarray:
        preds = self.handle.classify_texts.remote(texts).result()
        return np.array([[p["probs"][lab] for lab in self.labels] for p in preds], dtype=np.float32)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        texts = batch["text"].astype(str).tolist()
        errors: list[str | None] = [None] * len(texts)
        try:
            probs = self._probs(texts) if texts else np.zeros((0, len(self.labels)), dtype=np.float32)
        except Exception:
            probs = np.full((len(texts), len(self.labels)), np.nan, dtype=np.float32)
            for i, t in enumerate(texts):
                try:
                    probs[i] = self._probs([t])[0]
                except Exception as e:
                    errors[i] = f"{type(e).__name__}: {str(e)[:500]}"
        out = prediction_frame(batch, probs, errors, self.labels)
        if self.progress is not None:
            self.progress(out)
        return _typed_table(out)


def check_served_model(app_name: str, model_dir: str | Path) -> None:
    """The Serve application `app_name` runs on this cluster and serves the model folder `model_dir` (the labels
    and the fingerprint a table keeps are that folder's)."""
    from ray import serve

    try:
        info = serve.get_app_handle(app_name).model_info.remote().result(timeout_s=60)
    except Exception as e:
        raise LabelError(f"no Serve application {app_name!r} answers on this cluster ({type(e).__name__}: "
                         f"{str(e)[:200]}); fix: start it with `llambert serve --model {model_dir}` (its app is "
                         f"named llambert), set label.serve_app to its name, or label.via: actors") from e
    want = str(Path(model_dir).resolve())
    if info.get("model_dir") != want:
        raise LabelError(f"Serve application {app_name!r} serves {info.get('model_dir')}, not --model {want}; fix: "
                         f"pass the served model folder, or serve this one")


def _typed_table(out: pd.DataFrame) -> pa.Table:
    """A batch of predictions as Arrow, its text columns typed as text even when they hold no value (a batch where
    no row failed: error; none was labelled: label; no gold: gold). Ray Data turns a pandas column with no value
    into Arrow's null type, whatever its dtype; each block is written as a file of its own, and a folder whose files
    disagree on a column's type cannot be read as one (pyarrow: "Unsupported cast from large_string to null")."""
    table = pa.Table.from_pandas(out, preserve_index=False)
    for name in ("label", "gold", "error"):
        i = table.schema.get_field_index(name)
        if i >= 0 and pa.types.is_null(table.schema.field(i).type):
            table = table.set_column(i, name, table.column(i).cast(pa.large_string()))
    return table


def label_dataset(ds, model_dir: str | Path, cfg: LabelConfig, progress: Callable[[Any], Any] | None = None):
    """Lazy Dataset of predictions for every row of `ds` (columns id, text[, label]). `progress` (from
    `Progress.tally()`) is called with each finished batch."""
    from ray.data import ActorPoolStrategy

    labels = model_labels(model_dir)  # fail before any actor starts
    pool = (ActorPoolStrategy(size=cfg.concurrency) if not cfg.max_concurrency else
            ActorPoolStrategy(min_size=cfg.concurrency, max_size=max(cfg.max_concurrency, cfg.concurrency)))
    if cfg.via == "serve":  # light actors that call the deployment; the model's work is in Serve's replicas
        from llambert_ray.ray_env import LIGHT_CPUS

        return ds.map_batches(ServedClassifier, batch_format="pandas", batch_size=cfg.batch_size, compute=pool,
                              fn_constructor_kwargs={"app_name": cfg.serve_app, "labels": labels,
                                                     "progress": progress}, num_cpus=LIGHT_CPUS)
    return ds.map_batches(
        Classifier, batch_format="pandas", batch_size=cfg.batch_size,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "max_length": cfg.max_length,
                               "threads": torch_threads(cfg.cpus_per_actor), "sub_batch": cfg.sub_batch_size,
                               "dtype": cfg.dtype, "quantize": cfg.quantize, "progress": progress},
        # a fixed pool, or an autoscaling one: Ray Data adds actors (up to max_concurrency) while rows wait, on
        # nodes that join the cluster mid-stage too
        compute=pool,
        num_cpus=cfg.cpus_per_actor, **({"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor else {}))


def model_fingerprint(model_dir: str | Path) -> str:
    """What identifies a trained model folder in a labels table (its `model` column): a SHA-256 of the names and
    contents of its files (weights, config, tokenizer). A retrained model, or another one, has another."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()[:32]


def label(ds, model_dir: str | Path, cfg: LabelConfig, output: str | Path | SqlConfig, *,
          rows: int | None = None) -> LabelSummary:
    """Label every row of `ds` into OUTPUT: a parquet folder (published whole: data.write_parquet) or a database
    table (SqlConfig: rows upserted by id, sql.write_labels); with cfg.incremental (a table only) just the rows the
    table has no label for from this model, or whose text changed. `rows`: the corpus's row count when known (else
    counted, one more pass over `ds`). Returns its summary.

    Streaming, so the driver's memory does not grow with the corpus: the actors' predictions go to Ray Data's
    write tasks block by block as they are made (its backpressure bounds what waits in the object store; nothing
    is materialized), and the summary is counted afterwards from what was written (`output_counts`; for a table,
    one GROUP BY of this call's rows in the database). Counting what was written, not the batches as they passed,
    keeps it exact when Ray redid a batch (an actor died, a task was retried): its rows are written once (a
    retried write task rewrites its own file name, or upserts the same ids), while the progress tally, called as
    each batch finishes, counts them again.
    """
    from llambert_ray.storage import write_parquet

    labels = model_labels(model_dir)
    if cfg.incremental and not isinstance(output, SqlConfig):
        raise LabelError(f"label.incremental keeps what a labels table already holds; {output} is a parquet "
                         f"folder (written whole); fix: write to a database table (--output DB_URL, label.sql) "
                         f"or leave label.incremental off")
    if cfg.via == "serve":
        check_served_model(cfg.serve_app, model_dir)
    t0 = time.time()
    total = ds.count() if rows is None else rows
    with Progress("label", total) as bar:
        # counted batch by batch inside the classifier: the corpus may be one block, which leaves an operator whole
        tally = bar.tally()
        if isinstance(output, SqlConfig):
            counts = _label_into_table(ds, model_dir, labels, cfg, output, tally)
        else:
            write_parquet(label_dataset(ds, model_dir, cfg, progress=tally), output)
            counts = output_counts(output)
        seconds = time.time() - t0
        kept = max(total - counts.rows, 0) if cfg.incremental else 0
        bar.close(counts.rows + kept)  # the final line says the rows written, not the tally's (redone batches twice)
    return LabelSummary(rows=counts.rows, seconds=seconds, rows_per_s=counts.rows / max(seconds, 1e-9),
                        label_counts=counts.label_counts, accuracy=counts.accuracy, failed=counts.failed,
                        precision=None if cfg.via == "serve" else
                        encoder_precision("cuda" if cfg.gpus_per_actor else "cpu", cfg.dtype, cfg.quantize),
                        errors=counts.top_errors() or None, kept=kept)


def _label_into_table(ds, model_dir: str | Path, labels: list[str], cfg: LabelConfig, output: SqlConfig,
                      progress) -> OutputCounts:
    """Label `ds` (with cfg.incremental only its rows the table lacks from this model) and upsert the predictions
    into the labels table under a new run id; the counts of that run's rows."""
    import uuid

    from llambert_ray.ray_env import LIGHT_CPUS
    from llambert_ray.sql import prepare_labels_table, run_counts, unlabelled_rows, write_labels

    run_id, model = uuid.uuid4().hex, model_fingerprint(model_dir)
    columns = ["id", "label", *[f"prob_{c}" for c in labels], "gold", "error"]
    statement = prepare_labels_table(output, columns)  # the table exists before the incremental look-ups
    todo = unlabelled_rows(ds, output, model, cfg.incremental, LIGHT_CPUS, progress)
    write_labels(label_dataset(todo, model_dir, cfg, progress=progress), output, statement, columns, run_id, model,
                 num_cpus=LIGHT_CPUS)
    counts = OutputCounts()
    for lab, reason, gold, n in run_counts(output, run_id, REASON_CHARS):
        counts.add_group(lab, reason, gold, int(n))
    return counts.ordered()


def frame_blocks(df: pd.DataFrame, cfg: LabelConfig) -> list[pd.DataFrame]:
    """An in-memory frame (e.g. the test split) cut into blocks so that every labelling actor gets work: four a
    pool actor (its largest size), none smaller than a batch. As one block, one actor would label it while the
    others held their GPUs."""
    actors = max(cfg.max_concurrency or cfg.concurrency, cfg.concurrency)
    parts = max(1, min(actors * 4, len(df) // cfg.batch_size))
    return [df.iloc[i * len(df) // parts:(i + 1) * len(df) // parts] for i in range(parts)]


def check_sink(sink: SqlConfig) -> None:
    """Fail before Ray starts when the labels table cannot be reached (connection, password variable)."""
    from llambert_ray.sql import connector

    conn = connector(sink)  # raises for a missing password variable
    if sink.dialect == "sqlite":
        from llambert_ray.sql import sqlite_path

        parent = Path(sqlite_path(sink.url)).expanduser().parent
        if not parent.is_dir():
            raise LabelError(f"the folder of the SQLite file {sink.url} does not exist; fix: create {parent}")
    else:
        from llambert_ray.sql import open_connection

        open_connection(conn, sink.url).close()
