"""Full-corpus labelling with an actor pool: every id exactly once, probabilities sum to one."""

import numpy as np
import pytest

from llambert_ray.config import CorpusConfig, LabelConfig
from llambert_ray.label import LabelError, model_labels

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory):
    """The packaged encoder with a fresh 2-label head, saved like a trained model (labelling mechanics only)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.models import resolve_model

    src = resolve_model("minilm-l6")
    out = tmp_path_factory.mktemp("m") / "model"
    m = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2,
                                                           id2label={0: "positive", 1: "negative"},
                                                           label2id={"positive": 0, "negative": 1})
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_every_id_exactly_once(ray_local, tweets_frame, untrained_model, tmp_path):
    import pandas as pd

    from llambert_ray.data import read_corpus
    from llambert_ray.label import label

    src = tmp_path / "corpus.parquet"
    tweets_frame.head(1500).to_parquet(src)
    ds, _ = read_corpus(CorpusConfig(path=str(src)))
    s = label(ds.repartition(7), untrained_model, LabelConfig(batch_size=100, concurrency=2, cpus_per_actor=0.5,
                                                              max_length=48), tmp_path / "labels.parquet")
    out = pd.read_parquet(tmp_path / "labels.parquet")
    assert s.rows == 1500 and len(out) == 1500 and out["id"].is_unique
    assert set(out["id"]) == set(tweets_frame.head(1500)["id"])
    assert {"id", "label", "prob_positive", "prob_negative", "gold"} <= set(out.columns)
    assert np.allclose(out[["prob_positive", "prob_negative"]].sum(axis=1), 1.0, atol=1e-4)
    assert out["label"].isin(["positive", "negative"]).all()


def test_not_a_model_folder(tmp_path):
    with pytest.raises(LabelError, match="config.json"):
        model_labels(tmp_path)
