"""Gold-knn demonstrations: the nearest gold rows per row, balanced across labels, never the row itself."""

import json

import numpy as np
import pandas as pd

from llambert_ray.annotate import SHOTS_COLUMN, PromptPlan, row_examples
from llambert_ray.annotate.gold import attach_gold_shots, gold_rows, nearest_gold, with_gold
from llambert_ray.config import AnnotateConfig
from llambert_ray.tasks import load_task

LABELS = ["a", "b", "c", "d"]


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_nearest_gold_is_balanced_ordered_and_never_the_row_itself():
    rng = np.random.default_rng(0)
    x_gold = _unit(rng.normal(size=(40, 8)))
    gold_ids = [f"g{i}" for i in range(40)]
    gold_labels = [LABELS[i % 4] for i in range(40)]
    # the rows are gold rows themselves (same ids, same embeddings): the most similar gold row is the row
    picks = nearest_gold(x_gold[:10], gold_ids[:10], x_gold, gold_ids, gold_labels, 8, LABELS)
    for i, p in enumerate(picks):
        assert len(p) == 8 and len(set(p)) == 8 and i not in p
        assert sorted(np.bincount([LABELS.index(gold_labels[j]) for j in p], minlength=4)) == [2, 2, 2, 2]
        sims = x_gold[i] @ x_gold[p].T
        assert np.all(np.diff(sims) >= 0)  # least similar first, nearest last
        # within each label, the examples are that label's nearest (the row itself excluded)
        for lab in LABELS:
            mine = [j for j in p if gold_labels[j] == lab]
            others = [j for j in range(40) if gold_labels[j] == lab and j != i and j not in mine]
            assert min(x_gold[i] @ x_gold[mine].T) >= max(x_gold[i] @ x_gold[others].T)


def test_nearest_gold_fills_from_other_labels_when_one_runs_out():
    x_gold = _unit(np.eye(4)[[0, 1, 1, 1, 1]] + 0.01)
    labels = ["a", "b", "b", "b", "b"]
    (p,) = nearest_gold(x_gold[:1], ["q"], x_gold, list("vwxyz"), labels, 4, ["a", "b"])
    assert len(p) == 4 and [labels[j] for j in p].count("a") == 1
    (p,) = nearest_gold(x_gold[:1], ["v"], x_gold, list("vwxyz"), labels, 2, ["a", "b"])  # "v" is the row
    assert 0 not in p and len(p) == 2


def test_gold_rows_are_a_seeded_labelled_sample_without_test_ids():
    corpus = pd.DataFrame({"id": [f"r{i}" for i in range(50)], "text": [f"t{i}" for i in range(50)],
                           "label": [None if i % 5 == 0 else "a" for i in range(50)]})
    g = gold_rows(corpus, 10, exclude={"r1", "r2"})
    assert len(g) == 10 and g["label"].notna().all() and not {"r1", "r2"} & set(g["id"])
    assert g.equals(gold_rows(corpus, 10, exclude={"r1", "r2"}))


def test_attach_gold_shots_puts_each_rows_neighbours_into_its_prompt():
    task = load_task("imdb-sentiment")
    gold = pd.DataFrame({"id": ["g1", "g2", "g3", "g4"], "text": ["great fun", "awful", "superb", "dull"],
                         "label": ["positive", "negative", "positive", "negative"]})
    rows = pd.DataFrame({"id": ["r1"], "text": ["superb and great"]})
    emb = {"great fun": [1, 0.2, 0], "awful": [0, 1, 0], "superb": [1, 0, 0], "dull": [0, 1, 0.3],
           "superb and great": [1, 0.1, 0]}

    def embed(df):
        return _unit([emb[t] for t in df["text"]])

    out = attach_gold_shots(rows, gold, 2, task.labels, embed)
    shots = json.loads(out[SHOTS_COLUMN].iloc[0])
    assert {s["label"] for s in shots} == {"positive", "negative"} and shots[-1]["text"] in ("superb", "great fun")
    plan = PromptPlan(task=task, mode="score", style="completion", shots=2, max_text_chars=100, max_new_tokens=1,
                      temperature=0.0)
    prompt = plan.request("superb and great", row_examples(out.iloc[0].to_dict()))["prompt"]
    assert all(f"Review: {s['text']}\nSentiment: {s['label']}" in prompt for s in shots)
    assert "A wonderful film" not in prompt  # the task's fixed examples are replaced
    chat = PromptPlan(task=task, mode="score", style="chat", shots=2, max_text_chars=100, max_new_tokens=1,
                      temperature=0.0).request("x", row_examples(out.iloc[0].to_dict()))["messages"]
    assert [m["content"] for m in chat if m["role"] == "assistant"] == [s["label"] for s in shots]
    # with_gold: the rows and the gold rows (each with its own shots, never itself) under gold-knn
    corpus = pd.concat([gold, rows.assign(label=None)], ignore_index=True)
    r, g = with_gold(rows, corpus, task, AnnotateConfig(shots_from="gold-knn", shots=2), encoder="x", embed=embed)
    assert r[SHOTS_COLUMN].iloc[0] == out[SHOTS_COLUMN].iloc[0] and len(g) == 4
    for gid, gtext, s in zip(g["id"], g["text"], g[SHOTS_COLUMN], strict=True):
        assert gtext not in [e["text"] for e in json.loads(s)], gid
    r, g = with_gold(rows, corpus, task, AnnotateConfig(), encoder="x", embed=embed)
    assert g is None and SHOTS_COLUMN not in r


def test_a_runs_gold_set_embeds_its_gold_rows_once_and_never_takes_a_test_row():
    """A run makes its gold set once: each later annotate call (each active round) embeds only its own rows."""
    from llambert_ray.annotate.gold import gold_set

    task = load_task("imdb-sentiment")
    texts = ["great fun", "awful", "superb", "dull", "lovely", "bad"]
    corpus = pd.DataFrame({"id": [f"g{i}" for i in range(6)], "text": texts,
                           "label": ["positive", "negative"] * 3})
    embedded: list[int] = []

    def embed(df):
        embedded.append(len(df))
        return _unit([[1.0, float(len(t))] for t in df["text"]])

    cfg = AnnotateConfig(shots_from="gold-knn", shots=2, gold_rows=10)
    g = gold_set(corpus, task, cfg, encoder="x", exclude={"g4", "g5"}, embed=embed)
    assert sorted(g.rows["id"]) == ["g0", "g1", "g2", "g3"] and embedded == [4]
    for n in (1, 2):
        rows = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "text": ["nice"] * n})
        out = g.shots_for(rows)
        assert out[SHOTS_COLUMN].notna().all() and len(out) == n
        assert out[SHOTS_COLUMN].iloc[0] == with_gold(rows, corpus, task, cfg, encoder="x", exclude={"g4", "g5"},
                                                      embed=embed)[0][SHOTS_COLUMN].iloc[0]
    assert embedded == [4, 1, 4, 1, 2, 4, 2]  # the set: the gold rows once, then the rows; with_gold: both
    assert gold_set(corpus, task, AnnotateConfig(), encoder="x", embed=embed) is None
    calib = gold_set(corpus, task, AnnotateConfig(calibration="gold", gold_rows=3), encoder="x", embed=embed)
    assert len(calib.rows) == 3 and calib.shots_for(corpus) is corpus
