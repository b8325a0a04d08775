"""Annotation: request building and answer parsing (pure), then the real vLLM engine on a local Ray."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import CountingEngine

from llambert_ray.annotate import PromptPlan
from llambert_ray.annotate.engines import DatasetEngine
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


def test_head_tail_requests_and_their_own_cache_key():
    from dataclasses import replace

    from llambert_ray.annotate import plan_hash

    review = "Loved the start. " + "Then it drags. " * 30 + "In the end: terrible."
    plan = _plan("score", ids={"positive": 11, "negative": 22})
    both = replace(plan, truncate="head_tail")
    assert "terrible" not in plan.request(review)["prompt"]
    assert both.request(review)["prompt"].endswith("In the end: terrible.\nSentiment:")
    # another prompt, another cache key; the default keeps the key that caches written before had
    assert plan_hash(both, "m") != plan_hash(plan, "m")
    from llambert_ray.config import config_hash

    before = config_hash(plan.task, "m", plan.mode, plan.style, plan.shots, plan.max_text_chars,
                         plan.max_new_tokens, plan.temperature, plan.label_token_ids)
    assert plan_hash(plan, "m") == before


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


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_cache_reuses_finished_rows_and_drops_broken_parts(ray_local, tmp_path):
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    rows = pd.DataFrame({"id": [f"r{i:03d}" for i in range(60)], "text": [f"text {i}" for i in range(60)]})
    cfg, cache = AnnotateConfig(mode="generate", batch_size=4), tmp_path / "cache"
    first = CountingEngine()
    annotate(ray.data.from_pandas(rows[:25]), TASK, cfg, engine=first, cache_dir=cache)  # "interrupted" here
    (folders,) = list(cache.iterdir())
    (folders / "torn-part.parquet").write_bytes(b"PAR1 cut short by a crash")
    second = CountingEngine()
    df, summary = annotate(ray.data.from_pandas(rows), TASK, cfg, engine=second, cache_dir=cache)
    assert first.rows == 25 and second.rows == 35  # only the rows not answered before went to the engine
    assert summary.cached == 25 and summary.rows_in == 60 and summary.labelled == 60
    assert len(df) == 60 and df["id"].is_unique and set(df["id"]) == set(rows["id"])
    assert df["text"].tolist() == rows["text"].tolist()
    assert not (folders / "torn-part.parquet").exists()
    # another prompt (shots) is another cache: nothing reused
    third = CountingEngine()
    annotate(ray.data.from_pandas(rows[:5]), TASK, AnnotateConfig(mode="generate", shots=1), engine=third,
             cache_dir=cache)
    assert third.rows == 5 and len(list(cache.iterdir())) == 2


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(1500)
def test_killed_annotation_run_resumes_from_its_cache(ray_local, tmp_path):
    """`llambert annotate` (the real engine) killed (SIGKILL, its whole process tree) once a chunk of answers is
    cached whole: it leaves no output that looks complete, and a rerun on the same cache sends only the rows left
    to the engine (a counting stand-in here: the real engine answering a rerun's rows is
    test_engine_actor_killed_mid_run_every_id_once), every id exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import ray
    from conftest import REVIEWS, finished_parts

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    rows = [{"id": f"r{k}-{i:02d}", "text": t, "label": lab} for k in range(3) for i, (t, lab) in enumerate(REVIEWS)]
    corpus = tmp_path / "reviews.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ann"
    args = ["annotate", "-t", "imdb-sentiment", "-i", str(corpus), "-o", str(out), "--batch-size", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "llambert_ray.cli", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not finished_parts(out / ".annotate_cache"):
        time.sleep(0.5)
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:  # the run's own local Ray (raylet, workers, the engine actor)
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(30)
    assert finished_parts(out / ".annotate_cache"), "no chunk was cached before the kill"
    assert not (out / "annotations.parquet").exists()  # a killed run leaves no output that looks complete

    again = CountingEngine()
    df, s = annotate(ray.data.from_items(rows), TASK, AnnotateConfig(batch_size=8), engine=again,
                     cache_dir=out / ".annotate_cache")
    assert len(df) == 120 and df["id"].is_unique and set(df["id"]) == {r["id"] for r in rows}
    assert df["llm_label"].notna().all()
    assert 0 < s.cached < 120 and again.rows == 120 - s.cached  # only the rows left went to the engine
    assert "reused from the cache" in "\n".join(s.lines())


def test_prior_calibration_matches_the_label_shares_without_llm_calls():
    """Scores biased towards 'positive' (every row +1 nat): fitted offsets bring the shares back to the prior."""
    from llambert_ray.annotate import AnnotationError, apply_prior_calibration, make_plan
    from llambert_ray.config import AnnotateConfig

    rng = np.random.default_rng(0)
    true = rng.random(400) < 0.5
    margin = np.where(true, 1.0, -1.0) + rng.normal(0, 0.8, 400) + 1.0  # log p(pos) - log p(neg), biased +1
    rows = pd.DataFrame({"llm_raw": [json.dumps({"positive": m / 2, "negative": -m / 2}) for m in margin],
                         "llm_label": np.where(margin > 0, "positive", "negative"), "llm_confidence": 0.7})
    before = float((rows["llm_label"] == np.where(true, "positive", "negative")).mean())
    out, off = apply_prior_calibration(rows.copy(), ["positive", "negative"])
    after = float((out["llm_label"] == np.where(true, "positive", "negative")).mean())
    assert abs((out["llm_label"] == "positive").mean() - 0.5) < 0.05 and after > before + 0.1
    assert off["positive"] > off["negative"]
    out, _ = apply_prior_calibration(rows.copy(), ["positive", "negative"], {"positive": 0.8, "negative": 0.2})
    assert (out["llm_label"] == "positive").mean() > 0.75  # mean p(positive) = 0.8; share of argmax > 0.75
    with pytest.raises(AnnotationError, match="label_prior.*fix"):  # a bad prior fails before any LLM call
        make_plan(TASK, AnnotateConfig(mode="score", calibration="prior", label_prior={"pos": 1.0}))


def test_engine_config_reuses_the_few_shot_prefix_on_cpu():
    """vLLM reuses cached prefixes in whole KV blocks; its CPU default block (128 tokens) is longer than the tasks'
    few-shot prefixes (50-70 tokens), so on CPU the engine gets 32-token blocks; GPU keeps vLLM's default."""
    from llambert_ray.annotate import VLLMEngine
    from llambert_ray.config import AnnotateConfig
    from llambert_ray.models import resolve_model

    plan = _plan("score", ids={"positive": 11, "negative": 22})
    path = resolve_model("smollm2-135m-instruct")
    cpu = VLLMEngine(AnnotateConfig(device="cpu"), path).processor_config(plan)
    assert cpu.engine_kwargs["block_size"] == 32 and cpu.engine_kwargs["enable_prefix_caching"]
    from transformers import AutoTokenizer

    prefix_tokens = len(AutoTokenizer.from_pretrained(path)(TASK.completion_prefix(2))["input_ids"])
    assert cpu.engine_kwargs["block_size"] <= prefix_tokens < 128  # one whole block reused; none at 128
    gpu = VLLMEngine(AnnotateConfig(device="gpu"), path).processor_config(plan)
    assert "block_size" not in gpu.engine_kwargs and gpu.engine_kwargs["dtype"] == "bfloat16"
    assert VLLMEngine(AnnotateConfig(device="cpu", block_size=64), path).processor_config(plan).engine_kwargs[
        "block_size"] == 64


def test_openai_requests_and_answers_of_the_served_engine():
    """The run-long engine is reached through vLLM's OpenAI API: the same prompts and decoding, and its answers
    (log-probs keyed "token_id:N", completion or chat shaped) give the same labels as the in-process engine's."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from llambert_ray.annotate import openai_answer, openai_request

    score = _plan("score", ids={"positive": 11, "negative": 22})
    method, dtype, body = openai_request(score, "Great film.")
    assert (method, dtype) == ("completions", "CompletionRequest")
    r = CompletionRequest(**body)
    req = r.to_sampling_params(r.max_tokens, None)
    assert req.max_tokens == 1 and req.temperature == 0 and list(req.logprob_token_ids) == [11, 22]
    assert body["prompt"] == score.request("Great film.")["prompt"]
    method, dtype, body = openai_request(_plan("choice", style="chat"), "x")
    assert (method, dtype) == ("chat", "ChatCompletionRequest") and body["messages"][0]["role"] == "system"
    ChatCompletionRequest(**body)  # valid as the deployment will parse it
    chat_score = openai_request(_plan("score", style="chat", ids={"positive": 11, "negative": 22}), "x")[2]
    assert ChatCompletionRequest(**chat_score).logprobs

    completion = {"choices": [{"text": " positive", "logprobs": {"top_logprobs": [
        {"token_id:11": -0.1, "token_id:22": -2.5}]}}], "usage": {"prompt_tokens": 42}}
    text, lp, tokens = openai_answer(completion)
    assert (text, tokens) == (" positive", 42)
    assert score.result(text, lp, None)["llm_label"] == "positive"
    chat = {"choices": [{"message": {"content": "negative"}, "logprobs": {"content": [{"token": "token_id:22",
            "logprob": -0.2, "top_logprobs": [{"token": "token_id:11", "logprob": -3.0},
                                              {"token": "token_id:22", "logprob": -0.2}]}]}}],
            "usage": {"prompt_tokens": 7}}
    text, lp, tokens = openai_answer(chat)
    r = score.result(text, lp, None)
    assert r["llm_label"] == "negative" and r["llm_confidence"] > 0.9 and tokens == 7
    assert score.result(*openai_answer({"choices": [{"text": "x"}]})[:2], None)["llm_error"]


def test_the_engine_tokenizes_unless_asked_for_ray_data_stages():
    """vLLM tokenizes text prompts and returns answer text itself; Ray Data's own tokenize / detokenize stages
    are two more actor pools per call (bench/fixed_cost.py), so they run only when asked for."""
    from ray.llm._internal.batch.stages.configs import DetokenizeStageConfig, TokenizerStageConfig, resolve_stage_config

    from llambert_ray.annotate import VLLMEngine
    from llambert_ray.config import AnnotateConfig

    plan = _plan("score", ids={"positive": 11, "negative": 22})

    def enabled(**kw):
        c = VLLMEngine(AnnotateConfig(device="cpu", **kw), "x/y").processor_config(plan)
        return (resolve_stage_config(c.tokenize_stage, TokenizerStageConfig).enabled,
                resolve_stage_config(c.detokenize_stage, DetokenizeStageConfig).enabled)

    assert enabled() == (False, False)
    assert enabled(tokenize_in_engine=False) == (True, True)


def test_ray_ends_a_gpu_engines_child_processes():
    """On CPU the engine stops its own vLLM processes (Ray killing them first only prints tracebacks); on GPUs Ray
    must end them with the actor, or a crashed engine's vLLM process keeps holding its GPUs."""
    from llambert_ray.annotate.engines import engine_setup
    from llambert_ray.config import AnnotateConfig

    _, cpu_env, _ = engine_setup(AnnotateConfig(device="cpu"), "cpu")
    _, gpu_env, _ = engine_setup(AnnotateConfig(device="gpu", tensor_parallel_size=4), "gpu")
    assert cpu_env["RAY_kill_child_processes_on_worker_exit"] == "false"
    assert "RAY_kill_child_processes_on_worker_exit" not in gpu_env


def _engine_stage(cfg, model, plan):
    """The vLLM engine stage Ray Data LLM builds from our processor config (build_processor, as a run does), and the
    actor pool's size."""
    from ray.data.llm import build_processor

    from llambert_ray.annotate import VLLMEngine

    stage = build_processor(VLLMEngine(cfg, model).processor_config(plan)).get_stage_by_name("vLLMEngineStage")
    kw = stage.map_batches_kwargs
    assert kw["compute"].min_size == kw["compute"].max_size  # a fixed pool: every replica starts at once
    return kw, kw["compute"].max_size


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_engine_configs_through_ray_data_llms_stage_setup(ray_local, tiny_llama):
    """Our processor configs for a CPU and a GPU cluster passed through the stage setup Ray Data LLM runs
    (build_processor): what each engine replica's actor and placement group ask of Ray, and that the devices the
    plan and the manifest count (engine_devices) are the ones Ray reserves.
    - CPU, TP=2: vLLM's Ray executor needs a GPU-like device key, so the engine forks its TP ranks itself (mp): one
      actor holding every bundle's CPUs, no placement group of its own, one core list per rank;
    - GPU, TP=4: Ray's default for a GPU engine is a soft PACK of its TP bundles, which can spread it over 1-GPU
      pods: each replica's placement group must be 4 x {GPU 1, CPU 1} STRICT_PACKed (one node), the accelerator type
      passed through, the engine actor itself holding no GPU; with pipeline parallelism a replica may span nodes."""
    from llambert_ray.annotate import engine_devices
    from llambert_ray.config import AnnotateConfig

    plan = _plan("generate")
    model = str(tiny_llama)  # a local folder: the stage setup reads its config, and nothing is downloaded
    cpu_cfg = AnnotateConfig(device="cpu", tensor_parallel_size=2, cpus_per_engine=0.5, concurrency=2)
    cpu, replicas = _engine_stage(cpu_cfg, model, plan)
    assert cpu["num_cpus"] == 1.0 and not cpu.get("num_gpus") and "ray_remote_args_fn" not in cpu
    assert cpu["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    assert replicas == 2 and engine_devices(cpu_cfg, False) == cpu["num_cpus"] * replicas == 2.0

    gpu_cfg = AnnotateConfig(device="gpu", tensor_parallel_size=4, accelerator_type="A100-80G", concurrency=2)
    gpu, replicas = _engine_stage(gpu_cfg, model, plan)
    n_bundles, accelerator, pg = gpu["ray_remote_args_fn"].args  # what each replica's placement group will be
    assert (n_bundles, accelerator, pg["strategy"]) == (4, "A100-80G", "STRICT_PACK")
    assert [(b["GPU"], b["CPU"]) for b in pg["bundles"]] == [(1, 1)] * 4
    assert gpu["num_gpus"] == 0 and gpu["accelerator_type"] == "A100-80G"
    assert engine_devices(gpu_cfg, True) == sum(b["GPU"] for b in pg["bundles"]) * replicas == 8

    pp_cfg = AnnotateConfig(device="gpu", tensor_parallel_size=2, pipeline_parallel_size=2)
    pp, _ = _engine_stage(pp_cfg, model, plan)
    n_bundles, _, pg = pp["ray_remote_args_fn"].args
    assert n_bundles == 4 and pg["strategy"] == "PACK" and engine_devices(pp_cfg, True) == 4


class FlakyEngine(DatasetEngine):
    """A stand-in engine whose first run dies (a real Ray task failure) once some chunks are in the cache, like a
    run whose engine is lost for good mid-way. `failing` rows come back with a per-row engine error instead."""

    def __init__(self, cache, die_after_parts=1, failing=()):
        self.cache, self.die_after_parts, self.failing, self.sent = cache, die_after_parts, set(failing), []

    def run(self, ds, plan):
        ids = ds.to_pandas()["id"].tolist()
        self.sent.append(ids)
        die = len(self.sent) == 1 and self.die_after_parts is not None
        cache, n_parts, failing, last = self.cache, self.die_after_parts, self.failing, ids[-1]

        def answer(b):
            import time
            from pathlib import Path

            if die and last in set(b["id"]):  # the last chunk: wait for earlier chunks to be cached, then die
                deadline = time.time() + 120
                while time.time() < deadline and len(list(Path(cache).glob("*/*.parquet"))) < n_parts:
                    time.sleep(0.2)
                raise RuntimeError("engine lost")
            bad = b["id"].isin(failing)
            return b.assign(llm_label=["positive" if not x else None for x in bad], llm_confidence=0.9,
                            llm_raw="positive", llm_error=["ValueError: prompt too long" if x else None for x in bad],
                            prompt_tokens=10)

        return ds.map_batches(answer, batch_format="pandas", num_cpus=0.1)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_failed_run_resends_only_the_rows_it_left(ray_local, tmp_path):
    """The engine run dies after caching some chunks: annotate() runs again on exactly the rows left without an
    answer; every id comes out once, per-row engine failures included (counted, not dropped)."""
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    rows = pd.DataFrame({"id": [f"r{i:03d}" for i in range(130)], "text": [f"text {i}" for i in range(130)]})
    engine = FlakyEngine(tmp_path / "cache", failing={"r005", "r100"})
    df, s = annotate(ray.data.from_pandas(rows), TASK, AnnotateConfig(mode="generate", batch_size=4), engine=engine,
                     cache_dir=tmp_path / "cache")
    first, second = engine.sent
    assert len(first) == 130 and 0 < len(second) < 130 and s.attempts == 2 and s.resent == len(second)
    answered_first = set(first) - set(second)
    assert len(answered_first) >= 32  # at least the chunk cached before the failure was not sent again
    assert len(df) == 130 and df["id"].is_unique and set(df["id"]) == set(rows["id"])
    assert s.rows_in == 130 and s.failed == 2 and s.labelled == 128
    assert sorted(df.loc[df["llm_error"].notna(), "id"]) == ["r005", "r100"]
    assert any("2 attempts" in line for line in s.lines())
    # a rerun reuses the 128 answers and retries only the 2 per-row failures
    again = FlakyEngine(tmp_path / "cache", die_after_parts=None)
    df2, s2 = annotate(ray.data.from_pandas(rows), TASK, AnnotateConfig(mode="generate", batch_size=4),
                       engine=again, cache_dir=tmp_path / "cache")
    assert sorted(again.sent[0]) == ["r005", "r100"] and s2.cached == 128 and s2.failed == 0 and len(df2) == 130


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_run_failing_before_any_answer_is_not_retried(ray_local, tmp_path):
    import ray

    from llambert_ray.annotate import AnnotationError, annotate
    from llambert_ray.config import AnnotateConfig

    rows = pd.DataFrame({"id": [f"r{i:03d}" for i in range(10)], "text": [f"text {i}" for i in range(10)]})
    engine = FlakyEngine(tmp_path / "cache", die_after_parts=0)  # dies at once: nothing answered
    with pytest.raises(AnnotationError, match="rerunning the same command resumes"):
        annotate(ray.data.from_pandas(rows), TASK, AnnotateConfig(mode="generate"), engine=engine,
                 cache_dir=tmp_path / "cache")
    assert len(engine.sent) == 1


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(1500)
def test_engine_actor_killed_mid_run_every_id_once(ray_local, tmp_path):
    """The vLLM engine actor SIGKILLed (with its engine-core process) once its first chunk of answers is cached:
    Ray Data restarts the actor and retries its batches (or, failing that, annotate() runs again on the rows left
    unanswered); the run completes and every sampled id comes out exactly once, answered."""
    import signal
    import threading
    import time

    import psutil
    import ray
    from conftest import REVIEWS, finished_parts

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    # 240 rows (40 easy reviews x 6): with 120 a fast machine answered every chunk together before the kill
    rows = pd.DataFrame([{"id": f"r{k}-{i:02d}", "text": t, "label": lab}
                         for k in range(6) for i, (t, lab) in enumerate(REVIEWS)])
    cache = tmp_path / "cache"
    killed: dict = {}

    def engine_actor():
        for proc in psutil.Process().children(recursive=True):  # this session's Ray only
            try:
                if " ".join(proc.cmdline()).startswith("ray::") and "vLLMEngineStage" in " ".join(proc.cmdline()):
                    return proc
            except psutil.Error:
                pass
        return None

    def kill_engine_once_it_answers():
        deadline = time.time() + 1200
        while time.time() < deadline and not finished_parts(cache):
            time.sleep(0.5)
        actor = engine_actor()
        if actor is None:
            return
        victims = [actor, *actor.children(recursive=True)]  # the actor and vLLM's engine-core process
        for v in victims:
            try:
                v.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        killed.update(at=time.time(), pids=[v.pid for v in victims],
                      cached=sum(len(pd.read_parquet(f)) for f in finished_parts(cache)))

    killer = threading.Thread(target=kill_engine_once_it_answers, daemon=True)
    killer.start()
    t0 = time.time()
    df, s = annotate(ray.data.from_pandas(rows), TASK, AnnotateConfig(mode="score", batch_size=8), cache_dir=cache)
    done = time.time()
    killer.join(5)
    assert killed, "the engine actor was not found or not killed"
    restarted = engine_actor()
    print(f"\nkilled engine actor + children {killed['pids']} {killed['at'] - t0:.0f}s into annotate, with "
          f"{killed['cached']} rows cached; annotate took {done - t0:.0f}s ({done - killed['at']:.0f}s after the "
          f"kill); runs {s.attempts}, rows sent again by annotate {s.resent}; engine actor now "
          f"{restarted.pid if restarted else None}; killed pids still alive: "
          f"{[p for p in killed['pids'] if psutil.pid_exists(p)]}")
    assert len(df) == 240 and df["id"].is_unique and set(df["id"]) == set(rows["id"])
    assert s.rows_in == 240 and s.failed == 0 and s.labelled == 240
    assert killed["cached"] < 240  # the kill came mid-run
    acc = (df["llm_label"] == df["label"]).mean()
    assert acc >= 0.75, acc  # answers after the restart are as good as before (40 easy reviews x 6)


def test_prompt_key_covers_the_rows_text_and_its_own_examples():
    from llambert_ray.annotate import SHOTS_COLUMN, prompt_keys
    from llambert_ray.annotate.cache import _answer_keys

    rows = pd.DataFrame({"id": ["a", "a", "a"], "text": ["good", "bad", "good"],
                         SHOTS_COLUMN: ['[{"text": "x", "label": "positive"}]'] * 2 + ['[]']})
    k = prompt_keys(rows)
    assert k.nunique() == 3  # same id: another text, or other examples, is another key
    assert prompt_keys(rows.drop(columns=[SHOTS_COLUMN])).iloc[0] == prompt_keys(rows[["id", "text"]]).iloc[0]
    old = pd.DataFrame({"id": ["a"], "llm_label": ["positive"]})  # a part cached before keys existed
    assert _answer_keys(old).iloc[0] not in set(_answer_keys(rows.assign(prompt_key=k)))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_row_whose_text_changed_is_asked_again(ray_local, tmp_path):
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    rows = pd.DataFrame({"id": [f"r{i}" for i in range(6)], "text": [f"text {i}" for i in range(6)]})
    cfg, cache = AnnotateConfig(mode="generate", batch_size=4), tmp_path / "cache"
    annotate(ray.data.from_pandas(rows), TASK, cfg, engine=CountingEngine(), cache_dir=cache)
    changed = rows.copy()
    changed.loc[2, "text"] = "an edited text"
    again = CountingEngine()
    df, s = annotate(ray.data.from_pandas(changed), TASK, cfg, engine=again, cache_dir=cache)
    assert again.rows == 1 and s.cached == 5 and len(df) == 6 and df["id"].is_unique
    assert df.loc[df["id"] == "r2", "text"].item() == "an edited text"


def _skewed_scores(n, rng, bias):
    """Label log-probabilities of a biased scorer: the right label's score + 1 + noise, plus `bias` per label."""
    labels = ["a", "b", "c"]
    y = rng.integers(0, 3, n)
    s = rng.normal(0, 1.0, (n, 3)) + np.eye(3)[y] * 1.5 + np.asarray(bias)
    rows = []
    for i in range(n):
        raw = {lab: float(v) for lab, v in zip(labels, s[i], strict=True)}
        rows.append({"id": f"g{i:04d}", "label": labels[y[i]], "llm_raw": json.dumps(raw),
                     "llm_label": labels[int(s[i].argmax())], "llm_confidence": 0.5})
    return pd.DataFrame(rows), labels


def test_gold_calibration_undoes_a_label_bias_fitted_on_few_gold_rows():
    from llambert_ray.annotate import apply_gold_calibration, apply_offsets
    from llambert_ray.metrics import classification_metrics

    rng = np.random.default_rng(0)
    gold, labels = _skewed_scores(100, rng, [2.0, 0.0, -0.5])
    rows, _ = _skewed_scores(2000, rng, [2.0, 0.0, -0.5])
    before = classification_metrics(rows["label"], rows["llm_label"], labels)["accuracy"]
    out, offsets, report = apply_gold_calibration(rows.copy(), gold, labels)
    after = classification_metrics(out["label"], out["llm_label"], labels)["accuracy"]
    assert after > before + 0.15, (before, after)
    assert offsets["a"] > offsets["b"] > offsets["c"]
    assert report["held_out"] == 50 and report["after"]["accuracy"] > report["before"]["accuracy"]
    assert report["applied"] is True
    # with a temperature: the same labels up to the fit's noise, and the offsets re-apply to other rows
    out_t, off_t, _ = apply_gold_calibration(rows.copy(), gold, labels, temperature=True)
    assert off_t["temperature"] > 0
    assert (apply_offsets(rows.copy(), labels, off_t)["llm_label"] == out_t["llm_label"]).all()
    assert classification_metrics(out_t["label"], out_t["llm_label"], labels)["accuracy"] > before + 0.15


def test_gold_calibration_that_makes_held_out_gold_worse_is_not_applied():
    """Offsets fitted on gold rows whose bias the held-out rows do not share (+2 for `a` on the fitted half, none on
    the held-out half) make the held-out rows worse: the labels stay the LLM's, and the report says so."""
    from llambert_ray.annotate import apply_gold_calibration

    rng = np.random.default_rng(1)
    n, holdout, seed = 60, 0.5, 0
    held = set(np.random.default_rng(seed).permutation(n)[:int(n * holdout)])
    biased, labels = _skewed_scores(n, rng, [2.0, 0.0, -0.5])
    fair, _ = _skewed_scores(n, rng, [0.0, 0.0, 0.0])
    gold = pd.concat([fair.iloc[[i]] if i in held else biased.iloc[[i]] for i in range(n)]).reset_index(drop=True)
    gold["id"] = [f"g{i:04d}" for i in range(n)]  # the order calibration sorts by: row i stays row i
    rows, _ = _skewed_scores(300, rng, [0.0, 0.0, 0.0])
    out, offsets, report = apply_gold_calibration(rows.copy(), gold, labels, holdout=holdout, seed=seed)
    assert report["after"]["macro_f1"] < report["before"]["macro_f1"], report
    assert report["applied"] is False and offsets is None
    assert (out["llm_label"] == rows["llm_label"]).all()


def test_gold_calibration_needs_score_mode_and_gold_rows():
    from llambert_ray.annotate import AnnotationError, annotate, make_plan
    from llambert_ray.config import AnnotateConfig

    with pytest.raises(AnnotationError, match="only score mode"):
        make_plan(TASK, AnnotateConfig(mode="generate", calibration="gold"))
    with pytest.raises(AnnotationError, match="needs gold-labelled rows"):
        annotate(None, TASK, AnnotateConfig(calibration="gold"), engine=CountingEngine())
    # gold-knn needs no fixed examples of the task, and takes two per label when shots is not set
    plan = make_plan(TASK.model_copy(update={"examples": []}), AnnotateConfig(shots_from="gold-knn",
                                                                               model="smollm2-135m-instruct"))
    assert plan.shots == 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_served_engine_starts_early_only_when_the_cpus_hold_both(ray_local):
    """start_soon deploys the engine beside other work only if the free CPUs give both whole cores: on 2 CPUs an
    engine (1 + 0.1 CPU) and a 1-CPU embedding actor do not fit (Ray would keep the embedding waiting forever), nor
    does a 0.5-CPU one (the two would slow each other down more than they overlap)."""
    from llambert_ray.annotate import ServedVLLMEngine
    from llambert_ray.config import AnnotateConfig

    engine = ServedVLLMEngine(AnnotateConfig(), "unused")
    assert engine.cpus() == pytest.approx(1.1)
    assert engine.start_soon(spare_cpus=1.0) is False
    assert engine.start_soon(spare_cpus=0.5) is False
    assert engine._starting is None and engine.starts == 0


def test_a_run_takes_the_callers_engine_only_if_it_is_the_configured_one():
    """run_pipeline(engine=...): a kept engine serves the run as it is, never a different model or engine shape."""
    from types import SimpleNamespace

    from llambert_ray.annotate import run_engine
    from llambert_ray.config import AnnotateConfig

    kept = SimpleNamespace(cfg=AnnotateConfig(engine_lifetime="run", batch_size=8))
    with run_engine(AnnotateConfig(engine_lifetime="run", mode="generate"), kept) as engine:
        assert engine is kept  # how a call asks (mode, batch size) is the call's own
    with pytest.raises(ValueError, match=r"model 'smollm2-135m-instruct' \(engine\) vs 'other' \(config\)"):
        with run_engine(AnnotateConfig(engine_lifetime="run", model="other"), kept):
            pass
    with pytest.raises(ValueError, match="engine_lifetime: run"):
        with run_engine(AnnotateConfig(), kept):
            pass


def test_a_chat_prompt_reaches_the_llm_with_one_bos_on_either_engine():
    """Llama-2's chat template writes `<s>` and its tokenizer adds one too. The per-call engine sends vLLM a text
    prompt, which vLLM encodes with add_special_tokens=True; the served engine's chat endpoint renders the template
    and encodes without special tokens. chat_prompt drops the template's BOS where the tokenizer adds one, so both
    engines send the model the same tokens under their shared cache key, with one BOS; rendered as Ray Data LLM's
    template stage renders it (the template's own text), the per-call prompt had two. A Llama-2-style tokenizer
    built from the packaged SmolLM2 vocabulary (BOS added by the tokenizer, `{{ bos_token }}[INST] ...` template)."""
    from transformers import AutoTokenizer, LlamaTokenizerFast

    from llambert_ray.annotate.engines import VLLMEngine, chat_prompt
    from llambert_ray.config import AnnotateConfig
    from llambert_ray.models import resolve_model

    base = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    tok = LlamaTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", add_bos_token=True)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% else %} {{ m['content'] }}{% endif %}{% endfor %}")
    messages = _plan("generate", style="chat").request("A wonderful film.")["messages"]
    bos = tok.bos_token_id
    served = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    per_call = tok(chat_prompt(tok, messages))["input_ids"]  # as vLLM encodes a text prompt
    assert per_call == served and per_call[0] == bos and per_call.count(bos) == 1
    as_ray_renders = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]
    assert as_ray_renders[:2] == [bos, bos]  # the defect chat_prompt removes
    # a tokenizer that adds no BOS (SmolLM2's) keeps its template's text whole
    assert chat_prompt(base, messages) == base.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # and the per-call engine renders chat rows itself: Ray Data LLM's template stage stays off
    config = VLLMEngine(AnnotateConfig(device="cpu"), resolve_model("smollm2-135m-instruct")).processor_config(
        _plan("generate", style="chat"))
    assert config.chat_template_stage is False
