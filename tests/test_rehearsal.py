"""The CPU rehearsal of the 70B topology: its fixtures (tiny TP-ready Llama, tiny RoBERTa, offline hub cache), a
tensor-parallel vLLM engine on CPU through Ray Data LLM, the RoBERTa encoder through train / label / serve by hub id,
and a TP=2 engine on a 3-node `ray start` cluster (head without CPUs, two 1-CPU workers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, REVIEWS
from rehearsal import RehearsalCluster, cpu_bind_ranges, offline_hub_env, tp_engine_config


# ------------------------------------------------------------------------------------------ fixtures, fast
def test_offline_hub_cache_resolves_hub_ids_in_a_fresh_process(offline_hub):
    """HF_HOME + HF_HUB_OFFLINE: transformers loads hub ids from the cache, as a Ray worker on any node would."""
    code = ("from transformers import AutoConfig, AutoModel, AutoTokenizer\n"
            "m = AutoModel.from_pretrained('sentence-transformers/all-MiniLM-L6-v2')\n"
            "t = AutoTokenizer.from_pretrained('rehearsal/tiny-roberta')\n"
            "c = AutoConfig.from_pretrained('rehearsal/tiny-llama-tp2')\n"
            "print(type(m).__name__, type(t).__name__, c.num_attention_heads, c.num_key_value_heads)\n")
    env = {**os.environ, **offline_hub_env(offline_hub)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["BertModel", "RobertaTokenizer", "4", "2"]
    snap = next((offline_hub / "hub" / "models--rehearsal--tiny-llama-tp2" / "snapshots").iterdir())
    assert (snap / "config.json").is_symlink() and (snap / "model.safetensors").exists()


def test_tiny_roberta_is_roberta_shaped(tiny_roberta):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    cfg = AutoConfig.from_pretrained(tiny_roberta)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    single = tok("A fine film.")
    assert "token_type_ids" not in single and single["input_ids"][0] == 0 and single["input_ids"][-1] == 2
    pair = tok("a", "b")["input_ids"]
    assert pair[0] == 0 and pair[2:4] == [2, 2] and pair[-1] == 2  # <s> A </s></s> B </s>
    assert cfg.model_type == "roberta" and cfg.type_vocab_size == 1 and cfg.pad_token_id == 1
    assert cfg.max_position_embeddings == 514 and cfg.vocab_size == len(tok)


def test_cpu_bind_ranges_one_list_per_rank():
    assert cpu_bind_ranges(2, [0, 1]) == "0|1"
    assert cpu_bind_ranges(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_bind_ranges(2, [3]) == "3|3"  # one core: both ranks share it
    assert cpu_bind_ranges(4, list(range(8))).count("|") == 3


def test_tp_on_cpu_is_one_engine_actor_holding_every_bundles_cpus(tiny_llama):
    """How Ray Data LLM schedules a TP engine. With vLLM's mp executor (the one that works on CPU) there is no
    placement group: one actor asks for the sum of the bundles (strategy unused), and vLLM forks the TP workers
    inside it. With the default for TP > 1 (the ray executor) the engine actor itself (num_cpus 1, Ray Data's
    default) must fit into one bundle of the placement group."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage

    def stage(engine_kwargs, pg):
        return vLLMEngineStage(fn_constructor_kwargs={"model": str(tiny_llama), "engine_kwargs": dict(engine_kwargs),
                                                      "placement_group_config": dict(pg)},
                               map_batches_kwargs={}).map_batches_kwargs

    cfg = tp_engine_config(str(tiny_llama), tp=2, cpus_per_worker=0.5)
    mp = stage(cfg["engine_kwargs"], cfg["placement_group_config"])
    assert mp["num_cpus"] == 1.0 and "ray_remote_args_fn" not in mp
    default = {k: v for k, v in cfg["engine_kwargs"].items() if k != "distributed_executor_backend"}
    ray_exec = stage(default, cfg["placement_group_config"])
    assert ray_exec["num_gpus"] == 0 and "num_cpus" not in ray_exec and "ray_remote_args_fn" in ray_exec


# ------------------------------------------------------------------------------------------ engine, one node
def _annotate_rows(config: dict, n: int):
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    proc = build_processor(
        vLLMEngineProcessorConfig(**config),
        preprocess=lambda r: {"prompt": f"Review {r['id']}: a fine film. Sentiment:",
                              "sampling_params": {"max_tokens": 4, "temperature": 0.0}},
        postprocess=lambda r: {"id": r["id"], "out": r["generated_text"], "err": r.get("__inference_error__") or ""},
        preprocess_map_kwargs={"num_cpus": 0.1}, postprocess_map_kwargs={"num_cpus": 0.1})
    return proc(ray.data.from_pandas(pd.DataFrame({"id": list(range(n))}))).to_pandas()


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(1500)
def test_tp2_engine_on_cpu_through_ray_data_llm(ray_local, tiny_llama):
    """tensor_parallel_size 2 on a 2-CPU local Ray: 2 x 0.5-CPU bundles, mp executor, one OpenMP core per rank."""
    t0 = time.time()
    df = _annotate_rows(tp_engine_config(str(tiny_llama), tp=2, cpus_per_worker=0.5,
                                         env={"VLLM_CPU_OMP_THREADS_BIND": cpu_bind_ranges(2)}), 20)
    print(f"\nTP=2 on CPU: 20 rows in {time.time() - t0:.0f}s (engine start included)")
    assert len(df) == 20 and set(df["id"]) == set(range(20)) and (df["err"] == "").all()
    assert df["out"].map(lambda s: isinstance(s, str) and len(s) > 0).all()


# ------------------------------------------------------------------------------------------ RoBERTa, by hub id
@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_roberta_by_hub_id_trains_labels_and_serves_long_texts(ray_local, offline_hub, tmp_path, monkeypatch):
    """The flagship's encoder path with a RoBERTa: loaded by hub id from the offline cache on the Ray Train workers,
    max_length 512 (its max_position_embeddings is 514: position ids start at pad_token_id + 1) and texts longer than
    that, so the last position is used."""
    import httpx
    import ray

    from llambert_ray.config import LabelConfig, ServeConfig, TrainConfig
    from llambert_ray.label import label_dataset, model_labels
    from llambert_ray.train import fit

    for k, v in offline_hub_env(offline_hub).items():
        monkeypatch.setenv(k, v)  # fit() passes HF_HOME / HF_HUB_OFFLINE on to its workers
    rows = [{"id": f"r{i:02d}", "text": t + (" And so on." * 150 if i % 4 == 0 else ""), "label": lab}
            for i, (t, lab) in enumerate(REVIEWS)]
    df = pd.DataFrame(rows)
    cfg = TrainConfig(model="rehearsal/tiny-roberta", workers=2, cpus_per_worker=0.5, zero_stage=2, epochs=1,
                      batch_size=8, max_length=512, max_failures=0)
    r = fit(df[["text", "label"]], ["positive", "negative"], cfg, tmp_path / "train", name="roberta")
    assert model_labels(r.model_dir) == ["positive", "negative"]
    assert json.loads(Path(r.model_dir, "config.json").read_text())["model_type"] == "roberta"
    preds = label_dataset(ray.data.from_pandas(df), r.model_dir,
                          LabelConfig(cpus_per_actor=0.4, max_length=512)).to_pandas()
    assert len(preds) == 40 and preds["error"].isna().all(), preds["error"].dropna().head().tolist()

    from ray import serve

    from llambert_ray.serve import start

    port = _free_port()
    start(r.model_dir, ServeConfig(port=port, cpus_per_replica=0.4, max_length=512), name="rehearsal-roberta")
    try:
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/classify",
                          json={"texts": ["A wonderful film.", rows[0]["text"]]}, timeout=120)
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["predictions"]) == 2
    finally:
        serve.delete("rehearsal-roberta")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ engine, 3 nodes
_DRIVER = """
import json, sys, time
sys.path.insert(0, {tests!r})
import ray
from rehearsal import tp_engine_config
from test_rehearsal import _annotate_rows
ray.init(address={gcs!r})
cfg = tp_engine_config("rehearsal/tiny-llama-tp2", tp=2, cpus_per_worker=0.5,
                       env={{"VLLM_CPU_OMP_THREADS_BIND": "0|1", **{hub_env!r}}})
t0 = time.time()
df = _annotate_rows(cfg, 20)
from ray.util.state import list_actors, list_nodes
nodes = {{n.node_id: n.resources_total for n in list_nodes(address={dashboard!r})}}
engines = [nodes.get(a.node_id, {{}}) for a in list_actors(address={dashboard!r}, limit=1000,
           raise_on_missing_output=False) if "vLLMEngineStageUDF" in a.class_name]
print("RESULT " + json.dumps({{"rows": len(df), "ids": sorted(df["id"].tolist()),
                              "errors": int((df["err"] != "").sum()), "seconds": time.time() - t0,
                              "engine_nodes": engines}}))
"""


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(2400)
def test_tp2_engine_by_hub_id_on_a_three_node_cluster(offline_hub):
    """Head with 0 CPUs + two 1-CPU workers, each node with its own working dir; the hub id resolves from the offline
    cache on the worker that runs the engine. A TP=2 engine of 0.5-CPU bundles fits one 1-CPU node."""
    hub_env = offline_hub_env(offline_hub)
    # a short root: Ray's unix sockets live under it and their paths must stay under 107 characters
    cluster = RehearsalCluster(tempfile.mkdtemp(prefix="rh-", dir="/tmp"), [0, 1, 1], env=hub_env)
    try:
        cluster.start()
        assert len(cluster.alive_nodes()) == 3
        driver = _DRIVER.format(tests=str(REPO / "tests"), gcs=cluster.gcs, dashboard=cluster.dashboard,
                                hub_env=hub_env)
        out = subprocess.run([sys.executable, "-c", driver], env={**cluster.env, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=2000, cwd=cluster.root)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert out.returncode == 0 and lines, (out.stdout[-4000:], out.stderr[-6000:])
        res = json.loads(lines[-1][len("RESULT "):])
        print(f"\nTP=2 on a 3-node cluster: 20 rows in {res['seconds']:.0f}s; engine on {res['engine_nodes']}")
        assert res["rows"] == 20 and res["ids"] == list(range(20)) and res["errors"] == 0
        assert res["engine_nodes"] and all(n.get("CPU") == 1.0 for n in res["engine_nodes"])  # a worker, not the head
    finally:
        cluster.stop()
