"""GPU check of the training and labelling paths: Ray Train + DeepSpeed (bf16, ZeRO-2/3, NCCL) and the Ray Data
labelling actor on one GPU, with throughput as a fraction of the measured bf16 matmul ceiling.

Runs where no hub is reachable: the encoders are built from configs with random weights (the FLOPs of
roberta-large, the paper's encoder, and a small BERT that must learn IMDb sentiment from scratch), with the
packaged MiniLM tokenizer. Each step is recorded separately, so one failure does not hide the others.

    python -m bench.gpu_check --data DIR --tokenizer DIR --out DIR [--quick]

DIR for --data holds train.parquet / test.parquet (id, text, label in {negative, positive}).
--quick runs tiny sizes on CPU (checks the script itself).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.harness import Steps, check_parser

LABELS = ["negative", "positive"]


def _build_model(path: Path, tokenizer: str, *, hidden: int, layers: int, heads: int, vocab: int | None = None,
                 max_pos: int = 514) -> int:
    """A BertForSequenceClassification with random weights saved as an HF folder; returns non-embedding params."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = BertConfig(vocab_size=vocab or len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_pos,
                     num_labels=2, id2label=dict(enumerate(LABELS)), label2id={v: i for i, v in enumerate(LABELS)})
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def _mean_tokens(texts: list[str], tokenizer: str, max_length: int) -> float:
    """Mean tokens per row after truncation (no padding): the useful work per row."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    lens = [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    return sum(lens) / len(lens)


class _Checks:
    """The steps, sharing the data, the work folder, the models built and the measured ceiling."""

    def __init__(self, args) -> None:
        import torch

        self.args, self.quick = args, args.quick
        self.use_gpu = torch.cuda.is_available() and not args.quick
        self.train_df = pd.read_parquet(Path(args.data) / "train.parquet")
        self.test_df = pd.read_parquet(Path(args.data) / "test.parquet")
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.large = self.work / "large"
        self.peak = float("nan")
        self.n_params: dict[str, float] = {}

    def env(self) -> dict:
        import deepspeed
        import ray
        import torch
        import transformers

        return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "ray": ray.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}

    def ceiling(self) -> dict:
        import torch

        n, reps = (8192, 10) if self.use_gpu else (1024, 3)
        dev, dt = ("cuda", torch.bfloat16) if self.use_gpu else ("cpu", torch.float32)
        a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        for _ in range(3):
            a @ b
        self._sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        self._sync()
        s = (time.perf_counter() - t0) / reps
        self.peak = 2 * n**3 / s / 1e12
        return {"dtype": str(dt), "n": n, "tflops": round(self.peak, 2)}

    def _sync(self) -> None:
        if self.use_gpu:
            import torch

            torch.cuda.synchronize()

    def learn(self) -> dict:
        """1. A small BERT from scratch learns sentiment: bf16 DeepSpeed ZeRO-2 on the GPU, then the labelling
        actor."""
        import ray

        from llambert_ray.config import LabelConfig, TrainConfig
        from llambert_ray.label import label
        from llambert_ray.train import fit

        quick, work, small = self.quick, self.work, self.work / "small"
        n_train = 160 if quick else len(self.train_df)
        n_test = 64 if quick else len(self.test_df)
        _build_model(small, self.args.tokenizer, hidden=256, layers=4, heads=4)
        cfg = TrainConfig(epochs=1 if quick else 2, learning_rate=5e-4, batch_size=16 if quick else 64,
                          max_length=64 if quick else 256, workers=1, use_gpu=self.use_gpu, zero_stage=2,
                          cpus_per_worker=1.0, warmup_ratio=0.1, max_failures=0)
        r = fit(self.train_df.head(n_train), LABELS, cfg, work / "learn",
                eval_df=self.test_df.head(min(n_test, 1000)), init_model=str(small))
        lcfg = LabelConfig(batch_size=64 if quick else 1024, sub_batch_size=32 if quick else 256, max_length=256,
                           cpus_per_actor=1.0, gpus_per_actor=1.0 if self.use_gpu else 0.0)
        s = label(ray.data.from_pandas(self.test_df.head(n_test)), r.model_dir, lcfg, work / "learn_labels")
        lab = pd.read_parquet(work / "learn_labels")
        return {"train_rows": r.rows, "train_s": round(r.seconds, 1), "train_samples_per_s": round(r.samples_per_s, 1),
                "eval_accuracy_by_epoch": [h.get("eval_accuracy") for h in r.metrics["history"]],
                "deepspeed_accelerator": r.metrics.get("accelerator"), "bf16": r.metrics.get("bf16"),
                "label_rows_in": n_test, "label_rows_out": len(lab), "label_ids_unique": bool(lab["id"].is_unique),
                "label_ids_match": set(lab["id"]) == set(self.test_df.head(n_test)["id"]),
                "label_accuracy": s.accuracy, "label_rows_per_s": round(s.rows_per_s, 1)}

    def build_large(self) -> dict:
        """2. roberta-large's shape (24 x 1024), random weights."""
        quick = self.quick
        self.n_params["n"] = _build_model(self.large, self.args.tokenizer, hidden=256 if quick else 1024,
                                          layers=2 if quick else 24, heads=4 if quick else 16, vocab=50265)
        self.n_params["mean_tokens"] = _mean_tokens(self.train_df["text"].head(512).tolist(), self.args.tokenizer,
                                                    512)
        return {"non_embedding_params": self.n_params["n"],
                "mean_tokens_at_512": round(self.n_params["mean_tokens"], 1)}

    def train_large(self, stage: int):
        """Training throughput of roberta-large's shape with ZeRO `stage`, length 512."""
        def run() -> dict:
            from llambert_ray.config import TrainConfig
            from llambert_ray.train import fit

            rows = 96 if self.quick else 3072
            cfg = TrainConfig(epochs=1, learning_rate=1e-5, batch_size=16 if self.quick else 32, max_length=512,
                              workers=1, use_gpu=self.use_gpu, zero_stage=stage, cpus_per_worker=1.0,
                              max_failures=0)
            r = fit(self.train_df.head(rows), LABELS, cfg, self.work / f"large_z{stage}", init_model=str(self.large))
            # padded to the longest row of each batch: IMDb batches of 32 nearly always hit 512
            flops_per_row = 6 * self.n_params["n"] * 512
            return {"rows": rows, "samples_per_s": round(r.samples_per_s, 1), "fit_s": round(r.seconds, 1),
                    "tflops_at_512": round(r.samples_per_s * flops_per_row / 1e12, 1),
                    "fraction_of_ceiling": round(r.samples_per_s * flops_per_row / 1e12 / self.peak, 3)}
        return run

    def label_large(self) -> dict:
        """3. Labelling with roberta-large's shape: the Ray Data actor (bf16)."""
        import ray

        from llambert_ray.config import LabelConfig
        from llambert_ray.label import label

        rows = 64 if self.quick else 8192
        texts = pd.concat([self.test_df] * (1 + rows // len(self.test_df)), ignore_index=True).head(rows)
        texts["id"] = [f"r{i}" for i in range(rows)]
        lcfg = LabelConfig(batch_size=64 if self.quick else 2048, sub_batch_size=32 if self.quick else 256,
                           max_length=512, cpus_per_actor=1.0, gpus_per_actor=1.0 if self.use_gpu else 0.0)
        s = label(ray.data.from_pandas(texts), self.large, lcfg, self.work / "large_labels")
        return {"rows": rows, "rows_per_s_incl_actor_start": round(s.rows_per_s, 1),
                "tflops_real_tokens": round(s.rows_per_s * 2 * self.n_params["n"] * self.n_params["mean_tokens"]
                                            / 1e12, 1)}

    def dtypes(self) -> dict:
        """The bare model of roberta-large's shape labelling in bf16 vs fp32."""
        from llambert_ray.label import Classifier

        rows = 32 if self.quick else 2048
        texts = self.test_df["text"].head(rows).tolist()
        res: dict = {}
        for dt in ("bfloat16", "float32"):
            clf = Classifier(str(self.large), max_length=512, sub_batch=32 if self.quick else 256, dtype=dt)
            clf.predict_proba(texts[:64])
            self._sync()
            t0 = time.perf_counter()
            clf.predict_proba(texts)
            self._sync()
            rps = rows / (time.perf_counter() - t0)
            tflops = rps * 2 * self.n_params["n"] * self.n_params["mean_tokens"] / 1e12
            res[dt] = {"rows_per_s": round(rps, 1), "fraction_of_ceiling": round(tflops / self.peak, 3)}
            del clf
        res["bf16_over_fp32"] = round(res["bfloat16"]["rows_per_s"] / res["float32"]["rows_per_s"], 2)
        return res


def main() -> None:
    ap = check_parser(__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    import ray

    from llambert_ray.ray_env import init_ray

    checks, steps = _Checks(args), Steps(args.out, "gpu_check.json", args.skip)
    steps.run("env", checks.env)
    steps.run("ceiling", checks.ceiling)
    # The trap train_worker_env guards against: DS_ACCELERATOR=cpu left in the driver's environment (and so in
    # ray.init's runtime_env); GPU training must still get DeepSpeed's CUDA accelerator (recorded per epoch).
    os.environ["DS_ACCELERATOR"] = "cpu"
    init_ray(None, num_cpus=os.cpu_count(), object_store_memory=8 << 30 if checks.use_gpu else 1 << 30)
    steps.run("learn_small_bert_zero2_bf16", checks.learn)
    steps.run("build_roberta_large_shape", checks.build_large)
    steps.run("train_roberta_large_shape_zero2", checks.train_large(2))
    steps.run("label_roberta_large_shape_ray", checks.label_large)
    steps.run("label_dtype_bf16_vs_fp32", checks.dtypes)
    steps.run("train_roberta_large_shape_zero3", checks.train_large(3))
    ray.shutdown()
    ok = all(v.get("ok") for v in steps.results.values())
    print("ALL OK" if ok else "SOME CHECKS FAILED", flush=True)


if __name__ == "__main__":
    main()
