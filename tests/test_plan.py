"""`llambert plan` / `annotate --dry-run`: estimates from corpus metadata, real tokenizers and the hardware table."""

import json

import pandas as pd
import pytest
from conftest import REVIEWS
from typer.testing import CliRunner

from llambert_ray.cli import app
from llambert_ray.config import ConfigError
from llambert_ray.config_load import load_config
from llambert_ray.plan import load_hardware, plan_run
from llambert_ray.tasks import load_task


@pytest.fixture()
def corpus(tmp_path):
    rows = [{"id": f"r{i:03d}", "text": t, "label": lab, "split": "train" if i % 4 else "test"}
            for i, (t, lab) in enumerate(REVIEWS * 5)]
    path = tmp_path / "corpus.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def _cfg(corpus, **over):
    return load_config(None, {"corpus.path": str(corpus), "corpus.filters": {"split": ["train"]},
                              "corpus.sample": 60, "test": {"path": str(corpus), "filters": {"split": ["test"]}},
                              "train.variants": ["llm", "combined"], "train.epochs": 2, **over})


def test_plan_counts_rows_and_tokens_with_the_real_tokenizers(corpus):
    hw = load_hardware()
    est = plan_run(_cfg(corpus), load_task("imdb-sentiment"), hardware=hw)
    by = {s.stage: s for s in est.stages}
    assert [s.stage for s in est.stages] == ["annotate", "train[llm]", "train[combined]", "label", "evaluate"]
    assert by["annotate"].rows == 60 and by["label"].rows == 150 and by["evaluate"].rows == 50 * 2
    assert by["train[combined]"].rows == 120  # stage 1 on LLM labels + stage 2 on gold
    # the 2-shot completion prompt is far longer than a review: prompt tokens per row > 3x the encoder's
    assert by["annotate"].tokens / 60 > 3 * by["label"].tokens / 150
    assert by["train[llm]"].tokens == pytest.approx(2 * 60 * by["label"].tokens / 150, rel=0.01)
    assert not any("characters per token" in n for n in est.notes)  # packaged tokenizers were used
    for s in est.stages:
        price = hw["devices"][s.device]["usd_per_hour"]
        assert s.device_hours > 0 and s.cost_usd == pytest.approx(s.device_hours * price)
        assert s.wall_hours == pytest.approx(s.device_hours / s.devices)
    assert est.totals["cost_usd"] == pytest.approx(sum(s.cost_usd for s in est.stages))
    # evaluate.llm_test_sample: those test rows go to the LLM in the same call (at most the 50 test rows there are)
    for want, sent in ((30, 90), (500, 110)):
        est = plan_run(_cfg(corpus, **{"evaluate.llm_test_sample": want}), load_task("imdb-sentiment"), hardware=hw)
        assert {s.stage: s for s in est.stages}["annotate"].rows == sent


def test_plan_uses_gpu_rows_and_measured_rates(corpus, tmp_path):
    cfg = _cfg(corpus, **{"annotate.device": "gpu", "annotate.tensor_parallel_size": 4, "annotate.concurrency": 2})
    est = plan_run(cfg, load_task("imdb-sentiment"), hardware=load_hardware(), gpu="h100-80gb")
    ann = est.stages[0]
    assert ann.device == "h100-80gb" and ann.devices == 8 and ann.basis.startswith("45% of 989")
    manifest = {"stages": {"annotate": {"tokens": 1000, "device_seconds": 4.0},
                           "train[llm]": {"rows": 10, "device_seconds": 2.0,
                                          "stages": [{"rows": 10, "epochs": 3}]}}}
    est2 = plan_run(_cfg(corpus), load_task("imdb-sentiment"), hardware=load_hardware(), measured=manifest)
    by = {s.stage: s for s in est2.stages}
    assert by["annotate"].tokens_per_device_s == 250 and by["annotate"].basis == "measured"
    assert by["train[llm]"].basis.startswith("measured") and by["label"].basis.startswith("40%")


def test_plan_says_whether_the_engine_fits_its_gpus(corpus):
    """Llama-2-70b in bf16 is ~128 GiB of weights: over 4 A100-80GB it fits with its KV cache (the flagship), on one
    it cannot start (vLLM would refuse after minutes of loading); a max_model_len too long for the batch warns."""
    from llambert_ray.config import AnnotateConfig
    from llambert_ray.gpu_memory import ModelShape, engine_check

    hw, task = load_hardware(), load_task("imdb-sentiment")
    llama70 = {"annotate.model": "meta-llama/Llama-2-70b-chat-hf", "annotate.device": "gpu",
               "annotate.max_model_len": 4096, "annotate.batch_size": 64,
               "annotate.engine_kwargs": {"gpu_memory_utilization": 0.9}}
    flagship = plan_run(_cfg(corpus, **llama70, **{"annotate.tensor_parallel_size": 4}), task, hardware=hw)
    (note,) = [n for n in flagship.notes if n.startswith("GPU memory")]
    assert note.startswith("GPU memory OK") and "weights 32.1 GiB" in note, note
    one = plan_run(_cfg(corpus, **llama70, **{"annotate.tensor_parallel_size": 1}), task, hardware=hw)
    (note,) = [n for n in one.notes if n.startswith("GPU memory")]
    assert note.startswith("GPU memory FAIL") and "weights 128.5 GiB" in note and "tensor_parallel_size" in note
    shape = ModelShape.from_config(hw["llm_shapes"]["meta-llama/Llama-2-70b-chat-hf"])
    assert shape.params == pytest.approx(68.98e9, rel=1e-3)  # the published parameter count
    long = AnnotateConfig(model="m", device="gpu", tensor_parallel_size=4, max_model_len=65536, batch_size=64)
    status, detail, _ = engine_check(shape, long, 80, "a100-80gb")
    assert status == "warn" and "7 sequences at once" in detail, detail
    # the weights every engine start reads before it serves: 128.5 GiB at EFS bursting's 100 MiB/s is ~22 minutes
    # of 4 idle A100s ($2.00 an hour each), at elastic's 1,500 MiB/s per client 1.5 minutes
    (note,) = [n for n in flagship.notes if n.startswith("weights load")]
    assert "128 GiB per engine start" in note and "its 4 GPUs idle" in note, note
    assert "efs-bursting 21.8 min ($2.91)" in note and "efs-elastic 1.5 min" in note, note
    slow = {**hw, "weights_storage": {"nfs": 0.05}}
    (note,) = [n for n in plan_run(_cfg(corpus, **llama70, **{"annotate.tensor_parallel_size": 4}), task,
                                   hardware=slow).notes if n.startswith("weights load")]
    assert "nfs 42.8 min" in note and "efs" not in note, note


def test_plan_errors_name_the_fix(corpus, tmp_path):
    task = load_task("imdb-sentiment")
    cfg = load_config(None, {"corpus.path": str(tmp_path / "missing.parquet")})
    with pytest.raises(ConfigError, match="--rows"):
        plan_run(cfg, task, hardware=load_hardware())
    est = plan_run(cfg, task, hardware=load_hardware(), rows=1000, mean_chars=800)
    assert est.stages[0].rows == 1000
    with pytest.raises(ConfigError, match="not in the hardware table"):
        plan_run(_cfg(corpus, **{"train.model": "my-org/unknown-encoder"}), task, hardware=load_hardware())
    with pytest.raises(ConfigError, match="--gpu"):
        plan_run(_cfg(corpus), task, hardware=load_hardware(), gpu="tpu-v9")


def test_cli_plan_and_annotate_dry_run(corpus, tmp_path):
    (tmp_path / "run.yaml").write_text(f"corpus: {{path: {corpus}, sample: 40}}\n")
    r = CliRunner().invoke(app, ["plan", "-c", str(tmp_path / "run.yaml"), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "| annotate | 40 |" in r.output and "**total**" in r.output
    assert json.loads((tmp_path / "p.json").read_text())["totals"]["tokens"] > 0
    out = tmp_path / "ann"
    r = CliRunner().invoke(app, ["annotate", "-i", str(corpus), "-o", str(out), "--sample", "30", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "| annotate | 30 |" in r.output and "train" not in r.output and not out.exists()
    r = CliRunner().invoke(app, ["plan", "-c", str(tmp_path / "run.yaml"), "--measured", str(tmp_path)])
    assert r.exit_code == 2 and "no manifest.json" in r.output


def test_chat_prompts_are_counted_in_tokens_not_keys(corpus):
    """transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding: len() of it is 2 (its keys).
    A chat prompt holds the system prompt, the instruction and the review: far more than 2 tokens."""
    from llambert_ray.plan import TokenCounter

    task = load_task("imdb-sentiment")
    tok = TokenCounter("smollm2-135m-instruct")
    text = REVIEWS[0][0]
    chat = tok.count_chat(task.chat_messages(text, 0, 6000))
    assert chat > tok.count(text) + 20
    cfg = _cfg(corpus, **{"annotate.prompt_style": "chat", "annotate.shots": 0})
    by = {s.stage: s for s in plan_run(cfg, task, hardware=load_hardware()).stages}
    assert by["annotate"].tokens / 60 > 40  # system + user template + review, in tokens


def test_gold_knn_prompts_are_counted_with_their_corpus_length_examples(corpus):
    """gold-knn shots are corpus rows, longer than the task's short written examples: the plan counts them."""
    task = load_task("mesh-anatomy")  # its written examples are one-word terms; the corpus rows are reviews
    hw = load_hardware()
    fixed = {s.stage: s for s in plan_run(_cfg(corpus, **{"annotate.shots": 4}), task, hardware=hw).stages}
    knn = {s.stage: s for s in plan_run(_cfg(corpus, **{"annotate.shots": 4, "annotate.shots_from": "gold-knn"}),
                                        task, hardware=hw).stages}
    assert knn["annotate"].tokens > 1.5 * fixed["annotate"].tokens


def test_calibration_gold_counts_its_gold_rows_once(corpus):
    """calibration gold sends annotate.gold_rows gold rows to the LLM beside the sample (once a run: cached after)."""
    task, hw = load_task("imdb-sentiment"), load_hardware()
    plain = {s.stage: s for s in plan_run(_cfg(corpus), task, hardware=hw).stages}
    gold = {s.stage: s for s in plan_run(_cfg(corpus, **{"annotate.calibration": "gold", "annotate.gold_rows": 10}),
                                         task, hardware=hw).stages}
    assert plain["annotate"].rows == 60 and gold["annotate"].rows == 70
    assert gold["label"].rows == plain["label"].rows


def test_plan_chooses_the_training_topology_and_the_flagship_follows_it():
    """roberta-large on 10k LLM-labelled rows x 5 epochs: one A100 trains it in minutes by the plan's estimate, so
    4 data-parallel workers (each a 1-GPU pod, all-reducing ~0.6 GB of bf16 gradients every step) are advised
    against, with the settings that keep the effective batch; the flagship config trains on one GPU as advised, and
    its plan says so."""
    from conftest import REPO

    hw, task = load_hardware(), load_task("imdb-sentiment")
    big = {"train.model": "roberta-large", "train.use_gpu": True, "train.epochs": 5, "train.variants": ["llm"],
           "label.gpus_per_actor": 1, "corpus.sample": None}
    four = plan_run(_cfg(REPO / "configs" / "no-such.parquet", **big, **{"train.workers": 4, "train.grad_accum": 1}),
                    task, hardware=hw, rows=12_500, mean_chars=1300)
    (note,) = [n for n in four.notes if n.startswith("training topology")]
    assert "set train.workers: 1 and train.grad_accum: 4" in note and "0.6 GB" in note, note
    flagship = load_config(REPO / "configs" / "imdb-llama2-70b.yaml")
    t = flagship.train
    assert (t.workers, t.grad_accum * t.batch_size) == (1, 64)
    plan = plan_run(flagship, task, hardware=hw, rows=25_000, mean_chars=1300)
    (note,) = [n for n in plan.notes if n.startswith("training topology")]
    assert note.startswith("training topology: 1 GPU worker(s)"), note


def test_plan_prices_an_endpoint_by_its_tokens(corpus):
    """annotate.endpoint: the annotation costs its tokens at the endpoint's prices, holds no devices of the run's,
    and takes the time its tokens-a-minute limit allows; a hosted model's tokenizer is not at hand: 4 chars/token."""
    ep = {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY", "tokens_per_min": 60_000,
          "usd_per_1k_prompt_tokens": 0.15, "usd_per_1k_completion_tokens": 0.6}
    est = plan_run(_cfg(corpus, **{"annotate.model": "gpt-4o-mini", "annotate.mode": "generate",
                                   "annotate.endpoint": ep}), load_task("imdb-sentiment"), hardware=load_hardware())
    ann = est.stages[0]
    assert ann.stage == "annotate" and ann.device == "endpoint" and ann.devices == 0 and ann.device_hours == 0
    answer = 60 * 10  # max_new_tokens a row
    assert ann.cost_usd == pytest.approx(((ann.tokens - answer) * 0.15 + answer * 0.6) / 1000, rel=0.01)
    assert ann.wall_hours == pytest.approx(ann.tokens / 1000 / 3600) and "rate limits" in ann.basis
    assert any("gpt-4o-mini: tokenizer not available" in n for n in est.notes)
    assert est.totals["cost_usd"] == pytest.approx(sum(s.cost_usd for s in est.stages))
    assert "| annotate | 60 |" in est.table() and "| endpoint | 0 |" in est.table()
