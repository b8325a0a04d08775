"""The run report: Markdown + HTML with PNG plots, from the run's metrics and manifest.

Sections: headline table (variant x model -> accuracy, macro F1), LLM labels vs gold, per-class metrics,
confusion matrices, LLM confidence histogram, and a cost table (seconds, device-seconds, tokens per stage).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def headline_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per labeller: the LLM itself and each trained variant."""
    rows = []
    llm = metrics.get("llm")
    if llm and llm.get("accuracy") is not None:
        rows.append({"labeller": f"LLM ({metrics.get('llm_model', 'llm')})", "data": "annotated subset",
                     "rows": llm["rows"], "accuracy": llm["accuracy"], "macro_f1": llm["macro_f1"]})
    for variant, m in metrics.get("variants", {}).items():
        rows.append({"labeller": f"{metrics.get('encoder', 'encoder')} [{variant}]", "data": "test split",
                     "rows": m["rows"] if not m.get("failed") else f"{m['rows']} (+{m['failed']} failed, left out)",
                     "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
    return rows


def headline_table(metrics: dict[str, Any]) -> str:
    lines = ["| labeller | evaluated on | rows | accuracy | macro F1 |", "|---|---|---:|---:|---:|"]
    for r in headline_rows(metrics):
        lines.append(f"| {r['labeller']} | {r['data']} | {r['rows']} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['macro_f1'])} |")
    return "\n".join(lines)


def _plot_confusion(m: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    cm = m["confusion"]
    labels = m["labels"]
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = max((max(r) for r in cm), default=0)
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_variants(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rows)), dpi=110)
    names = [r["labeller"] for r in rows]
    accs = [100 * (r["accuracy"] or 0) for r in rows]
    ax.barh(names, accs, color=["#d98c3f" if n.startswith("LLM") else "#3f7fd9" for n in names])
    for i, a in enumerate(accs):
        ax.text(a + 0.3, i, f"{a:.1f}", va="center", fontsize=8)
    ax.set_xlim(max(0, min(accs, default=50) - 10), 100)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_confidence(ann: pd.DataFrame, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if "llm_confidence" not in ann or ann["llm_confidence"].notna().sum() == 0:
        return False
    fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
    conf = ann["llm_confidence"].dropna()
    if "label" in ann and ann["label"].notna().any():
        right = ann["llm_label"] == ann["label"]
        ax.hist([conf[right[conf.index]], conf[~right[conf.index]]], bins=20, stacked=True,
                label=["agrees with gold", "disagrees"], color=["#3f7fd9", "#d9533f"])
        ax.legend(fontsize=8)
    else:
        ax.hist(conf, bins=20, color="#3f7fd9")
    ax.set_xlabel("LLM confidence")
    ax.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def cost_table(manifest: dict[str, Any]) -> str:
    lines = ["| stage | rows | seconds | device-seconds | prompt tokens | rows/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, st in manifest.get("stages", {}).items():
        rows, secs = st.get("rows") or 0, st.get("seconds") or 0
        lines.append(f"| {name} | {rows} | {secs:.1f} | {st.get('device_seconds', 0):.1f} "
                     f"({st.get('device', 'cpu')}) | {st.get('tokens', 0) or '–'} | "
                     f"{rows / secs if secs else 0:.1f} |")
    return "\n".join(lines)


def label_issue_section(summary: dict[str, Any], issues: pd.DataFrame, top: int = 15) -> list[str]:
    md = ["## Label issues", "",
          f"{summary['flagged']} of {summary['annotated']} LLM labels ({_pct(summary['flagged_share'])}) are "
          f"contradicted with confidence by the trained classifier (confident-learning thresholds per class; "
          f"all in `label_issues.parquet`, most doubtful first)."]
    if summary.get("flag_precision") is not None:
        md.append(f"Against gold: {_pct(summary['flag_precision'])} of the flagged labels are wrong, vs "
                  f"{_pct(summary['llm_error_rate'])} of all LLM labels.")
    md.append("")
    if len(issues):
        gold = "label" in issues
        md += ["| id | text | LLM label | classifier | p(LLM label) |" + (" gold |" if gold else ""),
               "|---|---|---|---|---:|" + ("---|" if gold else "")]
        for r in issues.head(top).itertuples(index=False):
            text = str(getattr(r, "text", ""))[:90].replace("|", "/").replace("\n", " ")
            md.append(f"| {r.id} | {text} | {r.llm_label} | {r.classifier_label} | {r.p_llm_label:.2f} |"
                      + (f" {r.label} |" if gold else ""))
        md.append("")
    return md


def _active_rounds(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The rounds of an active-selection annotate stage, as the manifest recorded them (None for random)."""
    rounds = (manifest.get("stages", {}).get("annotate") or {}).get("rounds")
    return {"strategy": "active", "rounds": rounds} if rounds else None


def write_report(run_dir: str | Path, metrics: dict[str, Any], manifest: dict[str, Any],
                 annotations: pd.DataFrame | None = None, issues: pd.DataFrame | None = None) -> Path:
    """Write report.md, report.html and plots/*.png into run_dir; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str]] = []
    rows = headline_rows(metrics)
    if rows:
        _plot_variants(rows, plots / "variants.png")
        images.append(("Accuracy by labeller", "plots/variants.png"))
    if metrics.get("llm", {}).get("confusion"):
        _plot_confusion(metrics["llm"], "LLM labels vs gold", plots / "confusion_llm_labels.png")
        images.append(("LLM labels vs gold", "plots/confusion_llm_labels.png"))
    for variant, m in metrics.get("variants", {}).items():
        safe = variant.replace("+", "_")
        _plot_confusion(m, f"{variant} vs gold (test)", plots / f"confusion_{safe}.png")
        images.append((f"{variant} classifier vs gold", f"plots/confusion_{safe}.png"))
    if annotations is not None and _plot_confidence(annotations, plots / "llm_confidence.png"):
        images.append(("LLM confidence", "plots/llm_confidence.png"))
    active = _active_rounds(manifest)
    if active and any(r.get("probe_accuracy") is not None for r in active["rounds"]):
        from llambert_ray.active import plot_curves

        plot_curves([{**active, "name": "active selection (probe on embeddings)"}], plots / "active_selection.png")
        images.append(("Active selection: accuracy vs LLM calls", "plots/active_selection.png"))

    md = [f"# llambert-ray report: {manifest.get('name', run_dir.name)}", "",
          f"Task `{metrics.get('task')}`; LLM `{metrics.get('llm_model')}`; encoder `{metrics.get('encoder')}`; "
          f"config hash `{manifest.get('config_hash')}`.", "", "## Headline", "", headline_table(metrics), ""]
    llm = metrics.get("llm") or {}
    if llm:
        md += ["## LLM labels", "",
               f"{llm.get('rows', 0)} annotated rows with gold labels; accuracy {_pct(llm.get('accuracy'))}, "
               f"dropped (unparseable) {_pct(llm.get('dropped'))}.", ""]
    per_class = ["## Per-class metrics", "", "| labeller | class | precision | recall | F1 | support |",
                 "|---|---|---:|---:|---:|---:|"]
    for name, m in [("LLM", llm)] + list(metrics.get("variants", {}).items()):
        for lab, c in (m.get("per_class") or {}).items():
            per_class.append(f"| {name} | {lab} | {_pct(c['precision'])} | {_pct(c['recall'])} | "
                             f"{_pct(c['f1'])} | {c['support']} |")
    md += per_class + ["", "## Cost", "", cost_table(manifest), ""]
    if metrics.get("labels_summary"):
        s = metrics["labels_summary"]
        failed = (f" {s['failed']} rows failed (label empty, reason in the `error` column)."
                  if s.get("failed") else "")
        md += [f"Whole-corpus labelling: {s['rows']} rows at {s['rows_per_s']:.1f} rows/s "
               f"-> `labels.parquet`.{failed}", ""]
    if active:
        md += ["## Active selection", "",
               "Rows for the LLM were chosen in rounds by a probe (softmax regression on the encoder's embeddings) "
               "among the pool rows it was least sure of:", "",
               "| round | LLM calls | probe accuracy on test | probe macro F1 |", "|---:|---:|---:|---:|"]
        md += [f"| {r['round']} | {r['llm_calls']} | {_pct(r.get('probe_accuracy'))} | "
               f"{_pct(r.get('probe_macro_f1'))} |" for r in active["rounds"]] + [""]
    if metrics.get("label_issues") and issues is not None:
        md += label_issue_section(metrics["label_issues"], issues)
    md += ["## Plots", ""] + [f"![{t}]({p})" for t, p in images] + [""]
    (run_dir / "report.md").write_text("\n".join(md))
    (run_dir / "report.html").write_text(_to_html("\n".join(md), manifest.get("name", run_dir.name)))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return run_dir / "report.md"


def _to_html(md: str, title: str) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) to self-contained HTML."""
    out = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}</style>"]
    table: list[str] = []

    def flush() -> None:
        if table:
            head, *body = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = lambda r: [html.escape(c.strip()) for c in r.strip().strip("|").split("|")]  # noqa: E731
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells(head)) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>" for r in body) +
                       "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f"<figure><img src='{html.escape(src[:-1])}' alt='{html.escape(alt)}'>"
                       f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    return "\n".join(out)
