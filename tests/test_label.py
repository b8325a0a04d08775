"""Full-corpus labelling with an actor pool: every id exactly once, probabilities sum to one."""

import numpy as np
import pandas as pd
import pytest

from llambert_ray.config import CorpusConfig, LabelConfig
from llambert_ray.label import LabelError, model_labels

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


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


def test_progress_counts_each_batch_of_a_one_block_corpus(ray_local, tweets_frame, untrained_model):
    """A corpus read as one block leaves the classifier's operator whole: its rows are counted batch by batch."""
    import io
    import time

    import ray

    from llambert_ray.label import label_dataset
    from llambert_ray.progress import Progress

    ds = ray.data.from_pandas(tweets_frame.head(600)[["id", "text", "label"]])  # one block
    bar = Progress("label", 600, stream=io.StringIO(), live=False).start()
    label_dataset(ds, untrained_model, LabelConfig(batch_size=100, cpus_per_actor=0.5, max_length=32),
                  progress=bar.tally()).materialize()
    deadline = time.time() + 60
    while bar.done < 600 and time.time() < deadline:  # the counts reach the driver's line asynchronously
        time.sleep(0.2)
    bar.close()
    assert bar.done == 600  # counted inside the classifier's actor (nothing here set it)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(LabelError, match="config.json"):
        model_labels(tmp_path)


def _with_overlong_rows(tweets_frame, n_short: int, n_long: int):
    """n_short real tweets plus n_long rows of 40 tweets joined (over 512 tokens each), spread through the frame."""
    import pandas as pd

    short = tweets_frame.iloc[:n_short][["id", "text", "label"]]
    pool = tweets_frame.iloc[n_short:]
    long = pd.DataFrame({"id": [f"long-{k}" for k in range(n_long)],
                         "text": [" ".join(pool["text"].iloc[40 * k:40 * (k + 1)]) for k in range(n_long)],
                         "label": pool["label"].iloc[:n_long].tolist()})
    parts = [short.iloc[i * n_short // n_long:(i + 1) * n_short // n_long] for i in range(n_long)]
    return pd.concat([x for i in range(n_long) for x in (parts[i], long.iloc[[i]])], ignore_index=True)


def test_rows_the_model_rejects_are_recorded_not_fatal(ray_local, tweets_frame, untrained_model, tmp_path):
    """max_length 600 on a 512-position encoder: every row over 512 tokens makes its forward pass raise (a real
    failure, no injection). The run completes; the sub-batches those rows were padded with are redone row by row,
    so only the over-long rows fail, each with its reason; every id comes out exactly once."""
    import math

    import pandas as pd

    from llambert_ray.data import read_corpus
    from llambert_ray.label import label
    from llambert_ray.metrics import classification_metrics
    from llambert_ray.screening import label_issues

    frame = _with_overlong_rows(tweets_frame, 240, 6)
    src = tmp_path / "corpus.parquet"
    frame.to_parquet(src)
    ds, _ = read_corpus(CorpusConfig(path=str(src)))
    cfg = LabelConfig(batch_size=41, sub_batch_size=8, concurrency=1, cpus_per_actor=0.5, max_length=600)
    s = label(ds.repartition(3), untrained_model, cfg, tmp_path / "labels.parquet")
    out = pd.read_parquet(tmp_path / "labels.parquet")
    assert len(out) == len(frame) == 246 and out["id"].is_unique and set(out["id"]) == set(frame["id"])
    bad = out[out["error"].notna()]
    assert sorted(bad["id"]) == [f"long-{k}" for k in range(6)]  # nothing else failed with them
    assert bad["error"].str.contains("RuntimeError").all() and bad["error"].str.contains("512").all()
    assert bad["label"].isna().all() and bad[["prob_positive", "prob_negative"]].isna().all().all()
    good = out[out["error"].isna()]
    assert good["label"].isin(["positive", "negative"]).all()
    assert np.allclose(good[["prob_positive", "prob_negative"]].sum(axis=1), 1.0, atol=1e-4)
    assert (good["gold"] == frame.set_index("id").loc[good["id"], "label"].to_numpy()).all()
    assert s.rows == 246 and s.failed == 6 and sum(s.label_counts.values()) == 240
    assert sum(s.errors.values()) == 6 and any("failed 6 rows" in line for line in s.lines())
    assert math.isclose(s.accuracy, float((good["label"] == good["gold"]).mean()))
    # downstream: evaluation leaves the failed rows out and counts them; label issues skip their NaN probs
    m = classification_metrics(out["gold"], out["label"], ["positive", "negative"], failed=out["error"])
    assert m["rows"] == 240 and m["failed"] == 6 and m["dropped"] == 0 and m["accuracy"] == s.accuracy
    ann = frame.assign(llm_label=frame["label"])
    assert not set(label_issues(ann, out, ["positive", "negative"])["id"]) & set(bad["id"])


def test_a_model_failing_on_every_row_still_fails_the_batch(tweets_frame, untrained_model):
    """Row-level recovery is for bad rows: when nothing gets labelled the batch raises (and so does the serve
    path, which never retries)."""
    from llambert_ray.label import Classifier

    long = [" ".join(tweets_frame["text"].iloc[40 * k:40 * (k + 1)]) for k in range(4)]
    clf = Classifier(str(untrained_model), max_length=600, sub_batch=2, threads=1)
    clf.max_consecutive_failures = 3
    with pytest.raises(RuntimeError, match="the model, not the rows"):
        clf.predict_rows(long)
    with pytest.raises(RuntimeError, match="512"):
        clf.predict_proba(long[:1])
    probs, errors = clf.predict_rows(["fine", long[0], "also fine"])
    assert errors[0] is None and errors[2] is None and "512" in errors[1] and np.isnan(probs[1]).all()


def test_an_in_memory_split_gives_every_labelling_actor_work(tweets_frame):
    """The test split (a frame the driver holds) is cut into 4 blocks a labelling actor, none under a batch: on the
    flagship's 4 GPU actors the 25k test reviews are 16 blocks, not 1 that one actor labels while 3 GPUs wait."""
    from llambert_ray.label import frame_blocks

    flagship = LabelConfig(batch_size=256, concurrency=4, gpus_per_actor=1)
    test = pd.DataFrame({"id": [f"t{i}" for i in range(25_000)], "text": "x"})
    blocks = frame_blocks(test, flagship)
    assert len(blocks) == 16 and sum(map(len, blocks)) == 25_000
    assert pd.concat(blocks)["id"].tolist() == test["id"].tolist()  # every row once, in order
    assert len(frame_blocks(test.head(300), flagship)) == 1  # 300 rows: one batch, one block
    pool = LabelConfig(batch_size=16, concurrency=2, max_concurrency=3)  # autoscaling: its largest size counts
    assert len(frame_blocks(tweets_frame.head(1000), pool)) == 12


def test_an_output_without_gold_labels_is_counted():
    """A corpus with no gold labels writes no gold column: the summary counts it all the same (found by the
    rehearsal's backlog, which has none)."""
    from llambert_ray.label_counts import OutputCounts

    c = OutputCounts()
    c.add(pd.DataFrame({"label": ["positive", "negative", None], "error": [None, None, "too long"]}))
    c.add(pd.DataFrame({"label": ["positive"], "error": [None], "gold": ["positive"]}))
    assert (c.rows, c.failed, c.graded, c.correct) == (4, 1, 1, 1)
    assert c.label_counts == {"positive": 2, "negative": 1}


def test_precision_rule():
    from llambert_ray.label import encoder_precision

    assert encoder_precision("cpu") == "float32" and encoder_precision("cuda") == "bfloat16"
    assert encoder_precision("cpu", quantize="int8") == "int8"
    # int8 is the CPU path: a GPU actor keeps its dtype
    assert encoder_precision("cuda", quantize="int8") == "bfloat16"
    assert encoder_precision("cuda", "float32", "int8") == "float32"


def test_int8_encoder_tracks_fp32_on_real_text(tweets_frame, untrained_model):
    """Quantized Linear layers replace the fp32 ones, and the class probabilities stay with fp32's on real tweets
    (the accuracy change on a trained model is measured in bench/quantize.py)."""
    import torch

    from llambert_ray.label import Classifier

    texts = tweets_frame["text"].head(300).tolist()
    fp32 = Classifier(str(untrained_model), max_length=48, threads=1)
    int8 = Classifier(str(untrained_model), max_length=48, threads=1, quantize="int8")
    assert (fp32.precision, int8.precision) == ("float32", "int8")
    linear = int8.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(linear, torch.ao.nn.quantized.dynamic.Linear), type(linear)
    a, b = fp32.predict_proba(texts), int8.predict_proba(texts)
    assert np.abs(a - b).max() < 0.03
    # the untrained head's probabilities vary by ~0.005 across rows: int8 must still follow them
    assert np.corrcoef(a[:, 0], b[:, 0])[0, 1] > 0.8


def test_summary_is_counted_exactly_from_the_streamed_output(ray_local, tweets_frame, untrained_model, tmp_path,
                                                             monkeypatch, capsys):
    """The predictions stream to the sink (nothing materializes them) and the summary, counted from the published
    files, equals what they hold: rows, label counts, failed rows, the top failure reasons with their counts, and
    accuracy over the labelled rows that have gold. 10 rows of 6 lengths over 512 tokens fail, each with its length
    in the reason (6 reasons, one more than the summary keeps); gold is missing on a third of the rows, failed ones
    included. The classifier runs in int8 here (label.quantize), so its Ray Data path is tested with this run."""
    import pandas as pd
    import ray

    from llambert_ray.data import read_corpus
    from llambert_ray.label import label

    short = tweets_frame.iloc[:150][["id", "text", "label"]].reset_index(drop=True)
    words = [520, 520, 520, 530, 530, 540, 540, 550, 560, 570]  # 522..572 tokens; 3, 2, 2, 1, 1, 1 rows
    long = pd.DataFrame({"id": [f"long-{k}" for k in range(len(words))],
                         "text": [" ".join(["good"] * n) for n in words],
                         "label": ["positive", "negative"] * (len(words) // 2)})
    frame = pd.concat([short, long], ignore_index=True).sample(frac=1, random_state=0).reset_index(drop=True)
    frame.loc[frame.index % 3 == 0, "label"] = None
    src = tmp_path / "corpus.parquet"
    frame.to_parquet(src)
    ds, _ = read_corpus(CorpusConfig(path=str(src)))
    materialized = []
    real = ray.data.Dataset.materialize

    def recording(self):
        materialized.append(type(self._logical_plan.dag).__name__)
        return real(self)

    monkeypatch.setattr(ray.data.Dataset, "materialize", recording)
    cfg = LabelConfig(batch_size=40, sub_batch_size=8, concurrency=1, cpus_per_actor=0.5, max_length=600,
                      quantize="int8")
    s = label(ds.repartition(4), untrained_model, cfg, tmp_path / "labels.parquet")
    assert s.precision == "int8" and "int8" in s.lines()[0]
    assert set(materialized) <= {"Write"}  # only the write's own per-task results, never the predictions
    out = pd.read_parquet(tmp_path / "labels.parquet")
    assert len(out) == s.rows == len(frame) == 160 and out["id"].is_unique and set(out["id"]) == set(frame["id"])
    failed = out["error"].notna()
    assert sorted(out.loc[failed, "id"]) == sorted(long["id"]) and s.failed == 10
    reasons = out.loc[failed, "error"].str.slice(0, 200).value_counts()
    assert len(reasons) == 6 and len(s.errors) == 5 and sum(reasons) == 10
    assert all(reasons[r] == n for r, n in s.errors.items())
    assert reasons.drop(list(s.errors)).max() <= min(s.errors.values())  # the one left out is no more frequent
    assert s.errors[next(iter(s.errors))] == 3 and "(522)" in next(iter(s.errors))
    ok = out[~failed]
    assert s.label_counts == ok["label"].value_counts().to_dict() and sum(s.label_counts.values()) == 150
    graded = ok[ok["gold"].notna()]
    assert 0 < len(graded) < len(ok) and out.loc[failed, "gold"].notna().any()
    assert s.accuracy == float((graded["label"] == graded["gold"]).mean())
    assert "label  160/160 rows" in capsys.readouterr().err  # the final progress line: the rows written
