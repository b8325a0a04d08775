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


def labeller_speeds(stages: dict[str, Any], a: AnnotateConfig, t: TrainConfig, lab: LabelConfig) -> dict[str, Any]:
    """Rows/s and cost per 1,000 rows of the LLM (the annotate stage: its rows and test rows in one engine call,
    engine start included) and of the encoder (the label stage: the whole corpus, actor start included), both
    measured in this run; plus the encoder's all-in cost: the LLM labelling its training rows, training the llm
    variant and labelling the corpus, per corpus row."""
    try:
        core_price = load_hardware()["devices"]["cpu-core"]["usd_per_hour"]
    except Exception:  # no price, no USD column; the device-seconds stand
        core_price = None
    out: dict[str, Any] = {}
    busy: dict[str, float] = {}
    for key, name in (("llm", "annotate"), ("encoder", "label"), ("train_llm", "train[llm]")):
        st = stages.get(name)
        if not st or not st.get("seconds") or not st.get("rows"):
            continue
        busy[key] = busy_devices(name.split("[")[0], st.get("device", "cpu"), a, t, lab)
        price = core_price if st.get("device", "cpu") == "cpu" else None
        if key != "train_llm":
            out[key] = throughput(st["rows"], st["seconds"], busy[key], st.get("device", "cpu"), price)
    if {"llm", "encoder", "train_llm"} <= set(busy):
        ann, lab, tr = stages["annotate"], stages["label"], stages["train[llm]"]
        share = ann.get("annotated_rows", ann["rows"]) / ann["rows"]  # the test rows are evaluation, not method
        dev_s = ann["seconds"] * busy["llm"] * share + tr["seconds"] * busy["train_llm"] \
            + lab["seconds"] * busy["encoder"]
        per_1k = dev_s / lab["rows"] * 1000
        out["encoder_all_in"] = {"rows": lab["rows"], "device_seconds_per_1k": per_1k,
                                 "usd_per_1k": per_1k * core_price / 3600 if core_price and
                                 out["llm"]["device"] == "cpu" else None}
    return out
