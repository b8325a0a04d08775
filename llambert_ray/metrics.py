"""Metrics against gold labels (accuracy, per-class precision / recall / F1, macro F1, confusion matrix) and a
labeller's throughput and cost: the leaf every stage that scores or prices labels uses."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

_DROPPED = "\x00dropped"  # stands for a missing prediction; no task label looks like it


def failed_mask(failed: pd.Series | list | None, n: int) -> np.ndarray:
    """Rows marked as failed: a true flag or a non-empty error message (None / NaN / "" = not failed)."""
    if failed is None:
        return np.zeros(n, dtype=bool)
    return np.array([False if v is None or (not isinstance(v, str) and pd.isna(v)) else bool(v) for v in failed],
                    dtype=bool)


def classification_metrics(gold: pd.Series | list, pred: pd.Series | list, labels: list[str],
                           failed: pd.Series | list | None = None) -> dict[str, Any]:
    """Metrics over rows with a gold label. A missing prediction (None: the LLM's answer was dropped) counts
    as wrong, and its rate is reported as `dropped`. Rows marked in `failed` (the labelling `error` column: the
    classifier could not process the row) are left out of every metric and counted in `failed`."""
    g = pd.Series(list(gold), dtype=object)
    p = pd.Series(list(pred), dtype=object)
    bad = failed_mask(failed, len(g))
    has_gold = g.notna().to_numpy()
    n_failed = int((has_gold & bad).sum())
    keep = has_gold & ~bad
    g, p = g[keep].reset_index(drop=True), p[keep].reset_index(drop=True)
    n = len(g)
    if n == 0:
        return {"rows": 0, "accuracy": None, "macro_f1": None, "dropped": None, "per_class": {},
                "confusion": [], "labels": labels, "failed": n_failed}
    dropped = p.isna().to_numpy()
    # As strings (scikit-learn wants one type); a dropped prediction is a class of its own: wrong for accuracy and
    # recall, outside the confusion matrix.
    g, p = g.astype(str).to_numpy(), p.where(~dropped, _DROPPED).astype(str).to_numpy()
    names = [str(lab) for lab in labels]
    prec, rec, f1, support = precision_recall_fscore_support(g, p, labels=names, zero_division=0)
    per_class = {lab: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                       "support": int(support[i])} for i, lab in enumerate(labels)}
    # rows: gold, columns: predicted (confusion_matrix refuses gold with none of the labels: all zeros then)
    cm = (confusion_matrix(g, p, labels=names) if np.isin(g, names).any()
          else np.zeros((len(labels), len(labels)), dtype=int))
    return {"rows": n, "accuracy": float(accuracy_score(g, p)), "macro_f1": float(np.mean(f1)),
            "dropped": float(dropped.mean()), "per_class": per_class, "confusion": cm.tolist(), "labels": labels,
            "failed": n_failed}


def throughput(rows: int, seconds: float, devices: float, device: str = "cpu",
               usd_per_device_hour: float | None = None) -> dict[str, Any]:
    """A labeller's speed and cost from one measured stage: rows/s, device-seconds per 1,000 rows (wall seconds
    x the devices it computed on: CPU cores or GPUs) and, given a price, USD per 1,000 rows."""
    per_1k = seconds * devices / rows * 1000 if rows else None
    return {"rows": int(rows), "seconds": float(seconds), "rows_per_s": rows / seconds if seconds else None,
            "device": device, "devices": float(devices), "device_seconds_per_1k": per_1k,
            "usd_per_1k": per_1k * usd_per_device_hour / 3600 if per_1k is not None and usd_per_device_hour
            else None}


# When an LLM's labels are not worth training an encoder on (issue: a 6-class student collapsed to one class).
WEAK_MACRO_F1 = 0.5  # the LLM's macro F1 on annotated rows with gold below this
DOMINANT_SHARE = 0.9  # one label's share of the labelled rows above this
GUESSING_MARGIN = 0.1  # mean confidence within this of 1 / (number of labels): the model is guessing
MIN_GOLD = 20  # gold rows among the annotated ones needed to judge by gold
TRY = ("try gold-knn shots (annotate.shots_from: gold-knn), calibration (annotate.calibration: gold or prior), a "
       "larger model, or another labeller before training on these labels")


def llm_label_warnings(ann: pd.DataFrame, labels: list[str]) -> list[str]:
    """Plain-words warnings that an LLM's labels (columns llm_label, llm_confidence?, label? = gold) are not worth
    training on: by gold where the annotated rows have MIN_GOLD or more (macro F1, the most frequent confusion),
    otherwise by the labels themselves (one label above DOMINANT_SHARE; a mean confidence that says the model
    guesses). Empty when nothing looks wrong."""
    out: list[str] = []
    labelled = ann[ann["llm_label"].isin(labels)] if "llm_label" in ann else ann.iloc[:0]
    if len(labelled) == 0:
        return [f"the LLM labelled none of {len(ann)} rows; " + TRY] if len(ann) else []
    gold = labelled[labelled["label"].isin(labels)] if "label" in labelled else labelled.iloc[:0]
    if len(gold) >= MIN_GOLD:
        m = classification_metrics(gold["label"], gold["llm_label"], labels)
        if m["macro_f1"] < WEAK_MACRO_F1:
            conf = np.asarray(m["confusion"])
            np.fill_diagonal(conf, 0)
            i, j = np.unravel_index(conf.argmax(), conf.shape)
            out.append(f"the LLM's labels agree poorly with gold on {len(gold)} annotated rows: macro F1 "
                       f"{m['macro_f1']:.1%}, accuracy {m['accuracy']:.1%} (most frequent confusion: gold "
                       f"{labels[i]!r} labelled {labels[j]!r}, {conf[i, j]} rows)")
        return [w + "; " + TRY for w in out]  # gold says how good they are; the checks below stand in for it
    share = labelled["llm_label"].value_counts(normalize=True)
    if len(labels) > 1 and share.iloc[0] > DOMINANT_SHARE:
        out.append(f"the LLM gave {share.index[0]!r} to {share.iloc[0]:.1%} of {len(labelled)} labelled rows: an "
                   f"encoder trained on them learns little but that label")
    if "llm_confidence" in labelled and labelled["llm_confidence"].notna().any():
        mean = float(labelled["llm_confidence"].mean())
        if mean < 1 / len(labels) + GUESSING_MARGIN:
            out.append(f"the LLM's mean confidence is {mean:.2f} over {len(labels)} labels (chance "
                       f"{1 / len(labels):.2f}): it is guessing")
    return [w + "; " + TRY for w in out]
