"""Fine-tuning the encoder: Ray Train `TorchTrainer` workers running DeepSpeed (ZeRO 0-3), fed by Ray Data shards.

CPU (packaged MiniLM, fp32, gloo) and GPU clusters (roberta-large, bf16, nccl) run the same loop. Each epoch ends
with a DeepSpeed checkpoint reported to Ray Train, so a rerun (same output folder) or a worker failure resumes
from the latest one. The result is a plain HF folder (model + tokenizer + `labels.json`).

The paper's variants are built here from the annotation output:
- `gold`: gold labels of the train rows;   - `llm`: the LLM's labels of the same rows;
- `llm+extra`: plus the LLM's labels of unlabelled extra rows;
- `combined`: stage 1 on the LLM-labelled rows (incl. extra), stage 2 continues on gold.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray.config import TrainConfig
from llambert_ray.data import read_corpus
from llambert_ray.models import resolve_model
from llambert_ray.progress import Progress
from llambert_ray.ray_env import from_frames
from llambert_ray.targets import class_weights, soft_targets
from llambert_ray.train_loop import FINAL_MARKER, train_loop, train_worker_env

VARIANTS = ("gold", "llm", "llm+extra", "combined")


class TrainError(ValueError):
    """Training cannot start as configured; the message names the input and the fix."""


@dataclass
class TrainResult:
    model_dir: str
    rows: int
    epochs: int
    seconds: float
    samples_per_s: float
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ variants
def variant_stages(variant: str, annotations: pd.DataFrame, extra: pd.DataFrame | None = None,
                   min_confidence: float = 0.0) -> list[tuple[str, pd.DataFrame]]:
    """The training stages of a variant, each a frame with columns text, label (label names).

    `annotations` holds the annotated train rows (llm_label, llm_confidence, gold `label` where known);
    `extra` the annotated unlabelled extra rows. LLM rows with no label, or confidence below
    `min_confidence`, are left out.
    """
    if variant not in VARIANTS:
        raise TrainError(f"unknown variant {variant!r}; fix: use one of {', '.join(VARIANTS)}")

    def llm_rows(df: pd.DataFrame) -> pd.DataFrame:
        keep = df["llm_label"].notna()
        if min_confidence > 0 and "llm_confidence" in df:
            keep &= df["llm_confidence"].fillna(1.0) >= min_confidence
        # the LLM's confidence and scores ride along for train.targets: soft (targets.soft_targets)
        cols = ["text", "llm_label"] + [c for c in ("llm_confidence", "llm_raw") if c in df]
        return df.loc[keep, cols].rename(columns={"llm_label": "label"})

    def gold_rows() -> pd.DataFrame:
        if "label" not in annotations or annotations["label"].isna().all():
            raise TrainError(f"variant {variant!r} needs gold labels, but the train rows have none; fix: use a "
                             f"corpus with a label column, or train the 'llm' variant")
        return annotations.loc[annotations["label"].notna(), ["text", "label"]]

    if variant == "gold":
        return [("gold", gold_rows())]
    llm = llm_rows(annotations)
    if variant in ("llm+extra", "combined") and extra is not None and len(extra):
        llm = pd.concat([llm, llm_rows(extra)], ignore_index=True)
    elif variant == "llm+extra":
        raise TrainError("variant 'llm+extra' needs annotated extra rows; fix: set `extra:` in the config")
    if variant == "combined":
        return [("llm", llm), ("gold", gold_rows())]
    return [(variant, llm)]


def _datasets(train: pd.DataFrame, labels: list[str], cfg: TrainConfig,
              eval_df: pd.DataFrame | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows trained on (with soft `target` rows under train.targets: soft) and the Ray datasets the workers get:
    `train`, `agree` (the stop rule's seeded held-out slice) and `eval` (eval_df) where there are any."""
    frame = train[["text", "label"]].reset_index(drop=True)
    if cfg.targets == "soft":
        frame["target"] = list(soft_targets(train, labels, cfg.soft_temperature))
    datasets: dict[str, Any] = {}
    if cfg.stop_rule == "agreement":  # a seeded slice apart: the epoch that agrees best with its labels is kept
        held = frame.sample(frac=cfg.stop_holdout, random_state=cfg.seed)
        frame = frame.drop(held.index).reset_index(drop=True)
        datasets["agree"] = from_frames(held[["text", "label"]].reset_index(drop=True))
    datasets["train"] = from_frames(frame)
    if eval_df is not None and len(eval_df):
        datasets["eval"] = from_frames(eval_df[["text", "label"]].reset_index(drop=True))
    return frame, datasets


def fit(train: pd.DataFrame, labels: list[str], cfg: TrainConfig, output_dir: str | Path, *,
        eval_df: pd.DataFrame | None = None, init_model: str | None = None, name: str = "train") -> TrainResult:
    """Fine-tune `cfg.model` (or `init_model`, a folder from an earlier stage) on rows (text, label).

    Writes the HF folder to OUTPUT_DIR/model; Ray Train's checkpoints go to OUTPUT_DIR/ray_train, so calling
    fit again with the same output folder resumes from the latest epoch checkpoint (fit keeps them; fit_variant
    deletes them once the variant's model is written).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    bad = sorted(set(train["label"].dropna()) - set(labels))
    if bad:
        raise TrainError(f"training labels {bad} are not task labels {labels}")
    train = train[train["label"].notna()]
    min_rows = cfg.workers * cfg.batch_size * cfg.grad_accum
    if len(train) < min_rows:
        raise TrainError(f"{len(train)} training rows are fewer than one step needs ({cfg.workers} workers x "
                         f"batch {cfg.batch_size} x accumulation {cfg.grad_accum} = {min_rows}); fix: annotate "
                         f"more rows or lower train.batch_size / train.workers")
    output_dir = Path(output_dir).resolve()
    if init_model and Path(init_model).exists():
        init_model = str(Path(init_model).resolve())  # Ray Train's workers run in another working directory
    model_path = init_model or resolve_model(cfg.model)
    env = train_worker_env(cfg.use_gpu)
    frame, datasets = _datasets(train, labels, cfg, eval_df)
    best_dir = str(output_dir / "best_epoch") if "agree" in datasets else None
    weights = class_weights(train["label"], labels) if cfg.class_balance == "weighted" else None
    # rows trained, summed over workers and epochs: every worker takes the same whole steps (as train_loop), the
    # rest of an epoch's rows is dropped. A run resumed from a checkpoint ends below 100 %.
    step_rows = cfg.batch_size * cfg.grad_accum
    bar = Progress(f"train {name}", max(1, len(frame) // cfg.workers // step_rows) * step_rows * cfg.workers
                   * cfg.epochs)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg.model_dump(), "labels": labels, "model_path": model_path,
                           "rows": len(frame), "has_eval": "eval" in datasets,
                           "progress": bar.tally(), "class_weights": weights, "best_dir": best_dir},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(name=name, storage_path=str(output_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env}),
    )
    t0 = time.time()
    with bar:
        result = trainer.fit()
    seconds = time.time() - t0
    model_dir = _copy_final_model(result, output_dir, name)
    marker = json.loads((model_dir / FINAL_MARKER).read_text())
    history = marker.get("history", [])
    metrics = {"history": history, **(history[-1] if history else {}), "chosen_epoch": marker.get("chosen_epoch")}
    sps = [m["samples_per_s"] for m in history if "samples_per_s" in m]
    return TrainResult(model_dir=str(model_dir), rows=len(train), epochs=cfg.epochs, seconds=seconds,
                       samples_per_s=float(sum(sps) / len(sps)) if sps else math.nan, metrics=metrics)


def _copy_final_model(result, output_dir: Path, name: str) -> Path:
    """The final model (the last checkpoint train_loop reported) copied to OUTPUT_DIR/model, atomically."""
    if result.checkpoint is None:
        raise RuntimeError(f"training {name!r} finished without a model checkpoint: {result.error}")
    model_dir = output_dir / "model"
    tmp = output_dir / f"model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / FINAL_MARKER).exists():
            raise RuntimeError(f"the last checkpoint of {name!r} is not a final model: {d}")
        shutil.copytree(d, tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    return model_dir


def fit_variant(variant: str, annotations: pd.DataFrame, labels: list[str], cfg: TrainConfig,
                output_dir: str | Path, *, extra: pd.DataFrame | None = None,
                log=print) -> tuple[Path, list[TrainResult]]:
    """Train one of the paper's variants (all its stages) into OUTPUT_DIR/model; returns it and per-stage results.

    Each stage trains in OUTPUT_DIR/stage<N>/ (its Ray Train checkpoints in stage<N>/ray_train/, so a run killed
    before the variant's model is written resumes from them). Once OUTPUT_DIR/model is written the stage folders
    are deleted (checkpoints are ~5x the model's size), unless cfg.keep_checkpoints."""
    output_dir = Path(output_dir)
    stages = variant_stages(variant, annotations, extra, cfg.min_confidence)
    init, results = None, []
    for i, (stage_name, frame) in enumerate(stages):
        log(f"  {variant}: stage {i + 1}/{len(stages)} on {len(frame)} {stage_name}-labelled rows")
        r = fit(frame, labels, cfg, output_dir / f"stage{i + 1}", init_model=init,
                name=f"{variant.replace('+', '_')}-stage{i + 1}")
        init = r.model_dir
        results.append(r)
        if r.metrics.get("chosen_epoch") is not None:
            curve = ", ".join(f"{h['agreement_macro_f1']:.3f}" for h in r.metrics["history"])
            log(f"  {variant}: stop rule kept epoch {r.metrics['chosen_epoch'] + 1} of {cfg.epochs} (macro F1 "
                f"against the held-out rows' labels by epoch: {curve})")
    final = output_dir / "model"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(init, final)
    if not cfg.keep_checkpoints:
        for i in range(len(stages)):
            shutil.rmtree(output_dir / f"stage{i + 1}", ignore_errors=True)
    return final, results


def read_training_frame(path: str | Path, task) -> pd.DataFrame:
    """Annotations from `llambert annotate` as they are, or any gold-labelled corpus as (id, text, label)."""
    from llambert_ray.config import CorpusConfig

    p = Path(path)
    if p.exists() and (p.suffix == ".parquet" or p.is_dir()):
        try:
            df = pd.read_parquet(p)
            if "llm_label" in df:
                return df
        except Exception:
            pass
    ds, _ = read_corpus(CorpusConfig(path=str(path)), task)
    return ds.to_pandas()
