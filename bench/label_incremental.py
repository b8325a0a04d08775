"""Incremental relabelling of a database table: what does a rerun cost after 1 % new rows?

A SQLite table of `--rows` synthetic short texts (bench.label_memory's corpus: 5-15 words, gold labels) is labelled
into a labels table of the same file by `python -m llambert_ray.cli label` (a fresh process, a fresh local Ray), with
the 1-layer random BERT of bench.label_memory. Then, per repetition:
  1. full: the whole table labelled (the first run: the labels table is empty);
  2. +1 %: `--new-pct` % new rows inserted, `--incremental`: only those are labelled;
  3. nothing new: `--incremental` again: no row to label (what a rerun costs with nothing to do: start-up, the
     corpus read and the look-ups of every id).
Each run's wall time (the whole command) and its label stage's seconds (label_summary.json) are recorded; the
medians [min-max] over `--runs` repetitions, each on a fresh database, and the ratios to the full run.

    python -m bench.label_incremental [--rows 100000] [--new-pct 1] [--runs 3] [--encoder tiny|minilm]

--encoder minilm: the packaged MiniLM-L6 with a fresh 2-label head (~100x the tiny model's work a row), where the
classifier, not the read, is most of a full run.

Writes bench/results/label_incremental[_minilm].json and .md; the database goes to bench/results/bench_tmp/ (removed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, save_results
from bench.label_memory import TMP as MEMORY_TMP
from bench.label_memory import run_cli, synthetic_corpus, tiny_model

TMP = RESULTS / "bench_tmp" / "label_incremental"
STEPS = ("full", "new_rows", "nothing_new")


def make_db(rows: int, db: Path) -> None:
    """The synthetic corpus as a SQLite table `corpus` (id, text, label)."""
    import pyarrow.parquet as pq

    parts = synthetic_corpus(rows, TMP / "corpus")
    db.unlink(missing_ok=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE corpus (id TEXT PRIMARY KEY, text TEXT, label TEXT)")
    for f in sorted(parts.glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        con.executemany("INSERT INTO corpus VALUES (?, ?, ?)", zip(t["id"], t["text"], t["label"], strict=True))
    con.commit()
    con.close()
    shutil.rmtree(parts, ignore_errors=True)


def minilm_model(out: Path) -> Path:
    """The packaged MiniLM-L6 with a fresh 2-label head, saved as a model folder (made once)."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.models import resolve_model

    src = resolve_model("minilm-l6")
    AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    ).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def add_rows(db: Path, n: int, start: int) -> None:
    con = sqlite3.connect(db)
    con.executemany("INSERT INTO corpus VALUES (?, ?, ?)",
                    [(f"new{start + i}", f"a new review number {i} good plot", "positive") for i in range(n)])
    con.commit()
    con.close()


def run_label(db: Path, model: Path, incremental: bool, batch_size: int, timeout: int) -> dict[str, Any]:
    report = TMP / "report"
    shutil.rmtree(report, ignore_errors=True)
    url = f"sqlite:///{db.resolve()}"
    cmd = [sys.executable, "-m", "llambert_ray.cli", "label", "--model", str(model), "--input", url, "--table",
           "corpus", "--label-column", "label", "--output", url, "--output-table", "labels", "--report-dir",
           str(report), "--batch-size", str(batch_size), *(["--incremental"] if incremental else [])]
    _, wall = run_cli(cmd, timeout, "label")
    s = json.loads((report / "label_summary.json").read_text())
    return {"wall_s": wall, "label_stage_s": s["seconds"], "labelled": s["rows"], "kept": s["kept"]}


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary_md(res: dict[str, Any]) -> str:
    names = {"full": "full (first run)", "new_rows": f"+{res['new_pct']:g} % new rows, --incremental",
             "nothing_new": "nothing new, --incremental"}
    lines = ["# Incremental relabelling of a table", "",
             f"`python -m bench.label_incremental`: SQLite table of {res['rows']:,} synthetic rows -> labels table "
             f"of the same file; {res['model']}; {res['runs']} repetitions, each on a fresh database, median "
             f"[min-max]; {res['machine']}.", "",
             "| run | rows labelled | rows kept | wall s | x full | label stage s | x full |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for step in STEPS:
        r = res["steps"][step]
        w, st = r["wall_s"], r["label_stage_s"]
        lines.append(f"| {names[step]} | {r['labelled']:,} | {r['kept']:,} | {w['median']:.1f} [{w['min']:.1f}-"
                     f"{w['max']:.1f}] | {r['wall_ratio']:.2f} | {st['median']:.1f} [{st['min']:.1f}-"
                     f"{st['max']:.1f}] | {r['stage_ratio']:.2f} |")
    lines += ["", f"Work beyond start-up for the new rows (median of the paired differences, +1 % minus nothing "
              f"new, over full minus nothing new): {res['marginal_ratio']:.1%} of the full run's."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--new-pct", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--encoder", choices=["tiny", "minilm"], default="tiny")
    ap.add_argument("--name", default=None, help="bench/results/NAME.{json,md} (default label_incremental[_minilm])")
    a = ap.parse_args()
    name = a.name or ("label_incremental" if a.encoder == "tiny" else "label_incremental_minilm")
    model = tiny_model(MEMORY_TMP / "model") if a.encoder == "tiny" else minilm_model(MEMORY_TMP / "minilm")
    TMP.mkdir(parents=True, exist_ok=True)
    db = TMP / "corpus.db"
    reps: list[dict[str, dict[str, Any]]] = []
    for rep in range(a.runs):
        make_db(a.rows, db)
        full = run_label(db, model, False, a.batch_size, a.timeout)
        add_rows(db, round(a.rows * a.new_pct / 100), rep * a.rows)
        new = run_label(db, model, True, a.batch_size, a.timeout)
        none = run_label(db, model, True, a.batch_size, a.timeout)
        reps.append({"full": full, "new_rows": new, "nothing_new": none})
        print(json.dumps(reps[-1]), flush=True)
    steps: dict[str, Any] = {}
    for step in STEPS:
        steps[step] = {"labelled": reps[0][step]["labelled"], "kept": reps[0][step]["kept"],
                       "wall_s": _stat([r[step]["wall_s"] for r in reps]),
                       "label_stage_s": _stat([r[step]["label_stage_s"] for r in reps]),
                       "wall_ratio": statistics.median(r[step]["wall_s"] / r["full"]["wall_s"] for r in reps),
                       "stage_ratio": statistics.median(r[step]["label_stage_s"] / r["full"]["label_stage_s"]
                                                        for r in reps)}
    marginal = statistics.median((r["new_rows"]["wall_s"] - r["nothing_new"]["wall_s"])
                                 / (r["full"]["wall_s"] - r["nothing_new"]["wall_s"]) for r in reps)
    res = {"rows": a.rows, "new_pct": a.new_pct, "runs": a.runs, "batch_size": a.batch_size,
           "model": "random BERT, 1 layer, hidden 32, 2 labels" if a.encoder == "tiny" else
           "MiniLM-L6 (packaged), a fresh 2-label head", "machine": f"{os.cpu_count()} CPUs, "
           f"{platform.platform()}", "steps": steps, "marginal_ratio": marginal, "repetitions": reps}
    shutil.rmtree(TMP, ignore_errors=True)
    save_results(name, res, summary_md(res))


if __name__ == "__main__":
    main()
