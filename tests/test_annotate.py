"""Annotation: request building and answer parsing (pure), then the real vLLM engine on a local Ray."""

import json

import pandas as pd
import pytest

from llambert_ray.annotate import PromptPlan
from llambert_ray.tasks import load_task

TASK = load_task("imdb-sentiment")


def _plan(mode, style="completion", ids=None):
    return PromptPlan(task=TASK, mode=mode, style=style, shots=2, max_text_chars=50, max_new_tokens=10,
                      temperature=0.0, label_token_ids=ids or {})


def test_requests_per_mode_and_style():
    r = _plan("score", ids={"positive": 11, "negative": 22}).request("Great film. " * 20)
    assert r["prompt"].endswith("\nSentiment:") and len(r["prompt"].split("Review: ")[-1]) < 80  # cut text
    assert r["sampling_params"] == {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": [11, 22]}
    c = _plan("choice", style="chat").request("x")
    assert c["messages"][0]["role"] == "system"
    assert c["sampling_params"]["structured_outputs"] == {"choice": ["positive", "negative"]}
    g = _plan("generate", style="chat").request("x")
    assert g["sampling_params"] == {"max_tokens": 10, "temperature": 0.0}


def test_results_score_generate_error():
    plan = _plan("score", ids={"positive": 11, "negative": 22})
    lp = [{11: {"logprob": -0.2, "rank": 1}, 22: {"logprob": -2.0, "rank": 5}}]
    r = plan.result(" positive", lp, None)
    assert r["llm_label"] == "positive" and 0.8 < r["llm_confidence"] < 0.9
    assert json.loads(r["llm_raw"]) == {"positive": -0.2, "negative": -2.0}
    assert plan.result("", [{33: {"logprob": -1}}], None)["llm_error"]  # label token missing: an error, no guess
    gen = _plan("generate")
    assert gen.result("The sentiment is negative.", None, None)["llm_label"] == "negative"
    assert gen.result("hard to say", None, None)["llm_label"] is None  # dropped, raw kept
    assert gen.result(None, None, "ValueError: too long")["llm_error"] == "ValueError: too long"


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(1200)
def test_cli_annotates_reviews_with_real_vllm(ray_local, reviews_jsonl, tmp_path):
    """40 short reviews through SmolLM2 in a real vLLM engine actor: schema, ids, accuracy above chance."""
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    out = tmp_path / "ann"
    res = CliRunner().invoke(app, ["annotate", "--task", "imdb-sentiment", "--input", str(reviews_jsonl),
                                   "--output", str(out), "--mode", "score", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "annotations.parquet")
    assert {"id", "text", "label", "llm_label", "llm_confidence", "llm_raw"} <= set(df.columns)
    assert len(df) == 40 and df["id"].is_unique and set(df["id"]) == {f"r{i:02d}" for i in range(40)}
    assert df["llm_label"].isin(["positive", "negative"]).all()
    assert df["llm_confidence"].between(0.5, 1.0).all()
    acc = (df["llm_label"] == df["label"]).mean()
    assert acc >= 0.75, f"accuracy {acc:.2f} on 40 easy reviews"
    summary = json.loads((out / "annotate_summary.json").read_text())
    assert summary["rows_in"] == 40 and summary["prompt_tokens"] > 40 * 20
    assert "rows/s" in res.output


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(1200)
def test_generate_mode_parses_free_text(ray_local, reviews_jsonl):
    """The paper's generate mode on the real engine: every row accounted for as labelled or dropped."""
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    rows = [json.loads(line) for line in reviews_jsonl.read_text().splitlines()][:12]
    df, summary = annotate(ray.data.from_items(rows), TASK, AnnotateConfig(mode="generate", max_new_tokens=4))
    assert len(df) == 12 and df["id"].is_unique
    assert summary.labelled + summary.dropped + summary.failed == 12
    assert df["llm_raw"].notna().all()  # raw answers are kept, also for dropped rows
    assert summary.labelled >= 6


def test_content_free_calibration_removes_label_bias():
    from llambert_ray.annotate import apply_calibration

    rows = pd.DataFrame({
        "id": ["a", "b", "c"], "llm_label": ["positive", "positive", None], "llm_confidence": [0.6, 0.9, None],
        "llm_raw": [json.dumps({"positive": -0.5, "negative": -0.9}),
                    json.dumps({"positive": -0.1, "negative": -2.4}), None]})
    # On content-free inputs the model prefers 'positive' by a log-odds of about 1.0: that is bias.
    cf = pd.DataFrame({"llm_raw": [json.dumps({"positive": -0.3, "negative": -1.3})] * 2})
    out, offsets = apply_calibration(rows.copy(), cf, ["positive", "negative"])
    assert offsets["positive"] > offsets["negative"]
    assert out["llm_label"][:2].tolist() == ["negative", "positive"]  # the weak 'positive' flips
    assert pd.isna(out["llm_label"][2])  # a dropped row stays dropped
    assert out["llm_raw"].tolist() == rows["llm_raw"].tolist()  # raw scores kept for audit
    assert 0.5 <= out["llm_confidence"][0] < 0.7
