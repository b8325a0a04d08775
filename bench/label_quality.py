"""#17 measured: better LLM labels from a handful of gold labels (SmolLM2-135M through the real vLLM engine, CPU).

    python -m bench.label_quality [--domains imdb,mesh] [--gold 100,1000] [--calib-rows 200]
                                  [--phases llm,encoders] [--finetune imdb-100]

Per domain and gold size: test rows (IMDb: 500 test reviews; MeSH anatomy: 1,000 test terms) and `--gold`
gold-labelled train rows (a seeded sample; never test rows). llm phase: each test row is scored twice in ONE engine
call per domain and gold size: with the task's fixed few-shot examples, and with gold-knn examples (its nearest
gold rows by MiniLM embeddings, balanced across labels); `--calib-rows` of the gold rows (all of a small gold set)
are scored the same way, first (a gold row's knn examples never include itself). Then, post hoc on the same scores:
no calibration, prior (offsets matching the label shares of the gold rows) and gold (offsets fitted to the gold
rows' scores, annotate.apply_gold_calibration). Label issues: screening.cv_label_issues (5-fold probe on frozen
MiniLM embeddings + cleanlab) on each setting's test-row LLM labels; flag precision = the share of flagged rows
whose LLM label is wrong, against the LLM's error rate (the chance a random LLM label is wrong).
encoders phase (encoder_domain): an encoder trained on each label set, scored on held-out gold.
Answers are cached (bench/results/label_quality_cache/), so a rerun only recomputes. Writes
bench/results/label_quality.{json,md}; reads development data from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from llambert_ray.annotate import (
    SHOTS_COLUMN,
    annotate,
    apply_gold_calibration,
    apply_prior_calibration,
    resolved_shots,
)
from llambert_ray.annotate.gold import attach_gold_shots, gold_rows
from llambert_ray.config import AnnotateConfig, CorpusConfig
from llambert_ray.data import read_corpus, sample_corpus
from llambert_ray.embeddings import embed_rows
from llambert_ray.metrics import classification_metrics
from llambert_ray.ray_env import init_ray
from llambert_ray.screening import cv_label_issues, label_issue_summary
from llambert_ray.tasks import load_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path("bench/results")
TMP = OUT / "bench_tmp" / "label_quality"
DOMAINS = {
    "imdb": {"task": "imdb-sentiment", "path": DATA / "imdb" / "imdb_labeled.parquet", "id": "source_path",
             # head_tail 1,000 characters: 83.5 % with fixed shots at 2.5 rows/s (bench/results/bench.md)
             "annotate": {"max_text_chars": 1000, "truncate": "head_tail"},
             "encoder": {"max_length": 128, "epochs": 6}},  # 2 epochs on 240 rows learnt one label
    "mesh": {"task": "mesh-anatomy", "path": DATA / "mesh_anatomy" / "mesh2017_anatomy.parquet", "id": "mesh_ui",
             "annotate": {}, "encoder": {"max_length": 32, "epochs": 10}},  # 6 % yes: 3 learnt only "no"
}


def _rows(path: Path, id_col: str, split: str, task, sample: int | None, seed: int = 0) -> pd.DataFrame:
    cfg = CorpusConfig(path=str(path), id_column=id_col, filters={"split": [split]}, sample=sample, seed=seed)
    ds, _ = read_corpus(cfg, task)
    return sample_corpus(ds, cfg).to_pandas().sort_values("id").reset_index(drop=True)


def _quality(df: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    m = classification_metrics(df["label"], df["llm_label"], labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            **{f"share_{lab}": float((df["llm_label"] == lab).mean()) for lab in labels}}


def _settings(df: pd.DataFrame, test: pd.DataFrame, gold: pd.DataFrame, x_test, labels: list[str]
              ) -> tuple[dict, dict[str, pd.Series]]:
    """Per shots setting (fixed, gold-knn) and calibration (none, prior, gold): the LLM's label quality on the test
    rows and the label-issue flags' precision; and each setting's labels of the test rows."""
    setting_of = df["id"].str.split("|", n=2)
    df["setting"], df["kind"], df["id"] = setting_of.str[0], setting_of.str[1], setting_of.str[2]
    gold_share = gold["label"].value_counts(normalize=True).reindex(labels).fillna(1e-3).to_dict()
    labelled: dict[str, pd.Series] = {}
    settings: dict = {}
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
            labelled[f"{setting}/{cal}"] = frame.set_index("id")["llm_label"]
            issues = cv_label_issues(frame, x_test[answered], labels, folds=5)
            summ = label_issue_summary(issues, frame)
            summ["flag_vs_random"] = (summ["flag_precision"] / summ["llm_error_rate"]
                                      if summ.get("flag_precision") is not None and summ["llm_error_rate"] else None)
            out[cal]["label_issues"] = summ
        settings[setting] = out
    return settings, labelled


def run_domain(name: str, n_gold: int, a) -> dict:
    spec = DOMAINS[name]
    task = load_task(spec["task"])
    labels = task.labels
    n_test = a.imdb_rows if name == "imdb" else a.mesh_rows
    t0 = time.time()
    test = _rows(spec["path"], spec["id"], "test", task, n_test)
    train = _rows(spec["path"], spec["id"], "train", task, None)
    gold = gold_rows(train, n_gold, seed=0, exclude=set(test["id"]))
    embed = embed_rows("minilm-l6")
    x_gold, x_test = embed(gold), embed(test)
    # the gold rows the LLM scores for calibration gold: all of a small gold set, a seeded sample of a large one
    # (offsets per label need a few hundred scores, not a thousand); retrieval draws on every gold row
    calib = gold.sample(min(a.calib_rows, len(gold)), random_state=0).sort_values("id").reset_index(drop=True)
    x_calib = x_gold[gold["id"].isin(set(calib["id"])).to_numpy()]  # both sorted by id
    cfg = AnnotateConfig(**spec["annotate"], batch_size=16)
    shots = resolved_shots(task, cfg)
    fixed_shots = json.dumps([e.model_dump() for e in task.pick_examples(shots)])
    # every row twice, in one engine call: its fixed examples spelled out per row, or its gold-knn ones
    knn_test = attach_gold_shots(test, gold, shots, labels, embed, x_gold, x_test)
    knn_calib = attach_gold_shots(calib, gold, shots, labels, embed, x_gold, x_calib)
    parts = []
    # the calibration gold rows first: a run cut short still has what calibration gold is fitted on
    for kind in ("gold", "test"):
        for setting, rows in (("fixed", (calib if kind == "gold" else test).assign(**{SHOTS_COLUMN: fixed_shots})),
                              ("gold-knn", knn_calib if kind == "gold" else knn_test)):
            parts.append(rows.assign(id=f"{setting}|{kind}|" + rows["id"].astype(str)))
    both = pd.concat(parts, ignore_index=True)
    prep_s = time.time() - t0
    import ray

    t1 = time.time()
    df, s = annotate(ray.data.from_pandas(both), task, cfg, cache_dir=OUT / "label_quality_cache")
    llm_s = time.time() - t1
    print("\n".join(s.lines()), flush=True)
    res: dict = {"domain": name, "task": task.name, "test_rows": len(test), "gold_rows": len(gold),
                 "calib_rows": len(calib), "shots": shots,
                 "annotate": spec["annotate"], "prep_s": round(prep_s, 1), "llm_s": round(llm_s, 1),
                 "llm_rows": len(both), "prompt_tokens": s.prompt_tokens, "settings": {}}
    res["settings"], labelled = _settings(df, test, gold, x_test, labels)
    # what the encoders are trained on (bench.label_quality --encoders): the test rows with each label set
    rows = test[["id", "text", "label"]].set_index("id")
    for key, lab in labelled.items():
        rows[f"llm:{key}"] = lab
    TMP.mkdir(parents=True, exist_ok=True)
    rows.reset_index().to_parquet(TMP / f"{name}-{n_gold}-test.parquet")
    gold[["id", "text", "label"]].to_parquet(TMP / f"{name}-{n_gold}-gold.parquet")
    return res


# ------------------------------------------------------------------------------------------ encoders per label set
def _fit_cached(train: pd.DataFrame, labels: list[str], cfg, init: Path | None = None) -> Path:
    """MiniLM fine-tuned by llambert_ray.train.fit (Ray Train) on rows (text, label); a model trained on the same
    rows (and start) before is reused."""
    import hashlib

    from llambert_ray.train import fit

    key = hashlib.sha256(json.dumps([train["text"].tolist(), train["label"].tolist(), str(init),
                                     cfg.model_dump()]).encode()).hexdigest()[:16]
    out = (TMP / "models" / key).resolve()
    if not (out / "model" / "config.json").exists():
        fit(train[["text", "label"]].reset_index(drop=True), labels, cfg, out, init_model=str(init) if init else None,
            name=f"lq-{key}")
    return out / "model"


def _fine_tuned(out: dict, sets: dict, gold: pd.DataFrame, b_rows: pd.DataFrame, labels: list[str], enc: dict,
                score, what: str) -> None:
    """MiniLM fine-tuned (llambert_ray.train.fit) on a few of the label sets, and `combined` (the gold-knn/gold
    model, then gold); each scored on half B's gold into out[label set]["fine_tuned"]."""
    import numpy as np

    from llambert_ray.config import TrainConfig
    from llambert_ray.label import Classifier

    out["combined: gold-knn/gold, then gold"] = {"train_rows": len(sets["gold-knn/gold"]) + len(gold),
                                                 "train_label_accuracy": None}
    cfg = TrainConfig(epochs=enc["epochs"], max_length=enc["max_length"], batch_size=16, learning_rate=1e-4,
                      cpus_per_worker=1.5)
    models: dict[str, Path] = {}
    for label_set, (rows, then) in {"gold": (gold, None), "fixed/none": (sets["fixed/none"], None),
                                    "gold-knn/gold": (sets["gold-knn/gold"], None),
                                    "combined: gold-knn/gold, then gold": (gold, "gold-knn/gold")}.items():
        t0 = time.time()
        models[label_set] = _fit_cached(rows, labels, cfg, init=models[then] if then else None)
        clf = Classifier(str(models[label_set]), max_length=enc["max_length"], threads=2)
        out[label_set]["fine_tuned"] = {
            **score(np.array(clf.labels)[clf.predict_proba(b_rows["text"].tolist()).argmax(1)]),
            "seconds": round(time.time() - t0, 1)}
        print(f"{what}, MiniLM fine-tuned on {label_set}: {out[label_set]['fine_tuned']}", flush=True)


def encoder_domain(name: str, n_gold: int, a) -> dict:
    """Encoders trained on each label set, scored on held-out gold. The test rows (with run_domain's LLM labels)
    are split in half by a seeded draw: an encoder trains on half A's labels of a set and is scored on half B's
    gold labels (which no set trains on). `gold` trains on the gold rows alone; `combined` continues from the
    gold-knn/gold model on the gold rows (the paper's LLM-labelled data, then gold).

    Two encoders: the probe (embeddings.Probe: softmax regression on frozen MiniLM embeddings, seconds) for every set,
    and MiniLM fine-tuned by llambert_ray.train.fit (Ray Train, minutes per set on 2 cores) where --finetune
    names this domain and gold size."""
    import numpy as np

    from llambert_ray.embeddings import Probe

    spec = DOMAINS[name]
    labels = load_task(spec["task"]).labels
    test = pd.read_parquet(TMP / f"{name}-{n_gold}-test.parquet")
    gold = pd.read_parquet(TMP / f"{name}-{n_gold}-gold.parquet")
    half = np.random.default_rng(0).permutation(len(test)) < len(test) // 2
    a_rows, b_rows = test[half].reset_index(drop=True), test[~half].reset_index(drop=True)
    enc = spec["encoder"]
    embed = embed_rows("minilm-l6", enc["max_length"])
    x = dict(zip(test["id"], embed(test), strict=True)) | dict(zip(gold["id"], embed(gold), strict=True))

    def llm(key: str) -> pd.DataFrame:
        out = a_rows[["id", "text"]].assign(label=a_rows[f"llm:{key}"], truth=a_rows["label"])
        return out[out["label"].isin(labels)].reset_index(drop=True)  # truth: to report the labels' accuracy

    flagged = cv_label_issues(a_rows.assign(llm_label=a_rows["llm:gold-knn/gold"]),
                              np.stack([x[i] for i in a_rows["id"]]), labels, folds=5)
    sets = {"gold": gold, "fixed/none": llm("fixed/none"), "gold-knn/none": llm("gold-knn/none"),
            "gold-knn/gold": llm("gold-knn/gold")}
    sets["gold-knn/gold, flags dropped"] = sets["gold-knn/gold"].pipe(lambda d: d[~d["id"].isin(set(flagged["id"]))])
    x_b = np.stack([x[i] for i in b_rows["id"]])
    index = {lab: i for i, lab in enumerate(labels)}

    def score(pred) -> dict:
        m = classification_metrics(b_rows["label"], pd.Series(pred), labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    res: dict = {"train_rows_a": len(a_rows), "eval_rows_b": len(b_rows), "epochs": enc["epochs"],
                 "max_length": enc["max_length"], "sets": {}}
    for label_set, rows in sets.items():
        y = rows["label"].map(index).to_numpy()
        if len(set(y)) > 1:
            pred = np.array(labels)[Probe.fit(np.stack([x[i] for i in rows["id"]]), y, len(labels)).proba(x_b)
                                    .argmax(1)]
        else:  # one label only (e.g. calibration gold's all-"no" on MeSH): that label is all it can learn
            pred = np.array([labels[y[0]]] * len(b_rows))
        res["sets"][label_set] = {"train_rows": len(rows),
                                  "train_label_accuracy": float((rows["label"] == rows["truth"]).mean())
                                  if "truth" in rows else None,
                                  "probe": score(pred)}
    if f"{name}-{n_gold}" in a.finetune.split(","):
        _fine_tuned(res["sets"], sets, gold, b_rows, labels, enc, score, f"{name} {n_gold} gold")
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
        enc = r.get("encoders")
        if enc:
            lines += ["", f"Encoders trained on each label set: half A of the test rows ({enc['train_rows_a']}) "
                      f"with that set's labels (or the gold rows), scored on half B ({enc['eval_rows_b']}) against "
                      "gold. Probe = softmax regression on frozen MiniLM embeddings; fine-tuned = MiniLM-L6 by "
                      f"train.fit ({enc['epochs']} epochs, {enc['max_length']} tokens).", "",
                      "| trained on | rows | their labels' accuracy | probe accuracy | probe macro F1 | fine-tuned "
                      "accuracy | fine-tuned macro F1 |", "|---|---:|---:|---:|---:|---:|---:|"]
            for label_set, m in enc["sets"].items():
                pr, ft = m.get("probe") or {}, m.get("fine_tuned") or {}
                lines.append(f"| {label_set} | {m['train_rows']} | {_pct(m['train_label_accuracy'])} | "
                             f"{_pct(pr.get('accuracy'))} | {_pct(pr.get('macro_f1'))} | "
                             f"{_pct(ft.get('accuracy'))} | {_pct(ft.get('macro_f1'))} |")
        for setting, cals in r["settings"].items():
            rep = cals["gold"].get("held_out_gold")
            if rep:
                lines.append(f"\n{setting}, gold calibration on held-out gold rows (offsets fitted on the other "
                             f"half): accuracy {_pct(rep['before']['accuracy'])} -> {_pct(rep['after']['accuracy'])}"
                             f", macro F1 {_pct(rep['before']['macro_f1'])} -> {_pct(rep['after']['macro_f1'])} "
                             f"({rep['held_out']} rows).")
        lines.append("")
    return "\n".join(lines)


def _read(path: Path) -> dict:
    old = json.loads(path.read_text()) if path.exists() else {}
    return {} if old.get("partial") else old.get("results", {})  # the partial MeSH run is replaced


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--domains", default="imdb,mesh")
    p.add_argument("--gold", default="100,1000", help="gold-labelled rows available, one run per size")
    p.add_argument("--calib-rows", type=int, default=200, help="gold rows the LLM scores for calibration gold")
    p.add_argument("--imdb-rows", type=int, default=500)
    p.add_argument("--mesh-rows", type=int, default=1000)
    p.add_argument("--out", default="label_quality")
    p.add_argument("--phases", default="llm,encoders",
                   help="llm: the LLM's labels (one engine call per domain and gold size); encoders: MiniLM trained "
                        "on each label set (needs the llm phase's rows, kept under bench/results/bench_tmp/)")
    p.add_argument("--finetune", default="imdb-100",
                   help="DOMAIN-GOLD pairs whose encoders are also fine-tuned (train.fit), not only probes")
    a = p.parse_args()
    init_ray(None, num_cpus=2)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{a.out}.json"
    results = _read(path)
    for name in a.domains.split(","):
        for n_gold in (int(g) for g in str(a.gold).split(",")):
            key = f"{name}, {n_gold} gold"
            if "llm" in a.phases:
                results[key] = run_domain(name, n_gold, a)
            if "encoders" in a.phases:
                results[key]["encoders"] = encoder_domain(name, n_gold, a)
            mine = results[key]
            results = _read(path)  # as it is now (another domain's run may have written it), with this key's
            results[key] = mine
            doc = {"args": vars(a), "results": results}
            path.write_text(json.dumps(doc, indent=2))
            (OUT / f"{a.out}.md").write_text(markdown(results, vars(a)))
            print(markdown({key: results[key]}, vars(a)), flush=True)


if __name__ == "__main__":
    main()
