"""The run report: Markdown + HTML with PNG plots, from the run's metrics and manifest.

Sections: the paper's comparison (LLM vs each encoder variant on the same test rows, rows/s and cost per 1,000
rows, in plain words, with the run's aims met / not met, and a plot of accuracy against cost), headline table
(variant x model -> accuracy, macro F1), LLM labels vs gold, per-class metrics, confusion matrices, LLM confidence
histogram, and a cost table (seconds, device-seconds, tokens per stage).
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
    """One row per labeller: the LLM itself (on its annotated rows, and on its test rows) and each variant."""
    rows = []
    for key, data in (("llm", "annotated subset"), ("llm_test", "test sample")):
        llm = metrics.get(key)
        if llm and llm.get("accuracy") is not None:
            rows.append({"labeller": f"LLM ({metrics.get('llm_model', 'llm')})", "data": data,
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


# ------------------------------------------------------------------------------------------- the story
VARIANT_WORDS = {"llm": "LLM labels", "gold": "gold labels", "combined": "LLM labels, then gold",
                 "llm+extra": "LLM labels + extra rows"}


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


LLM_KEY = "__llm__"  # the LLM's row among the variants (a variant is also called "llm")
LLM_KEY_WORDS = "rows named `LLM <model>` are the LLM's own labels, `<encoder> [llm]` the encoder trained on them"


def story_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per labeller for the paper's comparison: accuracy on the LLM's test rows (the same rows for all),
    accuracy on the whole test sample, and speed / cost per 1,000 rows as measured in this run. Every encoder
    variant labels at the encoder's speed (same model, same labelling settings)."""
    speed = metrics.get("speed") or {}
    same = metrics.get("variants_on_llm_test") or {}
    out = []
    if metrics.get("llm_test") or metrics.get("llm"):
        m = metrics.get("llm_test") or {}
        out.append({"key": LLM_KEY, "labeller": f"LLM {metrics.get('llm_model', '')}".strip(), "trained_on": "–",
                    "same_rows": m.get("accuracy"), "n_same": m.get("rows"), "all_test": None, "n_all": None,
                    **_speed_cols(speed.get("llm"))})
    for variant, m in (metrics.get("variants") or {}).items():
        on_same = same.get(variant) or {}
        out.append({"key": variant, "labeller": f"{metrics.get('encoder', 'encoder')} [{variant}]",
                    "trained_on": VARIANT_WORDS.get(variant, variant),
                    "same_rows": on_same.get("accuracy"), "n_same": on_same.get("rows"),
                    "all_test": m.get("accuracy"), "n_all": m.get("rows"), **_speed_cols(speed.get("encoder"))})
    return out


def _speed_cols(sp: dict[str, Any] | None) -> dict[str, Any]:
    sp = sp or {}
    return {"rows_per_s": sp.get("rows_per_s"), "cost_1k": sp.get("device_seconds_per_1k"),
            "usd_1k": sp.get("usd_per_1k"), "device": sp.get("device", "cpu")}


def story_table(metrics: dict[str, Any]) -> str:
    """The comparison as a Markdown table (the CLI prints it at the end of `llambert run`)."""
    rows = story_rows(metrics)
    if not rows:
        return ""
    n_same = next((r["n_same"] for r in rows if r["key"] == LLM_KEY and r["n_same"]), None)
    n_all = next((r["n_all"] for r in rows if r["n_all"]), None)
    unit = "core" if all(r["device"] == "cpu" for r in rows) else "device"
    # the LLM's own test rows are a column only where the LLM labelled some (evaluate.llm_test_sample)
    same = f" accuracy, the LLM's {n_same} test rows |" if n_same else ""
    lines = [f"| labeller | trained on |{same} accuracy, all {n_all or '–'} test rows | rows/s | "
             f"{unit}-seconds per 1,000 rows | USD per 1,000 rows |", "|---|---|" + "---:|" * (4 + bool(same))]
    for r in rows:
        on_same = f" {_pct(r['same_rows'])} |" if same else ""
        lines.append(f"| {r['labeller']} | {r['trained_on']} |{on_same} {_pct(r['all_test'])} | "
                     f"{_num(r['rows_per_s'], '.1f')} | {_num(r['cost_1k'], '.1f')} | {_num(r['usd_1k'], '.6f')} |")
    if not same:
        lines.append(f"\n(the LLM's accuracy on test rows: set evaluate.llm_test_sample; {LLM_KEY_WORDS})")
    return "\n".join(lines)


def check_aims(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's aims (thresholds from the config's `evaluate:` section), each met / not met / not measured,
    with the numbers behind the verdict."""
    run = metrics.get("run") or {}
    aims_cfg = run.get("aims") or {}
    same = metrics.get("variants_on_llm_test") or {}
    llm_test = (metrics.get("llm_test") or {}).get("accuracy")
    speed = metrics.get("speed") or {}
    out: list[dict[str, Any]] = []

    def add(aim: str, ok: bool | None, measured: str) -> None:
        out.append({"aim": aim, "status": "not measured" if ok is None else "met" if ok else "not met",
                    "measured": measured})

    gap = aims_cfg.get("aim_llm_gap_points", 2.0)
    enc = (same.get("llm") or {}).get("accuracy")
    n = (metrics.get("llm_test") or {}).get("rows")
    if enc is not None and llm_test is not None:
        d = 100 * (enc - llm_test)
        add(f"encoder trained on LLM labels within {gap:g} points of the LLM on the same test rows",
            d >= -gap - 1e-9, f"{_pct(enc)} vs {_pct(llm_test)} on {n} rows ({d:+.1f} points)")
    else:
        add(f"encoder trained on LLM labels within {gap:g} points of the LLM on the same test rows", None,
            "needs variant llm and evaluate.llm_test_sample")
    v = metrics.get("variants") or {}
    if "combined" in v and "gold" in v:
        c, g = v["combined"]["accuracy"], v["gold"]["accuracy"]
        add("combined at or above gold", c is not None and g is not None and c >= g,
            f"{_pct(c)} vs {_pct(g)} on {v['gold']['rows']} test rows ({100 * ((c or 0) - (g or 0)):+.1f} points)")
    else:
        add("combined at or above gold", None, "needs variants combined and gold")
    want = aims_cfg.get("aim_speedup", 20.0)
    llm_sp, enc_sp = (speed.get("llm") or {}).get("rows_per_s"), (speed.get("encoder") or {}).get("rows_per_s")
    if llm_sp and enc_sp:
        add(f"encoder at least {want:g}x the LLM's rows/s", enc_sp / llm_sp >= want,
            f"{enc_sp:.1f} vs {llm_sp:.2f} rows/s = {enc_sp / llm_sp:.1f}x")
    else:
        add(f"encoder at least {want:g}x the LLM's rows/s", None, "needs the annotate and label stages' timings")
    minutes = aims_cfg.get("aim_wall_minutes")
    if minutes:
        reused = run.get("stages_reused") or []
        secs = run.get("seconds")
        if reused or secs is None:
            add(f"the whole run within {minutes:g} minutes", None,
                f"stages {', '.join(reused)} were reused from an earlier run, so this run's time says nothing")
        else:
            add(f"the whole run within {minutes:g} minutes", secs <= 60 * minutes,
                f"{secs / 60:.1f} min ({secs:.0f} s, from the start of the pipeline to the report)")
    return out


def story_sentences(metrics: dict[str, Any]) -> list[str]:
    """The comparison in plain words: what the LLM's labels bought, at what speed, and what gold labels add."""
    rows = {r["key"]: r for r in story_rows(metrics)}
    speed = metrics.get("speed") or {}
    llm, enc = rows.get(LLM_KEY), rows.get("llm")
    out = []
    if llm and enc and llm["same_rows"] is not None and enc["same_rows"] is not None:
        d = 100 * (enc["same_rows"] - llm["same_rows"])
        line = (f"The encoder trained on {metrics.get('annotated_rows', '?')} LLM labels scores "
                f"{_pct(enc['same_rows'])} vs the LLM's own {_pct(llm['same_rows'])} on the same "
                f"{llm['n_same']} test rows ({d:+.1f} points)")
        if llm["rows_per_s"] and enc["rows_per_s"]:
            line += (f", and labels at {enc['rows_per_s']:.1f} rows/s, {enc['rows_per_s'] / llm['rows_per_s']:.0f}x "
                     f"the LLM's {llm['rows_per_s']:.2f} rows/s")
        out.append(line + ".")
    if llm and enc and llm["cost_1k"] and enc["cost_1k"]:
        unit = "core" if llm["device"] == "cpu" else "device"
        line = (f"Per 1,000 rows the encoder costs {enc['cost_1k']:.1f} {unit}-seconds, the LLM {llm['cost_1k']:.1f} "
                f"({llm['cost_1k'] / enc['cost_1k']:.0f}x)")
        all_in = (speed.get("encoder_all_in") or {}).get("device_seconds_per_1k")
        if all_in:
            line += (f"; counting the LLM's labels for its training rows and its training too, the encoder's "
                     f"{speed['encoder']['rows']:,} corpus rows cost {all_in:.1f} {unit}-seconds per 1,000, "
                     f"{llm['cost_1k'] / all_in:.1f}x less than the LLM labelling them all")
        out.append(line + ".")
    gold, comb = rows.get("gold"), rows.get("combined")
    if gold and gold["all_test"] is not None:
        line = f"Trained on the gold labels of the same rows instead, the encoder scores {_pct(gold['all_test'])}"
        if enc and enc["all_test"] is not None:
            line += f" ({_pct(enc['all_test'])} on LLM labels)"
        if comb and comb["all_test"] is not None:
            line += (f"; on LLM labels first, then gold (combined), {_pct(comb['all_test'])} "
                     f"({100 * (comb['all_test'] - gold['all_test']):+.1f} points over gold alone)")
        out.append(line + f", on all {gold['n_all']} test rows.")
    return out


def story_text(metrics: dict[str, Any]) -> str:
    """Table, plain words and the aims, met or not: the end of `llambert run`'s output."""
    table = story_table(metrics)
    if not table:
        return ""
    aims = check_aims(metrics)
    return "\n".join([table, ""] + [f"- {x}" for x in story_sentences(metrics)] + ["", "Aims:"]
                     + [f"- {a['status']}: {a['aim']} ({a['measured']})" for a in aims])


def _plot_cost_accuracy(metrics: dict[str, Any], path: Path) -> bool:
    """Test accuracy (on the LLM's test rows when it has them) against cost per 1,000 rows, one point per
    labeller, plus the encoder's all-in cost (its training rows' LLM labels and its training included)."""
    import matplotlib.pyplot as plt

    rows = [r for r in story_rows(metrics) if r["cost_1k"]]
    acc_key = "same_rows" if any(r["same_rows"] is not None for r in rows if r["key"] != LLM_KEY) else "all_test"
    rows = [r for r in rows if r[acc_key] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    colors = {LLM_KEY: "#d98c3f", "llm": "#3f7fd9", "gold": "#555555", "combined": "#3fa34d"}
    for r in rows:
        ax.scatter(r["cost_1k"], 100 * r[acc_key], s=60, color=colors.get(r["key"], "#8c5fd9"), zorder=3)
        ax.annotate(r["labeller"] if r["key"] == LLM_KEY else f"[{r['key']}] {r['trained_on']}",
                    (r["cost_1k"], 100 * r[acc_key]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    all_in = ((metrics.get("speed") or {}).get("encoder_all_in") or {}).get("device_seconds_per_1k")
    enc = next((r for r in rows if r["key"] == "llm"), None)
    if all_in and enc:
        ax.scatter(all_in, 100 * enc[acc_key], s=60, facecolors="none", edgecolors="#3f7fd9", zorder=3)
        ax.annotate("[llm] all-in (+ its LLM labels, training)", (all_in, 100 * enc[acc_key]),
                    textcoords="offset points", xytext=(6, -10), fontsize=8)
        ax.plot([enc["cost_1k"], all_in], [100 * enc[acc_key]] * 2, color="#3f7fd9", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.margins(y=0.2)
    xs = [r["cost_1k"] for r in rows] + ([all_in] if all_in else [])
    ax.set_xlim(min(xs) / 2, max(xs) * 6)
    unit = "core" if all(r["device"] == "cpu" for r in rows) else "device"
    ax.set_xlabel(f"cost: {unit}-seconds per 1,000 rows labelled (log scale)")
    n = next((r["n_same"] for r in rows if r["key"] == LLM_KEY), None) if acc_key == "same_rows" else \
        next((r["n_all"] for r in rows if r["n_all"]), None)
    ax.set_ylabel(f"test accuracy (%), {n} rows" if n else "test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


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
    """Per stage: rows, seconds, the devices it reserved x seconds (a GPU stage names its GPU type), tokens, rows/s
    and USD at the hardware table's price (– where the device's price is unknown)."""
    lines = ["| stage | rows | seconds | device-seconds | prompt tokens | rows/s | USD |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, st in manifest.get("stages", {}).items():
        rows, secs = st.get("rows") or 0, st.get("seconds") or 0
        device = st.get("device", "cpu") + (f" {st['gpu_type']}" if st.get("gpu_type") else "")
        usd = _num(st.get("usd"), ".4f")
        lines.append(f"| {name} | {rows} | {secs:.1f} | {st.get('device_seconds', 0):.1f} ({device}) | "
                     f"{st.get('tokens', 0) or '–'} | {rows / secs if secs else 0:.1f} | {usd} |")
    return "\n".join(lines)


def label_issue_section(summary: dict[str, Any], issues: pd.DataFrame, top: int = 15) -> list[str]:
    md = ["## Label issues", "",
          f"{summary['flagged']} of {summary['annotated']} LLM labels ({_pct(summary['flagged_share'])}) are "
          f"contradicted with confidence by the trained classifier (confident-learning thresholds per class; "
          f"all in `label_issues.parquet`, most doubtful first)."]
    if summary.get("flag_precision") is not None:
        md.append(f"Against gold: {_pct(summary['flag_precision'])} of the flagged labels are wrong, vs "
                  f"{_pct(summary['llm_error_rate'])} of all LLM labels"
                  + (": **no better than chance** — here a flag is not evidence of an LLM error; do not drop or "
                     "relabel on these flags (train.label_issues: keep)." if summary.get("flags_informative") is False
                     else "."))
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
    run_dir = Path(run_dir)
    active = _active_rounds(manifest)
    images = _write_plots(run_dir / "plots", metrics, annotations, active)
    md = [f"# llambert-ray report: {manifest.get('name', run_dir.name)}", "",
          f"Task `{metrics.get('task')}`; LLM `{metrics.get('llm_model')}`; encoder `{metrics.get('encoder')}`; "
          f"config hash `{manifest.get('config_hash')}`.", ""]
    md += _comparison_section(metrics, images)
    md += ["## Headline", "", headline_table(metrics), ""]
    llm = metrics.get("llm") or {}
    if llm:
        md += ["## LLM labels", "",
               f"{llm.get('rows', 0)} annotated rows with gold labels; accuracy {_pct(llm.get('accuracy'))}, "
               f"dropped (unparseable) {_pct(llm.get('dropped'))}.", ""]
    if metrics.get("llm_warnings"):  # metrics.llm_label_warnings: read before trusting the encoders below
        md += ["**Are these labels worth training on?** Not as they are:", ""]
        md += [f"- {w}" for w in metrics["llm_warnings"]] + [""]
    md += _per_class_section(metrics) + ["", "## Cost", "", cost_table(manifest), ""]
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


def _write_plots(plots: Path, metrics: dict[str, Any], annotations: pd.DataFrame | None,
                 active: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The report's plots; returns (title, path relative to the run folder) of each one drawn."""
    import matplotlib

    matplotlib.use("Agg")
    plots.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str]] = []
    rows = headline_rows(metrics)
    if _plot_cost_accuracy(metrics, plots / "cost_accuracy.png"):
        images.append(("Test accuracy against cost per 1,000 rows", "plots/cost_accuracy.png"))
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
    if active and any(r.get("probe_accuracy") is not None for r in active["rounds"]):
        from llambert_ray.active import plot_curves

        plot_curves([{**active, "name": "active selection (probe on embeddings)"}], plots / "active_selection.png")
        images.append(("Active selection: accuracy vs LLM calls", "plots/active_selection.png"))
    return images


def _comparison_section(metrics: dict[str, Any], images: list[tuple[str, str]]) -> list[str]:
    """The LLM against the encoder: accuracy, speed and cost, the story and the aims (empty without them)."""
    table = story_table(metrics)
    if not table:
        return []
    md = ["## The comparison", "",
          "Accuracy against gold labels; speed and cost as measured in this run: the LLM's annotate call "
          "(its rows and test rows together, engine start included) and the encoder labelling the whole "
          "corpus (actor start included). Cost per 1,000 rows = wall seconds x the CPU cores (or GPUs) the "
          "stage computed on, per 1,000 rows; USD at the hardware table's price. Every encoder variant is the "
          "same model, so it labels at the same speed.", "", table, ""]
    md += [f"- {x}" for x in story_sentences(metrics)] + ["", "### Aims", "",
                                                          "| aim | verdict | measured |", "|---|---|---|"]
    md += [f"| {a['aim']} | **{a['status']}** | {a['measured']} |" for a in check_aims(metrics)] + [""]
    if any(t == "Test accuracy against cost per 1,000 rows" for t, _ in images):
        md += ["![Test accuracy against cost per 1,000 rows](plots/cost_accuracy.png)", ""]
    return md


def _per_class_section(metrics: dict[str, Any]) -> list[str]:
    md = ["## Per-class metrics", "", "| labeller | class | precision | recall | F1 | support |",
          "|---|---|---:|---:|---:|---:|"]
    encoder = metrics.get("encoder", "encoder")
    named = [(f"LLM {metrics.get('llm_model', '')}".strip(), metrics.get("llm") or {})]
    named += [(f"{encoder} [{v}]", m) for v, m in (metrics.get("variants") or {}).items()]
    for name, m in named:
        for lab, c in (m.get("per_class") or {}).items():
            md.append(f"| {name} | {lab} | {_pct(c['precision'])} | {_pct(c['recall'])} | "
                      f"{_pct(c['f1'])} | {c['support']} |")
    return md


def _to_html(md: str, title: str) -> str:
    """The Markdown report as self-contained HTML (markdown-it-py, CommonMark with tables; raw HTML escaped)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}</style>\n" + body)
