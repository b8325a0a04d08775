"""What the encoder learns from: each row's target over the task's labels (hard: its label; soft: the LLM's
per-label probabilities from score mode), class weights that keep a skewed label set from collapsing the student
onto its majority label, and the loss over both. Pure functions: the training loop (train.py) calls them on each
worker, the driver builds the targets and weights once."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd


def soft_targets(frame: pd.DataFrame, labels: list[str], temperature: float = 1.0) -> np.ndarray:
    """Per-row probabilities over `labels` (rows x labels, float32) from the LLM's answers: columns label (the
    row's training label), llm_confidence and llm_raw (score mode's label log-probabilities, JSON).

    The row's own label gets its confidence (after any calibration: llm_confidence is the calibrated one), the
    others share the rest in proportion to their raw probabilities; then p ** (1 / temperature), renormalised
    (temperature < 1 sharpens). A row without scores (generate / choice mode, a gold row) is one-hot on its label."""
    k = len(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.zeros((len(frame), k), dtype=np.float64)
    raws = frame["llm_raw"] if "llm_raw" in frame else pd.Series([None] * len(frame), index=frame.index)
    confs = frame["llm_confidence"] if "llm_confidence" in frame else pd.Series([None] * len(frame),
                                                                                index=frame.index)
    for r, (lab, raw, conf) in enumerate(zip(frame["label"], raws, confs, strict=True)):
        i = index[lab]
        scores = label_scores(raw)
        if not scores or conf is None or pd.isna(conf) or any(x not in scores for x in labels):
            out[r, i] = 1.0
            continue
        p = np.exp(np.array([scores[x] for x in labels], dtype=np.float64))
        rest = np.delete(p, i)
        out[r] = np.insert(rest / rest.sum() * (1 - float(conf)) if rest.sum() > 0 else rest, i, float(conf))
    if temperature != 1.0:
        out = np.power(out, 1.0 / temperature)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def label_scores(raw: Any) -> dict[str, float] | None:
    """Score mode's label log-probabilities from llm_raw (a JSON object), or None: generate / choice mode's llm_raw
    is the answer's text ("Positive."), which is no score."""
    if not isinstance(raw, str) or not raw.lstrip().startswith("{"):
        return None
    try:
        scores = json.loads(raw)
    except ValueError:
        return None
    return scores if isinstance(scores, dict) else None


def class_weights(label_column: pd.Series, labels: list[str]) -> list[float]:
    """n / (k x n_c) per label: a label with half the average share counts twice (sklearn's "balanced"); a label
    absent from the rows gets 1 (it has no row to weigh)."""
    counts = label_column.value_counts()
    n, k = int(counts.sum()), len(labels)
    return [n / (k * int(counts[lab])) if counts.get(lab, 0) else 1.0 for lab in labels]


def train_loss(logits: Any, y: Any, target: Any = None, weight: Any = None) -> Any:
    """Cross-entropy of `logits` (batch x labels) against hard labels `y` or soft `target` rows (batch x labels),
    each row weighted by its labels' class `weight` (the weighted mean torch's cross_entropy takes: a one-hot
    target gives exactly F.cross_entropy(logits, y, weight))."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    if target is None:
        return F.cross_entropy(logits, y, weight=weight)
    w = weight if weight is not None else torch.ones(logits.shape[-1], device=logits.device)
    logp = F.log_softmax(logits, dim=-1)
    return -(target * w * logp).sum() / (target * w).sum()
