"""`llambert preflight`: check a run's config against the cluster it will run on, in seconds, before a GPU is used.

A cluster run fails late and expensively when a model name does not resolve on the nodes that load it, a gated
model's token is missing on a worker, the corpus or output folder is local to the driver, or a tensor-parallel
engine fits no node. Preflight checks each of these from the nodes themselves (one light task per live node, no
GPU asked for) and against the node shapes the cluster has or can autoscale to, and prints one table: check,
where, status, fix. `llambert run` and the job entrypoints run it before the first stage.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from llambert_ray.checks import Check, checks_to_dicts, table  # noqa: F401  (the table and rows are preflight's)
from llambert_ray.cluster_shapes import live_nodes, node_name
from llambert_ray.config import RunConfig
from llambert_ray.placement import check_engine, check_workers, node_types
from llambert_ray.tasks import Task

# Hub orgs whose models are gated (a token is needed to download them); the hub itself is asked when reachable.
GATED_PREFIXES = ("meta-llama/", "mistralai/", "google/gemma", "google/medgemma", "bigcode/starcoder2")
NODE_TASK_TIMEOUT_S = 120


class PreflightError(RuntimeError):
    """One or more preflight checks failed; the message is the table."""


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
    nodes = live_nodes()
    _check_relative_paths(cfg.output_dir, paths, len(nodes), checks)
    # one light task per live node: models, corpus, output marker, credentials, seen from there
    marker = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    results, names = _probe_nodes(nodes, models, paths, cfg.output_dir, marker, checks)
    model_cfg = _check_model_loads(models, results, names, checks)
    _check_paths_readable(paths, results, names, checks)
    _check_output_shared(cfg.output_dir, marker, results, names, checks)
    cluster = node_types(cfg, checks)
    if cfg.annotate.endpoint is not None:
        check_endpoint(cfg, checks)
    else:
        check_engine(cfg, model_cfg.get("annotate.model"), cluster, checks)
    check_workers(cfg, cluster, checks)
    # the paper's headline needs gold test labels
    if cfg.test is None and cfg.corpus.label_column:
        checks.append(Check("test split", "evaluate", "warn", "no `test:` split: classifier accuracy will not be "
                            "measured", "add a gold-labelled `test:` section (e.g. the IMDb test split)"))
    for role, ref in models.items():
        if is_remote(ref):
            checks.append(_mirror_check(cfg, role, ref))
    return checks


def _mirror_check(cfg: RunConfig, role: str, ref: str) -> Check:
    """Where a model in object storage is copied before it loads: encoders once per node into $LLAMBERT_CACHE; LLM
    engines into HF_HUB_CACHE, which annotate.local_weights_dir puts on each node's own disk."""
    if role != "annotate.model":
        return Check("model mirror", role, "ok", f"{ref}: copied once per node into $LLAMBERT_CACHE")
    if cfg.annotate.local_weights_dir:
        return Check("model mirror", role, "ok", f"{ref}: copied once per engine node into "
                     f"{cfg.annotate.local_weights_dir} (annotate.local_weights_dir), loaded from there")
    return Check("model mirror", role, "warn", f"{ref}: every engine node copies it into the HF cache ($HF_HOME; on "
                 f"the cluster manifests the shared volume, the same folder for every node: Ray's download lock is "
                 f"per node) and loads it from there at the volume's throughput",
                 "annotate.local_weights_dir: a folder on each engine node's own disk (cluster/README.md, Weights)")


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
    if cfg.annotate.endpoint is not None:  # the endpoint's model: check_endpoint asks the endpoint for it
        del roles["annotate.model"]
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
    names = {n["NodeID"]: node_name(n) for n in nodes}
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


def check_endpoint(cfg: RunConfig, checks: list[Check]) -> None:
    """annotate.endpoint, from the driver (the annotation calls go from there): the key present, the endpoint
    reachable, the model among those it lists, and one row answered in the configured mode."""
    from llambert_ray.annotate import EndpointEngine, EndpointError, make_plan
    from llambert_ray.tasks import load_task

    a, ep = cfg.annotate, cfg.annotate.endpoint
    where = f"driver -> {ep.base_url}"
    add = checks.append
    with EndpointEngine(a) as engine:
        try:
            engine.api_key()
            add(Check("endpoint key", where, "ok",
                      f"{ep.api_key_env} is set" if ep.api_key_env else "no key asked for"))
            listed = engine.models()
        except EndpointError as e:
            add(Check("endpoint", where, "fail", str(e).split("; fix:")[0], str(e).partition("; fix: ")[2]))
            return
        if a.model not in listed:
            add(Check("endpoint model", where, "fail", f"{a.model!r} is not among the {len(listed)} models it lists "
                      f"({', '.join(listed[:8])}{', ...' if len(listed) > 8 else ''})",
                      "annotate.model: the model's name at the endpoint"))
            return
        add(Check("endpoint model", where, "ok", f"{a.model} listed"))
        try:
            task = load_task(cfg.task)
            plan = make_plan(task, a)
            text = task.examples[0].text if task.examples else "This is a test."
            got = engine.probe(plan, text)
        except Exception as e:
            add(Check(f"endpoint {a.mode} mode", where, "fail", f"{type(e).__name__}: {str(e)[:300]}",
                      "check the endpoint's answer to one request by hand (curl)"))
            return
        if got["usable"]:
            add(Check(f"endpoint {a.mode} mode", where, "ok", f"one row answered: {got['llm_label']!r} "
                      f"({got['prompt_tokens']} prompt tokens)"))
        else:
            why, _, fix = got["why"].partition("; fix: ")
            add(Check(f"endpoint {a.mode} mode", where, "fail", why, fix))


def preflight_or_raise(cfg: RunConfig, log=print) -> list[Check]:
    """Run the checks, print the table; raise PreflightError (the table) when any check failed."""
    t0 = time.time()
    checks = run_preflight(cfg)
    text = table(checks) + f" ({time.time() - t0:.1f}s)"
    if any(c.status == "fail" for c in checks):
        raise PreflightError("preflight failed; nothing was run:\n" + text)
    log(text)
    return checks


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
    llm = resolve_model(cfg.annotate.model, check_hub=local) if cfg.annotate.endpoint is None else None
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
