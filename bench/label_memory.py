"""The label stage's driver memory against the corpus size: does `llambert label` stay flat as the corpus grows?

A 1-layer, 32-wide random BERT with 2 labels (the packaged MiniLM's tokenizer) keeps the model's own cost small, so
what grows with the corpus shows. For each size a synthetic parquet corpus of short texts (5-15 words, gold labels
on every row, 100,000 rows a file) is labelled by `python -m llambert_ray.cli label` in a fresh process (a fresh
local Ray) under `/usr/bin/time -v`. Recorded per size: wall seconds and rows/s of the whole command, the label
stage's own seconds (label_summary.json), the driver's peak RSS (the CLI process itself, its getrusage at exit)
and the peak RSS `time -v` reports (the largest process of the tree it waited for: the driver or one of the Ray
processes it started), and between consecutive sizes the growth of the driver's peak in MB and bytes per row.

    python -m bench.label_memory [--rows 200000,2000000] [--io parquet,postgres] [--batch-size 512]
                                 [--set label.cpus_per_actor=1 ..]

`--io postgres`: the same corpus in a PostgreSQL table (a server of the bench's own on a loopback port,
bench.pg_server), labelled into a labels table of the same database (`--input postgresql://... --table corpus
--output postgresql://... --output-table labels`): database in, database out, beside parquet in, parquet out.

Writes bench/results/label_memory.json and .md; corpora, model and outputs go to bench/results/bench_tmp/ (removed
after each size's run, the model kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, save_results

TMP = RESULTS / "bench_tmp" / "label_memory"
FILE_ROWS = 100_000
WORDS = ("good bad great awful fine film plot actor scene music story boring lovely dull funny slow fast warm cold "
         "bright dark long short clever silly moving flat rich thin kind").split()

# Runs the CLI as `python -m llambert_ray.cli` would and prints this process's own peak RSS (kB) at exit, after
# Ray has shut down (atexit runs last-registered first: Ray's shutdown, registered by ray.init, comes before it);
# and, around the label stage, the object store's peak use (sampled each second) and what it spilled to disk.
DRIVER = """import atexit, re, resource, runpy, sys, threading
atexit.register(lambda: print("DRIVER_MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                              file=sys.stderr, flush=True))
import llambert_ray.label as stage
real = stage.label
def watched(*a, **k):
    import ray
    from ray._private.internal_api import memory_summary
    peak, stop = [0], threading.Event()
    here = ray.get_runtime_context().gcs_address  # this run's Ray, not another one on the machine
    def used():
        m = re.search(r"Plasma memory usage (\\d+) MiB", memory_summary(address=here, stats_only=True))
        return int(m.group(1)) if m else 0
    def poll():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], used())
            except Exception:
                pass
            stop.wait(1.0)
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        return real(*a, **k)
    finally:
        stop.set()
        t.join(10)
        spilled = re.search(r"Spilled (\\d+) MiB", memory_summary(address=here, stats_only=True))
        print("OBJECT_STORE_PEAK_MIB", peak[0], file=sys.stderr, flush=True)
        print("SPILLED_MIB", int(spilled.group(1)) if spilled else 0, file=sys.stderr, flush=True)
stage.label = watched
sys.argv = ["llambert_ray.cli", *sys.argv[1:]]
runpy.run_module("llambert_ray.cli", run_name="__main__")
"""


def tiny_model(out: Path) -> Path:
    """A random 1-layer BERT, hidden size 32, 2 labels, saved with MiniLM's tokenizer (made once, then reused)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llambert_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def synthetic_corpus(rows: int, out: Path, seed: int = 0) -> Path:
    """A parquet folder of `rows` short texts (id, text, label), FILE_ROWS rows a file, written a file at a time."""
    import numpy as np
    import pandas as pd

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    for start in range(0, rows, FILE_ROWS):
        n = min(FILE_ROWS, rows - start)
        lengths = rng.integers(5, 16, size=n)
        texts = [" ".join(words[rng.integers(0, len(words), size=k)]) for k in lengths]
        pd.DataFrame({"id": [f"r{i}" for i in range(start, start + n)], "text": texts,
                      "label": np.where(rng.random(n) < 0.5, "positive", "negative")}
                     ).to_parquet(out / f"part-{start // FILE_ROWS:05d}.parquet", index=False)
    return out


def _time_v(stderr: str, field: str) -> str:
    m = re.search(rf"^\s*{re.escape(field)}: (.+)$", stderr, flags=re.M)
    if not m:
        raise RuntimeError(f"/usr/bin/time -v printed no {field!r}")
    return m.group(1).strip()


def _wall_seconds(text: str) -> float:
    """`time -v`'s elapsed wall clock, h:mm:ss or m:ss.ss, in seconds."""
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def run_cli(cmd: list[str], timeout: int, what: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run a CLI command in a child process (Ray's auth off, as in the tests); it and its wall seconds. Raises
    with the end of its stderr if it fails."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{what} failed ({p.returncode}): {p.stderr[-3000:]}")
    return p, wall


PG_PASSWORD_ENV = "LLAMBERT_BENCH_PG_PASSWORD"


def load_postgres(url: str, corpus: Path, table: str = "corpus") -> None:
    """The synthetic corpus's files into a fresh PostgreSQL table (COPY), id its primary key; labels dropped."""
    import pandas as pd

    from llambert_ray.config import SqlConfig
    from llambert_ray.sql import connector

    with connector(SqlConfig(url=url, password_env=PG_PASSWORD_ENV, table=table))() as con:
        con.execute("DROP TABLE IF EXISTS labels")
        con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, text TEXT NOT NULL, label TEXT)")
        with con.cursor() as cur:
            for f in sorted(corpus.glob("*.parquet")):
                with cur.copy(f"COPY {table} (id, text, label) FROM STDIN") as cp:
                    for row in pd.read_parquet(f, columns=["id", "text", "label"]).itertuples(index=False):
                        cp.write_row(row)
        con.commit()


def label_run(rows: int, model: Path, batch_size: int, sets: list[str], timeout: int,
              pg_url: str | None = None) -> dict[str, Any]:
    """Label a fresh corpus of `rows` rows with the CLI in a child process; its wall time, RSS and summary. With
    `pg_url`, from a PostgreSQL table into a labels table of the same database instead of parquet to parquet."""
    corpus = synthetic_corpus(rows, TMP / f"corpus-{rows}")
    out = TMP / f"out-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", DRIVER, "label", "--model", str(model)]
    if pg_url:
        load_postgres(pg_url, corpus)
        cmd += ["--input", pg_url, "--table", "corpus", "--password-env", PG_PASSWORD_ENV, "--output", pg_url,
                "--output-table", "labels", "--output-password-env", PG_PASSWORD_ENV, "--report-dir", str(out)]
    else:
        cmd += ["--input", str(corpus), "--output", str(out)]
    cmd += ["--batch-size", str(batch_size)]
    for s in sets:
        cmd += ["--set", s]
    p, wall = run_cli(cmd, timeout, f"label of {rows} rows")
    driver = re.search(r"^DRIVER_MAXRSS_KB (\d+)$", p.stderr, flags=re.M)
    summary = json.loads((out / "label_summary.json").read_text())
    if summary["rows"] != rows:
        raise RuntimeError(f"labelled {summary['rows']} of {rows} rows")
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    secs = _wall_seconds(_time_v(p.stderr, "Elapsed (wall clock) time (h:mm:ss or m:ss)"))
    return {"io": "postgres" if pg_url else "parquet", "rows": rows, "wall_s": secs, "rows_per_s": rows / secs,
            "measured_wall_s": wall, "label_stage_s": summary["seconds"],
            "label_stage_rows_per_s": summary["rows_per_s"],
            "driver_peak_rss_mb": int(driver.group(1)) / 1024 if driver else None,
            "object_store_peak_mb": _stderr_int(p.stderr, "OBJECT_STORE_PEAK_MIB"),
            "spilled_mb": _stderr_int(p.stderr, "SPILLED_MIB"),
            "tree_max_rss_mb": int(_time_v(p.stderr, "Maximum resident set size (kbytes)")) / 1024,
            "failed": summary["failed"], "accuracy": summary["accuracy"]}


def _stderr_int(stderr: str, key: str) -> int | None:
    m = re.search(rf"^{key} (\d+)$", stderr, flags=re.M)
    return int(m.group(1)) if m else None


def growth(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The driver's peak RSS growth between consecutive sizes, in MB and bytes per added row."""
    out = []
    for a, b in zip(runs[:-1], runs[1:], strict=True):
        if a["driver_peak_rss_mb"] is None or b["driver_peak_rss_mb"] is None or a.get("io") != b.get("io"):
            continue
        mb = b["driver_peak_rss_mb"] - a["driver_peak_rss_mb"]
        tree = b["tree_max_rss_mb"] - a["tree_max_rss_mb"]
        out.append({"io": b.get("io", "parquet"), "from_rows": a["rows"], "to_rows": b["rows"], "driver_mb": mb,
                    "driver_bytes_per_row": mb * 2**20 / (b["rows"] - a["rows"]), "tree_max_mb": tree})
    return out


def summary_md(res: dict[str, Any]) -> str:
    lines = ["# Label stage: driver memory against corpus size", "",
             f"`python -m bench.label_memory`: {res['model']}; batch size {res['batch_size']}"
             + (f"; {', '.join(res['sets'])}" if res["sets"] else "") + f"; {res['machine']}.", "",
             "| in -> out | rows | wall s | rows/s | label stage s | driver peak RSS MB | process tree max RSS MB "
             "| object store peak MB | spilled MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        drv = f"{r['driver_peak_rss_mb']:.0f}" if r["driver_peak_rss_mb"] is not None else "–"
        lines.append(f"| {r.get('io', 'parquet')} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows_per_s']:.0f} | "
                     f"{r['label_stage_s']:.1f} | {drv} | {r['tree_max_rss_mb']:.0f} | "
                     f"{r.get('object_store_peak_mb', '–')} | {r.get('spilled_mb', '–')} |")
    if res["growth"]:
        lines += ["", "| in -> out | from rows | to rows | driver growth MB | bytes per added row "
                  "| tree max growth MB |", "|---|---:|---:|---:|---:|---:|"]
        for g in res["growth"]:
            lines.append(f"| {g.get('io', 'parquet')} | {g['from_rows']:,} | {g['to_rows']:,} | "
                         f"{g['driver_mb']:+.0f} | {g['driver_bytes_per_row']:+.1f} | {g['tree_max_mb']:+.0f} |")
    return "\n".join(lines) + "\n"


def _run_printed(rows: int, model: Path, a: argparse.Namespace, pg_url: str | None) -> dict[str, Any]:
    r = label_run(rows, model, a.batch_size, a.sets, a.timeout, pg_url)
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="200000,2000000", help="comma-separated corpus sizes, smallest first")
    ap.add_argument("--io", default="parquet", help="comma-separated: parquet (files in, files out), postgres "
                    "(a table in, a labels table out)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="passed to the CLI's --set")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per size")
    ap.add_argument("--name", default="label_memory", help="bench/results/NAME.json and NAME.md")
    a = ap.parse_args()
    import platform

    model = tiny_model(TMP / "model")
    runs = []
    sizes = sorted(int(r) for r in a.rows.split(","))
    for io in a.io.split(","):
        if io == "parquet":
            runs += [_run_printed(rows, model, a, None) for rows in sizes]
        elif io == "postgres":
            import secrets

            from bench.pg_server import postgres_server

            os.environ[PG_PASSWORD_ENV] = secrets.token_hex(12)
            with postgres_server(os.environ[PG_PASSWORD_ENV]) as url:
                runs += [_run_printed(rows, model, a, url) for rows in sizes]
        else:
            raise SystemExit(f"--io {io!r}: use parquet or postgres")
    res = {"model": "random BERT, 1 layer, hidden 32, 2 labels, MiniLM's tokenizer", "batch_size": a.batch_size,
           "sets": a.sets, "machine": f"{os.cpu_count()} CPUs, {platform.platform()}", "runs": runs,
           "growth": growth(runs)}
    save_results(a.name, res, summary_md(res))


if __name__ == "__main__":
    main()
