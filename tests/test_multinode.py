"""A real two-node Ray cluster on 127.0.0.1 (`ray start --head` + `ray start --address`), a small pipeline submitted
to it as a Ray job with `make submit`, its outputs checked, the cluster stopped.

The two nodes (tests/rehearsal.py's RehearsalCluster) get their own ports, working dirs and one CPU each; the
session's other local Ray (tests' ray_local) is left alone: teardown kills only this cluster's processes, never
`ray stop`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest
from conftest import REPO, REVIEWS
from rehearsal import RehearsalCluster

pytestmark = [pytest.mark.ray, pytest.mark.llm, pytest.mark.timeout(1800)]


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
    cluster = RehearsalCluster(tempfile.mkdtemp(prefix="lr-", dir="/tmp"), [1, 1], object_store_bytes=700_000_000,
                               env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
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
    shutil.rmtree(cluster.root, ignore_errors=True)  # kept (with the nodes' logs) when the test failed

    run_dir = runs / "two-nodes"
    ann = pd.read_parquet(run_dir / "annotations.parquet")
    labels = pd.read_parquet(run_dir / "labels.parquet")
    assert len(ann) == 16 and ann["id"].is_unique and ann["llm_label"].notna().all()
    assert len(labels) == 40 and set(labels["id"]) == set(corpus["id"]) and labels["id"].is_unique
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["llm"]["accuracy"] > 0.6 and "llm" in metrics["variants"]
    assert (run_dir / "report.md").exists() and (run_dir / "models" / "llm" / "model" / "config.json").exists()
