"""Active selection: the probe, the choice of rows, the rounds (stand-in LLM = gold lookup) and the Ray embedder,
on real text embedded by the packaged MiniLM."""

import numpy as np
import pandas as pd
import pytest
from conftest import REVIEWS

from llambert_ray.active import run_rounds, select_next
from llambert_ray.config import SelectConfig
from llambert_ray.embeddings import Embedder, Probe
from llambert_ray.models import resolve_model

LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def reviews():
    df = pd.DataFrame([{"id": f"r{i:02d}", "text": t, "label": lab} for i, (t, lab) in enumerate(REVIEWS)])
    x = Embedder(resolve_model("minilm-l6"), max_length=64).encode(df["text"].tolist())
    return df, x


def test_select_next_takes_uncertain_rows_spread_over_space():
    # 4 clusters of 10 rows: clusters 0 and 1 uncertain, 2 and 3 certain; 4 picks should come from 0 and 1, both
    rng = np.random.default_rng(0)
    centers = np.eye(8)[:4]
    x = np.repeat(centers, 10, axis=0) + 0.01 * rng.standard_normal((40, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    proba = np.repeat([[0.5, 0.5], [0.55, 0.45], [0.99, 0.01], [0.02, 0.98]], 10, axis=0)
    taken = np.zeros(40, dtype=bool)
    pick = select_next(x, proba, taken, 4, candidates_factor=5)
    assert len(set(pick)) == 4 and set(pick // 10) == {0, 1}
    plain = select_next(x, proba, taken, 4, diversity=False)
    assert set(plain // 10) == {0}  # without diversity: all from the single most uncertain cluster
    taken[:39] = True
    assert list(select_next(x, proba, taken, 4)) == [39]  # fewer free rows than asked: all of them


def test_probe_learns_sentiment_from_embeddings(reviews):
    df, x = reviews
    y = df["label"].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy()
    probe = Probe.fit(x[:24], y[:24], 2)
    acc = float((probe.proba(x[24:]).argmax(1) == y[24:]).mean())
    assert acc >= 0.75, acc  # 16 held-out reviews; chance is 0.5
    w = np.linspace(0.5, 1.0, 24)
    assert Probe.fit(x[:24], y[:24], 2, sample_weight=w).proba(x[:2]).shape == (2, 2)
    # a label no LLM answer has given yet gets a column too, with probability 0
    p3 = Probe.fit(x[:24], np.where(y[:24] == 1, 2, 0), 3).proba(x[:4])
    assert p3.shape == (4, 3) and (p3[:, 1] == 0).all() and np.allclose(p3.sum(1), 1)


@pytest.mark.parametrize("strategy", ["active", "random"])
def test_rounds_spend_the_budget_once_per_row(reviews, strategy):
    df, x = reviews
    asked: list[str] = []
    gold = df.set_index("id")["label"]

    def llm(ids):
        asked.extend(ids)
        return pd.DataFrame({"id": ids, "llm_label": gold.loc[ids].to_numpy(), "llm_confidence": 0.9})

    pool, test = df.iloc[:30], df.iloc[30:]
    cfg = SelectConfig(strategy=strategy, rounds=3)
    answers, result = run_rounds(pool["id"].to_numpy(), x[:30], LABELS, 18, cfg, llm, strategy=strategy,
                                 x_test=x[30:], y_test=test["label"].tolist(), log=lambda s: None)
    assert len(answers) == 18 and answers["id"].is_unique and len(asked) == 18 and set(asked) <= set(pool["id"])
    assert [r.llm_calls for r in result.rounds] == [6, 12, 18]
    assert result.rounds[-1].probe_accuracy is not None and result.rounds[-1].probe_accuracy >= 0.6


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_embed_through_ray_data_keeps_every_id(ray_local, reviews):
    from llambert_ray.embeddings import embed

    df, x = reviews
    ids, emb = embed(ray_local.data.from_pandas(df), resolve_model("minilm-l6"),
                     SelectConfig(max_length=64, embed_batch_size=16, cpus_per_actor=0.5))
    assert sorted(ids) == sorted(df["id"]) and emb.shape == (40, x.shape[1])
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    order = pd.Series(range(len(ids)), index=ids)[df["id"]].to_numpy()
    assert np.allclose(emb[order], x, atol=1e-4)  # same vectors as the in-process encoder
