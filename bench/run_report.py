"""bench/results/bench.md from bench.json: what `python -m bench.run` measured, a section per step (annotation,
labelling, training, serving, quantized labelling, the fixed cost, active selection, cost against accuracy)."""

from __future__ import annotations

from typing import Any

from bench.active_cost import summary_md as active_cost_md
from bench.cost_accuracy import summary_md as cost_accuracy_md
from bench.fixed_cost import summary_md as fixed_cost_md
from bench.quantize import summary_md as quantize_md


def _spread_line(r: dict[str, Any], keys: tuple[str, ...]) -> str:
    """'min-max over N runs' for the step's main figures (paths ending in one of `keys`)."""
    sp = r.get("spread") or {}
    cells = [f"{p} {v['min']:.3g}-{v['max']:.3g}" for p, v in sp.items() if p.endswith(keys) and v["runs"] > 1]
    if not cells:
        return ""
    return f"\nMedians of {next(iter(sp.values()))['runs']} runs; min-max: " + "; ".join(cells) + "\n"


def _annotate_md(a: dict[str, Any]) -> list[str]:
    """The annotation section: each setting's runs, rows/s, accuracy and ratio to the paper's loop."""
    lines = ["## Annotation (SmolLM2-135M-Instruct, IMDb test)", "",
             "Whole calls (an engine start included in ours; the paper loop's model load is not), the run with "
             "the median time of each setting; rows/s as median [min-max] over the runs.", "",
             "| method | runs | rows/s | prompt tok/s | accuracy | dropped | x paper | % of ceiling |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in a.items():
        if k == "engine_start":
            continue
        ratio = v.get("speedup_vs_paper", v.get("speedup_vs_block128"))
        tag = "" if "speedup_vs_block128" not in v else " (x: vs block 128)"
        sp = (v.get("spread") or {}).get("rows_per_s")
        rate = f"{sp['median']:.2f} [{sp['min']:.2f}-{sp['max']:.2f}]" if sp else f"{v['rows_per_s']:.2f}"
        lines.append(f"| {k}{tag} | {sp['runs'] if sp else 1} | {rate} | {v['prompt_tokens_per_s']:.0f} | "
                     f"{v['accuracy']:.1%} | {v['drop_rate']:.1%} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {v['ceiling_fraction']:.0%} |")
        ex = v.get("excl_engine_start")
        if ex:
            ratio = ex.get("speedup_vs_paper", ex.get("speedup_vs_block128"))
            lines.append(f"| {k}, engine start taken out | | {ex['rows_per_s']:.2f} | "
                         f"{ex['prompt_tokens_per_s']:.0f} | | | {'' if ratio is None else f'{ratio:.2f}'} | "
                         f"{ex['ceiling_fraction']:.0%} |")
    if "engine_start" in a:
        lines.append(f"\nEngine start (an annotate call on 2 short rows): "
                     f"{a['engine_start']['seconds']:.0f} s, paid once per call. Prompt tokens "
                     f"include prefix-cache hits, so a run that reuses its prefix can pass 100 % of the ceiling.")
    lines.append("")
    return lines


def summary_md(r: dict[str, Any]) -> str:
    lines = [f"# Benchmarks ({r['machine']['cpus']} CPUs, {r['machine']['platform']})", ""]
    if "ceiling" in r:
        lines.append(f"Ceiling: {r['ceiling']['gflops']:.0f} GFLOP/s fp32 matmul on {r['ceiling']['threads']} "
                     f"threads.\n")
    if "annotate" in r:
        lines += _annotate_md(r["annotate"])
    if "label" in r:
        v = r["label"]
        lines += ["## Labelling (MiniLM-L6 classifier, IMDb test, 256 tokens)", "",
                  "| method | rows/s | tok/s | % of ceiling |", "|---|---:|---:|---:|"]
        for k in ("plain_pipeline_loop", "ours_ray_data_actor", "ours_classifier_steady"):
            if k not in v:
                continue
            lines.append(f"| {k} | {v[k]['rows_per_s']:.1f} | {v[k]['tokens_per_s']:.0f} | "
                         f"{v[k]['ceiling_fraction']:.0%} |")
        lines += [f"\nspeed-up: {v['speedup']:.2f}x incl. actor start"
                  + (f", {v['speedup_steady']:.2f}x warm" if "speedup_steady" in v else "") + "\n"]
        lines.append(_spread_line(v, ("rows_per_s", "speedup", "speedup_steady")))
    if "train" in r:
        lines += ["## Training (MiniLM-L6, 128 tokens, batch 8 per worker)", "", "| workers / ZeRO | samples/s |",
                  "|---|---:|"]
        lines += [f"| {k} | {v['samples_per_s']:.1f} |" for k, v in r["train"].items() if k != "spread"]
        lines.append(_spread_line(r["train"], ("samples_per_s",)))
    if "serve" in r:
        s = r["serve"]
        lines += ["## Serve (same load, 16 concurrent clients)", "", "| config | req/s | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {s[k]['requests_per_s']:.1f} | {s[k]['p50_ms']:.0f} | {s[k]['p99_ms']:.0f} |"
                  for k in ("batch_1", "batch_32")]
        lines.append(f"\nbatching: {s['speedup_requests_per_s']:.2f}x requests/s, p99 x{s['p99_ratio']:.2f}\n")
        lines.append(_spread_line(s, ("requests_per_s", "p99_ms", "p99_ratio")))
    if "quantize" in r:
        lines.append(quantize_md(r["quantize"]))
    if "fixed_cost" in r:
        lines.append(fixed_cost_md(r["fixed_cost"]))
    if "active_cost" in r:
        lines.append(active_cost_md(r["active_cost"]))
    if "cost_accuracy" in r:
        lines.append(cost_accuracy_md(r["cost_accuracy"]))
    return "\n".join(lines)
