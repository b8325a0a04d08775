"""Metrics against gold labels: accuracy, per-class precision / recall / F1, macro F1, confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def classification_metrics(gold: pd.Series | list, pred: pd.Series | list, labels: list[str]) -> dict[str, Any]:
    """Metrics over rows with a gold label. A missing prediction (None: the LLM's answer was dropped) counts
    as wrong, and its rate is reported as `dropped`."""
    g = pd.Series(list(gold), dtype=object)
    p = pd.Series(list(pred), dtype=object)
    keep = g.notna().to_numpy()
    g, p = g[keep].reset_index(drop=True), p[keep].reset_index(drop=True)
    n = len(g)
    if n == 0:
        return {"rows": 0, "accuracy": None, "macro_f1": None, "dropped": None, "per_class": {},
                "confusion": [], "labels": labels}
    dropped = p.isna().to_numpy()
    index = {lab: i for i, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=int)  # rows: gold, columns: predicted
    for gi, pi in zip(g, p, strict=True):
        if pi in index and gi in index:
            cm[index[gi], index[pi]] += 1
    per_class = {}
    for lab, i in index.items():
        tp = cm[i, i]
        predicted = cm[:, i].sum()
        actual = int((g == lab).sum())
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[lab] = {"precision": float(prec), "recall": float(rec), "f1": float(f1), "support": actual}
    acc = float((g == p).sum() / n)
    return {"rows": n, "accuracy": acc, "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
            "dropped": float(dropped.mean()), "per_class": per_class, "confusion": cm.tolist(), "labels": labels}
