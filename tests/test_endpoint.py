"""The endpoint engine (`annotate.endpoint`) against a fault-injecting OpenAI-compatible server on 127.0.0.1: a
stand-in for a hosted API that answers by a marker in each row's text and fails on purpose (429 with Retry-After,
500s, answers slower than the timeout, malformed bodies, a 400 for one row, a run of 503s, a wrong key). The real
server, vLLM's own OpenAI server with the packaged model in each mode, is tested beside it in test_served_engine.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from llambert_ray.annotate import EndpointError, make_plan
from llambert_ray.annotate.endpoint import EndpointEngine, retry_after
from llambert_ray.config import AnnotateConfig, EndpointConfig
from llambert_ray.tasks import load_task

TASK = load_task("imdb-sentiment")
KEY = "sk-llambert-test-0123456789abcdef"  # must appear in no file, log or answer
KEY_ENV = "LLAMBERT_TEST_ENDPOINT_KEY"


class FaultServer:
    """OpenAI's chat API, answering 'positive' / 'negative' by the row's marker `row-N-pos|neg`, with the faults
    its text asks for on the row's first tries: [429] (Retry-After: 1), [500x2], [slow] (past the client's
    timeout), [bad] (a body that is not JSON); [400] always (the row's own error). `down`: every request 503."""

    def __init__(self):
        self.tries: Counter = Counter()
        self.log: list[tuple[float, str, int]] = []  # (time, row, status)
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.down = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, body: str | dict, headers: dict | None = None):
                raw = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorised(self) -> bool:
                got = self.headers.get("Authorization", "")
                server.auth.add(got)
                if got != f"Bearer {KEY}":
                    self._send(401, {"error": {"message": "Incorrect API key provided"}})
                    return False
                return True

            def do_GET(self):
                if self._authorised():
                    self._send(200, {"object": "list", "data": [{"id": "fake-llm"}, {"id": "other"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                self._send(*server.answer(body))

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the [slow] answer's client has gone (its timeout): nothing to tell

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> tuple:
        arrived = time.monotonic()
        self.bodies.append(body)
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        row, sentiment = (re.findall(r"row-(\d+)-(pos|neg)", text) or [("probe", "pos")])[-1]
        with self.lock:
            self.tries[row] += 1
            n = self.tries[row]
        status, out, headers = 200, None, None
        if self.down:
            status, out = 503, {"error": {"message": "overloaded"}}
        elif "[400]" in text:
            status, out = 400, {"error": {"message": "prompt too long for this model"}}
        elif "[429]" in text and n == 1:
            status, out, headers = 429, {"error": {"message": "rate limit"}}, {"Retry-After": "1"}
        elif "[500x2]" in text and n <= 2:
            status, out = 500, {"error": {"message": "internal error"}}
        elif "[bad]" in text and n == 1:
            out = "<html>upstream hiccup</html>"
        elif "[slow]" in text and n == 1:
            time.sleep(1.5)
        self.log.append((arrived, row, status))
        if out is not None:
            return status, out, headers
        word = "positive" if sentiment == "pos" else "negative"
        other = "negative" if word == "positive" else "positive"
        choice = {"index": 0, "message": {"role": "assistant", "content": word}, "finish_reason": "stop"}
        if body.get("logprobs") and body["model"] != "other":  # "other" gives no logprobs, as some servers
            top = [{"token": word, "logprob": -0.1}, {"token": "The", "logprob": -2.0},
                   {"token": other, "logprob": -3.0}]
            choice["logprobs"] = {"content": [{"token": word, "logprob": -0.1, "top_logprobs": top}]}
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice],
                     "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 1}}, None

    def close(self):
        self.httpd.shutdown()


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    s = FaultServer()
    yield s
    s.close()


def _rows(n: int, faults: dict[int, str]) -> list[dict]:
    return [{"id": f"e{i:02d}", "text": f"row-{i}-{'pos' if i % 2 else 'neg'} {faults.get(i, '')} A film.",
             "label": "positive" if i % 2 else "negative"} for i in range(n)]


def _cfg(url: str, **ep) -> AnnotateConfig:
    base = dict(base_url=url, api_key_env=KEY_ENV, concurrency=4, timeout_s=0.5, backoff_s=0.05, retries=3)
    return AnnotateConfig(model="fake-llm", mode="generate", prompt_style="chat", shots=0,
                          endpoint=EndpointConfig(**{**base, **ep}))


def _files_hold(folder, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cli_annotates_through_a_faulty_endpoint_every_id_once(server, ray_local, tmp_path, caplog):
    """`llambert annotate` with an endpoint config: 429 + Retry-After, 500s, a timeout and a malformed answer are
    retried (counted), the 400 row is its own llm_error, every id comes out once with the server's label, the
    Retry-After pause held every request, and the key is in no output file or log line (only in its header)."""
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    faults = {3: "[429]", 5: "[500x2]", 8: "[slow]", 11: "[bad]", 14: "[400]"}
    rows = _rows(24, faults)
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        "annotate:\n  model: fake-llm\n  mode: generate\n  prompt_style: chat\n  shots: 0\n  endpoint:\n"
        f"    base_url: {server.url}\n    api_key_env: {KEY_ENV}\n    concurrency: 4\n    timeout_s: 0.5\n"
        "    backoff_s: 0.05\n    retries: 3\n    usd_per_1k_prompt_tokens: 0.5\n"
        "    usd_per_1k_completion_tokens: 1.5\n")
    out = tmp_path / "ann"
    res = CliRunner().invoke(app, ["annotate", "--task", "imdb-sentiment", "--input", str(corpus), "--output",
                                   str(out), "-c", str(tmp_path / "run.yaml")])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "annotations.parquet")
    assert len(df) == 24 and df["id"].is_unique and set(df["id"]) == {r["id"] for r in rows}
    bad = df.set_index("id").loc["e14"]
    assert pd.isna(bad["llm_label"]) and "HTTP 400" in bad["llm_error"] and "too long" in bad["llm_error"]
    ok = df[df["id"] != "e14"]
    assert ok["llm_error"].isna().all() and (ok["llm_label"] == ok["label"]).all()
    s = json.loads((out / "annotate_summary.json").read_text())
    e = s["endpoint"]
    assert s["failed"] == 1 and s["labelled"] == 23
    # retries: 429 once, 500 twice, the timeout once, the malformed answer once; the 400 is not retried
    assert e["retries"] == 5 and e["rate_limited"] == 1 and e["server_errors"] == 2
    assert e["timeouts"] == 1 and e["malformed"] == 1 and e["row_errors"] == 1
    assert server.tries["14"] == 1 and e["requests"] == 24 + 5
    assert e["completion_tokens"] == 23 and e["usd"] == pytest.approx(
        (e["prompt_tokens"] * 0.5 + 23 * 1.5) / 1000)
    assert "endpoint: 29 requests (5 retries" in res.output
    # Retry-After: 1 paused every request, not only the row's: none arrived in the second after the 429
    (t429,) = [t for t, row, status in server.log if status == 429]
    assert not [row for t, row, _ in server.log if t429 + 0.2 < t < t429 + 0.95]
    assert min(t for t, row, _ in server.log if row == "3" and t > t429) >= t429 + 0.95
    assert server.auth == {f"Bearer {KEY}"}
    assert not _files_hold(out, KEY) and KEY not in res.output and KEY not in caplog.text


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_an_endpoint_that_goes_down_stops_the_call_and_the_rerun_sends_only_the_rest(server, ray_local, tmp_path):
    """After endpoint.max_failures rows in a row fail with every retry spent, the call stops with one line, what was
    answered cached; once the endpoint is back, the same call sends only the rows without an answer."""
    import ray

    from llambert_ray.annotate import AnnotationError, annotate

    rows = _rows(30, {})
    cfg = _cfg(server.url, retries=1, max_failures=3, concurrency=1)
    answered = threading.Event()

    def go_down():  # after 10 answers, every request is a 503
        while sum(1 for _, _, s in server.log if s == 200) < 10:
            time.sleep(0.01)
        server.down = True
        answered.set()

    threading.Thread(target=go_down, daemon=True).start()
    with pytest.raises(AnnotationError) as err:
        annotate(ray.data.from_items(rows), TASK, cfg, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "failed 3 requests in a row" in msg and "503" in msg and "rerun" in msg
    assert answered.is_set()
    got_before = sum(1 for _, _, st in server.log if st == 200)
    server.down = False
    df, s = annotate(ray.data.from_items(rows), TASK, cfg, cache_dir=tmp_path / "cache")
    assert len(df) == 30 and df["id"].is_unique and s.failed == 0 and (df["llm_label"] == df["label"]).all()
    assert s.cached == got_before >= 10 and s.endpoint["requests"] == 30 - got_before


def test_a_missing_or_refused_key_stops_before_any_row_with_the_variable_named(server, monkeypatch):
    """No key in the environment: the error names the variable and nothing is sent; a wrong key: the endpoint's 401
    stops the call at once, naming the variable and never the key."""
    plan = make_plan(TASK, _cfg(server.url))
    monkeypatch.delenv(KEY_ENV)
    with EndpointEngine(_cfg(server.url)) as engine, pytest.raises(EndpointError, match=f"export {KEY_ENV}="):
        list(engine.answer_frames(pd.DataFrame(_rows(3, {})), plan, 8))
    assert not server.log
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-000")
    with EndpointEngine(_cfg(server.url)) as engine, pytest.raises(EndpointError) as err:
        list(engine.answer_frames(pd.DataFrame(_rows(3, {})), plan, 8))
    assert "refused the API key (HTTP 401" in str(err.value) and KEY_ENV in str(err.value)
    assert "sk-wrong-key-000" not in str(err.value)


def test_preflight_checks_key_model_and_one_row_in_the_mode(server, monkeypatch):
    """llambert preflight's endpoint rows: the key present, the model listed, one row answered in the mode; each
    failure names the fix."""
    from llambert_ray.config import RunConfig
    from llambert_ray.preflight import check_endpoint

    def rows(**annotate):
        checks = []
        cfg = RunConfig.model_validate({"task": "imdb-sentiment", "corpus": {"path": "x.jsonl"},
                                        "annotate": _cfg(server.url).model_copy(update=annotate).model_dump()})
        check_endpoint(cfg, checks)
        return {c.check: c for c in checks}

    ok = rows(mode="score")
    assert [c.status for c in ok.values()] == ["ok"] * 3, ok
    assert "one row answered" in ok["endpoint score mode"].detail
    none = rows(mode="score", model="other")["endpoint score mode"]
    assert none.status == "fail" and "no logprobs" in none.detail and "annotate.mode generate" in none.fix
    wrong = rows(model="gpt-nope")
    assert wrong["endpoint model"].status == "fail" and "fake-llm" in wrong["endpoint model"].detail
    monkeypatch.delenv(KEY_ENV)
    (c,) = rows().values()
    assert c.status == "fail" and KEY_ENV in c.fix
    monkeypatch.setenv(KEY_ENV, KEY)
    gone = rows(endpoint=EndpointConfig(base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV, timeout_s=2))
    assert gone["endpoint"].status == "fail" and "not reachable" in gone["endpoint"].detail


def test_score_mode_by_token_text_and_retry_after_forms():
    """Score mode without the endpoint model's tokenizer: the label words' first tokens are found among the top
    alternatives by text (case and a leading space aside; a token that begins two label words counts for
    neither), a label not shown gets the lowest log-prob shown; none shown is the row's error."""
    cfg = AnnotateConfig(model="fake-llm", mode="score", prompt_style="chat",
                         endpoint=EndpointConfig(base_url="http://127.0.0.1:1/v1", top_logprobs=5))
    plan = make_plan(TASK, cfg)
    assert plan.label_token_ids == {} and plan.request("x")["sampling_params"]["top_logprobs"] == 5
    r = plan.result("Pos", [{"Pos": -0.5, " negative": -1.5, "The": -3.0}], None)
    assert r["llm_label"] == "positive" and json.loads(r["llm_raw"]) == {"positive": -0.5, "negative": -1.5}
    r = plan.result("Pos", [{"Pos": -0.5, "The": -3.0}], None)
    assert json.loads(r["llm_raw"])["negative"] == -3.0
    r = plan.result("The", [{"The": -0.5, "A": -1.0}], None)
    assert r["llm_label"] is None and "no label word" in r["llm_error"] and "generate or choice" in r["llm_error"]
    assert retry_after({"retry-after": "2"}) == 2.0 and retry_after({}) is None
    assert 0 <= retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) < 1e-9
    with pytest.raises(ValueError, match="NAME of the environment variable"):
        EndpointConfig(base_url="https://api.openai.com/v1", api_key_env="sk-abc123-def")
    with pytest.raises(ValueError, match="holds credentials"):
        EndpointConfig(base_url="https://user:pw@api.example.com/v1")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_annotate_takes_its_gold_rows_apart_from_the_rows_it_labels(server, ray_local, tmp_path, caplog):
    """`llambert annotate --gold FILE` with gold-knn shots: every prompt's examples are --gold rows, never a row being
    labelled; a --gold row with the same text as one is warned about. Without --gold, the input's labelled rows that
    are all being annotated are no gold (never their own): the error names --gold. The summary says on how many rows
    it measured accuracy when only some have a gold label."""
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    rows = _rows(12, {})
    for r in rows[6:]:
        r["label"] = None  # a corpus mixing labelled and unlabelled rows
    gold = [{"id": f"g{i}", "text": f"row-{100 + i}-{'pos' if i % 2 else 'neg'} gold example {i}",
             "label": "positive" if i % 2 else "negative"} for i in range(8)]
    gold.append({"id": "g-dup", "text": rows[0]["text"], "label": rows[0]["label"]})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gold))
    (tmp_path / "run.yaml").write_text(
        "annotate:\n  model: fake-llm\n  mode: generate\n  prompt_style: chat\n  shots: 2\n  shots_from: gold-knn\n"
        f"  endpoint: {{base_url: '{server.url}', api_key_env: {KEY_ENV}}}\n")
    base = ["annotate", "--task", "imdb-sentiment", "--input", str(tmp_path / "in.jsonl"), "-c",
            str(tmp_path / "run.yaml")]
    res = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "a"), "--gold", str(tmp_path / "gold.jsonl")])
    assert res.exit_code == 0, res.output
    said = res.output + caplog.text
    assert "1 of the 9 gold rows (--gold) have the same text" in said, said
    shown = [json.dumps(b["messages"]) for b in server.bodies if "row-" in json.dumps(b["messages"])]
    own = [r["text"] for r in rows]
    for body in shown:
        assert "gold example" in body  # its shots came from --gold
        assert sum(t in body for t in own) <= 1 + (rows[0]["text"] in body)  # no other input row as a shot
    assert "on the 6 of 12 rows that have a gold label" in res.output
    from llambert_ray.annotate import AnnotationError
    from llambert_ray.annotate.gold import run_gold_set

    with pytest.raises(AnnotationError, match="--gold FILE"):  # what `annotate` without --gold meets here
        run_gold_set(ray_local.data.from_items(rows), TASK, AnnotateConfig(calibration="gold"), encoder="minilm-l6",
                     exclude={r["id"] for r in rows})


def test_the_limiter_keeps_requests_a_second_and_tokens_a_minute():
    """endpoint.requests_per_s spaces requests 1 / rate apart; endpoint.tokens_per_min lets a full minute's tokens
    through at once, then waits for the bucket to refill (a lower bound on the time: what a rate limit is)."""
    from llambert_ray.annotate.endpoint import _Limiter

    rps = _Limiter(EndpointConfig(base_url="http://127.0.0.1:1/v1", requests_per_s=50))
    t0 = time.monotonic()
    for _ in range(11):
        rps.acquire(1)
    assert time.monotonic() - t0 >= 10 / 50 * 0.95
    tpm = _Limiter(EndpointConfig(base_url="http://127.0.0.1:1/v1", tokens_per_min=6000))  # 100 tokens a second
    t0 = time.monotonic()
    tpm.acquire(6000)
    assert time.monotonic() - t0 < 0.1
    tpm.acquire(30)
    assert time.monotonic() - t0 >= 0.28
