"""What every benchmark shares: the results folder, repeated figures as median / min / max, a measurement in a
fresh Python process (a fresh local Ray each time), and one way to write results (bench/results/NAME.json for
machines, NAME.md for people, the Markdown also on stdout)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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
