"""The benchmarks stay runnable: every bench module imports and answers --help with what it measures, running
nothing (a bench's own run reads ../shared, which a clone has not: `make bench` on a development machine)."""

import contextlib
import importlib
import io
import sys
from pathlib import Path

import pytest

BENCHES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")
                 if p.stem not in ("__init__", "harness", "pg_server", "paper_loop", "run_report"))


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


# Each bench's Markdown from its results JSON: (bench module, renderer, results name). The committed Markdown must
# be what the renderer makes of the committed JSON, so a refactor that breaks a renderer (or a stale .md) fails here.
RENDERERS = [("active_cost", "summary_md", "active_cost"), ("cost_accuracy", "summary_md", "cost_accuracy"),
             ("fixed_cost", "summary_md", "fixed_cost"), ("label_incremental", "summary_md", "label_incremental"),
             ("label_incremental", "summary_md", "label_incremental_minilm"),
             ("label_memory", "summary_md", "label_memory"), ("quantize", "summary_md", "quantize"),
             ("serve_backlog", "summary_md", "serve_backlog"), ("endpoint", "_markdown", "endpoint"),
             ("run_report", "summary_md", "bench"), ("distill", "results_md", "distill")]


@pytest.mark.parametrize(("module", "renderer", "name"), RENDERERS, ids=[r[2] for r in RENDERERS])
def test_each_bench_renders_its_committed_results(module, renderer, name):
    import json

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    render = getattr(importlib.import_module(f"bench.{module}"), renderer)
    md = render(json.loads((results / f"{name}.json").read_text()))
    assert md.count("|---") >= 1, name  # at least one table
    assert md == (results / f"{name}.md").read_text(), f"bench/results/{name}.md is not what bench.{module} makes"
