"""A real two-node Ray cluster on 127.0.0.1 (`ray start --head` + `ray start --address`), a small pipeline submitted
to it as a Ray job with `make submit`, its outputs checked, the cluster stopped.

The two nodes get their own ports, temp dir and one CPU each; the session's other local Ray (tests' ray_local)
is left alone: teardown kills only this cluster's process groups and processes, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, REVIEWS

pytestmark = [pytest.mark.ray, pytest.mark.llm, pytest.mark.timeout(1800)]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _node_args(ports: list[int]) -> list[str]:
    nm, om, agent, agent_grpc, metrics, renv, wmin = ports
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={renv}", f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 60}",
            "--num-cpus=1", "--object-store-memory=700000000", "--disable-usage-stats", "--block"]


class LocalCluster:
    """Two Ray nodes on this machine, started with the real `ray start` CLI."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.procs: list[subprocess.Popen] = []
        gcs, dash, client, *rest = _free_ports(3 + 7 + 7)
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        # worker ports need a free range above each node's min worker port
        self.head_ports, self.worker_ports = rest[:7], rest[7:]
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update({"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1", "DS_ACCELERATOR": "cpu",
                         "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_OMP_THREADS_BIND": "0-1"})
        self.head_cmd = [RAY, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
                         *_node_args(self.head_ports)]
        self.worker_cmd = [RAY, "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1",
                           *_node_args(self.worker_ports)]

    def _start(self, cmd: list[str], log: str) -> None:
        out = open(self.temp_dir / log, "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=REPO))

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, raise_on_missing_output=False)
                if n.state == "ALIVE"]

    def start(self, timeout_s: float = 240) -> None:
        self._start_node(self.head_cmd, "head", 1, timeout_s)
        self._start_node(self.worker_cmd, "worker", 2, timeout_s)

    def _start_node(self, cmd: list[str], name: str, nodes: int, timeout_s: float) -> None:
        for attempt in range(3):
            # On a loaded 2-core machine a node's raylet can miss its start-up deadlines ("Timed out waiting for
            # file .../dashboard_agent...", "Failed to get node info"): that node exits, so start it again.
            self._start(cmd, f"{name}{attempt}.log")
            try:
                self._wait(nodes, timeout_s)
                return
            except RuntimeError:
                if attempt == 2:
                    raise
                node = self.procs.pop()
                try:
                    os.killpg(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                time.sleep(5)

    def _wait(self, n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.procs[-1].poll() is not None:  # the node just started has exited
                break
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except Exception:
                pass
            time.sleep(2)
        logs = "\n".join(f.read_text()[-3000:] for f in sorted(self.temp_dir.glob("*.log")))
        raise RuntimeError(f"cluster did not reach {n} nodes in {timeout_s}s:\n{logs}")

    def stop(self) -> None:
        import psutil

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        # anything of this cluster that left the process groups (Ray workers) is found by its temp dir / port
        marks = (str(self.temp_dir), self.gcs)
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if any(m in cmd for m in marks):
                try:
                    proc.kill()
                except psutil.Error:
                    pass


def test_pipeline_as_a_ray_job_on_a_two_node_cluster(tmp_path):
    corpus = pd.DataFrame([{"id": f"r{i:02d}", "text": t, "label": lab} for i, (t, lab) in enumerate(REVIEWS)])
    corpus.to_parquet(tmp_path / "corpus.parquet")
    runs = tmp_path / "runs"
    (tmp_path / "job.yaml").write_text(f"""
name: two-nodes
output_dir: {runs}
task: imdb-sentiment
corpus: {{path: {tmp_path / 'corpus.parquet'}, sample: 16, seed: 0}}
test: {{path: {tmp_path / 'corpus.parquet'}}}
annotate: {{batch_size: 8, cpus_per_engine: 0.5}}
train: {{variants: [llm], epochs: 1, batch_size: 8, max_length: 48, workers: 2, cpus_per_worker: 0.4}}
label: {{batch_size: 16, max_length: 48, cpus_per_actor: 0.4}}
""")
    # Each node has 1 CPU and the light stages take fractions of one on either node, so no node may have a whole
    # CPU free for the engine: it asks for half (cpus_per_engine), as on any cluster of small nodes.
    # a short temp dir: Ray's unix sockets live under it and their paths must stay under 107 characters
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp")))
    try:
        cluster.start()
        nodes = cluster.alive_nodes()
        assert len(nodes) == 2 and len({n.node_id for n in nodes}) == 2
        sub = subprocess.run(
            ["make", "-s", "submit", f"ADDRESS={cluster.dashboard}", "STAGE=pipeline",
             f"CONFIG={tmp_path / 'job.yaml'}", "RUNTIME_ENV=jobs/runtime_env-cpu.yaml", "WAIT=1",
             "ENTRYPOINT_CPUS=0.1", f"JOB_PYTHON={sys.executable}"],
            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=1500)
        assert sub.returncode == 0, (sub.stdout[-6000:], sub.stderr[-3000:])
        assert "succeeded" in sub.stdout.lower()

        from ray.job_submission import JobStatus, JobSubmissionClient
        from ray.util.state import list_actors

        jobs = JobSubmissionClient(cluster.dashboard).list_jobs()
        assert [j.status for j in jobs if j.type == "SUBMISSION"] == [JobStatus.SUCCEEDED]
        # the work really spread: actors (job supervisor, vLLM engine, train workers, ...) ran on both nodes
        actors = list_actors(address=cluster.dashboard, limit=10000, raise_on_missing_output=False)
        assert len({a.node_id for a in actors if a.node_id}) == 2  # (actors never placed have no node)
    finally:
        cluster.stop()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)  # kept (with the nodes' logs) when the test failed

    run_dir = runs / "two-nodes"
    ann = pd.read_parquet(run_dir / "annotations.parquet")
    labels = pd.read_parquet(run_dir / "labels.parquet")
    assert len(ann) == 16 and ann["id"].is_unique and ann["llm_label"].notna().all()
    assert len(labels) == 40 and set(labels["id"]) == set(corpus["id"]) and labels["id"].is_unique
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["llm"]["accuracy"] > 0.6 and "llm" in metrics["variants"]
    assert (run_dir / "report.md").exists() and (run_dir / "models" / "llm" / "model" / "config.json").exists()
