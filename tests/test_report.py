"""The report's story: the paper's comparison table, the plain-words lines, the aims and the cost plot, from a
small synthetic metrics dict (no Ray, no models)."""

import pandas as pd
import pytest

from llambert_ray.metrics import classification_metrics, throughput
from llambert_ray.report import check_aims, story_rows, story_sentences, story_table, story_text, write_report

LABELS = ["positive", "negative"]


def _m(correct: int, rows: int) -> dict:
    gold = ["positive"] * rows
    return classification_metrics(gold, ["positive"] * correct + ["negative"] * (rows - correct), LABELS)


def _metrics(combined_correct: int = 830, wall_s: float = 600.0, reused: list | None = None) -> dict:
    return {
        "task": "movie-snippet-sentiment", "llm_model": "smollm2-135m-instruct", "encoder": "minilm-l6",
        "annotated_rows": 800, "corpus_rows": 10000,
        "llm": _m(640, 800), "llm_test": _m(340, 400),  # 85.0 % on its 400 test rows
        "variants": {"llm": _m(820, 1000), "gold": _m(825, 1000), "combined": _m(combined_correct, 1000)},
        "variants_on_llm_test": {"llm": _m(334, 400), "gold": _m(333, 400), "combined": _m(336, 400)},
        "speed": {"llm": throughput(1200, 200.0, 2, "cpu", 0.025),         # 6 rows/s, 333.3 core-s per 1k
                  "encoder": throughput(10000, 50.0, 2, "cpu", 0.025),     # 200 rows/s, 10 core-s per 1k
                  "encoder_all_in": {"rows": 10000, "device_seconds_per_1k": 60.0, "usd_per_1k": 0.0004}},
        "run": {"seconds": wall_s, "stages_ran": ["annotate"], "stages_reused": reused or [],
                "aims": {"aim_llm_gap_points": 2.0, "aim_speedup": 20.0, "aim_wall_minutes": 12.0}},
    }


def test_story_rows_and_table():
    m = _metrics()
    rows = {r["labeller"]: r for r in story_rows(m)}
    assert rows["LLM smollm2-135m-instruct"]["same_rows"] == 0.85
    assert rows["minilm-l6 [llm]"]["same_rows"] == 334 / 400 and rows["minilm-l6 [llm]"]["all_test"] == 0.82
    assert rows["minilm-l6 [combined]"]["rows_per_s"] == 200.0
    table = story_table(m)
    assert "accuracy, the LLM's 400 test rows" in table and "all 1000 test rows" in table
    assert "| LLM smollm2-135m-instruct | – | 85.00 % | – | 6.0 | 333.3 |" in table
    assert "| minilm-l6 [llm] | LLM labels | 83.50 % | 82.00 % | 200.0 | 10.0 |" in table
    head, rule = table.splitlines()[:2]
    assert head.count("|") == rule.count("|") == 8  # a delimiter row of another width is no Markdown table
    # without the LLM's own test rows that column goes (no "the LLM's – test rows" header); the note says how
    m = _metrics()
    del m["llm_test"], m["variants_on_llm_test"]
    table = story_table(m)
    assert "LLM's" not in table.splitlines()[0] and "| minilm-l6 [llm] | LLM labels | 82.00 % | 200.0 |" in table
    head, rule = table.splitlines()[:2]
    assert head.count("|") == rule.count("|") == 7
    assert "evaluate.llm_test_sample" in table


def test_story_in_plain_words():
    words = " ".join(story_sentences(_metrics()))
    assert "scores 83.50 % vs the LLM's own 85.00 % on the same 400 test rows (-1.5 points)" in words
    assert "200.0 rows/s, 33x the LLM's 6.00 rows/s" in words
    assert "60.0 core-seconds per 1,000, 5.6x less than the LLM" in words
    assert "combined), 83.00 % (+0.5 points over gold alone)" in words


def test_aims_say_met_and_not_met_with_numbers():
    aims = {a["aim"].split(" ")[0] + a["aim"].split(" ")[1]: a for a in check_aims(_metrics())}
    assert [a["status"] for a in aims.values()] == ["met", "met", "met", "met"]
    bad = check_aims(_metrics(combined_correct=800, wall_s=900))
    assert [a["status"] for a in bad] == ["met", "not met", "met", "not met"]
    assert "80.00 % vs 82.50 %" in bad[1]["measured"] and "15.0 min" in bad[3]["measured"]
    reused = check_aims(_metrics(reused=["annotate"]))
    assert reused[3]["status"] == "not measured" and "annotate" in reused[3]["measured"]
    m = _metrics()
    del m["llm_test"], m["variants_on_llm_test"]
    assert check_aims(m)[0]["status"] == "not measured"
    assert "Aims:" in story_text(_metrics()) and "- met: combined at or above gold" in story_text(_metrics())


def test_report_has_the_comparison_and_the_cost_plot(tmp_path):
    ann = pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "label": ["positive", "negative"],
                        "llm_label": ["positive", "positive"], "llm_confidence": [0.9, 0.6]})
    md = write_report(tmp_path, _metrics(combined_correct=800), {"name": "t", "stages": {}}, ann).read_text()
    assert "## The comparison" in md and "| **not met** |" in md and "| **met** |" in md
    assert "![Test accuracy against cost per 1,000 rows](plots/cost_accuracy.png)" in md
    png = tmp_path / "plots" / "cost_accuracy.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert "<h2>The comparison</h2>" in (tmp_path / "report.html").read_text()
    # per-class rows are named as in the comparison: the LLM by its model, each encoder variant by its encoder
    assert "| LLM smollm2-135m-instruct | positive |" in md and "| minilm-l6 [llm] | positive |" in md
    assert "| llm | positive |" not in md
    assert "worth training on" not in md  # no warnings in these metrics
    warned = {**_metrics(), "llm_warnings": ["the LLM gave 'positive' to 97.0% of 800 labelled rows"]}
    md = write_report(tmp_path, warned, {"name": "t", "stages": {}}, ann).read_text()
    assert "**Are these labels worth training on?**" in md and "- the LLM gave 'positive' to 97.0%" in md


def test_a_gpu_runs_stages_are_priced_at_their_gpus_price():
    """A GPU run's stages get USD at the hardware table's price of their GPU type (annotate.accelerator_type, or
    the GPU nodes' accelerator_type:X), in the manifest's stage records, the cost table and the speed table;
    a GPU of unknown type stays unpriced (–), never priced as a CPU core."""
    from llambert_ray.accounting import labeller_speeds, stage_cost, usd_per_device_hour
    from llambert_ray.config_load import load_config
    from llambert_ray.report import cost_table

    cfg = load_config(None, {"annotate.device": "gpu", "annotate.accelerator_type": "A100-80G",
                             "annotate.tensor_parallel_size": 4, "train.use_gpu": True, "train.workers": 1,
                             "label.gpus_per_actor": 1, "label.concurrency": 4})
    a, t, lab = cfg.annotate, cfg.train, cfg.label
    a100 = usd_per_device_hour("gpu", "A100-80G")
    assert a100 == 2.0 and usd_per_device_hour("gpu", "no-such-gpu") is None
    stages = {}
    for name, secs, rows in (("annotate", 3600.0, 10_000), ("train[llm]", 600.0, 10_000), ("label", 900.0, 1_000_000)):
        stages[name] = {"seconds": secs, "rows": rows, **stage_cost(name, secs, a, t, lab)}
    assert stages["annotate"]["gpu_type"] == "A100-80G"
    assert stages["annotate"]["usd"] == 4 * 3600 * a100 / 3600  # 4 GPUs (TP 4) for an hour
    assert stages["label"]["usd"] == 4 * 900 * a100 / 3600
    speed = labeller_speeds(stages, a, t, lab)
    assert speed["llm"]["usd_per_1k"] == 4 * 3600 / 10 * a100 / 3600  # 4 GPU-hours for 10k rows
    all_in = (4 * 3600 + 600 + 4 * 900) / 1_000_000 * 1000 * a100 / 3600
    assert abs(speed["encoder_all_in"]["usd_per_1k"] - all_in) < 1e-12
    table = cost_table({"stages": stages})
    assert "| USD |" in table and "(gpu A100-80G)" in table and "| 8.0000 |" in table, table
    unknown = load_config(None, {"annotate.device": "gpu", "annotate.accelerator_type": "B300-NEW"})
    cost = stage_cost("annotate", 60.0, unknown.annotate, unknown.train, unknown.label)
    assert cost["usd"] is None and cost["device"] == "gpu"


def test_an_endpoint_llm_is_priced_by_its_tokens_in_the_stage_and_speed_tables():
    """annotate.endpoint: the annotate stage holds no devices of the run's and costs what its tokens cost (the
    summary's endpoint usd); the LLM's USD per 1,000 rows and the encoder's all-in cost carry it."""
    from llambert_ray.accounting import labeller_speeds, stage_cost, usd_per_device_hour
    from llambert_ray.config_load import load_config
    from llambert_ray.report import cost_table

    cfg = load_config(None, {"annotate.model": "gpt-4o-mini",
                             "annotate.endpoint": {"base_url": "https://api.openai.com/v1"},
                             "annotate.device": "gpu", "annotate.accelerator_type": "A100-80G",
                             "train.use_gpu": True, "label.gpus_per_actor": 1})
    a, t, lab = cfg.annotate, cfg.train, cfg.label
    a100 = usd_per_device_hour("gpu", "A100-80G")
    stages = {"annotate": {"seconds": 100.0, "rows": 10_000, **stage_cost("annotate", 100.0, a, t, lab, 3.0)}}
    assert stages["annotate"] == {"seconds": 100.0, "rows": 10_000, "device": "endpoint", "device_seconds": 0.0,
                                  "usd": 3.0}
    for name, secs, rows in (("train[llm]", 600.0, 10_000), ("label", 900.0, 1_000_000)):
        stages[name] = {"seconds": secs, "rows": rows, **stage_cost(name, secs, a, t, lab)}
    speed = labeller_speeds(stages, a, t, lab)
    assert speed["llm"]["usd_per_1k"] == pytest.approx(0.3) and speed["llm"]["rows_per_s"] == 100
    assert speed["llm"]["device_seconds_per_1k"] is None
    all_in = ((600 + 900) * a100 / 3600 + 3.0) / 1_000_000 * 1000
    assert speed["encoder_all_in"]["usd_per_1k"] == pytest.approx(all_in)
    assert "| annotate |" in cost_table({"stages": stages}) and "3.0000" in cost_table({"stages": stages})
