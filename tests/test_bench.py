"""The benchmarks stay runnable: every bench module imports and answers --help with what it measures, running
nothing (a bench's own run reads ../shared, which a clone has not: `make bench` on a development machine)."""

import contextlib
import importlib
import io
import sys
from pathlib import Path

import pytest

BENCHES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")
                 if p.stem not in ("__init__", "harness", "pg_server", "paper_loop"))


def test_every_bench_imports_and_explains_itself(monkeypatch):
    assert {"endpoint", "distill", "label_memory", "run"} <= set(BENCHES)
    for name in BENCHES:
        mod = importlib.import_module(f"bench.{name}")
        assert mod.__doc__ and len(mod.__doc__) > 80, name
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            mod.main()
        assert done.value.code == 0 and "usage:" in out.getvalue(), (name, out.getvalue()[:300])
