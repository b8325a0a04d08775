"""What every benchmark shares: the results folder, repeated figures as median / min / max, a measurement in a
fresh Python process (a fresh local Ray each time), and one way to write results (bench/results/NAME.json for
machines, NAME.md for people, the Markdown also on stdout); and the GPU check scripts' steps, each recorded apart."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path("bench/results")


def spread(values: list[float]) -> dict[str, float]:
    """Repeated measurements of one figure: median, min, max and how many."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def save_results(name: str, result: dict[str, Any], markdown: str) -> None:
    """bench/results/NAME.json and NAME.md, and the Markdown on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def child_result(code: str, what: str, timeout: int = 3600) -> dict[str, Any]:
    """Run `code` in a fresh Python process (a fresh local Ray) and return the JSON it prints after 'RESULT '."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{what} failed ({p.returncode}): {p.stderr[-3000:]}")
    return json.loads(line[0].removeprefix("RESULT "))


class Steps:
    """A check script's steps (bench.gpu_check, bench.gpu_check_cluster), each recorded apart: its dict (ok True)
    or its error (ok False) and its wall time, into OUT/NAME, rewritten after every step so a run stopped at its
    time limit still leaves what it finished. A step whose name holds one of `skip` (comma-separated) is left out;
    `limit_s` stops a step that runs past it (SIGALRM: the main thread)."""

    def __init__(self, out: str | Path, name: str, skip: str = "") -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path, self.skip = self.out / name, [s for s in skip.split(",") if s]
        self.results: dict[str, Any] = {}

    def run(self, name: str, fn, limit_s: int | None = None) -> None:
        if any(s in name for s in self.skip):
            return
        t0 = time.time()
        print(f"=== {name}", flush=True)
        if limit_s:
            signal.signal(signal.SIGALRM, _step_timeout)
            signal.alarm(limit_s)
        try:
            self.results[name] = {"ok": True, **fn()}
        except Exception as e:  # a check that fails is a result too (StepTimeout included)
            traceback.print_exc()
            self.results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000]}
        finally:
            if limit_s:
                signal.alarm(0)
        self.results[name]["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps({name: self.results[name]}, default=str), flush=True)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=2, default=str))


class StepTimeout(Exception):
    pass


def _step_timeout(signum, frame):
    raise StepTimeout("step ran past its time limit")


def check_parser(doc: str) -> argparse.ArgumentParser:
    """The check scripts' options: --out DIR, --quick (tiny sizes on the CPU: checks the script, not the GPU) and
    --skip (parts of step names to leave out); a script adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: checks the script, not the GPU")
    ap.add_argument("--skip", default="", help="comma-separated parts of step names to leave out, e.g. zero3,serve")
    return ap
