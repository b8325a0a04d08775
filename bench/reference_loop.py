"""The #3 reference, rerun on the pipeline's own rows: a plain single-process PyTorch loop (no Ray, no DeepSpeed).

MiniLM-L6, 2 epochs, AdamW lr 5e-5 (constant), batch 16, max length 256 - the loop the issue measured its 86.4 %
(gold) and 83.1 % (SmolLM2 labels) with, on another 1,000 test reviews. Here it trains on exactly the 1,000
reviews a pipeline run annotated (its `annotations.parquet`: gold `label` and `llm_label`) and scores exactly that
run's 2,000 test reviews (`test_predictions.parquet` ids), so a difference to the pipeline is the pipeline's and a
difference to 86.4 % is the test set's.

    python -m bench.reference_loop --run bench/results/imdb-cpu-1w [--labels gold,llm] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llambert_ray.tasks import load_task

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb"
TASK = load_task("imdb-sentiment")  # its labels, and its map from IMDb's 1 / 0 to them
LABELS = TASK.labels


def run_once(train_texts: list[str], train_y: list[str], test_texts: list[str], test_y: list[str], *, seed: int,
             epochs: int = 2, lr: float = 5e-5, batch: int = 16, max_length: int = 256) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.models import resolve_model

    torch.manual_seed(seed)
    path = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    y = torch.tensor([LABELS.index(v) for v in train_y])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(train_texts))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            enc = tok([train_texts[j] for j in idx], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            loss = model(**enc, labels=y[idx]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    train_s = time.perf_counter() - t0
    model.eval()
    pred: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(test_texts), 64):
            enc = tok(test_texts[i:i + 64], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            pred += model(**enc).logits.argmax(-1).tolist()
    gold = np.array([LABELS.index(v) for v in test_y])
    return {"seed": seed, "accuracy": float((np.array(pred) == gold).mean()), "train_s": train_s,
            "train_samples_per_s": epochs * len(train_texts) / train_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a bench/imdb_pipeline run folder")
    ap.add_argument("--labels", default="gold,llm", help="gold, llm or both (comma-separated)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="bench/results/reference_loop.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    run = Path(a.run)
    ann = pd.read_parquet(run / "annotations.parquet")
    test_ids = pd.read_parquet(run / "test_predictions.parquet", columns=["id"]).id.unique()
    imdb = pd.read_parquet(IMDB / "imdb_labeled.parquet").set_index("source_path")
    test = imdb.loc[test_ids]
    result = {"run": str(run), "train_rows": len(ann), "test_rows": len(test),
              "llm_label_accuracy": float((ann.llm_label == ann.label.map(TASK.gold_label)).mean()), "runs": []}
    for labels in a.labels.split(","):
        col = "label" if labels == "gold" else "llm_label"
        rows = ann[ann[col].notna()]
        for seed in [int(s) for s in a.seeds.split(",")]:
            r = run_once(rows.text.tolist(), rows[col].map(TASK.gold_label).tolist(), test.text.tolist(),
                         test.label.map(TASK.gold_label).tolist(), seed=seed)
            r["labels"] = labels
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
            Path(a.out).write_text(json.dumps(result, indent=2))
    pipeline = json.loads((run / "metrics.json").read_text())["variants"]
    result["pipeline"] = {k: v["accuracy"] for k, v in pipeline.items()}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
