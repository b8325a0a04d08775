"""Accuracy, drop rate and speed of the annotation modes and prompt styles, side by side in one run.

Reads IMDb test reviews from ../shared/data/imdb (seeded sample), runs each variant through the real vLLM
engine on a local Ray, and writes bench/results/annotate_modes.json plus a Markdown table.

    python -m bench.annotate_modes --rows 500 --variants all
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llambert_ray.annotate import annotate
from llambert_ray.config import AnnotateConfig, CorpusConfig
from llambert_ray.data import read_corpus, sample_corpus
from llambert_ray.ray_env import init_ray
from llambert_ray.tasks import load_task

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb" / "imdb_labeled.parquet"
VARIANTS = {
    "generate-chat-0": dict(mode="generate", prompt_style="chat", shots=0),
    "choice-chat-0": dict(mode="choice", prompt_style="chat", shots=0, max_new_tokens=3),
    "score-chat-0": dict(mode="score", prompt_style="chat", shots=0),
    "score-chat-2": dict(mode="score", prompt_style="chat", shots=2),
    "score-completion-0": dict(mode="score", prompt_style="completion", shots=0),
    "score-completion-2": dict(mode="score", prompt_style="completion", shots=2),
    "score-completion-4": dict(mode="score", prompt_style="completion", shots=4),
    "score-completion-2-calibrated": dict(mode="score", prompt_style="completion", shots=2,
                                          calibration="content-free"),
    "generate-completion-2": dict(mode="generate", prompt_style="completion", shots=2, max_new_tokens=3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="all", help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--out", default="bench/results/annotate_modes.json")
    args = ap.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    init_ray(None, num_cpus=2)
    task = load_task("imdb-sentiment")
    ds, _ = read_corpus(CorpusConfig(path=str(IMDB), id_column="source_path", filters={"split": ["test"]}), task)
    subset = sample_corpus(ds, CorpusConfig(sample=args.rows, seed=args.seed)).materialize()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in names:
        t0 = time.time()
        df, s = annotate(subset, task, AnnotateConfig(**VARIANTS[name]))
        gold = df["label"]
        labelled = df["llm_label"].notna()
        results[name] = {
            **VARIANTS[name], "rows": len(df),
            "accuracy": float((df["llm_label"] == gold).fillna(False).astype(bool).mean()),
            "accuracy_on_labelled": float((df["llm_label"] == gold)[labelled].mean()) if labelled.any() else None,
            "drop_rate": float(1 - labelled.mean()), "rows_per_s": s.rows_per_s,
            "prompt_tokens_per_s": s.prompt_tokens_per_s, "seconds_incl_engine_start": time.time() - t0,
            "positive_share": float((df["llm_label"] == "positive").fillna(False).astype(bool).mean()),
        }
        print(name, json.dumps(results[name]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    lines = ["| variant | accuracy | drop rate | rows/s | prompt tok/s | positive share |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['accuracy']:.1%} | {r['drop_rate']:.1%} | {r['rows_per_s']:.2f} | "
                     f"{r['prompt_tokens_per_s']:.0f} | {r['positive_share']:.1%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
