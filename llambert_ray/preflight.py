"""`llambert preflight`: check a run's config against the cluster it will run on, in seconds, before a GPU is used.

A cluster run fails late and expensively when a model name does not resolve on the nodes that load it, a gated
model's token is missing on a worker, the corpus or output folder is local to the driver, or a tensor-parallel
engine fits no node. Preflight checks each of these from the nodes themselves (one light task per live node, no
GPU asked for) and against the node shapes the cluster has or can autoscale to, and prints one table: check,
where, status, fix. `llambert run` and the job entrypoints run it before the first stage.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llambert_ray.config import RunConfig
from llambert_ray.tasks import Task

# Hub orgs whose models are gated (a token is needed to download them); the hub itself is asked when reachable.
GATED_PREFIXES = ("meta-llama/", "mistralai/", "google/gemma", "google/medgemma", "bigcode/starcoder2")
NODE_TASK_TIMEOUT_S = 120


class PreflightError(RuntimeError):
    """One or more preflight checks failed; the message is the table."""


@dataclass
class Check:
    check: str
    where: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


@dataclass
class NodeShape:
    """A node that is up, or a node type the autoscaler can add (`count` of them at most)."""

    name: str
    resources: dict[str, float]
    count: int
    live: bool


def table(checks: list[Check]) -> str:
    lines = ["| check | where | status | detail | fix |", "|---|---|---|---|---|"]
    for c in checks:
        mark = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}[c.status]
        lines.append(f"| {c.check} | {c.where} | {mark} | {c.detail} | {c.fix} |")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append(f"\npreflight: {len(checks)} checks, {fails} failed, {warns} warnings")
    return "\n".join(lines)


# ------------------------------------------------------------------ what runs on each node
def _probe_node(models: list[str], paths: list[str], output_dir: str, marker: str) -> dict[str, Any]:
    """On one node: which models' configs load, which corpus paths exist, whether output_dir takes a marker file,
    and which credentials the environment holds. Light: no weights, no GPU."""
    import socket

    from llambert_ray.models import read_model_config

    out: dict[str, Any] = {"host": socket.gethostname(), "cwd": os.getcwd(),
                           "hf_token": bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")),
                           "hf_offline": os.environ.get("HF_HUB_OFFLINE") == "1", "models": {}, "paths": {}}
    for ref in models:
        try:
            cfg = read_model_config(ref)
            out["models"][ref] = {"ok": True, "config": {k: cfg.get(k) for k in (
                "model_type", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "max_position_embeddings", "type_vocab_size", "text_config", "hidden_size", "intermediate_size",
                "vocab_size", "tie_word_embeddings", "head_dim")}}
        except Exception as e:
            out["models"][ref] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    for p in paths:
        try:
            from llambert_ray.data import detect_format

            out["paths"][p] = {"ok": True, "format": detect_format(p)}
        except Exception as e:
            out["paths"][p] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    if "://" in output_dir:  # refused on the driver (_check_relative_paths): no local folder of that name
        out["output_dir"] = {"ok": True, "path": output_dir}
        return out
    try:
        d = Path(output_dir) / ".preflight" / marker
        d.mkdir(parents=True, exist_ok=True)
        import ray

        node = ray.get_runtime_context().get_node_id()
        (d / node).write_text(out["host"])
        out["output_dir"] = {"ok": True, "path": str(Path(output_dir).resolve())}
    except Exception as e:
        out["output_dir"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def _live_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _node_name(n: dict[str, Any]) -> str:
    labels = n.get("Labels") or {}
    group = labels.get("ray.io/node-group") or labels.get("llambert/group") or labels.get("ray.io/node-type")
    head = "head" if n.get("Resources", {}).get("node:__internal_head__") else None
    return f"{group or head or 'node'}@{n.get('NodeManagerAddress')}:{n.get('NodeManagerPort')}"


def node_shapes() -> list[NodeShape]:
    """Live nodes, and the node types the autoscaler may add (from the cluster config it reports to the GCS)."""
    shapes = [NodeShape(_node_name(n), {k: float(v) for k, v in n["Resources"].items()
                                        if k in ("CPU", "GPU", "memory") or k.startswith("accelerator_type:")},
                        1, True) for n in _live_nodes()]
    try:
        import ray._private.state as state

        cc = state.state.get_cluster_config()
        for g in (cc.node_group_configs if cc else []):
            shapes.append(NodeShape(f"{g.name} (autoscaler)", {k: float(v) for k, v in g.resources.items()},
                                    max(int(g.max_count), 0), False))
    except Exception:  # no autoscaler config reported (a fixed cluster, a local Ray)
        pass
    return shapes


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


def is_gated(ref: str) -> bool:
    """Whether a hub model needs a token: the hub's answer when reachable, else the known gated orgs."""
    from llambert_ray.models import is_remote

    if is_remote(ref) or Path(ref).exists() or "/" not in ref:  # gated hub repos all have an org
        return False
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from huggingface_hub import HfApi

            return bool(HfApi().model_info(ref, timeout=5).gated)
        except Exception:
            pass
    return ref.startswith(GATED_PREFIXES)


# ------------------------------------------------------------------ the checks
def run_preflight(cfg: RunConfig) -> list[Check]:
    """Every check for cfg against the connected Ray cluster (init_ray first). Never asks for a GPU."""
    from llambert_ray.models import is_remote

    checks: list[Check] = []
    models = _resolve_models(cfg, checks)
    splits = {"corpus": cfg.corpus, "test": cfg.test, "extra": cfg.extra}
    paths = {name: c.path for name, c in splits.items() if c is not None and c.path}
    nodes = _live_nodes()
    _check_relative_paths(cfg.output_dir, paths, len(nodes), checks)
    # one light task per live node: models, corpus, output marker, credentials, seen from there
    marker = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    results, names = _probe_nodes(nodes, models, paths, cfg.output_dir, marker, checks)
    model_cfg = _check_model_loads(models, results, names, checks)
    _check_paths_readable(paths, results, names, checks)
    _check_output_shared(cfg.output_dir, marker, results, names, checks)
    shapes = node_shapes()
    _check_engine(cfg, model_cfg.get("annotate.model"), shapes, checks)
    _check_workers(cfg, shapes, checks)
    # the paper's headline needs gold test labels
    if cfg.test is None and cfg.corpus.label_column:
        checks.append(Check("test split", "evaluate", "warn", "no `test:` split: classifier accuracy will not be "
                            "measured", "add a gold-labelled `test:` section (e.g. the IMDb test split)"))
    for ref in models.values():
        if is_remote(ref):
            checks.append(Check("model mirror", "annotate/train", "ok", f"{ref}: engines download it per node "
                                f"(Ray Data LLM), encoders copy it once per node into $LLAMBERT_CACHE"))
    return checks


def _resolve_models(cfg: RunConfig, checks: list[Check]) -> dict[str, str]:
    """The task, and each role's model resolved on the driver: {role: resolved ref} of those that resolve."""
    from llambert_ray.models import ModelNotFoundError, resolve_model
    from llambert_ray.tasks import TaskError, load_task

    add = checks.append
    try:
        task = load_task(cfg.task)
        add(Check("task", "driver", "ok", f"{task.name}: labels {task.labels}"))
    except TaskError as e:
        add(Check("task", "driver", "fail", str(e), "a preset name or a task YAML path"))
    roles = {"annotate.model": cfg.annotate.model, "train.model": cfg.train.model}
    if cfg.select.strategy == "active":
        roles["select.model"] = cfg.select.model or cfg.train.model
    models: dict[str, str] = {}
    for role, ref in roles.items():
        try:
            models[role] = resolve_model(ref)
        except ModelNotFoundError as e:
            add(Check(f"model {role}", "driver", "fail", str(e).split("; fix:")[0],
                      "a packaged name, a hub id, a folder or an s3:// / gs:// mirror"))
    return models


def _check_relative_paths(out: str, paths: dict[str, str], n_nodes: int, checks: list[Check]) -> None:
    """On several nodes a relative path resolves in each node's own working dir. And a run folder is never in
    object storage: only `llambert label --output` may be a bucket."""
    if "://" in out:
        checks.append(Check("output_dir shared", "cluster", "fail",
                            f"output_dir {out.partition('?')[0]} is object storage: a run folder needs a POSIX disk "
                            f"every node shares (its manifest and annotation cache parts are renamed into place, "
                            f"model folders and checkpoints are loaded by path)",
                            "an absolute path on a shared volume, e.g. /mnt/shared/runs; to put the labels in a "
                            "bucket: llambert label --model RUN/model --output s3://BUCKET/PREFIX"))
        return
    if n_nodes <= 1:
        return
    if not os.path.isabs(out) and "://" not in out:
        checks.append(Check("output_dir shared", "cluster", "fail",
                            f"relative output_dir {out!r} on a {n_nodes}-node cluster: each node would write into "
                            f"its own working dir (annotation cache parts, checkpoints) while the driver reads its "
                            f"own", "an absolute path on storage every node mounts, e.g. /mnt/shared/runs"))
    for name, p in paths.items():
        if "://" not in p and not os.path.isabs(p):
            checks.append(Check(f"{name} path", "cluster", "fail", f"relative path {p!r} on a {n_nodes}-node "
                                f"cluster", "an absolute path on shared storage or an s3:// / gs:// URI"))


def _probe_nodes(nodes: list[dict[str, Any]], models: dict[str, str], paths: dict[str, str], out: str,
                 marker: str, checks: list[Check]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """_probe_node on every live node: ({node id: its answers}, {node id: its name})."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from llambert_ray.ray_env import worker_env

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    env = {"env_vars": worker_env()}
    refs = {n["NodeID"]: probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False), runtime_env=env).remote(
        sorted(set(models.values())), sorted(set(paths.values())), out, marker) for n in nodes}
    names = {n["NodeID"]: _node_name(n) for n in nodes}
    results: dict[str, dict[str, Any]] = {}
    for nid, r in refs.items():
        try:
            results[nid] = ray.get(r, timeout=NODE_TASK_TIMEOUT_S)
        except Exception as e:
            checks.append(Check("node reachable", names[nid], "fail", f"the check task did not run: "
                                f"{type(e).__name__}: {str(e)[:160]}", "check the node's runtime env and that "
                                "llambert_ray is importable there"))
    return results, names


def _check_model_loads(models: dict[str, str], results: dict[str, dict[str, Any]], names: dict[str, str],
                       checks: list[Check]) -> dict[str, dict[str, Any]]:
    """Each model loads (its config) on every node, with HF_TOKEN where gated; returns {role: its HF config}."""
    add = checks.append
    model_cfg: dict[str, dict[str, Any]] = {}
    for role, ref in models.items():
        bad = [(names[n], r["models"][ref]["error"]) for n, r in results.items() if not r["models"][ref]["ok"]]
        good = [r["models"][ref]["config"] for r in results.values() if r["models"][ref]["ok"]]
        if good:
            model_cfg[role] = good[0]
        if bad:
            add(Check(f"model {role} loads", ", ".join(b[0] for b in bad), "fail", f"{ref}: {bad[0][1]}",
                      "check the id; give every node HF_TOKEN (gated models) and the HF cache/mirror "
                      "(`llambert models pull`), or use an s3:// mirror"))
        elif results:
            add(Check(f"model {role} loads", f"{len(results)} node(s)", "ok", f"{ref} ({good[0].get('model_type')})"))
        if not is_gated(ref):
            continue
        missing = [names[n] for n, r in results.items() if not r["hf_token"]]
        if missing or not os.environ.get("HF_TOKEN"):
            add(Check(f"HF_TOKEN for {role}", ", ".join(missing) or "driver", "fail",
                      f"{ref} is gated; the nodes that load it or its tokenizer (engines, Ray Data LLM's "
                      f"tokenizer stages, the driver) have no HF_TOKEN",
                      "set HF_TOKEN on every node (the hf-token secret in cluster/kuberay, env in aws.yaml) "
                      "or point the model at a mirror folder"))
        else:
            add(Check(f"HF_TOKEN for {role}", f"{len(results)} node(s)", "ok", f"{ref} is gated; token set"))
    return model_cfg


def _check_paths_readable(paths: dict[str, str], results: dict[str, dict[str, Any]], names: dict[str, str],
                          checks: list[Check]) -> None:
    for name, p in paths.items():
        bad = [(names[n], r["paths"][p]["error"]) for n, r in results.items() if not r["paths"][p]["ok"]]
        if bad:
            checks.append(Check(f"{name} readable", ", ".join(b[0] for b in bad), "fail", f"{p}: {bad[0][1]}",
                                "a path every node sees (shared volume, s3:// / gs:// with credentials on every "
                                "node)"))
        elif results:
            checks.append(Check(f"{name} readable", f"{len(results)} node(s)", "ok", p))


def _check_output_shared(out: str, marker: str, results: dict[str, dict[str, Any]], names: dict[str, str],
                         checks: list[Check]) -> None:
    """output_dir: every node's marker must be visible to the driver."""
    if "://" in out:
        return
    seen = set()
    mdir = Path(out) / ".preflight" / marker
    if mdir.is_dir():
        seen = {f.name for f in mdir.iterdir()}
    not_shared = [names[n] for n, r in results.items() if r["output_dir"]["ok"] and n not in seen]
    unwritable = [(names[n], r["output_dir"]["error"]) for n, r in results.items() if not r["output_dir"]["ok"]]
    if unwritable:
        checks.append(Check("output_dir writable", ", ".join(u[0] for u in unwritable), "fail", unwritable[0][1],
                            "an output_dir every node can write"))
    if not_shared:
        checks.append(Check("output_dir shared", ", ".join(not_shared), "fail",
                            f"{out}: files these nodes wrote are not in the driver's {Path(out).resolve()}",
                            "an absolute path on storage every node mounts, e.g. /mnt/shared/runs"))
    elif results and not unwritable:
        checks.append(Check("output_dir shared", f"{len(results)} node(s)", "ok", str(Path(out).resolve())))
    shutil.rmtree(mdir, ignore_errors=True)


def _check_engine(cfg: RunConfig, llm: dict[str, Any] | None, shapes: list[NodeShape], checks: list[Check]) -> None:
    """The annotation engines: TP / PP against the LLM's heads and layers, bundles against node shapes."""
    from llambert_ray.annotate import engine_placement
    from llambert_ray.ray_env import resolve_device

    a = cfg.annotate
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
        checks.append(Check("engine fits a node", "annotate", "fail",
                            f"one engine needs {what}; no node shape has that: "
                            + "; ".join(f"{s.name} {s.resources}" for s in shapes),
                            "a node type with enough GPUs/CPUs for tensor_parallel_size (or a smaller TP)"))
    else:
        reach = sum(_replicas_on(bundles, s) for s in fitting) if one_node else a.concurrency
        status = "ok" if reach >= a.concurrency else "fail"
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


def _check_workers(cfg: RunConfig, shapes: list[NodeShape], checks: list[Check]) -> None:
    """Training workers and labelling actors against the node shapes."""
    t = cfg.train
    wb = {"GPU": 1.0, "CPU": 1.0} if t.use_gpu else {"CPU": t.cpus_per_worker}
    reach = sum(_replicas_on([wb], s) for s in shapes)
    checks.append(Check("train workers", "train", "ok" if reach >= t.workers else "fail",
                        f"{t.workers} worker(s) of {wb}; the cluster can hold {reach}",
                        "" if reach >= t.workers else "fewer train.workers or a bigger GPU/CPU group"))
    lab = cfg.label
    lb = {"GPU": lab.gpus_per_actor, "CPU": lab.cpus_per_actor} if lab.gpus_per_actor else {"CPU": lab.cpus_per_actor}
    if not any(_fits([lb], s) for s in shapes):
        checks.append(Check("label actors", "label", "fail", f"a labelling actor needs {lb}; no node shape has it",
                            "lower label.cpus_per_actor / gpus_per_actor"))


def preflight_or_raise(cfg: RunConfig, log=print) -> list[Check]:
    """Run the checks, print the table; raise PreflightError (the table) when any check failed."""
    t0 = time.time()
    checks = run_preflight(cfg)
    text = table(checks) + f" ({time.time() - t0:.1f}s)"
    if any(c.status == "fail" for c in checks):
        raise PreflightError("preflight failed; nothing was run:\n" + text)
    log(text)
    return checks


def checks_to_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


def check_run_inputs(cfg: RunConfig) -> Task:
    """The checks `llambert run` makes before Ray starts, in seconds, whether or not the full preflight runs: a
    wrong path, task, model or mode fails here. Returns the task."""
    from llambert_ray.annotate import make_plan
    from llambert_ray.data import check_corpus_path
    from llambert_ray.models import resolve_model
    from llambert_ray.ray_env import is_local
    from llambert_ray.tasks import load_task

    task = load_task(cfg.task)
    if cfg.label.sql is not None or cfg.label.incremental:
        from llambert_ray.label import LabelError

        raise LabelError("label.sql / label.incremental are for `llambert label`: a run's label stage writes "
                         "labels.parquet in its run folder; fix: leave them out of this config and, after the run, "
                         "llambert label --model RUN_DIR/model --output DB_URL [--incremental]")
    # Every stage's model, resolved before the first stage: a bad encoder name must not stop the run after the
    # LLM annotation has been paid for. (`llambert preflight` also checks they load on the nodes that load them.)
    local = is_local(cfg.cluster.address)
    llm = resolve_model(cfg.annotate.model, check_hub=local)
    for ref in dict.fromkeys([cfg.train.model, cfg.select.model or cfg.train.model]):
        resolve_model(ref, check_hub=local)
    if ("llm+extra" in cfg.train.variants) and cfg.extra is None:
        from llambert_ray.train import TrainError

        raise TrainError("variant 'llm+extra' needs an `extra:` corpus section; fix: add it or drop the variant")
    if cfg.evaluate.llm_test_sample is not None and cfg.test is not None and cfg.select.strategy == "active":
        from llambert_ray.config import ConfigError

        raise ConfigError("evaluate.llm_test_sample needs select.strategy random (the test rows ride in the one "
                          "engine call of the random sample); fix: drop one of the two")
    for section in ("corpus", "test", "extra"):
        check_corpus_path(getattr(cfg, section), f"{section}.path")
    make_plan(task, cfg.annotate, llm)  # bad task/mode; loads the LLM's tokenizer (score mode): last
    return task
