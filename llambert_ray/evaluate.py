"""Metrics against gold labels: accuracy, per-class precision / recall / F1, macro F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
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


def label_issues(annotations: pd.DataFrame, predictions: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """LLM labels the classifier contradicts with confidence, most doubtful first (confident learning).

    annotations: id, llm_label (and text, llm_confidence, label = gold when present); predictions: id,
    prob_<class> from the trained classifier (rows it failed to label, NaN probabilities, are left out). A row
    is flagged when, among the classes whose predicted probability reaches that class's threshold (the mean
    probability the classifier gives the class on rows the LLM gave it), the most probable one is not the LLM's
    label. Flagged rows are ranked by the probability of the LLM's label (lowest first). The classifier has seen
    these rows in training, so this finds the grossest issues, not all of them: cv_label_issues judges each row on
    out-of-sample probabilities instead (train.label_issues: drop / relabel uses it before training)."""
    cols = [f"prob_{c}" for c in labels]
    missing = [c for c in ["id", *cols] if c not in predictions]
    if missing or "llm_label" not in annotations:
        raise ValueError(f"label_issues needs annotations.llm_label and predictions {missing}")
    keep = [c for c in ["id", "text", "llm_label", "llm_confidence", "label"] if c in annotations]
    predictions = predictions[predictions[cols].notna().all(axis=1)]
    df = annotations[keep].merge(predictions[["id", *cols]], on="id", how="inner")
    df = df[df["llm_label"].isin(labels)].reset_index(drop=True)
    if df.empty:
        return df.assign(classifier_label=pd.Series(dtype=str), p_llm_label=pd.Series(dtype=float))
    probs = df[cols].to_numpy(dtype=float)
    given = df["llm_label"].map({c: i for i, c in enumerate(labels)}).to_numpy()
    thresholds = np.array([probs[given == j, j].mean() if (given == j).any() else 1.0 for j in range(len(labels))])
    above = np.where(probs >= thresholds, probs, -1.0)
    suggested = above.argmax(axis=1)
    flagged = (above.max(axis=1) >= 0) & (suggested != given)
    df["classifier_label"] = [labels[i] for i in suggested]
    df["p_llm_label"] = probs[np.arange(len(df)), given]
    out = df[flagged].sort_values("p_llm_label").reset_index(drop=True)
    return out.drop(columns=cols)


def cv_label_issues(annotations: pd.DataFrame, x: np.ndarray, labels: list[str], folds: int = 5,
                    seed: int = 0) -> pd.DataFrame:
    """LLM labels likely wrong, judged on out-of-sample probabilities: a probe (active.Probe: softmax regression on
    frozen encoder embeddings `x`, one row per annotations row) is cross-validated over `folds` folds of the LLM
    labels, and cleanlab's confident learning (`cleanlab.filter.find_label_issues`) flags the rows whose label the
    held-out probe contradicts. Returns the flagged rows (id, text, llm_label, llm_confidence, label when present,
    classifier_label = the probe's, p_llm_label), most doubtful first; same columns as label_issues."""
    from cleanlab.filter import find_label_issues

    from llambert_ray.active import cross_val_proba

    keep = [c for c in ["id", "text", "llm_label", "llm_confidence", "label"] if c in annotations]
    ok = annotations["llm_label"].isin(labels).to_numpy()
    df = annotations.loc[ok, keep].reset_index(drop=True)
    empty = df.iloc[:0].assign(classifier_label=pd.Series(dtype=str), p_llm_label=pd.Series(dtype=float))
    given = df["llm_label"].map({c: i for i, c in enumerate(labels)}).to_numpy()
    present = np.unique(given)
    if len(df) < 2 * folds or len(present) < 2:
        return empty
    # cleanlab wants every class it is given to occur: work in the labels that do, then map back
    proba = cross_val_proba(np.asarray(x)[ok], np.searchsorted(present, given), len(present), folds, seed)
    # n_jobs 1: cleanlab's default forks a pool per call, and forking a driver that runs Ray (its threads hold
    # locks) hangs the child; a sample's few thousand rows take milliseconds in one process anyway
    ranked = find_label_issues(np.searchsorted(present, given), proba, return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    if not len(ranked):
        return empty
    out = df.iloc[ranked].copy()
    out["classifier_label"] = [labels[present[i]] for i in proba[ranked].argmax(1)]
    out["p_llm_label"] = proba[ranked, np.searchsorted(present, given[ranked])]
    return out.reset_index(drop=True)


def screen_llm_labels(annotations: pd.DataFrame, issues: pd.DataFrame, action: str) -> pd.DataFrame:
    """The annotations to train on after label-issue screening (train.label_issues): `keep` every LLM label,
    `drop` the flagged rows' LLM labels (llm_label None: variants trained on LLM labels leave those rows out, those
    trained on gold labels keep every row), or `relabel` them with the probe's label. Every row stays;
    llm_label_before keeps the LLM's label."""
    if action == "keep" or issues.empty:
        return annotations
    if action not in ("drop", "relabel"):
        raise ValueError(f"train.label_issues {action!r}: use keep, drop or relabel")
    flagged = annotations["id"].isin(set(issues["id"]))
    out = annotations.copy()
    out["llm_label_before"] = out["llm_label"]
    out["llm_label"] = out["llm_label"].astype(object)
    out.loc[flagged, "llm_label"] = (None if action == "drop" else
                                     out.loc[flagged, "id"].map(issues.set_index("id")["classifier_label"]))
    return out


def screen_for_training(annotations: pd.DataFrame, task: Any, cfg: Any, run_dir: str | Path,
                        log: Callable[[str], None] = print) -> pd.DataFrame:
    """The pipeline's hook for train.label_issues (drop / relabel; keep does nothing): embeds the annotated rows
    with the encoder, runs cv_label_issues, writes RUN_DIR/label_issues_cv.parquet and returns the rows to train
    on. task: a Task; cfg: the RunConfig."""
    if cfg.train.label_issues == "keep":
        return annotations
    from llambert_ray.active import embed_rows

    ok = annotations[annotations["llm_label"].isin(task.labels)].reset_index(drop=True)
    x = embed_rows(cfg.select.model or cfg.train.model, cfg.select.max_length)(ok)
    issues = cv_label_issues(ok, x, task.labels, cfg.train.label_issue_folds, cfg.train.seed)
    issues.to_parquet(Path(run_dir) / "label_issues_cv.parquet")
    s = label_issue_summary(issues, ok)
    log(f"  label issues (cross-validated probe + cleanlab): {s['flagged']} of {s['annotated']} LLM labels flagged"
        + (f", {s['flag_precision']:.1%} of them wrong vs gold (LLM error rate {s['llm_error_rate']:.1%})"
           if s.get("flag_precision") is not None else "") + f"; train.label_issues: {cfg.train.label_issues}")
    return screen_llm_labels(annotations, issues, cfg.train.label_issues)


def label_issue_summary(issues: pd.DataFrame, annotations: pd.DataFrame) -> dict[str, Any]:
    """How many LLM labels were flagged and, where gold exists, how often a flag points at a real LLM error."""
    labelled = annotations["llm_label"].notna()
    out: dict[str, Any] = {"annotated": int(labelled.sum()), "flagged": len(issues),
                           "flagged_share": len(issues) / max(int(labelled.sum()), 1)}
    if "label" in annotations and annotations["label"].notna().any() and "label" in issues:
        gold = annotations[labelled & annotations["label"].notna()]
        out["llm_error_rate"] = float((gold["llm_label"] != gold["label"]).mean())
        g = issues[issues["label"].notna()]
        out["flag_precision"] = float((g["llm_label"] != g["label"]).mean()) if len(g) else None
    return out


def throughput(rows: int, seconds: float, devices: float, device: str = "cpu",
               usd_per_device_hour: float | None = None) -> dict[str, Any]:
    """A labeller's speed and cost from one measured stage: rows/s, device-seconds per 1,000 rows (wall seconds
    x the devices it computed on: CPU cores or GPUs) and, given a price, USD per 1,000 rows."""
    per_1k = seconds * devices / rows * 1000 if rows else None
    return {"rows": int(rows), "seconds": float(seconds), "rows_per_s": rows / seconds if seconds else None,
            "device": device, "devices": float(devices), "device_seconds_per_1k": per_1k,
            "usd_per_1k": per_1k * usd_per_device_hour / 3600 if per_1k is not None and usd_per_device_hour
            else None}


def predict_gold(test_ds, model_dirs: dict[str, Any], label_cfg) -> pd.DataFrame:
    """Each model's predictions on the gold test rows (a Ray Dataset with id, text, label): the labelling
    stage's columns (id, label, gold, error, prob_<class>..) plus `variant`, the model_dirs key."""
    from llambert_ray.label import label_dataset

    frames = []
    for variant, model_dir in model_dirs.items():
        preds = label_dataset(test_ds, model_dir, label_cfg).to_pandas()
        preds["variant"] = variant
        frames.append(preds)
    return pd.concat(frames, ignore_index=True)


def gold_metrics(preds: pd.DataFrame, labels: list[str]) -> dict[str, Any]:
    """classification_metrics of predictions from predict_gold (or label_dataset) against their gold column;
    rows the classifier could not process (`error`) are counted as failed, not as wrong."""
    return classification_metrics(preds["gold"], preds["label"], labels, failed=preds.get("error"))


def evaluate_on_corpus(corpus_cfg, task, model_dir, label_cfg) -> dict[str, Any]:
    """The metrics of one model folder on a gold-labelled corpus (`llambert train --eval`)."""
    from llambert_ray.data import read_corpus

    ds, _ = read_corpus(corpus_cfg, task)
    return gold_metrics(predict_gold(ds, {"model": model_dir}, label_cfg), task.labels)
