"""Bounded loopback load on the Serve deployment: requests/s and p50/p99 latency, batching vs batch size 1.

Both configurations serve the same model under the same concurrent load, one after the other in one run:

    python -m bench.serve_load --model runs/demo/models/llm/model --requests 400 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from bench.pg_server import free_port

TEXTS = ["what a great day, loving the new phone", "worst service ever, never again",
         "the flight was delayed three hours and nobody told us anything", "thanks for the quick help!",
         "this update broke everything on my laptop", "such a lovely concert last night"]


async def load(url: str, requests: int, concurrency: int, time_limit_s: float, texts_per_request: int = 1):
    """Send `requests` POSTs from `concurrency` keep-alive loopback clients; stop early at time_limit_s.

    The client is aiohttp (already installed with Ray): it shares the cores with the server, and it spends
    0.6-0.75 ms of CPU per request here where httpx spent 1.5-2.4 ms (measured side by side, same deployment).
    `client_cpu_ms_per_request` reports it."""
    import aiohttp

    assert url.startswith(("http://127.", "http://localhost")), "load goes to loopback only"
    lat: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + time_limit_s

    async def client(s: aiohttp.ClientSession):
        nonlocal errors, sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            body = {"texts": [TEXTS[(sent + j) % len(TEXTS)] for j in range(texts_per_request)]}
            t0 = time.perf_counter()
            try:
                async with s.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            lat.append(time.perf_counter() - t0)
            errors += not ok

    t0, cpu0 = time.perf_counter(), time.process_time()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        await asyncio.gather(*[client(s) for _ in range(concurrency)])
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    a = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors, "seconds": wall, "requests_per_s": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "client_cpu_ms_per_request": 1000 * cpu / max(len(lat), 1)}


def compare(model: str, requests: int, concurrency: int, time_limit_s: float) -> dict:
    from ray import serve

    from llambert_ray.config import ServeConfig
    from llambert_ray.ray_env import init_ray
    from llambert_ray.serve import start

    init_ray(None, num_cpus=2)
    port = free_port()
    out = {}
    for name, mbs in [("batch_1", 1), ("batch_32", 32)]:
        cfg = ServeConfig(port=port, max_batch_size=mbs, batch_wait_timeout_s=0.005, cpus_per_replica=1.0,
                          max_length=64)
        start(model, cfg, name=f"bench-{name}")
        url = f"http://127.0.0.1:{port}/v1/classify"
        asyncio.run(load(url, 20, 4, 30))  # warm-up
        out[name] = asyncio.run(load(url, requests, concurrency, time_limit_s))
        print(name, json.dumps(out[name]), flush=True)
        serve.delete(f"bench-{name}")
    serve.shutdown()
    out["speedup_requests_per_s"] = out["batch_32"]["requests_per_s"] / out["batch_1"]["requests_per_s"]
    out["p99_ratio"] = out["batch_32"]["p99_ms"] / out["batch_1"]["p99_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--time-limit-s", type=float, default=120)
    ap.add_argument("--out", default="bench/results/serve_load.json")
    a = ap.parse_args()
    res = compare(a.model, a.requests, a.concurrency, a.time_limit_s)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
