"""The run-long engine: one vLLM engine for every annotation call of a run, a Ray Serve LLM deployment called
by its handle (`annotate.engine_lifetime: run`)."""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray.annotate.columns import OUTPUT_COLUMNS, PROMPT_KEY
from llambert_ray.annotate.engines import engine_placement, engine_setup
from llambert_ray.annotate.prompts import PromptPlan, row_examples
from llambert_ray.config import AnnotateConfig
from llambert_ray.progress import Progress
from llambert_ray.ray_env import LIGHT, from_frames, resolve_device
from llambert_ray.tasks import Example

log = logging.getLogger(__name__)

SERVED_APP = "llambert-llm"  # the Serve application of a run-long engine


def openai_request(plan: PromptPlan, text: str, examples: list[Example] | None = None, model: str = SERVED_APP
                   ) -> tuple[str, str, dict[str, Any]]:
    """One row's engine request as an OpenAI API takes it (vLLM's: its extensions where the plan asks for label
    token ids or a guided choice): (deployment method / endpoint path, request class, fields)."""
    req = plan.request(text, examples)
    sp = req.pop("sampling_params")
    body: dict[str, Any] = {"model": model, "max_tokens": sp["max_tokens"], "temperature": sp["temperature"],
                            "stream": False}
    if "structured_outputs" in sp:
        body["structured_outputs"] = sp["structured_outputs"]
    if "logprob_token_ids" in sp:
        # token ids as "token_id:N" keys, so answers are matched by id as with the in-process engine
        body.update(logprob_token_ids=sp["logprob_token_ids"], return_tokens_as_token_ids=True)
    top = sp.get("top_logprobs")  # score mode by token text: the answer's top alternatives
    if "messages" in req:
        body["messages"] = req["messages"]
        if "logprob_token_ids" in body or top:
            body.update(logprobs=True, top_logprobs=top or 1)
        return "chat", "ChatCompletionRequest", body
    body["prompt"] = req["prompt"]
    if "logprob_token_ids" in body or top:
        body["logprobs"] = top or 1
    return "completions", "CompletionRequest", body


def openai_answer(row: dict[str, Any]) -> tuple[str | None, list[dict[int | str, float]] | None, int]:
    """(answer text, first-token log-probs by token id ("token_id:N" keys) or else by token text, prompt tokens) of
    an OpenAI API response row."""
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
    by_id = [{_token_key(k): float(v) for k, v in step.items() if v is not None} for step in steps] or None
    return text, by_id, int((row.get("usage") or {}).get("prompt_tokens") or 0)


def _token_key(token: Any) -> int | str:
    """A token as an answer's logprobs name it: its id where the server was asked for ids ("token_id:N"), else
    its text."""
    t = str(token)
    return int(t[len("token_id:"):]) if t.startswith("token_id:") and t[len("token_id:"):].isdigit() else t


def answer_row(plan: PromptPlan, row: dict[str, Any], answer: dict[str, Any], error: str | None) -> dict[str, Any]:
    """A row's output columns (id, text[, label, prompt_key] and OUTPUT_COLUMNS) from an OpenAI API answer (or the
    request's error), as every engine gives them."""
    out = {k: row[k] for k in ("id", "text", "label", PROMPT_KEY) if k in row}
    if error is None and answer.get("error"):  # vLLM's ErrorResponse, e.g. a prompt over max_model_len
        err = answer["error"]
        error = str(err.get("message", err) if isinstance(err, dict) else err)
    text, logprobs, tokens = openai_answer(answer)
    out.update(plan.result(text, logprobs, error))
    out["prompt_tokens"] = tokens
    return out


class ServedVLLMEngine:
    """One vLLM engine for every annotation call of a run: a Ray Serve LLM deployment (`ray.serve.llm`) that this
    process calls by its deployment handle, so the sample, the extra rows, the test rows and each active round share
    one engine start (minutes for a 70B model) instead of paying one each.

    The rows of an annotation call are a sample the driver holds anyway, so they go to the deployment straight from
    here, a window of requests in flight (vLLM batches them), answers streamed back chunk by chunk. Calling it
    through a Ray Data stage (`ServeDeploymentProcessorConfig`) started a stage actor per call, which imports Ray
    Serve LLM and vLLM's OpenAI layer afresh, every active round.

    Use as a context manager around the run's annotation calls; Serve runs without HTTP proxies (the engine is
    reached by handle only) and is shut down at the end if this engine started it."""

    def __init__(self, cfg: AnnotateConfig, model_path: str):
        self.cfg = cfg
        self.model_path = model_path
        self.device = resolve_device(cfg.device)
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
        than they overlap (bench/README.md, active selection). Returns whether it began."""
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

        engine_kwargs, env, placement = engine_setup(self.cfg, self.device)
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
        # the request classes import vLLM's OpenAI layer (slow): here, while the engine loads
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
        row order, with the same columns as engines.VLLMEngine.run's. A request the engine refuses (e.g. a prompt longer
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
            out.append(answer_row(plan, row, answer, error))
            if len(out) == chunk or not pending:
                yield pd.DataFrame(out)
                out = []

    def write_answers(self, rows: pd.DataFrame, plan: PromptPlan, folder: Path, chunk: int,
                      bar: Progress | None) -> None:
        """The answers, frame by frame as they come back, each a part of the cache folder."""
        write_parts(self.answer_frames(rows, plan, chunk), folder, bar)

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


def write_parts(frames: Iterator[pd.DataFrame], folder: Path, bar: Progress | None) -> None:
    """Each frame of answers as a part of the cache folder as it arrives (written whole, then renamed into place)."""
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


# what a served engine is, as opposed to how a call asks it (mode, prompt, batch size, ...)
ENGINE_FIELDS = ("model", "max_model_len", "tensor_parallel_size", "pipeline_parallel_size", "device", "dtype",
                 "engine_kwargs")
