"""#17 measured: better LLM labels from a handful of gold labels (SmolLM2-135M through the real vLLM engine, CPU).

    python -m bench.label_quality [--domains imdb,mesh] [--gold 100] [--imdb-rows 500] [--mesh-rows 1000]

Per domain: test rows (IMDb: 500 test reviews; MeSH anatomy: 1,000 test terms) and `--gold` gold-labelled train rows
(a seeded sample; never test rows). Each row is scored twice in ONE engine call per domain: with the task's fixed
few-shot examples, and with gold-knn examples (its nearest gold rows by MiniLM embeddings, balanced across labels);
the gold rows are scored the same way (a gold row's knn examples never include itself). Then, post hoc on the same
scores: no calibration, prior (offsets matching the label shares of the gold rows) and gold (offsets fitted to the
gold rows' scores, annotate.apply_gold_calibration). Label issues: evaluate.cv_label_issues (5-fold probe on frozen
MiniLM embeddings + cleanlab) on each setting's test-row LLM labels; flag precision = the share of flagged rows whose
LLM label is wrong, against the LLM's error rate (the chance a random LLM label is wrong).
Writes bench/results/label_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from llambert_ray.active import embed_rows
from llambert_ray.annotate import (
    SHOTS_COLUMN,
    annotate,
    apply_gold_calibration,
    apply_prior_calibration,
    resolved_shots,
)
from llambert_ray.config import AnnotateConfig, CorpusConfig
from llambert_ray.data import read_corpus, sample_corpus
from llambert_ray.evaluate import classification_metrics, cv_label_issues, label_issue_summary
from llambert_ray.gold import attach_gold_shots, gold_rows
from llambert_ray.ray_env import init_ray
from llambert_ray.tasks import load_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path("bench/results")
DOMAINS = {
    "imdb": {"task": "imdb-sentiment", "path": DATA / "imdb" / "imdb_labeled.parquet", "id": "source_path",
             # head_tail 1,000 characters: 83.5 % with fixed shots at 2.5 rows/s (bench/results/bench.md)
             "annotate": {"max_text_chars": 1000, "truncate": "head_tail"}},
    "mesh": {"task": "mesh-anatomy", "path": DATA / "mesh_anatomy" / "mesh2017_anatomy.parquet", "id": "mesh_ui",
             "annotate": {}},
}


def _rows(path: Path, id_col: str, split: str, task, sample: int | None, seed: int = 0) -> pd.DataFrame:
    cfg = CorpusConfig(path=str(path), id_column=id_col, filters={"split": [split]}, sample=sample, seed=seed)
    ds, _ = read_corpus(cfg, task)
    return sample_corpus(ds, cfg).to_pandas().sort_values("id").reset_index(drop=True)


def _quality(df: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    m = classification_metrics(df["label"], df["llm_label"], labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            **{f"share_{lab}": float((df["llm_label"] == lab).mean()) for lab in labels}}


def run_domain(name: str, a) -> dict:
    spec = DOMAINS[name]
    task = load_task(spec["task"])
    labels = task.labels
    n_test = a.imdb_rows if name == "imdb" else a.mesh_rows
    t0 = time.time()
    test = _rows(spec["path"], spec["id"], "test", task, n_test)
    train = _rows(spec["path"], spec["id"], "train", task, None)
    gold = gold_rows(train, a.gold, seed=0, exclude=set(test["id"]))
    embed = embed_rows("minilm-l6")
    x_gold, x_test = embed(gold), embed(test)
    cfg = AnnotateConfig(**spec["annotate"], batch_size=16)
    shots = resolved_shots(task, cfg)
    fixed_shots = json.dumps([e.model_dump() for e in task.pick_examples(shots)])
    # every row twice, in one engine call: its fixed examples spelled out per row, or its gold-knn ones
    knn_test = attach_gold_shots(test, gold, shots, labels, embed, x_gold, x_test)
    knn_gold = attach_gold_shots(gold, gold, shots, labels, embed, x_gold, x_gold)
    parts = []
    for setting, t_rows, g_rows in (("fixed", test.assign(**{SHOTS_COLUMN: fixed_shots}),
                                     gold.assign(**{SHOTS_COLUMN: fixed_shots})),
                                    ("gold-knn", knn_test, knn_gold)):
        for kind, rows in (("test", t_rows), ("gold", g_rows)):
            parts.append(rows.assign(id=f"{setting}|{kind}|" + rows["id"].astype(str)))
    both = pd.concat(parts, ignore_index=True)
    prep_s = time.time() - t0
    import ray

    t1 = time.time()
    df, s = annotate(ray.data.from_pandas(both), task, cfg, cache_dir=OUT / "label_quality_cache")
    llm_s = time.time() - t1
    print("\n".join(s.lines()), flush=True)
    res: dict = {"task": task.name, "test_rows": len(test), "gold_rows": len(gold), "shots": shots,
                 "annotate": spec["annotate"], "prep_s": round(prep_s, 1), "llm_s": round(llm_s, 1),
                 "llm_rows": len(both), "prompt_tokens": s.prompt_tokens, "settings": {}}
    setting_of = df["id"].str.split("|", n=2)
    df["setting"], df["kind"], df["id"] = setting_of.str[0], setting_of.str[1], setting_of.str[2]
    gold_share = gold["label"].value_counts(normalize=True).reindex(labels).fillna(1e-3).to_dict()
    for setting in ("fixed", "gold-knn"):
        t = df[(df["setting"] == setting) & (df["kind"] == "test")].drop(columns=["setting", "kind"])
        answered = test["id"].isin(set(t["id"])).to_numpy()  # all rows, unless read back from a cut-short run
        t = t.set_index("id").loc[test["id"][answered]].reset_index()
        g = df[(df["setting"] == setting) & (df["kind"] == "gold")].drop(columns=["setting", "kind"])
        out = {"none": {**_quality(t, labels), "gold_rows_accuracy": _quality(g, labels)["accuracy"]}}
        prior_df, prior_off = apply_prior_calibration(t.copy(), labels, gold_share)
        out["prior"] = {**_quality(prior_df, labels), "offsets": prior_off}
        gold_df, gold_off, report = apply_gold_calibration(t.copy(), g, labels)
        out["gold"] = {**_quality(gold_df, labels), "offsets": gold_off, "held_out_gold": report}
        for cal, frame in (("none", t), ("prior", prior_df), ("gold", gold_df)):
            issues = cv_label_issues(frame, x_test[answered], labels, folds=5)
            summ = label_issue_summary(issues, frame)
            summ["flag_vs_random"] = (summ["flag_precision"] / summ["llm_error_rate"]
                                      if summ.get("flag_precision") is not None and summ["llm_error_rate"] else None)
            out[cal]["label_issues"] = summ
        res["settings"][setting] = out
    return res


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def markdown(results: dict, args: dict) -> str:
    lines = ["# LLM labels from a handful of gold labels (`python -m bench.label_quality`)", "",
             f"SmolLM2-135M-Instruct (score mode, completion prompt) through the real vLLM engine on 2 CPU cores; "
             f"{args['gold']} gold-labelled train rows available. Calibrations are post hoc on the same scores. "
             "Label issues: 5-fold probe (MiniLM embeddings) + cleanlab on the test rows' LLM labels; "
             "'x random' = flag precision / the LLM's error rate.", ""]
    for name, r in results.items():
        lines += [f"## {name} ({r['test_rows']} test rows, {r['gold_rows']} gold rows, {r['shots']} shots; "
                  f"LLM {r['llm_rows']} rows in {r['llm_s']:.0f} s)", "",
                  "| shots | calibration | accuracy | macro F1 | flagged | flag precision | LLM error rate | "
                  "x random |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for setting, cals in r["settings"].items():
            for cal, m in cals.items():
                li = m["label_issues"]
                xr = f"{li['flag_vs_random']:.2f}" if li.get("flag_vs_random") is not None else ""
                lines.append(f"| {setting} | {cal} | {_pct(m['accuracy'])} | {_pct(m['macro_f1'])} | "
                             f"{li['flagged']} | {_pct(li.get('flag_precision'))} | {_pct(li.get('llm_error_rate'))} "
                             f"| {xr} |")
        for setting, cals in r["settings"].items():
            rep = cals["gold"].get("held_out_gold")
            if rep:
                lines.append(f"\n{setting}, gold calibration on held-out gold rows (offsets fitted on the other "
                             f"half): accuracy {_pct(rep['before']['accuracy'])} -> {_pct(rep['after']['accuracy'])}"
                             f", macro F1 {_pct(rep['before']['macro_f1'])} -> {_pct(rep['after']['macro_f1'])} "
                             f"({rep['held_out']} rows).")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--domains", default="imdb,mesh")
    p.add_argument("--gold", type=int, default=100)
    p.add_argument("--imdb-rows", type=int, default=500)
    p.add_argument("--mesh-rows", type=int, default=1000)
    p.add_argument("--out", default="label_quality")
    a = p.parse_args()
    init_ray(None, num_cpus=2)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{a.out}.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}
    for name in a.domains.split(","):
        results[name] = run_domain(name, a)
        doc = {"args": vars(a), "results": results}
        path.write_text(json.dumps(doc, indent=2))
        (OUT / f"{a.out}.md").write_text(markdown(results, vars(a)))
        print(markdown({name: results[name]}, vars(a)), flush=True)


if __name__ == "__main__":
    main()
