"""What runs on every Ray Train worker while the encoder is fine-tuned (llambert_ray.train starts it): DeepSpeed's
engine (ZeRO 0-3) over the model, one epoch after another over the worker's Ray Data shard, a DeepSpeed checkpoint
reported to Ray Train after each (a rerun or a worker failure resumes from it), the stop rule's agreement measured
after each epoch, and the final model (an HF folder with FINAL_MARKER) reported as the last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llambert_ray.config import TrainConfig
from llambert_ray.models import cache_dir, local_model_dir
from llambert_ray.ray_env import torch_threads, worker_env
from llambert_ray.targets import train_loss

FINAL_MARKER = "llambert_model.json"

def _deepspeed_config(cfg: TrainConfig, use_bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        # A plain torch optimizer keeps the CPU path free of DeepSpeed's compiled fused optimizers.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def train_loop(config: dict[str, Any]) -> None:  # runs on every Ray Train worker
    import warnings

    # DeepSpeed's ZeRO collectives call deprecated torch.distributed names on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import ray.train
    import ray.train.torch
    import torch
    from deepspeed.accelerator import get_accelerator

    cfg = TrainConfig(**config["train"])
    labels: list[str] = config["labels"]
    label2id = {lab: i for i, lab in enumerate(labels)}
    torch.set_num_threads(torch_threads(cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed)
    world = ray.train.get_context().get_world_size()
    # Ray Train's device for this worker: with CUDA_VISIBLE_DEVICES set per worker, the local rank is not the
    # index of the worker's GPU.
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    steps_per_epoch = max(1, config["rows"] // world // (cfg.batch_size * cfg.grad_accum))
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else cfg.use_gpu
    engine, tok = _deepspeed_engine(cfg, config["model_path"], labels, steps_per_epoch * cfg.epochs, use_bf16,
                                    device)
    start_epoch, history = _restore(engine)
    weight = torch.tensor(config["class_weights"], device=device) if config.get("class_weights") else None

    def encode(texts: list[str]) -> dict[str, Any]:
        enc = tok(texts, truncation=True, max_length=cfg.max_length, padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if config["has_eval"] else None
    agree_shard = ray.train.get_dataset_shard("agree") if config.get("best_dir") else None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        seen, micro, loss_sum = _train_epoch(engine, train_shard, encode, label2id, device, cfg, epoch,
                                             steps_per_epoch * cfg.grad_accum, config.get("progress"), weight)
        # start_epoch: where this attempt began (> 0: restored from the checkpoint of epoch start_epoch - 1,
        # after a worker failure or a rerun), so the history shows whether and where training resumed.
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(micro, 1),
                                   "samples_per_s": seen * world / max(time.time() - t0, 1e-9),
                                   "accelerator": get_accelerator().device_name(), "device": str(device),
                                   "bf16": use_bf16, "targets": cfg.targets,
                                   "class_weights": config.get("class_weights"), "start_epoch": start_epoch}
        if eval_shard is not None:
            metrics["eval_accuracy"] = _evaluate(engine, eval_shard, encode, label2id, device)
        if agree_shard is not None:  # the stop rule: agreement with the held-out rows' labels; the best kept
            metrics["agreement_macro_f1"] = _agreement(engine, agree_shard, encode, label2id, device)
            if epoch == chosen_epoch([*history, metrics]):
                _save_model(engine, tok, cfg, labels, Path(config["best_dir"]),
                            {"epoch": epoch, "agreement_macro_f1": metrics["agreement_macro_f1"]})
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds", client_state={"epoch": epoch, "history": history})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    _report_final_model(engine, tok, cfg, labels, history, config.get("best_dir"))


def chosen_epoch(history: list[dict[str, Any]]) -> int | None:
    """The stop rule's epoch: the first with the best agreement_macro_f1 (None without any)."""
    scored = [(m["agreement_macro_f1"], -m["epoch"]) for m in history if m.get("agreement_macro_f1") is not None]
    return -max(scored)[1] if scored else None


def _deepspeed_engine(cfg: TrainConfig, model_ref: str, labels: list[str], total_steps: int, use_bf16: bool,
                      device=None):
    """The classifier (a fresh head over `labels`), AdamW and the LR schedule wrapped by DeepSpeed, on `device`
    (this worker's, from Ray Train); and the tokenizer."""
    import argparse

    import deepspeed
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_constant_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    model_path = local_model_dir(model_ref)  # an s3:// / gs:// encoder: copied once per node
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}, ignore_mismatched_sizes=True)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = (get_constant_schedule_with_warmup(optimizer, warmup) if cfg.lr_schedule == "constant"
                 else get_linear_schedule_with_warmup(optimizer, warmup, total_steps))
    # DeepSpeed puts its engine on cuda:LOCAL_RANK unless it is given the device (args.device_rank), while the
    # inputs go to Ray Train's device for this worker: the two agree only by the order Ray starts its workers in.
    args = None
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
        args = argparse.Namespace(device_rank=device.index if device.index is not None else 0)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=_deepspeed_config(cfg, use_bf16))
    return engine, tok


def _restore(engine) -> tuple[int, list[dict[str, Any]]]:
    """(first epoch to run, history so far): from Ray Train's latest checkpoint when this attempt resumes. A latest
    checkpoint that is a finished run's final model (fit called again on a kept output folder: no DeepSpeed state in
    it) is no epoch to resume from: the run trains afresh."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0, []
    with ckpt.as_directory() as d:
        if not (Path(d) / "ds").is_dir():
            return 0, []
        _, client = engine.load_checkpoint(d, tag="ds")
    return int((client or {}).get("epoch", -1)) + 1, list((client or {}).get("history", []))


def _train_epoch(engine, shard, encode, label2id, device, cfg: TrainConfig, epoch: int, micro_per_epoch: int,
                 tally, weight=None) -> tuple[int, int, float]:
    """One epoch over this worker's shard: (rows seen, micro-batches, summed loss). The loss: targets.train_loss,
    against the batch's soft `target` rows where it has them, each label weighted by `weight` (class_balance)."""
    import numpy as np
    import torch

    engine.train()
    seen, loss_sum, micro = 0, 0.0, 0
    for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", drop_last=True,
                                    local_shuffle_buffer_size=max(4 * cfg.batch_size, 256),
                                    local_shuffle_seed=cfg.seed + epoch):
        if micro >= micro_per_epoch:  # every rank takes the same number of steps (collectives must match)
            break
        enc = encode(batch["text"].tolist())
        y = torch.tensor([label2id[v] for v in batch["label"]], device=device)
        target = (torch.tensor(np.stack(batch["target"].to_numpy()), device=device, dtype=torch.float32)
                  if "target" in batch else None)
        loss = train_loss(engine(**enc).logits, y, target, weight)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach())
        seen += len(batch)
        micro += 1
        if tally is not None:
            tally(batch)  # the driver's progress line (an async call to its counter actor)
    return seen, micro, loss_sum


def _save_model(engine, tok, cfg: TrainConfig, labels: list[str], folder: Path, marker: dict[str, Any]) -> None:
    """The model as an HF folder, written by rank 0 (whole, then renamed into place). Under ZeRO-3 DeepSpeed gathers
    the partitions layer by layer onto rank 0's CPU (what HF's Trainer saves through; every rank takes part, it is a
    collective: every rank calls this). Saved in fp32 whatever the training dtype: the labelling side picks its own.
    `marker`: what FINAL_MARKER records beside the labels and max_length."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    state = (engine._zero3_consolidated_16bit_state_dict() if cfg.zero_stage == 3
             else engine.module_state_dict() if rank == 0 else None)
    if rank == 0:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict={k: v.detach().float().cpu() for k, v in state.items()})
        tok.save_pretrained(tmp)
        Path(tmp, FINAL_MARKER).write_text(json.dumps({"labels": labels, "max_length": cfg.max_length,
                                                       "world_size": world, **marker}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    if world > 1:
        dist.barrier()


def _report_final_model(engine, tok, cfg: TrainConfig, labels: list[str], history: list[dict[str, Any]],
                        best_dir: str | None = None) -> None:
    """The final HF model reported as the last checkpoint: the last epoch's, or with the stop rule (best_dir) the
    chosen epoch's, saved there when it was measured (a worker restart since does not lose it: best_dir is in the
    shared output folder). Its FINAL_MARKER holds the whole history and the chosen epoch."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    chosen = chosen_epoch(history) if best_dir else None
    kept = Path(best_dir) if best_dir else None
    saved = None  # the epoch whose model best_dir holds: its epoch and agreement both this history's (not stale)
    if kept is not None and (kept / FINAL_MARKER).exists():
        m = json.loads((kept / FINAL_MARKER).read_text())
        if any(h["epoch"] == m.get("epoch") and h.get("agreement_macro_f1") == m.get("agreement_macro_f1")
               for h in history):
            saved = m["epoch"]
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        if chosen is not None and saved == chosen:
            if rank == 0:
                shutil.copytree(kept, folder)
        else:  # the last epoch (also when the chosen one's save is missing: said in the marker)
            _save_model(engine, tok, cfg, labels, folder, {})
        if rank == 0:
            marker = json.loads((folder / FINAL_MARKER).read_text())
            marker.update(history=history, chosen_epoch=chosen if saved == chosen else None)
            (folder / FINAL_MARKER).write_text(json.dumps(marker))
        ray.train.report({"final": True},
                         checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None)


def _confusion(engine, shard, encode, label2id, device):
    """The encoder's confusion matrix (gold x predicted) on the shard's rows, summed over every rank's rows."""
    import torch
    import torch.distributed as dist

    engine.eval()
    k = len(label2id)
    # on the training device: NCCL (GPU) reduces only CUDA tensors, gloo (CPU) only CPU ones
    confusion = torch.zeros(k * k, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=64, batch_format="pandas"):
            pred = engine(**encode(batch["text"].tolist())).logits.argmax(-1)
            y = torch.tensor([label2id[v] for v in batch["label"]], device=device)
            confusion += torch.bincount(y * k + pred, minlength=k * k).double()
    if dist.is_initialized():
        dist.all_reduce(confusion)
    return confusion.view(k, k).cpu()


def _evaluate(engine, shard, encode, label2id, device) -> float:
    """Accuracy on the eval shard."""
    m = _confusion(engine, shard, encode, label2id, device)
    return float(m.diag().sum() / max(float(m.sum()), 1.0))


def _agreement(engine, shard, encode, label2id, device) -> float:
    """Macro F1 of the encoder's labels against the shard's labels: the stop rule's measure."""
    m = _confusion(engine, shard, encode, label2id, device)
    tp, gold, predicted = m.diag(), m.sum(1), m.sum(0)
    f1 = [float(2 * tp[i] / (gold[i] + predicted[i])) for i in range(len(tp)) if gold[i] + predicted[i] > 0]
    return sum(f1) / len(f1) if f1 else 0.0


def train_worker_env(use_gpu: bool) -> dict[str, str]:
    """Env vars for the training workers: DeepSpeed's accelerator matches the devices the run trains on (a
    DS_ACCELERATOR=cpu left in the driver's environment must not reach GPU workers), unless the Ray job sets it."""
    from llambert_ray.ray_env import _job_env_vars

    env = worker_env()
    if "DS_ACCELERATOR" not in _job_env_vars():
        env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    if not use_gpu:
        # DeepSpeed compiles a small CPU op on first use; cache it across runs and workers.
        env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR",
                                                              str(cache_dir() / "torch_extensions")))
    return env
