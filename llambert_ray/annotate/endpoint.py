"""The endpoint engine: the LLM at an OpenAI-compatible HTTP endpoint (a hosted API, or a vLLM / TGI server or
gateway the user already runs) instead of vLLM engines this product starts (`annotate.endpoint`).

The rows of an annotation call are a sample the driver holds anyway, so they go to the endpoint from here, as the
served engine's do: a window of requests in flight (endpoint.concurrency), answers streamed back chunk by chunk into
the answer cache. One client is where the endpoint's limits are kept: requests a second, tokens a minute, and a
429's Retry-After pauses every request, not only the one that got it; N Ray workers each holding a share of a rate
limit would keep it no better. (Ray Data LLM's HTTP stage, HttpRequestProcessorConfig, retries with a fixed backoff,
ignores Retry-After and token limits, puts the key in its config and fails the batch when a row's retries run out.)

What a failure costs: a 400-class answer for one row (its prompt too long, say) is that row's llm_error; a timeout,
429, 5xx or malformed answer is retried (endpoint.retries, exponential backoff, Retry-After honoured); a row whose
retries are spent is that row's llm_error too, and after endpoint.max_failures such rows in a row the call stops with
EndpointError, every answer so far cached (a rerun resumes). A refused key (401 / 403) or an unknown model (404)
stops at once. The API key is read from the environment variable endpoint.api_key_env and sent only in the request
header: never logged, cached or written out.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from llambert_ray.annotate.columns import OUTPUT_COLUMNS, AnnotationError
from llambert_ray.annotate.prompts import PromptPlan, row_examples
from llambert_ray.annotate.served import answer_row, openai_request, write_parts
from llambert_ray.config import AnnotateConfig, EndpointConfig
from llambert_ray.progress import Progress
from llambert_ray.ray_env import from_frames

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})  # worth asking again
FATAL_STATUS = {401: "refused the API key", 403: "refused the API key", 404: "does not know this path or model"}
MAX_BACKOFF_S = 60.0
CHARS_PER_TOKEN = 4  # tokens_per_min: a request's tokens before the server counts them


class EndpointError(AnnotationError):
    """The endpoint cannot answer this call (down, the key refused, the model unknown): the call stops, the answers
    so far cached. `final`: running the call again at once would not help (the answer cache's retries skip it)."""

    final = True


@dataclass
class EndpointUsage:
    """What the endpoint was asked and answered: requests sent (retries included), retries, 429s, 5xx, timeouts and
    malformed answers among them, rows that ended in an error, and the tokens the server counted."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0
    malformed: int = 0
    row_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def minus(self, other: EndpointUsage) -> EndpointUsage:
        return EndpointUsage(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def usd(self, ep: EndpointConfig) -> float | None:
        """The tokens at the endpoint's prices; None when it has none."""
        if ep.usd_per_1k_prompt_tokens is None and ep.usd_per_1k_completion_tokens is None:
            return None
        return (self.prompt_tokens * (ep.usd_per_1k_prompt_tokens or 0.0)
                + self.completion_tokens * (ep.usd_per_1k_completion_tokens or 0.0)) / 1000

    def to_dict(self, ep: EndpointConfig) -> dict[str, Any]:
        return {**asdict(self), "usd": self.usd(ep)}


class _Limiter:
    """Requests a second and tokens a minute (token buckets), and a pause every request waits out (a 429's or
    503's Retry-After)."""

    def __init__(self, ep: EndpointConfig):
        self.rps, self.tpm = ep.requests_per_s, ep.tokens_per_min
        self.lock = threading.Lock()
        now = time.monotonic()
        self.next_request = now
        self.tokens = float(self.tpm or 0)  # bucket of tokens, refilled at tpm / 60 a second
        self.filled = now
        self.paused_until = now

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def acquire(self, tokens: int) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                wait = max(0.0, self.paused_until - now)
                if self.tpm:
                    self.tokens = min(self.tpm, self.tokens + (now - self.filled) * self.tpm / 60)
                    self.filled = now
                    need = min(tokens, self.tpm)  # a request over the whole minute's budget waits for a full bucket
                    if self.tokens < need:
                        wait = max(wait, (need - self.tokens) * 60 / self.tpm)
                if self.rps:
                    wait = max(wait, self.next_request - now)
                if wait <= 0:
                    if self.tpm:
                        self.tokens -= tokens
                    if self.rps:
                        self.next_request = max(self.next_request, now) + 1.0 / self.rps
                    return
            time.sleep(min(wait, 1.0))

    def settle(self, estimated: int, counted: int) -> None:
        """The server's count of a request's tokens in place of the estimate it was let through with."""
        if self.tpm:
            with self.lock:
                self.tokens -= counted - estimated


def retry_after(headers: Any) -> float | None:
    """A Retry-After header's wait in seconds (delta-seconds or an HTTP date), None without one."""
    raw = headers.get("retry-after") if headers is not None else None
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


class _GaveUp(Exception):
    """A request whose retries are spent (its row's llm_error), or the endpoint's refusal (fatal)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class EndpointEngine:
    """The LLM at an OpenAI-compatible endpoint: answers an annotation call's rows with HTTP requests (module doc).
    One for a whole pipeline run (its limits and usage shared by every call), or one per annotate() call."""

    device = "endpoint"
    starts = 0  # no engine to start: the endpoint is up or not

    def __init__(self, cfg: AnnotateConfig):
        if cfg.endpoint is None:
            raise ValueError("EndpointEngine needs annotate.endpoint")
        self.cfg = cfg
        self.ep = cfg.endpoint
        self.usage = EndpointUsage()
        self._usage_lock = threading.Lock()
        self._limiter = _Limiter(self.ep)
        self._client = None

    # ---- the run-long engine's interface (run_engine, the pipeline)
    def __enter__(self) -> EndpointEngine:
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def start_soon(self, spare_cpus: float) -> bool:
        return False  # nothing to start

    # ---- HTTP
    def api_key(self) -> str | None:
        """The key from the environment (endpoint.api_key_env), or None without one; a named variable that is not
        set is an error naming it."""
        name = self.ep.api_key_env
        if name is None:
            return None
        key = os.environ.get(name)
        if not key:
            raise EndpointError(f"annotate.endpoint.api_key_env names {name}, which is not set (or empty) where "
                                f"the job runs; fix: export {name}=<your key> there (it is read from the "
                                f"environment only, never written out)")
        return key

    def client(self):
        if self._client is None:
            import httpx

            key = self.api_key()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            self._client = httpx.Client(
                base_url=self.ep.base_url + "/", headers=headers, timeout=self.ep.timeout_s,
                limits=httpx.Limits(max_connections=self.ep.concurrency,
                                    max_keepalive_connections=self.ep.concurrency))
        return self._client

    def _count(self, **add: int) -> None:
        with self._usage_lock:
            for k, v in add.items():
                setattr(self.usage, k, getattr(self.usage, k) + v)

    def models(self) -> list[str]:
        """The model names the endpoint lists (GET /models). Raises EndpointError naming the URL when it cannot."""
        import httpx

        try:
            r = self.client().get("models")
        except httpx.HTTPError as e:
            raise EndpointError(f"endpoint {self.ep.base_url} not reachable ({type(e).__name__}: {e}); fix: check "
                                f"annotate.endpoint.base_url (with its /v1) and that the server is up") from None
        if r.status_code in FATAL_STATUS:
            raise EndpointError(f"endpoint {self.ep.base_url} {FATAL_STATUS[r.status_code]} (HTTP {r.status_code} "
                                f"on /models){self._key_hint(r.status_code)}")
        try:
            return [str(m["id"]) for m in r.json()["data"]]
        except Exception:
            raise EndpointError(f"endpoint {self.ep.base_url}/models answered HTTP {r.status_code} without a model "
                                f"list: {r.text[:200]!r}; fix: base_url is the API's root with /v1") from None

    def _key_hint(self, status: int) -> str:
        if status in (401, 403):
            return (f"; fix: the key in {self.ep.api_key_env}" if self.ep.api_key_env
                    else "; fix: set annotate.endpoint.api_key_env to the variable holding your API key")
        return f"; fix: annotate.model names a model the endpoint lists (GET {self.ep.base_url}/models)"

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request's answer, retried as the module doc says. Raises _GaveUp with the row's error (fatal: the
        endpoint refused the key or the model, every row would fail alike)."""
        import httpx

        estimate = len(json.dumps(body)) // CHARS_PER_TOKEN + int(body.get("max_tokens") or 0)
        last = ""
        for attempt in range(self.ep.retries + 1):
            if attempt:
                self._count(retries=1)
            self._limiter.acquire(estimate)
            self._count(requests=1)
            wait = None
            try:
                r = self.client().post(path, json=body)
            except httpx.TimeoutException:
                self._count(timeouts=1)
                last = f"no answer in {self.ep.timeout_s:g}s"
            except httpx.TransportError as e:
                self._count(server_errors=1)
                last = f"{type(e).__name__}: {str(e)[:200]}"
            else:
                if r.status_code == 200:
                    try:
                        answer = r.json()
                        answer["choices"][0]  # noqa: B018  (a malformed answer fails here and is retried)
                    except Exception:
                        self._count(malformed=1)
                        last = f"malformed answer: {r.text[:200]!r}"
                    else:
                        usage = answer.get("usage") or {}
                        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                        self._count(prompt_tokens=p, completion_tokens=c)
                        self._limiter.settle(estimate, p + c if usage else estimate)
                        return answer
                elif r.status_code in FATAL_STATUS:
                    raise _GaveUp(f"endpoint {self.ep.base_url} {FATAL_STATUS[r.status_code]} (HTTP "
                                  f"{r.status_code}: {_message(r)}){self._key_hint(r.status_code)}", fatal=True)
                elif r.status_code in RETRY_STATUS:
                    self._count(rate_limited=int(r.status_code == 429), server_errors=int(r.status_code >= 500))
                    last = f"HTTP {r.status_code}: {_message(r)}"
                    wait = retry_after(r.headers)
                    if wait is not None and r.status_code in (429, 503):
                        self._limiter.pause(wait)  # every request waits: the limit is the endpoint's, not the row's
                else:  # the request itself is refused (400, 413, 422): this row's error, not worth repeating
                    raise _GaveUp(f"HTTP {r.status_code}: {_message(r)}")
            if attempt < self.ep.retries:
                backoff = min(MAX_BACKOFF_S, self.ep.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
                time.sleep(max(backoff, wait or 0.0))
        raise _GaveUp(f"no answer after {self.ep.retries + 1} tries: {last}")

    # ---- the annotation engine's interface
    def answer_frames(self, rows: pd.DataFrame, plan: PromptPlan, chunk: int) -> Iterator[pd.DataFrame]:
        """The answers to `rows`, `chunk` rows per frame, in row order, with the columns every engine gives
        (served.answer_row). Raises EndpointError after endpoint.max_failures rows in a row failed with their
        retries spent, or at once when the endpoint refuses the key or the model; frames yielded before are the
        caller's to keep."""
        window = self.ep.concurrency * 4
        records = iter(rows.to_dict("records"))
        pending: deque[tuple[dict[str, Any], Future]] = deque()
        failed_in_a_row = 0

        def ask(row: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
            path, _, body = openai_request(plan, row["text"], row_examples(row), model=self.cfg.model)
            try:
                return self.post("chat/completions" if path == "chat" else "completions", body), None
            except _GaveUp as e:
                if e.fatal:
                    raise
                return {}, str(e)

        with ThreadPoolExecutor(self.ep.concurrency, thread_name_prefix="llambert-endpoint") as pool:
            def submit() -> bool:
                row = next(records, None)
                if row is None:
                    return False
                pending.append((row, pool.submit(ask, row)))
                return True

            while len(pending) < window and submit():
                pass
            out: list[dict[str, Any]] = []
            try:
                while pending:
                    row, future = pending.popleft()
                    try:
                        answer, error = future.result()
                    except _GaveUp as e:
                        raise EndpointError(str(e)) from None
                    submit()
                    if error is not None:
                        self._count(row_errors=1)
                        failed_in_a_row = failed_in_a_row + 1 if error.startswith("no answer after") else 0
                    else:
                        failed_in_a_row = 0
                    out.append(answer_row(plan, row, answer, error))
                    if failed_in_a_row >= self.ep.max_failures:
                        yield pd.DataFrame(out)  # its failures too: counted, and sent again by the next run
                        out = []
                        raise EndpointError(
                            f"endpoint {self.ep.base_url} failed {failed_in_a_row} requests in a row, each after "
                            f"{self.ep.retries + 1} tries (last: {error.split(': ', 1)[-1][:200]}); fix: rerun when it "
                            f"answers again (annotate.endpoint.max_failures: how many failures in a row stop a call)")
                    if len(out) == chunk or not pending:
                        yield pd.DataFrame(out)
                        out = []
            finally:
                for _, future in pending:
                    future.cancel()

    def write_answers(self, rows: pd.DataFrame, plan: PromptPlan, folder: Path, chunk: int,
                      bar: Progress | None) -> None:
        write_parts((f for f in self.answer_frames(rows, plan, chunk) if len(f)), folder, bar)

    def run(self, ds, plan: PromptPlan):
        rows = ds.to_pandas()
        frames = [f for f in self.answer_frames(rows, plan, max(len(rows), 1)) if len(f)]
        return from_frames(frames or [pd.DataFrame(columns=["id", *OUTPUT_COLUMNS])])

    def probe(self, plan: PromptPlan, text: str) -> dict[str, Any]:
        """One row answered in the plan's mode (preflight): the row's output columns, plus `usable` and, when not,
        `why` with the fix."""
        row = {"id": "probe", "text": text}
        frame = next(iter(self.answer_frames(pd.DataFrame([row]), plan, 1)), pd.DataFrame())
        got = frame.iloc[0].to_dict() if len(frame) else {"llm_error": "no answer"}
        if got.get("llm_error"):
            why = str(got["llm_error"])
            if plan.mode == "choice":
                why += ("; fix: annotate.mode generate where the endpoint has no structured output "
                        "(vLLM's structured_outputs choice)")
            return {**got, "usable": False, "why": why}
        if plan.mode == "choice" and got.get("llm_label") is None:
            return {**got, "usable": False,
                    "why": f"the answer {got.get('llm_raw')!r} is none of the label words: the endpoint ignores "
                           f"structured_outputs; fix: annotate.mode generate or score"}
        return {**got, "usable": True}


def _message(r) -> str:
    """An error answer's message (OpenAI's {"error": {"message": ...}}), else the start of its body."""
    try:
        err = r.json().get("error")
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except Exception:
        return r.text[:300]
