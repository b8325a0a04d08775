"""The endpoint labeller against the in-process engine, on the same rows: vLLM's own OpenAI-compatible server
(started here, the same model) called over HTTP by `annotate.endpoint`, vs the engine the product starts itself
(Ray Data LLM's vLLM actor). Rows/s of the annotation call, the server's / engine's start, agreement of the labels,
and cost per 1,000 rows: the endpoint's tokens at a hosted price list (--usd-prompt / --usd-answer, per 1k tokens)
beside the in-process engine's CPU-core seconds at the hardware table's price.

    python -m bench.endpoint --rows 200 --repeats 3

IMDb test reviews from ../shared/data/imdb (seeded sample). Results: bench/results/endpoint.json and .md.
`vllm_server` is also the tests' way to start vLLM's server (tests/test_served_engine.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import save_results, spread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model_path: str, served_name: str, *, max_model_len: int = 2048, log: Path | None = None,
                start_timeout_s: float = 300) -> Iterator[str]:
    """vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`) on 127.0.0.1, serving
    `model_path` as `served_name` (CPU: float32, eager, 32-token KV blocks, as the product's engines on CPU); yields
    its base URL (…/v1) once /v1/models answers, stops it after. Raises with the log's tail if it dies first."""
    import httpx

    port = free_port()
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-server-{port}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--dtype", "float32", "--enforce-eager", "--block-size", "32",
           "--disable-uvicorn-access-log"]
    url = f"http://127.0.0.1:{port}/v1"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({proc.returncode}) before it answered: "
                                   f"{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vLLM's server did not answer in {start_timeout_s:.0f}s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


MODEL = "smollm2-135m-instruct"
BASE = dict(model=MODEL, mode="score", batch_size=16, max_model_len=2048)


def _in_process(rows, task, args) -> tuple[list[dict], object]:
    """Each call starts its engine (Ray Data LLM), as a run's call does."""
    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    runs, labels = [], None
    for _ in range(args.repeats):
        t0 = time.time()
        df, s = annotate(rows, task, AnnotateConfig(**BASE))
        runs.append({"whole_s": time.time() - t0, "rows_per_s": s.rows_per_s, "call_s": s.seconds,
                     "prompt_tokens": s.prompt_tokens})
        labels = df.set_index("id")["llm_label"]
    return runs, labels


def _served(rows, task, args) -> tuple[list[dict], float]:
    """The engine a run keeps (engine_lifetime run, Ray Serve LLM by handle): one start, then the calls."""
    from llambert_ray.annotate import ServedVLLMEngine, annotate
    from llambert_ray.config import AnnotateConfig
    from llambert_ray.models import resolve_model

    runs = []
    t0 = time.time()
    run_cfg = AnnotateConfig(**BASE, engine_lifetime="run")
    with ServedVLLMEngine(run_cfg, resolve_model(MODEL)) as served:
        served.start()
        start_s = time.time() - t0
        for _ in range(args.repeats):
            t1 = time.time()
            _, s = annotate(rows, task, run_cfg, engine=served)
            runs.append({"whole_s": time.time() - t1, "rows_per_s": s.rows_per_s, "call_s": s.seconds})
    return runs, start_s


def _endpoint(rows, task, args) -> tuple[list[dict], object, float]:
    """vLLM's own OpenAI server as the endpoint, `--concurrency` requests in flight."""
    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig, EndpointConfig
    from llambert_ray.models import resolve_model

    runs, labels = [], None
    t0 = time.time()
    with vllm_server(resolve_model(MODEL), MODEL) as url:
        start_s = time.time() - t0
        ep = EndpointConfig(base_url=url, tokenizer=MODEL, concurrency=args.concurrency,
                            usd_per_1k_prompt_tokens=args.usd_prompt, usd_per_1k_completion_tokens=args.usd_answer)
        for _ in range(args.repeats):
            t1 = time.time()
            df, s = annotate(rows, task, AnnotateConfig(**BASE, endpoint=ep))
            runs.append({"whole_s": time.time() - t1, "rows_per_s": s.rows_per_s, "call_s": s.seconds,
                         "prompt_tokens": s.prompt_tokens, "usd": s.endpoint["usd"],
                         "requests": s.endpoint["requests"]})
            labels = df.set_index("id")["llm_label"]
    return runs, labels, start_s


def _result(args, inproc: list[dict], served: list[dict], served_start_s: float, endpoint: list[dict],
            start_s: float, agree: float) -> dict:
    from llambert_ray.accounting import usd_per_device_hour

    core_usd_h = usd_per_device_hour("cpu") or 0.0
    n = args.rows
    inproc_rate = spread([r["rows_per_s"] for r in inproc])
    ep_rate = spread([r["rows_per_s"] for r in endpoint])
    served_rate = spread([r["rows_per_s"] for r in served])
    return {
        "rows": n, "repeats": args.repeats, "model": MODEL, "mode": "score", "concurrency": args.concurrency,
        "cpus": os.cpu_count(), "server_start_s": start_s, "core_usd_per_h": core_usd_h,
        "in_process": {"rows_per_s": inproc_rate, "whole_call_s": spread([r["whole_s"] for r in inproc]),
                       # the engine computes on every core of this machine (vLLM's OpenMP threads)
                       "usd_per_1k_at_core_price": (os.cpu_count() or 1) / inproc_rate["median"] * 1000
                       * core_usd_h / 3600},
        "endpoint": {"rows_per_s": ep_rate, "whole_call_s": spread([r["whole_s"] for r in endpoint]),
                     "usd_per_1k_at_list_price": endpoint[-1]["usd"] / n * 1000,
                     "prompt_tokens_per_row": endpoint[-1]["prompt_tokens"] / n,
                     "usd_prompt_per_1k_tokens": args.usd_prompt, "usd_answer_per_1k_tokens": args.usd_answer},
        "served": {"rows_per_s": served_rate, "start_s": served_start_s},
        "ratio_endpoint_over_in_process_rows_per_s": ep_rate["median"] / inproc_rate["median"],
        "ratio_endpoint_over_served_rows_per_s": ep_rate["median"] / served_rate["median"],
        "labels_agree": agree,
    }


def _markdown(r: dict) -> str:
    def cell(sp: dict) -> str:
        return f"{sp['median']:.2f} ({sp['min']:.2f}–{sp['max']:.2f})"

    ep = r["endpoint"]
    return "\n".join([
        f"## Endpoint vs in-process engine ({r['rows']} IMDb rows, score mode, {r['model']}, {r['repeats']} calls "
        f"each, {r['cpus']} CPUs)", "",
        "| labeller | rows/s, call (median, min–max) | whole call s | USD per 1,000 rows |", "|---|---:|---:|---:|",
        f"| in-process vLLM (engine starts each call) | {cell(r['in_process']['rows_per_s'])} | "
        f"{cell(r['in_process']['whole_call_s'])} | {r['in_process']['usd_per_1k_at_core_price']:.6f} "
        f"(CPU cores at ${r['core_usd_per_h']:g}/h) |",
        f"| in-process vLLM kept for the run (engine_lifetime run; started once in {r['served']['start_s']:.1f}s) | "
        f"{cell(r['served']['rows_per_s'])} | – | – |",
        f"| endpoint: vLLM's OpenAI server, {r['concurrency']} in flight | {cell(ep['rows_per_s'])} | "
        f"{cell(ep['whole_call_s'])} | {ep['usd_per_1k_at_list_price']:.6f} "
        f"(${ep['usd_prompt_per_1k_tokens']:g} / ${ep['usd_answer_per_1k_tokens']:g} per 1k prompt / answer "
        f"tokens) |", "",
        f"Endpoint / in-process rows/s: {r['ratio_endpoint_over_in_process_rows_per_s']:.2f}x (per-call engine), "
        f"{r['ratio_endpoint_over_served_rows_per_s']:.2f}x (the run's engine); the server "
        f"started once in {r['server_start_s']:.1f}s; labels agree on {r['labels_agree']:.1%} of rows.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="annotation calls per engine (fresh answer cache each)")
    ap.add_argument("--concurrency", type=int, default=16, help="endpoint requests in flight")
    ap.add_argument("--usd-prompt", type=float, default=0.00015, help="USD per 1k prompt tokens (a hosted small "
                                                                       "model's list price)")
    ap.add_argument("--usd-answer", type=float, default=0.0006, help="USD per 1k answer tokens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from bench.annotate_modes import IMDB
    from llambert_ray.config import CorpusConfig
    from llambert_ray.data import read_corpus, sample_corpus
    from llambert_ray.ray_env import init_ray
    from llambert_ray.tasks import load_task

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    init_ray(None, num_cpus=2)
    task = load_task("imdb-sentiment")
    ds, _ = read_corpus(CorpusConfig(path=str(IMDB), id_column="source_path", filters={"split": ["test"]}), task)
    rows = sample_corpus(ds, CorpusConfig(sample=args.rows, seed=args.seed)).materialize()
    inproc, inproc_labels = _in_process(rows, task, args)
    served, served_start_s = _served(rows, task, args)
    endpoint, ep_labels, start_s = _endpoint(rows, task, args)
    agree = float((ep_labels == inproc_labels.reindex(ep_labels.index)).mean())
    result = _result(args, inproc, served, served_start_s, endpoint, start_s, agree)
    save_results("endpoint", result, _markdown(result))


if __name__ == "__main__":
    main()
