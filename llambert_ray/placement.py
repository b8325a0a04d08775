"""Whether a run's stages fit the cluster: the engines' TP x PP bundles, their GPUs' memory, the training workers
and the labelling actors, against the live nodes and the node types the autoscaler can add
(llambert_ray.cluster_shapes). Part of `llambert preflight`."""

from __future__ import annotations

import math
from typing import Any

from llambert_ray.checks import Check
from llambert_ray.cluster_shapes import ClusterShapes, ManifestError, NodeShape, cluster_shapes, live_shapes
from llambert_ray.config import RunConfig


def _need(bundles: list[dict[str, float]]) -> dict[str, float]:
    """What a set of bundles asks of one node, summed per resource."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    return need


def _fits(bundles: list[dict[str, float]], shape: NodeShape) -> bool:
    return all(shape.resources.get(k, 0.0) + 1e-9 >= v for k, v in _need(bundles).items() if v)


def _replicas_on(bundles: list[dict[str, float]], shape: NodeShape) -> int:
    """How many copies of `bundles` the node shape (times its count) holds."""
    per = [math.floor(shape.resources.get(k, 0.0) / v + 1e-9) for k, v in _need(bundles).items() if v]
    return (min(per) if per else 0) * shape.count


def node_types(cfg: RunConfig, checks: list[Check]) -> ClusterShapes:
    """The live nodes and the node types the cluster can add (llambert_ray.cluster_shapes), and a row saying where
    the node types came from. A cluster whose node types are unknown gets warnings, not failures, for what no live
    node holds: its autoscaler may add such a node (GPU groups at zero)."""
    from llambert_ray.ray_env import is_local

    try:
        cluster = cluster_shapes(cfg.cluster.manifest)
    except ManifestError as e:
        checks.append(Check("cluster.manifest", "driver", "fail", str(e).split("; fix:")[0],
                            "the RayCluster manifest or cluster-launcher YAML the cluster was made from"))
        return ClusterShapes(live_shapes(), None)
    types = [s.name for s in cluster.shapes if not s.live]
    if cluster.source:
        checks.append(Check("node types", "cluster", "ok", f"{len(types)} from {cluster.source}: "
                            + ", ".join(f"{s.name.removesuffix(' (autoscaler)')} x{s.count} {s.resources}"
                                        for s in cluster.shapes if not s.live)))
    elif not is_local(cfg.cluster.address):
        checks.append(Check("node types", "cluster", "warn", "the autoscaler's node types could not be read (not "
                            "reported to the GCS, no config file on the head): stages are checked against the "
                            "live nodes only, and what no live node holds is a warning",
                            "set cluster.manifest to the RayCluster manifest or cluster-launcher YAML the cluster "
                            "was made from (e.g. cluster/kuberay/raycluster.yaml)"))
    return cluster


def _refuse(cluster: ClusterShapes, cfg: RunConfig) -> str:
    """The status of a stage no known shape holds: fail where every node type is known (the autoscaler's config,
    or a local Ray), warn where the autoscaler may still add a node nobody told preflight about."""
    from llambert_ray.ray_env import is_local

    return "fail" if cluster.source or is_local(cfg.cluster.address) else "warn"


def check_engine(cfg: RunConfig, llm: dict[str, Any] | None, cluster: ClusterShapes, checks: list[Check]) -> None:
    """The annotation engines: TP / PP against the LLM's heads and layers, bundles against node shapes."""
    from llambert_ray.annotate import engine_placement
    from llambert_ray.ray_env import resolve_device

    a, shapes = cfg.annotate, cluster.shapes
    device = resolve_device(a.device, gpu_elsewhere=cfg.train.use_gpu or cfg.label.gpus_per_actor > 0)
    if llm:
        _check_parallelism(a, llm, checks)
        if device == "gpu":
            _check_gpu_memory(a, llm, shapes, checks)
    placement = engine_placement(a, device == "gpu")
    bundles = placement["bundles"]
    if a.accelerator_type and device == "gpu":
        key = f"accelerator_type:{a.accelerator_type}"
        bundles = [{**b, key: 0.001} for b in bundles]
    one_node = placement["strategy"] == "STRICT_PACK"
    fitting = [s for s in shapes if _fits(bundles, s)] if one_node else shapes
    what = f"{len(bundles)} x {bundles[0]}" + (" on one node" if one_node else "")
    if one_node and not fitting:
        checks.append(Check("engine fits a node", "annotate", _refuse(cluster, cfg),
                            f"one engine needs {what}; no node shape has that: "
                            + "; ".join(f"{s.name} {s.resources}" for s in shapes),
                            "a node type with enough GPUs/CPUs for tensor_parallel_size (or a smaller TP)"))
    else:
        reach = sum(_replicas_on(bundles, s) for s in fitting) if one_node else a.concurrency
        status = "ok" if reach >= a.concurrency else _refuse(cluster, cfg)
        checks.append(Check("engine replicas", "annotate", status,
                            f"{a.concurrency} replica(s) of {what} ({device}); the cluster can hold {reach}",
                            "" if status == "ok" else "raise the GPU group's maxReplicas or lower "
                            "annotate.concurrency"))
    if a.device == "auto" and cfg.cluster.address not in (None, "local") and device == "cpu":
        checks.append(Check("annotate.device", "annotate", "warn", "auto resolved to cpu: no GPU node is up",
                            "say device: gpu on an autoscaling cluster whose GPU groups start at 0"))


def _check_gpu_memory(a, llm: dict[str, Any], shapes: list[NodeShape], checks: list[Check]) -> None:
    """One engine's weights and KV cache against its GPUs' memory (llambert_ray.gpu_memory), where the GPU type is
    known: annotate.accelerator_type, or the accelerator_type:X resource of the GPU nodes (Ray sets it)."""
    from llambert_ray.gpu_memory import ModelShape, engine_check
    from llambert_ray.plan import load_hardware

    kinds = {a.accelerator_type} if a.accelerator_type else {
        k.split(":", 1)[1] for s in shapes if s.resources.get("GPU") for k in s.resources
        if k.startswith("accelerator_type:")}
    devices = {d.get("ray_accelerator"): (name, d.get("memory_gib")) for name, d in load_hardware()["devices"].items()}
    known = [devices[k] for k in sorted(kinds) if k in devices and devices[k][1]]
    try:
        shape = ModelShape.from_config(llm)
    except KeyError:  # not a decoder config this estimate knows
        return
    if not known:
        checks.append(Check("GPU memory", "annotate", "warn", f"GPU type unknown ({sorted(kinds) or 'none seen'}): "
                            "weights and KV cache not checked against its memory", "set annotate.accelerator_type "
                            "(e.g. A100-80G, H100) or add the GPU to the hardware table"))
        return
    name, mem = min(known, key=lambda nm: nm[1])  # the smallest GPU an engine may land on
    status, detail, fix = engine_check(shape, a, mem, name)
    checks.append(Check("GPU memory", "annotate", status, detail, fix))


def _check_parallelism(a, llm: dict[str, Any], checks: list[Check]) -> None:
    """vLLM refuses, after loading, a TP that does not divide the heads, or a PP beyond the layers."""
    add = checks.append
    llm = {**(llm.get("text_config") or {}), **{k: v for k, v in llm.items() if v is not None}}
    heads, kv = llm.get("num_attention_heads"), llm.get("num_key_value_heads") or llm.get("num_attention_heads")
    tp, pp = a.tensor_parallel_size, a.pipeline_parallel_size
    if heads and heads % tp:
        add(Check("TP vs attention heads", "annotate", "fail",
                  f"{a.model} has {heads} attention heads, not divisible by tensor_parallel_size {tp} (vLLM "
                  f"refuses it after loading)", f"a tensor_parallel_size that divides {heads}"))
    elif kv and tp > kv and tp % kv or kv and tp <= kv and kv % tp:
        add(Check("TP vs KV heads", "annotate", "fail",
                  f"{a.model} has {kv} KV heads; tensor_parallel_size {tp} neither divides them nor is a "
                  f"multiple of them", "a tensor_parallel_size that divides the KV heads"))
    elif heads:
        add(Check("TP vs heads", "annotate", "ok", f"{heads} heads, {kv} KV heads over TP {tp}"))
    layers = llm.get("num_hidden_layers")
    if layers and pp > layers:
        add(Check("PP vs layers", "annotate", "fail", f"{layers} layers < pipeline_parallel_size {pp}",
                  "a smaller pipeline_parallel_size"))


def check_workers(cfg: RunConfig, cluster: ClusterShapes, checks: list[Check]) -> None:
    """Training workers and labelling actors against the node shapes."""
    t, shapes, refuse = cfg.train, cluster.shapes, _refuse(cluster, cfg)
    wb = {"GPU": 1.0, "CPU": 1.0} if t.use_gpu else {"CPU": t.cpus_per_worker}
    reach = sum(_replicas_on([wb], s) for s in shapes)
    checks.append(Check("train workers", "train", "ok" if reach >= t.workers else refuse,
                        f"{t.workers} worker(s) of {wb}; the cluster can hold {reach}",
                        "" if reach >= t.workers else "fewer train.workers or a bigger GPU/CPU group"))
    lab = cfg.label
    lb = {"GPU": lab.gpus_per_actor, "CPU": lab.cpus_per_actor} if lab.gpus_per_actor else {"CPU": lab.cpus_per_actor}
    if not any(_fits([lb], s) for s in shapes):
        checks.append(Check("label actors", "label", refuse, f"a labelling actor needs {lb}; no node shape has it",
                            "lower label.cpus_per_actor / gpus_per_actor"))
