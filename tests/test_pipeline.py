"""`llambert run`: the whole pipeline on a small real corpus, then a rerun that skips every finished stage."""

import json

import pandas as pd
import pytest
from conftest import REVIEWS

pytestmark = [pytest.mark.ray, pytest.mark.llm, pytest.mark.timeout(1800)]


def test_run_then_rerun_skips(ray_local, tweets_frame, tmp_path):
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    corpus = pd.DataFrame([{"id": f"r{i:02d}", "text": t, "label": lab} for i, (t, lab) in enumerate(REVIEWS)])
    corpus.to_parquet(tmp_path / "corpus.parquet")
    (tmp_path / "run.yaml").write_text(f"""
name: small
output_dir: {tmp_path / 'runs'}
task: imdb-sentiment
corpus: {{path: {tmp_path / 'corpus.parquet'}, sample: 32, seed: 0}}
test: {{path: {tmp_path / 'corpus.parquet'}}}
evaluate: {{llm_test_sample: 6}}
annotate: {{batch_size: 8, calibration: prior}}
train: {{variants: [llm, gold, combined], epochs: 1, batch_size: 8, max_length: 48, workers: 1,
         cpus_per_worker: 0.5}}
label: {{batch_size: 16, max_length: 48, cpus_per_actor: 0.5}}
""")
    runner = CliRunner()
    first = runner.invoke(app, ["run", "--config", str(tmp_path / "run.yaml")])
    assert first.exit_code == 0, first.output
    run_dir = tmp_path / "runs" / "small"
    for name in ["annotations.parquet", "labels.parquet", "report.md", "report.html", "manifest.json",
                 "metrics.json", "plots/variants.png", "plots/confusion_llm_labels.png",
                 "models/llm/model/config.json", "label_issues.parquet"]:
        assert (run_dir / name).exists(), name
    ann = pd.read_parquet(run_dir / "annotations.parquet")
    labels = pd.read_parquet(run_dir / "labels.parquet")
    assert len(ann) == 32 and ann["id"].is_unique
    assert len(labels) == 40 and set(labels["id"]) == set(corpus["id"])  # the whole corpus, each id once
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"llm", "gold", "combined"} and metrics["llm"]["accuracy"] > 0.6
    assert "| LLM (" in first.output and "report:" in first.output
    # the LLM's test rows: answered in the one engine call, scored beside every variant on the same rows
    test_ann = pd.read_parquet(run_dir / "test_annotations.parquet")
    assert len(test_ann) == 6 and test_ann["llm_label"].notna().all()
    assert metrics["llm_test"]["rows"] == 6 and {v["rows"] for v in metrics["variants_on_llm_test"].values()} == {6}
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    # 32 + 6 rows in one engine call (here the test split is the corpus itself: a row in both is asked once)
    assert stages["annotate"]["rows"] == len(set(ann["id"]) | set(test_ann["id"]))
    assert stages["annotate"]["test_rows"] == 6
    assert json.loads((run_dir / "manifest.json").read_text())["engine_starts"] == {"lifetime": "call", "starts": 1}
    assert stages["annotate"]["summary"]["calibration"]  # prior offsets, fitted on the 32 annotated rows
    assert stages["train[combined]"]["reuses"] == "train[llm]"
    assert metrics["speed"]["llm"]["rows_per_s"] > 0 and metrics["speed"]["encoder"]["rows_per_s"] > 0
    assert "Aims:" in first.output and "(plots/cost_accuracy.png)" in (run_dir / "report.md").read_text()
    assert "## Label issues" in (run_dir / "report.md").read_text() and metrics["label_issues"]["annotated"] == 32
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # what a person reads: stage lines, one progress line per stage, the summaries and the table; no tracebacks
    assert "Traceback" not in first.output and len(first.output.splitlines()) < 100, first.output
    n_llm = stages["annotate"]["rows"]  # the 32 annotated rows and the LLM's test rows, one progress line
    assert f"annotate  {n_llm}/{n_llm} rows  100%" in first.output and "label  40/40 rows  100%" in first.output
    assert list(ann.columns) == ["id", "text", "label", "llm_label", "llm_confidence", "llm_raw", "llm_error",
                                 "prompt_tokens"]
    assert (run_dir / "logs" / "llambert.log").stat().st_size > 0
    assert not list(run_dir.glob("models/*/stage*")), "checkpoints left after the models were written"

    second = runner.invoke(app, ["run", "--config", str(tmp_path / "run.yaml")])
    assert second.exit_code == 0, second.output
    for stage in ["annotate", "train[llm]", "train[gold]", "train[combined]", "label", "evaluate"]:
        assert f"[{stage}] up to date" in second.output, stage
    assert json.loads((run_dir / "manifest.json").read_text())["stages"] == manifest["stages"]
