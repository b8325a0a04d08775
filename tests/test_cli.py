"""The command line: help texts, evaluate, data fetch (bad input through the CLI: tests/test_bad_inputs.py)."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from llambert_ray.cli import app

runner = CliRunner()


def test_help_lists_every_stage():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ["annotate", "train", "label", "evaluate", "run", "serve", "data", "models"]:
        assert cmd in res.output
    assert "--sample" in runner.invoke(app, ["annotate", "--help"]).output


def test_evaluate_an_annotations_file(tmp_path):
    p = tmp_path / "annotations.parquet"
    pd.DataFrame({"id": ["a", "b", "c", "d"], "label": ["positive", "negative", "positive", "negative"],
                  "llm_label": ["positive", "negative", None, "positive"]}).to_parquet(p)
    res = runner.invoke(app, ["evaluate", "--input", str(p), "--task", "imdb-sentiment",
                              "--output", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "accuracy 50.00%" in res.output and "dropped 25.00%" in res.output
    assert json.loads((tmp_path / "m.json").read_text())["confusion"] == [[1, 0], [1, 1]]


def test_fetch_tweets_and_offline_imdb(tmp_path):
    res = runner.invoke(app, ["data", "fetch", "tweets", "--dest", str(tmp_path)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tmp_path / "tweets.parquet")
    assert len(df) > 15000 and df["id"].is_unique and set(df["label"]) == {"positive", "negative"}
    assert set(df["split"]) == {"train", "test"}

    from llambert_ray.data import CorpusError, fetch_imdb

    with pytest.raises(CorpusError, match="offline"):  # a closed loopback port stands in for no network
        fetch_imdb(tmp_path / "imdb", url="http://127.0.0.1:9/aclImdb_v1.tar.gz", timeout_s=5)
    assert not list((tmp_path / "imdb").glob("*.part"))
