"""Connecting to Ray: a local Ray on a laptop, or an existing cluster, with the environment engines need."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Environment every Ray worker needs. On CPU, vLLM takes one core for OpenMP unless told to bind all, and
# its default KV cache (4 GiB+) is far more than a small model needs (GPU builds of vLLM ignore these).
# DeepSpeed's accelerator is not set here: training sets it per run (cpu or cuda), since a cluster-wide
# DS_ACCELERATOR=cpu would silently put GPU training on the CPU accelerator.
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto",
                  "TOKENIZERS_PARALLELISM": "false"}

# CPUs for the light steps around the heavy actors (pandas transforms of the corpus, prompt building, answer parsing,
# row counting, parquet writes). A fraction of a CPU: with a full one each, a 2-core machine whose engine actor holds
# a core leaves Ray Data's budget short, and the pipeline waits forever instead of failing. One value for all, since
# Ray Data fuses adjacent map steps into one task only when they ask for the same resources.
LIGHT_CPUS = 0.1
LIGHT = {"num_cpus": LIGHT_CPUS}


def from_frames(frames: Any):
    """A Ray Dataset of pandas frames or Arrow tables (one block each), as `ray.data.from_pandas` / `from_arrow`
    give, but with no Ray task. from_pandas reads each frame's metadata in a task that asks for a whole CPU, and on
    a cluster whose CPUs an engine holds (a run's served engine on a 2-CPU machine keeps 1.1 of them) that task
    never starts: the run waits forever. `ray.data.from_blocks` reads the metadata in this process."""
    import pandas as pd
    import pyarrow as pa
    import ray

    one = isinstance(frames, (pd.DataFrame, pa.Table))
    return ray.data.from_blocks([frames] if one else list(frames))


def has_gpu() -> bool:
    """True if this Ray cluster has a GPU or its autoscaler can add GPU nodes (or, before Ray starts, this machine
    has a GPU)."""
    try:
        import ray

        if ray.is_initialized():
            if ray.cluster_resources().get("GPU", 0) > 0:
                return True
            # an autoscaling cluster whose GPU groups are at 0 replicas: the node types its autoscaler may add
            import ray._private.state as state

            cc = state.state.get_cluster_config()
            return bool(cc and any(g.resources.get("GPU", 0) > 0 and g.max_count != 0
                                   for g in cc.node_group_configs))
    except Exception:
        pass
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def resolve_device(requested: str, *, gpu_elsewhere: bool = False) -> str:
    """"cpu" / "gpu" for a stage's `device` setting. "auto" is gpu when GPUs are up in the cluster, or when another
    stage of the run asks for GPUs (an autoscaling cluster whose GPU groups start at 0 has none up yet)."""
    if requested in ("cpu", "gpu"):
        return requested
    return "gpu" if gpu_elsewhere or has_gpu() else "cpu"


def cpu_bind_ranges(ranks: int, cores: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the `ranks` (TP x PP) workers of one CPU engine: one core list per rank joined
    by '|' (vLLM asserts one list per local rank). With fewer cores than ranks, ranks share cores ('0|0')."""
    cores = cores if cores is not None else sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // ranks)
    parts = []
    for r in range(ranks):
        mine = cores[r * per:(r + 1) * per] if len(cores) >= ranks else [cores[r % len(cores)]]
        parts.append(",".join(str(c) for c in mine))
    return "|".join(parts)


def torch_threads(cpus: float) -> int:
    """torch intra-op threads for an actor or worker that Ray gives `cpus` CPUs (fractional allowed): one per whole
    CPU, at least one. More threads than the CPUs Ray reserved would oversubscribe cores the node gave other
    actors."""
    return max(1, int(round(cpus)))


def worker_env() -> dict[str, str]:
    """Env vars to pass to Ray workers: this process's engine settings plus the CPU defaults, less what the Ray
    job this driver runs in sets already."""
    env = dict(CPU_ENGINE_ENV)
    ncpu = os.cpu_count() or 1
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{ncpu - 1}" if ncpu > 1 else "0"
    # Not HF_TOKEN: a runtime_env is shown in the dashboard. Gated models are loaded on every node (engines, Ray
    # Data LLM's tokenizer stages, training workers), so the nodes' own environment carries the token (the manifests
    # give it to every group; a local Ray's workers inherit this process's), and `llambert preflight` checks it there.
    for key in list(CPU_ENGINE_ENV) + ["LLAMBERT_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "HF_HOME",
                                       "DS_ACCELERATOR"]:
        if key in os.environ:
            env[key] = os.environ[key]
    # Inside a Ray job the job's runtime_env already reaches every worker, and Ray refuses a driver runtime_env
    # (ray.init's, or ray.data.llm's) that sets the same keys again: add only what the job did not set.
    job_env = _job_env_vars()
    return {k: v for k, v in env.items() if k not in job_env}


def _job_env_vars() -> dict[str, str]:
    """env_vars of the Ray job this driver runs in (empty outside a job)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except ValueError:
        return {}


def is_local(address: str | None) -> bool:
    """True when this address means a Ray started here for this command (not an existing cluster)."""
    return address is None or address == "local"


class RayStartError(RuntimeError):
    """Ray could not be started or reached; the message says what to do."""


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_dir: str | Path | None = None,
             **kwargs: Any) -> None:
    """Start a local Ray (address None) or connect to a cluster ("auto", "ray://host:10001"). Idempotent.

    Unless verbose (`-v`, LLAMBERT_VERBOSE=1), Ray workers' output (vLLM, DeepSpeed, Ray Train) is not streamed
    here: it stays in Ray's session folder and is gathered into LOG_DIR (see llambert_ray.console), and Ray Data
    draws no progress bars of its own (each stage draws one line)."""
    import ray

    from llambert_ray import console

    console.configure_logs(log_dir)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # each stage draws one line of its own (progress.Progress)
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        console.ray_started()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = worker_env()
    for k, v in env.items():
        os.environ.setdefault(k, v)
    opts: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": console.verbose(),
                            "include_dashboard": False, **kwargs}
    local = is_local(address)
    if local:
        # "local" (not None): ray.init(address=None) would join a cluster that `ray start` left running on
        # this machine instead of starting the local Ray the config asked for. Plenty of worker processes get
        # forked on 2 cores; keep Ray's own memory use modest.
        opts.update(address="local", num_cpus=num_cpus, object_store_memory=kwargs.get("object_store_memory", 2 << 30))
    else:
        opts.update(address=address)
    try:
        ray.init(**opts)
    except ConnectionError as e:
        if local:
            raise
        raise RayStartError(f"no Ray cluster answered at --address {address} ({str(e).splitlines()[0][:200]}); "
                            f"fix: check the address (`ray status` on the head node prints it), or leave --address "
                            f"out to start a local Ray") from None
    except Exception as e:
        if local and "timed out during startup" in str(e):
            ray.shutdown()  # the half-started node's processes
            raise RayStartError(
                "the local Ray did not finish starting within 30 s, most likely because another command on this "
                "machine is starting its own Ray at the same moment (or the machine is overloaded); fix: wait until "
                "the other run is past its start and run this again, or share that run's cluster: start one with "
                "`ray start --head` and pass --address auto to every command") from None
        raise
    console.ray_started()


class UnsharedPathError(ValueError):
    """A relative path where several nodes would each resolve it in their own working dir."""


def require_shared_path(path: str | os.PathLike, what: str) -> None:
    """Refuse a relative output path on a multi-node cluster: Ray Data workers write their parts on their own node
    (into their own working dir), while the driver reads its own folder. Call after init_ray."""
    import ray

    p = str(path)
    if "://" in p or os.path.isabs(p) or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise UnsharedPathError(f"{what} {p!r} is relative on a {len(nodes)}-node cluster: each node would write "
                                f"into its own working dir; fix: an absolute path on storage every node mounts "
                                f"(e.g. /mnt/shared/runs/...)")
