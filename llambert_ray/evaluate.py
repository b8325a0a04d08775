"""Evaluation on gold-labelled rows: each trained model's predictions on the test rows and their metrics."""

from __future__ import annotations

from typing import Any

import pandas as pd

from llambert_ray.metrics import classification_metrics


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


def quality_metrics(ann: pd.DataFrame, labels: list[str], variants: list[str], test_ann: pd.DataFrame | None = None,
                    preds: pd.DataFrame | None = None) -> dict[str, Any]:
    """The LLM on its annotated rows `ann` (where they have gold labels) and on its test rows `test_ann`; each
    variant's classifier on the test split (`preds`, predict_gold's) and, beside the LLM, on the same test rows
    the LLM labelled (the paper's like-for-like comparison)."""
    metrics: dict[str, Any] = {"variants": {}}
    if "label" in ann and ann["label"].notna().any():
        metrics["llm"] = classification_metrics(ann["label"], ann["llm_label"], labels)
    if test_ann is not None:
        metrics["llm_test"] = classification_metrics(test_ann["label"], test_ann["llm_label"], labels)
        metrics["variants_on_llm_test"] = {}
    if preds is None:
        return metrics
    for variant in variants:
        p = preds[preds["variant"] == variant]
        metrics["variants"][variant] = gold_metrics(p, labels)
        if test_ann is not None:
            metrics["variants_on_llm_test"][variant] = gold_metrics(p[p["id"].isin(set(test_ann["id"]))], labels)
    return metrics
