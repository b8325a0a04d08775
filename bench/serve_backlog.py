"""A backlog labelled through the Serve app (`label.via: serve`) against a classifier actor pool (`via: actors`),
side by side on the same corpus and model, with online requests to the same Serve app all along: rows/s of the
backlog, and the online requests' p50 / p99 with no backlog, while the actor pool labels it, and while the Serve
app labels it.

One local Ray (2 CPUs); the Serve app serves the model (one replica, dynamic batching); the online load is a few
loopback clients (bench.serve_load.load) sending one text a request, all the time a backlog runs. The backlog is
bench.label_memory's synthetic corpus of short texts.

    python -m bench.serve_backlog [--rows 5000] [--encoder minilm|tiny] [--clients 4] [--repeats 2]

Writes bench/results/serve_backlog.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, save_results, spread
from bench.label_incremental import minilm_model
from bench.label_memory import synthetic_corpus, tiny_model
from bench.pg_server import free_port
from bench.serve_load import load

TMP = RESULTS / "bench_tmp" / "serve_backlog"
APP = "bench-backlog"


def online_while(busy: threading.Event | None, url: str, clients: int, seconds: float) -> dict[str, Any]:
    """The online load's latencies: for `seconds` (no backlog), or as long as `busy` is set (a backlog runs)."""
    import numpy as np

    lat_p50, lat_p99, n, errors, t0 = [], [], 0, 0, time.perf_counter()
    while (busy.is_set() if busy is not None else time.perf_counter() - t0 < seconds):
        r = asyncio.run(load(url, 40 * clients, clients, 10))
        n, errors = n + r["requests"], errors + r["errors"]
        lat_p50.append(r["p50_ms"])
        lat_p99.append(r["p99_ms"])
    return {"requests": n, "errors": errors, "p50_ms": float(np.median(lat_p50)) if lat_p50 else None,
            "p99_ms": float(np.max(lat_p99)) if lat_p99 else None}


def backlog(via: str, ds, model: Path, rows: int, url: str, clients: int, batch_size: int) -> dict[str, Any]:
    """Label `ds` (every row) by `via` into a parquet folder while the online load runs; both results."""
    from llambert_ray.config import LabelConfig
    from llambert_ray.label import label

    out = TMP / f"labels-{via}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = LabelConfig(via=via, serve_app=APP, batch_size=batch_size, cpus_per_actor=0.5, max_length=64)
    busy, result = threading.Event(), {}
    busy.set()

    def run() -> None:
        try:
            result["summary"] = label(ds, model, cfg, out, rows=rows)
        finally:
            busy.clear()

    worker = threading.Thread(target=run)
    worker.start()
    online = online_while(busy, url, clients, 0)
    worker.join()
    s = result["summary"]
    assert s.rows == rows and s.failed == 0, (s.rows, s.failed)
    shutil.rmtree(out, ignore_errors=True)
    return {"via": via, "rows": s.rows, "seconds": s.seconds, "rows_per_s": s.rows_per_s, "online": online}


def bench(rows: int, encoder: str, clients: int, repeats: int, batch_size: int) -> dict[str, Any]:
    from ray import serve

    from llambert_ray.config import CorpusConfig, ServeConfig
    from llambert_ray.data import read_corpus
    from llambert_ray.ray_env import init_ray
    from llambert_ray.serve import start

    model = (minilm_model if encoder == "minilm" else tiny_model)(TMP / f"model-{encoder}")
    corpus = synthetic_corpus(rows, TMP / "corpus")
    init_ray(None, num_cpus=2)
    port = free_port()
    start(model, ServeConfig(port=port, max_batch_size=32, batch_wait_timeout_s=0.005, cpus_per_replica=0.5,
                             max_length=64), name=APP)
    url = f"http://127.0.0.1:{port}/v1/classify"
    asyncio.run(load(url, 40, 4, 30))  # warm-up
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        runs.append({"via": "none", "online": online_while(None, url, clients, 20)})
        for via in ("actors", "serve"):  # alternating, so load drift hits both
            ds, info = read_corpus(CorpusConfig(path=str(corpus)), hold=False)
            runs.append(backlog(via, ds, model, info.rows, url, clients, batch_size))
            print(json.dumps(runs[-1]), flush=True)
    serve.shutdown()
    shutil.rmtree(corpus, ignore_errors=True)
    out: dict[str, Any] = {"rows": rows, "encoder": encoder, "clients": clients, "repeats": repeats,
                           "batch_size": batch_size, "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
                           "runs": runs, "summary": {}}
    for via in ("none", "actors", "serve"):
        mine = [r for r in runs if r["via"] == via]
        out["summary"][via] = {"online_p50_ms": spread([r["online"]["p50_ms"] for r in mine]),
                               "online_p99_ms": spread([r["online"]["p99_ms"] for r in mine]),
                               "online_errors": sum(r["online"]["errors"] for r in mine)}
        if via != "none":
            out["summary"][via]["rows_per_s"] = spread([r["rows_per_s"] for r in mine])
    return out


def _cell(s: dict[str, float], fmt: str = ".0f") -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def summary_md(r: dict[str, Any]) -> str:
    s = r["summary"]
    ratio = s["serve"]["rows_per_s"]["median"] / s["actors"]["rows_per_s"]["median"]
    lines = ["# A backlog through Serve vs an actor pool, with online requests to the same app", "",
             f"`python -m bench.serve_backlog`: {r['rows']:,} rows, encoder {r['encoder']}, {r['clients']} online "
             f"clients, {r['repeats']} repetitions (median [min-max]); {r['machine']}.", "",
             "| backlog | backlog rows/s | online p50 ms | online p99 ms | online errors |",
             "|---|---:|---:|---:|---:|"]
    for via, name in (("none", "none (online only)"), ("actors", "actor pool"), ("serve", "through Serve")):
        rate = _cell(s[via]["rows_per_s"]) if "rows_per_s" in s[via] else "–"
        lines.append(f"| {name} | {rate} | {_cell(s[via]['online_p50_ms'])} | {_cell(s[via]['online_p99_ms'])} | "
                     f"{s[via]['online_errors']} |")
    lines += ["", f"Backlog through Serve / actor pool, rows/s: **{ratio:.2f}x**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--encoder", choices=["minilm", "tiny"], default="minilm")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    res = bench(a.rows, a.encoder, a.clients, a.repeats, a.batch_size)
    save_results("serve_backlog", res, summary_md(res))


if __name__ == "__main__":
    main()
