"""Sentence embeddings from an HF encoder in Ray Data actors, and the probe on them (softmax regression on frozen
embeddings, cross-validated for out-of-sample probabilities): shared by active selection, gold-knn shots and
label-issue screening."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from llambert_ray.config import SelectConfig
from llambert_ray.models import resolve_model
from llambert_ray.ray_env import LIGHT, from_frames, torch_threads


class Embedder:
    """Mean-pooled, L2-normalised sentence embeddings from an HF encoder, loaded once per Ray actor."""

    def __init__(self, model_path: str, max_length: int = 128, threads: int | None = None, sub_batch: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).to(self.device).eval()
        self.max_length, self.sub_batch = max_length, sub_batch

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(texts), self.sub_batch):
                idx = order[s:s + self.sub_batch]
                enc = self.tok([texts[i] for i in idx], truncation=True, max_length=self.max_length, padding=True,
                               return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
                out[idx] = torch.nn.functional.normalize(e, dim=-1).cpu().numpy()
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        emb = self.encode(batch["text"].astype(str).tolist())
        return pd.DataFrame({"id": batch["id"].to_numpy(), "embedding": list(emb)})


def embed(ds, model_path: str, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings) for every row of `ds` (columns id, text), computed in a Ray Data actor pool."""
    from ray.data import ActorPoolStrategy

    out = ds.select_columns(["id", "text"], **LIGHT).map_batches(
        Embedder, batch_format="pandas", batch_size=cfg.embed_batch_size,
        fn_constructor_kwargs={"model_path": str(model_path), "max_length": cfg.max_length,
                               "threads": torch_threads(cfg.cpus_per_actor)},
        compute=ActorPoolStrategy(size=1), num_cpus=cfg.cpus_per_actor).to_pandas()
    return out["id"].to_numpy(), np.stack(out["embedding"].to_numpy()).astype(np.float32)


Embed = Callable[[pd.DataFrame], np.ndarray]  # rows (id, text) -> L2-normalised embeddings, one per row, in order


def embed_in_order(rows: pd.DataFrame, model_path: str, cfg: SelectConfig) -> np.ndarray:
    """Embeddings of `rows` (column text) in row order, whatever their ids (repeats too), in one actor pool."""
    pos, x = embed(from_frames(pd.DataFrame({"id": np.arange(len(rows)), "text": rows["text"].to_numpy()})),
                   model_path, cfg)
    out = np.empty_like(x)
    out[pos.astype(np.int64)] = x
    return out


def embed_rows(model: str, max_length: int = 128) -> Embed:
    """Embeddings of rows by an encoder (a packaged name or folder) in a Ray Data actor (embed), in row order."""
    path = resolve_model(model)
    cfg = SelectConfig(max_length=max_length)
    return lambda rows: embed_in_order(rows, path, cfg)


@dataclass
class Probe:
    """Softmax regression on embeddings: scikit-learn's (multinomial) LogisticRegression, L2-regularised, rows
    weighted, its probabilities laid out over all the task's labels."""

    model: Any  # a fitted sklearn LogisticRegression
    n_classes: int

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None,
            l2: float = 1e-3) -> Probe:
        """Fit on rows x (embeddings) with label indices y; minimises the weighted mean cross-entropy + l2 * |W|^2."""
        from sklearn.linear_model import LogisticRegression

        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        # sklearn minimises C * sum(w * loss) + |W|^2 / 2: with weights summing to 1, C = 1 / (2 * l2)
        model = LogisticRegression(C=1 / (2 * l2), max_iter=1000).fit(x, y, sample_weight=w / w.sum())
        return cls(model, n_classes)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, one column per task label (0 for labels the probe never saw)."""
        out = np.zeros((len(x), self.n_classes))
        out[:, self.model.classes_] = self.model.predict_proba(x)
        return out


def cross_val_proba(x: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-sample class probabilities: each row's from a Probe fitted on the other folds (stratified where each
    label has enough rows), so a row's own (possibly wrong) label never shapes its probabilities."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y, minlength=n_classes)
    split = (StratifiedKFold(folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= folds
             else KFold(folds, shuffle=True, random_state=seed))
    out = np.zeros((len(y), n_classes))
    for tr, te in split.split(x, y):
        if len(np.unique(y[tr])) < 2:  # a fold with one label: its prior is all there is to say
            out[te] = np.bincount(y[tr], minlength=n_classes) / len(tr)
            continue
        out[te] = Probe.fit(x[tr], y[tr], n_classes).proba(x[te])
    return out
