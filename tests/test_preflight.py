"""`llambert preflight`: each defect a cluster run would hit late is caught in seconds, before a stage runs.

The multi-node cases (a relative output folder over several nodes; node types read from a real autoscaler's config
with the LLM group at zero; TP over two CPU bundles on a node type no live node has) are in tests/test_rehearsal.py."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from conftest import REPO, REVIEWS

from llambert_ray.cluster_shapes import (
    ClusterShapes,
    ManifestError,
    NodeShape,
    node_types_from_config,
    node_types_from_manifest,
)
from llambert_ray.config_load import load_config
from llambert_ray.placement import check_engine
from llambert_ray.preflight import run_preflight, table

pytestmark = [pytest.mark.timeout(600)]  # the tests that start Ray are marked `ray` one by one


@pytest.fixture()
def corpus(tmp_path):
    df = pd.DataFrame([{"id": f"r{i:02d}", "text": t, "label": lab} for i, (t, lab) in enumerate(REVIEWS)])
    df.to_parquet(tmp_path / "corpus.parquet")
    return tmp_path / "corpus.parquet"


def _cfg(corpus, tmp_path, **over):
    return load_config(None, {"output_dir": str(tmp_path / "runs"), "corpus.path": str(corpus),
                              "test": {"path": str(corpus)}, **over})


def _by(checks):
    return {c.check: c for c in checks}


@pytest.mark.ray
def test_a_good_config_passes_in_seconds(ray_local, corpus, tmp_path):
    t0 = time.time()
    checks = run_preflight(_cfg(corpus, tmp_path))
    secs = time.time() - t0
    assert all(c.status == "ok" for c in checks), table(checks)
    by = _by(checks)
    assert {"model annotate.model loads", "model train.model loads", "corpus readable", "test readable",
            "output_dir shared", "TP vs heads", "engine replicas", "train workers"} <= set(by)
    assert not list((tmp_path / "runs" / ".preflight").glob("*/*"))  # its marker files are cleaned up
    print(f"\npreflight: {len(checks)} checks in {secs:.1f}s")


@pytest.mark.ray
def test_each_defect_is_caught(ray_local, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # forwarded to the node tasks, as on an offline cluster
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # an unresolvable model: a hub id neither in the HF cache nor reachable, seen from the node that loads it
    by = _by(run_preflight(_cfg(corpus, tmp_path, **{"train.model": "nobody-here/no-such-encoder"})))
    assert by["model train.model loads"].status == "fail" and "no-such-encoder" in by["model train.model loads"].detail
    # a name that is no model reference at all fails on the driver, before any node is asked
    by = _by(run_preflight(_cfg(corpus, tmp_path, **{"train.model": "minilm-l7"})))
    assert by["model train.model"].status == "fail" and by["model train.model"].where == "driver"
    # TP that does not divide the heads (SmolLM2-135M: 9), and an engine that fits no node (4 x 1 CPU on 2 CPUs)
    by = _by(run_preflight(_cfg(corpus, tmp_path, **{"annotate.tensor_parallel_size": 2})))
    assert by["TP vs attention heads"].status == "fail" and "9 attention heads" in by["TP vs attention heads"].detail
    by = _by(run_preflight(_cfg(corpus, tmp_path, **{"annotate.tensor_parallel_size": 3, "annotate.device": "cpu"})))
    assert by["engine fits a node"].status == "fail" and "3 x" in by["engine fits a node"].detail
    # a gated model with no HF_TOKEN where it loads
    by = _by(run_preflight(_cfg(corpus, tmp_path, **{"annotate.model": "meta-llama/Llama-2-70b-chat-hf",
                                                      "annotate.mode": "generate"})))
    assert by["HF_TOKEN for annotate.model"].status == "fail"
    # a corpus that is not there, and the warning for gold labels without a test split
    cfg = _cfg(corpus, tmp_path, **{"corpus.path": str(tmp_path / "nope.parquet")})
    cfg.test = None
    by = _by(run_preflight(cfg))
    assert by["corpus readable"].status == "fail" and by["test split"].status == "warn"
    # a run folder in a bucket: refused, saying what needs a shared disk and where a bucket does go
    cfg = _cfg(corpus, tmp_path, **{"output_dir": "s3://runs-bucket/llambert"})
    check = _by(run_preflight(cfg))["output_dir shared"]
    assert check.status == "fail" and "annotation cache parts" in check.detail and "--output s3://" in check.fix


def _engine_check(cluster, **over):
    checks = []
    cfg = load_config(None, {"annotate.tensor_parallel_size": 4, "annotate.device": "gpu", **over})
    check_engine(cfg, None, cluster, checks)
    (check,) = checks
    return check


def test_node_types_from_the_clusters_manifests_place_a_tp4_engine():
    """The node groups of cluster/kuberay/raycluster.yaml (rayStartParams, else the Ray container's limits, times
    maxReplicas), as preflight reads them through `cluster.manifest` where the autoscaler's own config cannot be
    read: a TP=4 engine fits the 4-GPU group (2 replicas with maxReplicas 2), never the 1-GPU group however many
    nodes. The autoscaler's own config file is read on a real autoscaling cluster in tests/test_rehearsal.py."""
    types = {s.name: s for s in node_types_from_manifest(REPO / "cluster" / "kuberay" / "raycluster.yaml")}
    assert set(types) == {"cpu (autoscaler)", "llm-4gpu (autoscaler)", "train-1gpu (autoscaler)"}
    llm, train = types["llm-4gpu (autoscaler)"], types["train-1gpu (autoscaler)"]
    assert (llm.resources["GPU"], llm.resources["CPU"], llm.count) == (4.0, 32.0, 2) and not llm.live
    assert (train.resources["GPU"], train.count) == (1.0, 4)
    cluster = ClusterShapes(list(types.values()), "cluster.manifest")
    c = _engine_check(cluster, **{"annotate.concurrency": 2})
    assert (c.check, c.status) == ("engine replicas", "ok") and "can hold 2" in c.detail, c
    c = _engine_check(cluster, **{"annotate.concurrency": 3})  # the 1-GPU group's 4 GPUs hold no TP=4 replica
    assert (c.check, c.status) == ("engine replicas", "fail") and "can hold 2" in c.detail, c
    c = _engine_check(ClusterShapes([train], "cluster.manifest"), **{"annotate.concurrency": 1})
    assert (c.check, c.status) == ("engine fits a node", "fail") and "train-1gpu (autoscaler)" in c.detail, c
    # a cluster-launcher config (as the autoscaler's config file on a head is) gives its worker types
    launcher = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "llm_4gpu": {"resources": {"CPU": 48, "GPU": 4}, "min_workers": 0, "max_workers": 2}}}
    assert node_types_from_config(launcher) == [NodeShape("llm_4gpu (autoscaler)", {"CPU": 48.0, "GPU": 4.0}, 2,
                                                          False)]


def test_unknown_node_types_warn_instead_of_refusing_on_a_remote_cluster(tmp_path):
    """Where the autoscaler's node types are unknown (no config in the GCS or on the head, no cluster.manifest),
    what no live node holds may still be added by the autoscaler: a warning, not a refusal. On a local Ray every
    node is known: refused. A manifest that is not there is a failure naming it."""
    live_only = ClusterShapes([NodeShape("head", {"CPU": 2.0}, 1, True)], None)
    c = _engine_check(live_only, **{"cluster.address": "auto"})
    assert (c.check, c.status) == ("engine fits a node", "warn"), c
    c = _engine_check(live_only)
    assert (c.check, c.status) == ("engine fits a node", "fail"), c
    with pytest.raises(ManifestError, match="does not exist"):
        node_types_from_manifest(tmp_path / "nope.yaml")
    (tmp_path / "job.yaml").write_text("apiVersion: ray.io/v1\nkind: RayJob\nspec: {clusterSelector: {a: b}}\n")
    with pytest.raises(ManifestError, match="no RayCluster"):
        node_types_from_manifest(tmp_path / "job.yaml")


def test_the_engine_must_fit_its_gpus_memory():
    """Llama-2-70b (its config.json's shape) on A100-80GB nodes, as the GPU nodes' accelerator type says: TP=4 fits
    weights and KV cache, TP=1 cannot start (vLLM would refuse after loading for minutes); an unknown GPU type
    warns that memory went unchecked."""
    from llambert_ray.plan import load_hardware

    llm = {**load_hardware()["llm_shapes"]["meta-llama/Llama-2-70b-chat-hf"], "model_type": "llama"}
    a100 = [NodeShape("llm-4gpu (autoscaler)", {"CPU": 48.0, "GPU": 4.0, "accelerator_type:A100-80G": 1.0}, 2, False)]

    def memory(shapes, **over):
        checks = []
        cfg = load_config(None, {"annotate.device": "gpu", "annotate.model": "meta-llama/Llama-2-70b-chat-hf",
                                 "annotate.max_model_len": 4096, "annotate.batch_size": 64, **over})
        check_engine(cfg, llm, ClusterShapes(shapes, "the test's node types"), checks)
        (check,) = [c for c in checks if c.check == "GPU memory"]
        return check

    c = memory(a100, **{"annotate.tensor_parallel_size": 4})
    assert c.status == "ok" and "weights 32.1 GiB" in c.detail and "a100-80gb" in c.detail, c
    c = memory(a100, **{"annotate.tensor_parallel_size": 1})
    assert c.status == "fail" and "tensor_parallel_size" in c.fix, c
    c = memory([NodeShape("gpu", {"CPU": 8.0, "GPU": 4.0}, 1, False)], **{"annotate.tensor_parallel_size": 4})
    assert c.status == "warn" and "accelerator_type" in c.fix, c
    c = memory([], **{"annotate.tensor_parallel_size": 4, "annotate.accelerator_type": "H100"})
    assert c.status == "ok" and "h100-80gb" in c.detail, c


@pytest.mark.ray
def test_cli_preflight_exits_2_with_the_table(ray_local, corpus, tmp_path):
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    (tmp_path / "bad.yaml").write_text(f"output_dir: {tmp_path / 'runs'}\ncorpus: {{path: {corpus}}}\n"
                                       f"annotate: {{tensor_parallel_size: 2}}\n")
    r = CliRunner().invoke(app, ["preflight", "-c", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 2, r.output
    assert "| TP vs attention heads | annotate | FAIL |" in r.output and "preflight failed" in r.output


def test_an_llm_in_a_bucket_warns_until_it_has_a_node_local_folder():
    """annotate.model: s3://...: without annotate.local_weights_dir every engine node copies it into the HF cache,
    the shared volume on a cluster (warn, naming the fix); with it, each node's own disk (ok); encoders copy into
    $LLAMBERT_CACHE either way."""
    from llambert_ray.config import RunConfig
    from llambert_ray.preflight import _mirror_check

    bucket = "s3://models-bucket/llama-2-70b-chat"
    shared = _mirror_check(RunConfig.model_validate({"annotate": {"model": bucket}}), "annotate.model", bucket)
    assert shared.status == "warn" and "shared volume" in shared.detail and "local_weights_dir" in shared.fix
    local = RunConfig.model_validate({"annotate": {"model": bucket, "local_weights_dir": "/mnt/nvme/weights"}})
    ok = _mirror_check(local, "annotate.model", bucket)
    assert ok.status == "ok" and "/mnt/nvme/weights" in ok.detail, ok
    assert _mirror_check(local, "train.model", "s3://b/roberta").status == "ok"
