"""Calibration of score-mode labels: per-label offsets on the label log-probabilities, fitted on content-free
inputs (Zhao et al., 2021), on a label prior over the rows themselves, or on gold-labelled rows; llm_raw keeps the
raw scores, so a correction can be audited or undone."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from llambert_ray.annotate.columns import AnnotationError
from llambert_ray.metrics import classification_metrics
from llambert_ray.targets import label_scores

# Content-free inputs for contextual calibration: the LLM's label preference on them is its bias, independent of
# any row.
CONTENT_FREE_TEXTS = ["N/A", "[MASK]", "", "..."]
log = logging.getLogger(__name__)


def label_logsoftmax(raw: str | None, labels: list[str]) -> np.ndarray | None:
    scores = label_scores(raw)
    if scores is None:
        return None
    v = np.array([scores[lab] for lab in labels], dtype=float)
    return v - (v.max() + np.log(np.exp(v - v.max()).sum()))


def apply_calibration(df: pd.DataFrame, content_free: pd.DataFrame, labels: list[str]):
    """Subtract the mean label log-probabilities on content-free inputs from every row's, relabel.

    Returns (frame with llm_label / llm_confidence recalibrated, offsets per label). llm_raw keeps the raw
    scores, so the correction can be audited or undone.
    """
    cf = [x for x in (label_logsoftmax(r, labels) for r in content_free["llm_raw"]) if x is not None]
    if not cf:
        return df, None
    offset = np.mean(cf, axis=0)
    return relabel(df, labels, offset), {lab: float(o) for lab, o in zip(labels, offset, strict=True)}


def apply_prior_calibration(df: pd.DataFrame, labels: list[str], prior: dict[str, float] | None = None,
                            iters: int = 100):
    """Shift every row's label log-probabilities by per-label offsets chosen so that the mean probability of
    each label over the rows equals `prior` (equal shares when None). No extra LLM calls: the correction is
    fitted on the score distribution itself. Returns (relabelled frame, offsets per label)."""
    target = prior_vector(labels, prior)
    rows = [label_logsoftmax(r, labels) if isinstance(lab, str) else None
            for r, lab in zip(df["llm_raw"], df["llm_label"], strict=True)]
    v = np.array([x for x in rows if x is not None])
    if not len(v):
        return df, None
    offset = np.zeros(len(labels))
    for _ in range(iters):
        z = v - offset
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        offset += np.log(p.mean(0) / target)
        offset -= offset.mean()
    return relabel(df, labels, offset), {lab: float(o) for lab, o in zip(labels, offset, strict=True)}


def apply_offsets(df: pd.DataFrame, labels: list[str], offsets: dict[str, float]) -> pd.DataFrame:
    """Relabel scored rows with calibration offsets fitted on other rows (e.g. those of
    apply_prior_calibration on the annotated sample: the same correction then holds for any further row); a
    "temperature" key (gold calibration) divides the scores first."""
    return relabel(df, labels, np.array([offsets[lab] for lab in labels], dtype=float),
                    float(offsets.get("temperature", 1.0)))


def fit_gold_offsets(scores: np.ndarray, gold: np.ndarray, n_labels: int, *, temperature: bool = False,
                     l2: float = 1e-2) -> tuple[np.ndarray, float]:
    """Per-label offsets b (and, with `temperature`, T) minimising the cross-entropy of softmax(scores / T - b)
    against the gold label indices, + l2 * |b|^2. scores: rows x labels label log-probabilities."""
    from scipy.optimize import minimize

    onehot = np.eye(n_labels)[gold]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        b, log_t = params[:n_labels], (params[n_labels] if temperature else 0.0)
        t = np.exp(log_t)
        z = scores / t - b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        nll = -np.mean(np.log(np.clip((p * onehot).sum(1), 1e-12, None)))
        g_z = (p - onehot) / len(scores)  # d loss / d z
        grad = np.concatenate([-g_z.sum(0) + 2 * l2 * b,
                               [-(g_z * scores / t).sum()] if temperature else []])
        return nll + l2 * float(b @ b), grad

    x0 = np.zeros(n_labels + (1 if temperature else 0))
    res = minimize(loss, x0, jac=True, method="L-BFGS-B")
    b = res.x[:n_labels] - res.x[:n_labels].mean()
    return b, float(np.exp(res.x[n_labels])) if temperature else 1.0


def apply_gold_calibration(df: pd.DataFrame, gold_scored: pd.DataFrame, labels: list[str], *,
                           temperature: bool = False, holdout: float = 0.5, seed: int = 0):
    """Fit gold calibration (fit_gold_offsets) on the LLM's scores of gold rows (columns llm_raw, llm_label,
    label) and relabel `df` with it. Returns (frame, offsets per label (+ "temperature"), report): the report
    scores the LLM labels before and after on the held-out share of the gold rows, with offsets fitted on the
    rest; the offsets applied are fitted on all gold rows. Where calibration made the held-out rows' macro F1 worse,
    it is not applied (`df` as it was, offsets None, report["applied"] False)."""
    ok = gold_scored[gold_scored["label"].isin(labels) & gold_scored["llm_label"].isin(labels)]
    ok = ok.sort_values("id", kind="stable").reset_index(drop=True)
    if ok["label"].nunique() < 2:
        log.warning("calibration gold: fewer than two labels among %d scored gold rows; left uncalibrated", len(ok))
        return df, None, None
    scores = np.stack([label_logsoftmax(r, labels) for r in ok["llm_raw"]])
    y = ok["label"].map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    test = np.random.default_rng(seed).permutation(len(ok))[:int(len(ok) * holdout)]
    fit_rows = np.setdiff1d(np.arange(len(ok)), test)
    b, t = fit_gold_offsets(scores[fit_rows], y[fit_rows], len(labels), temperature=temperature)
    held = ok.iloc[test].copy()
    before = classification_metrics(held["label"], held["llm_label"], labels)
    after = classification_metrics(held["label"], relabel(held.copy(), labels, b, t)["llm_label"], labels)
    report = {"gold_rows": len(ok), "held_out": len(held),
              "before": {"accuracy": before["accuracy"], "macro_f1": before["macro_f1"]},
              "after": {"accuracy": after["accuracy"], "macro_f1": after["macro_f1"]},
              "applied": after["macro_f1"] >= before["macro_f1"]}
    if not report["applied"]:  # measured worse on gold it was not fitted on: the labels stay the LLM's own
        log.warning("calibration gold: macro F1 on %d held-out gold rows %.2f%% -> %.2f%%; not applied", len(held),
                    100 * before["macro_f1"], 100 * after["macro_f1"])
        return df, None, report
    b, t = fit_gold_offsets(scores, y, len(labels), temperature=temperature)
    offsets = {lab: float(o) for lab, o in zip(labels, b, strict=True)}
    if temperature:
        offsets["temperature"] = t
    return relabel(df, labels, b, t), offsets, report


def prior_vector(labels: list[str], prior: dict[str, float] | None) -> np.ndarray:
    """annotate.label_prior as shares in label order (equal shares when None); a clear error when it is off."""
    if prior is None:
        return np.full(len(labels), 1.0 / len(labels))
    bad = sorted(set(prior) - set(labels)) + [lab for lab in labels if prior.get(lab, 0) <= 0]
    if bad:
        example = dict.fromkeys(labels, round(1 / len(labels), 3))
        raise AnnotationError(f"annotate.label_prior {prior} is off for {bad}: it needs a positive share for each "
                              f"label of {labels} and no other keys; fix: e.g. label_prior: {example}")
    v = np.array([prior[lab] for lab in labels], dtype=float)
    return v / v.sum()


def relabel(df: pd.DataFrame, labels: list[str], offset: np.ndarray, temperature: float = 1.0) -> pd.DataFrame:
    """Divide each scored row's label log-probabilities by `temperature`, subtract `offset`, relabel (llm_raw is
    kept)."""
    new_label, new_conf = [], []
    for raw, old_label, old_conf in zip(df["llm_raw"], df["llm_label"], df["llm_confidence"], strict=True):
        v = label_logsoftmax(raw, labels) if isinstance(old_label, str) else None
        if v is None:
            new_label.append(old_label)
            new_conf.append(old_conf)
            continue
        v = v / temperature - offset
        p = np.exp(v - v.max())
        p /= p.sum()
        new_label.append(labels[int(p.argmax())])
        new_conf.append(float(p.max()))
    df["llm_label"] = pd.Series(new_label, index=df.index, dtype=object)
    df["llm_confidence"] = pd.Series(new_conf, index=df.index, dtype=float)
    return df
