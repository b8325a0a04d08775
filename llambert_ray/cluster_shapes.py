"""What a Ray cluster has and can grow to: its live nodes, and the node types its autoscaler may add.

Preflight places engines, training workers and labelling actors on these shapes. On an autoscaling cluster the GPU
groups often start at zero, so the live nodes alone would refuse every GPU stage. The node types come from the
first of these that answers:

1. the cluster config the autoscaler reports to the GCS (Ray's ClusterConfig message; not every autoscaler does:
   Ray 2.60's own, started by `ray up` or `ray start --autoscaling-config`, does not);
2. the autoscaler's own config file, read on the head node from the monitor process's `--autoscaling-config`
   (`ray up` clusters: ~/ray_bootstrap_config.yaml; local autoscaling clusters);
3. a manifest the run names in `cluster.manifest`: a KubeRay RayCluster / RayJob / RayService or a cluster-launcher
   YAML, for clusters whose autoscaler runs where no Ray task can read it (KubeRay's autoscaler sidecar).

Where none answers, `ClusterShapes.source` is None: the shapes are the live nodes only, and preflight warns
instead of refusing what no live node can hold.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAD_TASK_TIMEOUT_S = 60


@dataclass
class NodeShape:
    """A node that is up, or a node type the autoscaler can add (`count` of them at most)."""

    name: str
    resources: dict[str, float]
    count: int
    live: bool


@dataclass
class ClusterShapes:
    """The live nodes and the autoscaler's node types; `source` says where the node types came from (None: not
    known, so what no live node holds may still be added, or may never be)."""

    shapes: list[NodeShape] = field(default_factory=list)
    source: str | None = None


class ManifestError(ValueError):
    """A cluster manifest that names no node types this module can read."""


# ------------------------------------------------------------------ live nodes
def live_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_name(n: dict[str, Any]) -> str:
    labels = n.get("Labels") or {}
    group = labels.get("ray.io/node-group") or labels.get("llambert/group") or labels.get("ray.io/node-type")
    head = "head" if n.get("Resources", {}).get("node:__internal_head__") else None
    return f"{group or head or 'node'}@{n.get('NodeManagerAddress')}:{n.get('NodeManagerPort')}"


def _kept(resources: dict[str, Any]) -> dict[str, float]:
    """The resources a placement asks for: CPU, GPU, memory, accelerator types and custom resources (not Ray's
    per-node `node:` markers or the object store)."""
    return {k: float(v) for k, v in resources.items() if not (k.startswith("node:") or k == "object_store_memory")}


def live_shapes() -> list[NodeShape]:
    return [NodeShape(node_name(n), _kept(n["Resources"]), 1, True) for n in live_nodes()]


# ------------------------------------------------------------------ node types from a config
def _quantity(v: Any) -> float:
    """A Kubernetes quantity ("500m", "16", "64Gi", 4) as a number (CPUs, bytes, GPUs)."""
    s = str(v).strip()
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", s)
    if not m or (m.group(2) and m.group(2) not in units):
        raise ManifestError(f"not a Kubernetes quantity: {v!r}")
    return float(m.group(1)) * units.get(m.group(2), 1.0)


def _launcher_types(raw: dict[str, Any]) -> list[NodeShape]:
    """A cluster-launcher / autoscaler config: available_node_types other than the head's."""
    head = raw.get("head_node_type")
    out = []
    for name, t in (raw.get("available_node_types") or {}).items():
        if name == head or not int(t.get("max_workers", 0) or 0):
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items() if k != "object_store_memory"}
        if not res:
            raise ManifestError(f"node type {name!r} declares no resources (the cluster launcher fills them in from "
                                f"the instance type at `ray up`; a running cluster's head holds the filled-in "
                                f"config, which preflight reads itself); fix: give its resources, e.g. "
                                f"{{CPU: 48, GPU: 4}}, or leave cluster.manifest out")
        out.append(NodeShape(f"{name} (autoscaler)", res, int(t["max_workers"]), False))
    return out


def _kuberay_group(g: dict[str, Any]) -> dict[str, float]:
    """A KubeRay worker group's Ray resources: rayStartParams first (as `ray start` reads them), else the Ray
    container's limits (KubeRay passes cpu / nvidia.com/gpu / memory limits on to `ray start`)."""
    params = g.get("rayStartParams") or {}
    container = (g.get("template", {}).get("spec", {}).get("containers") or [{}])[0]
    limits = (container.get("resources") or {}).get("limits") or {}
    res: dict[str, float] = {}
    if "num-cpus" in params:
        res["CPU"] = float(params["num-cpus"])
    elif "cpu" in limits:
        res["CPU"] = float(int(_quantity(limits["cpu"])))  # Ray rounds a fractional CPU limit down
    if "num-gpus" in params:
        res["GPU"] = float(params["num-gpus"])
    elif "nvidia.com/gpu" in limits:
        res["GPU"] = _quantity(limits["nvidia.com/gpu"])
    if "memory" in limits:
        res["memory"] = _quantity(limits["memory"])
    if params.get("resources"):
        custom = str(params["resources"]).strip().strip("'").replace('\\"', '"')
        res.update({k: float(v) for k, v in json.loads(custom).items()})
    return {k: v for k, v in res.items() if v}


def _kuberay_types(raw: dict[str, Any]) -> list[NodeShape]:
    spec = raw.get("spec") or {}
    spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = spec.get("workerGroupSpecs")
    if groups is None:
        raise ManifestError(f"a {raw.get('kind')} without spec.workerGroupSpecs")
    return [NodeShape(f"{g['groupName']} (autoscaler)", _kuberay_group(g),
                      int(g.get("maxReplicas", g.get("replicas", 0)) or 0) * int(g.get("numOfHosts", 1) or 1), False)
            for g in groups if int(g.get("maxReplicas", g.get("replicas", 0)) or 0)]


def node_types_from_config(raw: dict[str, Any]) -> list[NodeShape]:
    """The node types a KubeRay manifest (RayCluster, RayJob, RayService) or a cluster-launcher config can add."""
    if not isinstance(raw, dict):
        raise ManifestError("not a mapping")
    if str(raw.get("apiVersion", "")).startswith("ray.io/"):
        return _kuberay_types(raw)
    if "available_node_types" in raw:
        return _launcher_types(raw)
    raise ManifestError("neither a KubeRay manifest (apiVersion ray.io/...) nor a cluster-launcher config "
                        "(available_node_types)")


def node_types_from_manifest(path: str | Path) -> list[NodeShape]:
    """node_types_from_config of a YAML file; a multi-document file is searched for its first Ray manifest."""
    import yaml

    p = Path(path)
    if not p.is_absolute() and not p.is_file():  # relative to the checkout (a job's working dir, the image's copy)
        p = Path(__file__).resolve().parents[1] / p
    if not p.is_file():
        raise ManifestError(f"cluster manifest {str(path)!r} does not exist; fix: the path of the RayCluster "
                            f"manifest or cluster-launcher YAML the cluster was made from, e.g. "
                            f"cluster/kuberay/raycluster.yaml")
    docs = [d for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    errors = []
    for d in docs:
        try:
            return node_types_from_config(d)
        except ManifestError as e:
            errors.append(str(e))
    named = [e for e in errors if "declares no resources" in e]
    raise ManifestError(f"{path}: " + (named[0] if named else "no RayCluster, RayService or cluster-launcher config "
                                       "with node groups in it"))


# ------------------------------------------------------------------ the autoscaler's own config, on the head node
def _monitor_config(gcs_port: str) -> dict[str, Any] | None:
    """On the head node: the config file this cluster's autoscaler (Ray's monitor process, the one of the GCS on
    `gcs_port`) was started with, parsed."""
    import psutil
    import yaml

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(c.endswith(os.path.join("autoscaler", "_private", "monitor.py")) for c in cmd[:4]):
            continue
        if not any(c.startswith("--gcs-address=") and c.rsplit(":", 1)[-1] == gcs_port for c in cmd):
            continue  # another cluster's autoscaler on the same machine
        for i, c in enumerate(cmd):
            path = c.split("=", 1)[1] if c.startswith("--autoscaling-config=") else (
                cmd[i + 1] if c == "--autoscaling-config" and i + 1 < len(cmd) else None)
            if path:
                try:
                    return yaml.safe_load(Path(os.path.expanduser(path)).read_text())
                except (OSError, yaml.YAMLError):
                    return None
    return None


def autoscaler_config_on_head() -> dict[str, Any] | None:
    """_monitor_config run as a 0-CPU task on the head node; None where no monitor with a config file runs there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in live_nodes() if n["Resources"].get("node:__internal_head__")]
    if not heads:
        return None
    task = ray.remote(num_cpus=0, max_retries=0)(_monitor_config).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0], soft=False))
    try:
        return ray.get(task.remote(ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]),
                       timeout=HEAD_TASK_TIMEOUT_S)
    except Exception:
        return None


def _reported_to_gcs() -> list[NodeShape]:
    try:
        import ray._private.state as state

        cc = state.state.get_cluster_config()
    except Exception:  # no autoscaler config reported (a fixed cluster, a local Ray)
        return []
    return [NodeShape(f"{g.name} (autoscaler)", {k: float(v) for k, v in g.resources.items()},
                      max(int(g.max_count), 0), False) for g in (cc.node_group_configs if cc else [])]


def cluster_shapes(manifest: str | None = None) -> ClusterShapes:
    """The connected cluster's live nodes plus the autoscaler's node types (see the module's docstring)."""
    live = live_shapes()
    types = _reported_to_gcs()
    if types:
        return ClusterShapes(live + types, "the autoscaler's config in the GCS")
    raw = autoscaler_config_on_head()
    if raw:
        try:
            return ClusterShapes(live + node_types_from_config(raw), "the autoscaler's config file on the head")
        except ManifestError:
            pass
    if manifest:
        return ClusterShapes(live + node_types_from_manifest(manifest), f"cluster.manifest {manifest}")
    return ClusterShapes(live, None)
