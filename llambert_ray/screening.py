"""Label-issue screening: LLM labels a classifier contradicts (confident learning), judged in-sample by the trained
classifier (the report's list) or out-of-sample by a cross-validated probe on frozen embeddings
(`train.label_issues: drop / relabel`, before training)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llambert_ray.config import TrainConfig
from llambert_ray.embeddings import cross_val_proba, embed_rows


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
    """LLM labels likely wrong, judged on out-of-sample probabilities: a probe (embeddings.Probe: softmax regression on
    frozen encoder embeddings `x`, one row per annotations row) is cross-validated over `folds` folds of the LLM
    labels, and cleanlab's confident learning (`cleanlab.filter.find_label_issues`) flags the rows whose label the
    held-out probe contradicts. Returns the flagged rows (id, text, llm_label, llm_confidence, label when present,
    classifier_label = the probe's, p_llm_label), most doubtful first; same columns as label_issues."""
    from cleanlab.filter import find_label_issues

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
    if action == "relabel":  # the LLM's scores are not the new label's: soft targets make these rows one-hot
        for col in ("llm_confidence", "llm_raw"):
            if col in out:
                out[col] = out[col].astype(object)
                out.loc[flagged, col] = None
    return out


def screen_for_training(annotations: pd.DataFrame, labels: list[str], cfg: TrainConfig, *, encoder: str,
                        max_length: int, run_dir: str | Path, log: Callable[[str], None] = print) -> pd.DataFrame:
    """The pipeline's hook for train.label_issues (drop / relabel; keep does nothing): embeds the annotated rows
    with `encoder` (at `max_length` tokens), runs cv_label_issues, writes RUN_DIR/label_issues_cv.parquet and
    returns the rows to train on."""
    if cfg.label_issues == "keep":
        return annotations
    ok = annotations[annotations["llm_label"].isin(labels)].reset_index(drop=True)
    x = embed_rows(encoder, max_length)(ok)
    issues = cv_label_issues(ok, x, labels, cfg.label_issue_folds, cfg.seed)
    issues.to_parquet(Path(run_dir) / "label_issues_cv.parquet")
    s = label_issue_summary(issues, ok)
    log(f"  label issues (cross-validated probe + cleanlab): {s['flagged']} of {s['annotated']} LLM labels flagged"
        + (f", {s['flag_precision']:.1%} of them wrong vs gold (LLM error rate {s['llm_error_rate']:.1%})"
           if s.get("flag_precision") is not None else "") + f"; train.label_issues: {cfg.label_issues}"
        + ("; the flags are no better than chance here: consider train.label_issues: keep"
           if s.get("flags_informative") is False else ""))
    return screen_llm_labels(annotations, issues, cfg.label_issues)


INFORMATIVE_POINTS = 10  # flagged labels wrong at least this many points more often than all LLM labels


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
        if out["flag_precision"] is not None:
            # a flag is evidence of an LLM error only where flagged labels are wrong clearly more often than any
            # LLM label is (the chance rate)
            out["flags_informative"] = out["flag_precision"] >= out["llm_error_rate"] + INFORMATIVE_POINTS / 100
    return out
