"""A handful of gold labels put to work before any training: retrieved few-shot demonstrations (gold-knn).

With `annotate.shots_from: gold-knn`, each row's few-shot examples are the `shots` gold-labelled corpus rows most
similar to it (cosine similarity of the encoder embeddings that active selection uses), taken in turns across labels
so that no label dominates the context, and never the row itself. They travel with the row in its `llm_shots`
column (JSON), which the prompt and the row's cache key both include. The same gold rows serve
`annotate.calibration: gold` (calibration.apply_gold_calibration).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from llambert_ray.annotate.columns import SHOTS_COLUMN, AnnotationError
from llambert_ray.annotate.prompts import resolved_shots
from llambert_ray.config import AnnotateConfig
from llambert_ray.embeddings import Embed, embed_rows
from llambert_ray.ray_env import from_frames
from llambert_ray.tasks import Task

log = logging.getLogger(__name__)


def nearest_gold(x_rows: np.ndarray, row_ids: Sequence, x_gold: np.ndarray, gold_ids: Sequence,
                 gold_labels: Sequence[str], k: int, labels: list[str]) -> list[list[int]]:
    """For each row, the indices (into the gold rows) of its k examples: in rounds, each label's next most similar
    gold row, labels ordered by that row's similarity (so k >= len(labels) covers every label that has gold rows,
    and a label that runs out leaves its turn to the others); a gold row with the row's own id is never chosen.
    Each list runs from the least to the most similar example (the nearest one ends up next to the row's text)."""
    sims = np.asarray(x_rows, dtype=np.float32) @ np.asarray(x_gold, dtype=np.float32).T
    gold_ids = np.asarray([str(g) for g in gold_ids], dtype=object)
    gold_labels = np.asarray(gold_labels, dtype=object)
    out = []
    for i, rid in enumerate(row_ids):
        order = np.argsort(-sims[i], kind="stable")
        order = order[gold_ids[order] != str(rid)]
        by_label = [order[gold_labels[order] == lab] for lab in labels]
        chosen: list[int] = []
        depth = 0
        while len(chosen) < k:
            turn = [int(c[depth]) for c in by_label if depth < len(c)]
            if not turn:
                break
            turn.sort(key=lambda j: -sims[i, j])
            chosen.extend(turn[:k - len(chosen)])
            depth += 1
        chosen.sort(key=lambda j: sims[i, j])
        out.append(chosen)
    return out


def gold_rows(corpus: pd.DataFrame, n: int, seed: int = 0, exclude: set[str] | None = None) -> pd.DataFrame:
    """A seeded sample of n corpus rows with a gold label (id, text, label; all when fewer), never one of `exclude`
    (test ids)."""
    from llambert_ray.data import sample_ids

    has = corpus[corpus["label"].notna()] if "label" in corpus else corpus.iloc[:0]
    if exclude:
        has = has[~has["id"].astype(str).isin(exclude)]
    ids = set(sample_ids(has["id"], n=min(n, len(has)), seed=seed))  # fewer when the corpus has fewer
    return has[has["id"].astype(str).isin(ids)][["id", "text", "label"]].sort_values("id").reset_index(drop=True)


def attach_gold_shots(rows: pd.DataFrame, gold: pd.DataFrame, k: int, labels: list[str], embed: Embed,
                      gold_embeddings: np.ndarray | None = None,
                      row_embeddings: np.ndarray | None = None) -> pd.DataFrame:
    """`rows` with an llm_shots column: each row's k nearest gold rows (nearest_gold) as JSON [{text, label}]."""
    x_gold = embed(gold) if gold_embeddings is None else gold_embeddings
    x_rows = embed(rows) if row_embeddings is None else row_embeddings
    picks = nearest_gold(x_rows, rows["id"].tolist(), x_gold, gold["id"].tolist(), gold["label"].tolist(),
                         k, labels)
    texts, labs = gold["text"].tolist(), gold["label"].tolist()
    out = rows.copy()
    out[SHOTS_COLUMN] = [json.dumps([{"text": texts[j], "label": labs[j]} for j in p]) for p in picks]
    return out


@dataclass
class GoldSet:
    """The gold rows annotate uses, made once per run: the rows (id, text, label; under gold-knn each with its own
    llm_shots) and, under gold-knn, what gives any other row its nearest gold rows (the gold embeddings are kept,
    so a later call embeds only its own rows)."""

    rows: pd.DataFrame
    shots: int = 0
    labels: list[str] = field(default_factory=list)
    embed: Embed | None = None
    embeddings: np.ndarray | None = None

    def shots_for(self, rows: pd.DataFrame) -> pd.DataFrame:
        """`rows` with their llm_shots under gold-knn; as they are otherwise."""
        if self.embed is None:
            return rows
        return attach_gold_shots(rows, self.rows, self.shots, self.labels, self.embed, self.embeddings)


def wants_gold(cfg: AnnotateConfig) -> bool:
    """Whether annotate needs gold rows: gold-knn shots or calibration gold."""
    return cfg.shots_from == "gold-knn" or cfg.calibration == "gold"


def gold_set(corpus: pd.DataFrame, task: Task, cfg: AnnotateConfig, *, encoder: str, seed: int = 0,
             exclude: set[str] | None = None, embed: Embed | None = None) -> GoldSet | None:
    """The gold rows `cfg` asks for (gold-knn shots, calibration gold), None when it asks for none. corpus: id,
    text, label; `exclude`: ids never used as gold (the test split's)."""
    if not wants_gold(cfg):
        return None
    gold = gold_rows(corpus, cfg.gold_rows, seed=seed, exclude=exclude)
    if cfg.shots_from != "gold-knn" or gold.empty:
        return GoldSet(gold)
    shots = resolved_shots(task, cfg)
    embed = embed or embed_rows(encoder)
    x_gold = embed(gold)
    return GoldSet(attach_gold_shots(gold, gold, shots, task.labels, embed, x_gold, x_gold), shots, task.labels,
                   embed, x_gold)


def with_gold(rows: pd.DataFrame, corpus: pd.DataFrame, task: Task, cfg: AnnotateConfig, *, encoder: str,
              seed: int = 0, exclude: set[str] | None = None,
              embed: Embed | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """What annotate needs from the gold rows under `cfg`: (rows, with llm_shots under gold-knn; the gold rows,
    with their own llm_shots, when gold-knn or calibration gold asks for them, else None). corpus: id, text, label."""
    gold = gold_set(corpus, task, cfg, encoder=encoder, seed=seed, exclude=exclude, embed=embed)
    return (rows, None) if gold is None else (gold.shots_for(rows), gold.rows)


def run_gold_set(corpus_ds, task: Task, cfg: AnnotateConfig, *, encoder: str, seed: int = 0,
                 exclude: set[str] | None = None) -> GoldSet | None:
    """The gold rows of a run (from the corpus's label column, never an id in `exclude`; gold-knn embeds them with
    `encoder`), or None when `cfg` asks for none. Raises AnnotationError when it asks for some and the corpus has no
    gold labels."""
    if not wants_gold(cfg):  # before the corpus is pulled into this process
        return None
    corpus = corpus_ds.to_pandas() if "label" in corpus_ds.columns() else pd.DataFrame(columns=["id", "text", "label"])
    gold = gold_set(corpus, task, cfg, encoder=encoder, seed=seed, exclude=exclude)
    if gold is None or gold.rows.empty:
        raise AnnotationError("annotate.shots_from gold-knn / calibration gold need gold labels in the corpus's label "
                         "column, and it has none (apart from any rows being annotated, which are never their own "
                         "gold); fix: a labelled corpus (llambert annotate --gold FILE), or shots_from: fixed / "
                         "another calibration")
    return gold


def warn_gold_overlap(gold: pd.DataFrame, rows: pd.DataFrame, source: str) -> int:
    """Warn (and return how many) when gold rows share a text with the rows being annotated: their gold labels then
    shape those rows' answers (as shots or through calibration), and accuracy measured on them says too much."""
    same = int(gold["text"].isin(set(rows["text"])).sum()) if len(gold) and len(rows) else 0
    if same:
        log.warning("%d of the %d gold rows (%s) have the same text as rows being annotated: their labels shape "
                    "those rows' answers, so accuracy measured on these rows overstates the LLM's; fix: gold rows "
                    "apart from the rows to label (llambert annotate --gold FILE)", same, len(gold), source)
    return same


def gold_for_annotate(ds, gold: GoldSet | None):
    """The pipeline's hook, per annotate() call: (the rows to annotate, as a Ray Dataset, with llm_shots under
    gold-knn; the gold rows for annotate(gold=...) or None)."""
    if gold is None:
        return ds, None
    return from_frames(gold.shots_for(ds.to_pandas())), gold.rows
