"""What a run's stages hold and use, and what that costs: the devices each stage reserves from Ray (the
manifest's device_seconds), the devices it computes on, and the labellers' measured speeds and costs per 1,000
rows (the report's speed table)."""

from __future__ import annotations

import os
from typing import Any

from llambert_ray.annotate.engines import engine_devices
from llambert_ray.config import AnnotateConfig, LabelConfig, TrainConfig
from llambert_ray.metrics import throughput
from llambert_ray.plan import load_hardware
from llambert_ray.ray_env import torch_threads


def reserved_devices(stage: str, a: AnnotateConfig, t: TrainConfig, lab: LabelConfig) -> tuple[str, float]:
    """The device kind a stage runs on and how many it reserves from Ray while it runs (the manifest's
    device_seconds = these x its seconds): the engines' placement (annotate.engine_devices); a training worker's
    GPU or CPUs x workers; a labelling actor's GPUs or CPUs x actors (label, and evaluate on the test split)."""
    if stage.startswith("annotate"):
        if a.endpoint is not None:  # the LLM is someone else's: it holds nothing here, it is paid by the token
            return "endpoint", 0.0
        return a.device, engine_devices(a, a.device == "gpu")
    if stage.startswith("train"):
        return ("gpu", t.workers) if t.use_gpu else ("cpu", t.workers * t.cpus_per_worker)
    return ("gpu" if lab.gpus_per_actor else "cpu"), (lab.gpus_per_actor or lab.cpus_per_actor) * lab.concurrency


def busy_devices(stage: str, device: str, a: AnnotateConfig, t: TrainConfig, lab: LabelConfig) -> float:
    """The devices a stage computes on while it runs (its cost = these x its wall seconds): the GPUs it holds, or
    on CPUs the cores its threads run on. That is more than the CPUs it reserves from Ray (the manifest's
    device_seconds): the vLLM engine binds OpenMP to every core of its node, a classifier actor runs
    ray_env.torch_threads(cpus_per_actor) torch threads, a training worker torch_threads(cpus_per_worker)."""
    import ray

    if stage == "annotate":
        if device == "gpu":
            return float(a.tensor_parallel_size * a.pipeline_parallel_size * a.concurrency)
        return float(min((os.cpu_count() or 1) * a.concurrency, ray.cluster_resources().get("CPU", 1)))
    if stage == "label":
        per_actor = lab.gpus_per_actor if device == "gpu" else torch_threads(lab.cpus_per_actor)
        return float(per_actor * lab.concurrency)
    return float(t.workers * (1 if device == "gpu" else torch_threads(t.cpus_per_worker)))


def usd_per_device_hour(device: str, gpu_type: str | None = None) -> float | None:
    """The hardware table's price of one device-hour: a CPU core, or one GPU of Ray's accelerator type `gpu_type`
    (e.g. A100-80G, H100); None where the type or its price is unknown."""
    try:
        devices = load_hardware()["devices"]
    except Exception:  # no table, no price; the device-seconds stand
        return None
    if device == "cpu":
        return devices.get("cpu-core", {}).get("usd_per_hour")
    for d in devices.values():
        if gpu_type and str(d.get("ray_accelerator", "")).lower() == gpu_type.lower():
            return d.get("usd_per_hour")
    return None


def gpu_type(a: AnnotateConfig) -> str | None:
    """The GPU type a run's GPU stages ran on: annotate.accelerator_type, else the one accelerator type of the
    cluster's GPU nodes (Ray's accelerator_type:X resource; nodes up now or earlier in the run); None if several or
    none."""
    import ray

    if a.accelerator_type:
        return a.accelerator_type
    kinds = {k.split(":", 1)[1] for n in ray.nodes() if (n.get("Resources") or {}).get("GPU")
             for k in n["Resources"] if k.startswith("accelerator_type:")}
    return kinds.pop() if len(kinds) == 1 else None


def stage_cost(stage: str, seconds: float, a: AnnotateConfig, t: TrainConfig, lab: LabelConfig,
               endpoint_usd: float | None = None) -> dict[str, Any]:
    """What a stage reserved and what that costs, for its manifest record: the device kind, device-seconds
    (reserved_devices x seconds), on GPUs the GPU type, and USD at the hardware table's price where it is known;
    an endpoint's annotation: `endpoint_usd`, its tokens at the endpoint's prices."""
    device, devices = reserved_devices(stage, a, t, lab)
    out: dict[str, Any] = {"device": device, "device_seconds": seconds * devices}
    if device == "endpoint":
        return {**out, "usd": endpoint_usd}
    if device == "gpu":
        out["gpu_type"] = gpu_type(a)
    price = usd_per_device_hour(device, out.get("gpu_type"))
    out["usd"] = out["device_seconds"] * price / 3600 if price is not None else None
    return out


def labeller_speeds(stages: dict[str, Any], a: AnnotateConfig, t: TrainConfig, lab: LabelConfig) -> dict[str, Any]:
    """Rows/s and cost per 1,000 rows of the LLM (the annotate stage: its rows and test rows in one engine call,
    engine start included) and of the encoder (the label stage: the whole corpus, actor start included), both
    measured in this run; plus the encoder's all-in cost: the LLM labelling its training rows, training the llm
    variant and labelling the corpus, per corpus row."""
    out: dict[str, Any] = {}
    busy: dict[str, float] = {}
    price: dict[str, float | None] = {}
    for key, name in (("llm", "annotate"), ("encoder", "label"), ("train_llm", "train[llm]")):
        st = stages.get(name)
        if not st or not st.get("seconds") or not st.get("rows"):
            continue
        if st.get("device") == "endpoint":  # no devices of the run's: the endpoint's price per token
            busy[key], price[key] = 0.0, 0.0
            usd = st.get("usd")
            out[key] = {**throughput(st["rows"], st["seconds"], 0.0, "endpoint"), "device_seconds_per_1k": None,
                        "usd_per_1k": usd / st["rows"] * 1000 if usd is not None else None}
            continue
        busy[key] = busy_devices(name.split("[")[0], st.get("device", "cpu"), a, t, lab)
        price[key] = usd_per_device_hour(st.get("device", "cpu"), st.get("gpu_type"))
        if key != "train_llm":
            out[key] = throughput(st["rows"], st["seconds"], busy[key], st.get("device", "cpu"), price[key])
    if {"llm", "encoder", "train_llm"} <= set(busy):
        ann, lab, tr = stages["annotate"], stages["label"], stages["train[llm]"]
        share = ann.get("annotated_rows", ann["rows"]) / ann["rows"]  # the test rows are evaluation, not method
        dev_s = {"llm": ann["seconds"] * busy["llm"] * share, "train_llm": tr["seconds"] * busy["train_llm"],
                 "encoder": lab["seconds"] * busy["encoder"]}
        per_1k = sum(dev_s.values()) / lab["rows"] * 1000
        # an endpoint's LLM: its tokens' price (the sample's share), beside the devices' time
        paid = (ann.get("usd") if ann.get("device") == "endpoint" else 0.0)
        priced = paid is not None and all(price[k] is not None for k in dev_s)
        paid = (paid or 0.0) * share
        out["encoder_all_in"] = {"rows": lab["rows"], "device_seconds_per_1k": per_1k,
                                 "usd_per_1k": (sum(dev_s[k] * price[k] for k in dev_s) / 3600 + paid)
                                 / lab["rows"] * 1000 if priced else None}
    return out
