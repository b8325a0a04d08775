"""GPU check of the cluster path on one GPU node: Ray Train + DeepSpeed (bf16, ZeRO-2 and ZeRO-3) training a small
BERT and a small RoBERTa, Ray Data labelling on the GPU, Ray Serve with a GPU replica, and `llambert preflight`
against the live one-node GPU cluster.

Runs where nothing can be downloaded: the encoders are built from configs with random weights, with the MiniLM
tokenizer committed in bench/assets/minilm_tokenizer (no packaged-model pip package, no hub), the rows are
synthetic, and the LLM that preflight checks is a config.json alone. Each step is recorded separately in
OUT/gpu_check_cluster.json (a failing step is a result; the file is rewritten after every step, so a run stopped
at its time limit still leaves what it finished).

    python -m bench.gpu_check_cluster --out DIR [--quick] [--skip serve,zero3]

--quick: tiny sizes on the CPU (checks the script itself, any machine). bench/gpu_check_cluster.sh runs it on the
device machine with the carried wheels.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

from bench.harness import Steps, check_parser

LABELS = ["negative", "positive"]
TOKENIZER = Path(__file__).resolve().parent / "assets" / "minilm_tokenizer"
RESULT = "gpu_check_cluster.json"


# ------------------------------------------------------------------------------------------ data and models
_POS = ["wonderful", "brilliant", "moving", "superb", "delightful", "great", "charming", "gripping"]
_NEG = ["awful", "boring", "dreadful", "tedious", "terrible", "dull", "painful", "lazy"]
_FILL = ["the", "film", "story", "cast", "music", "plot", "ending", "was", "and", "a", "really", "quite",
         "direction", "acting", "script", "scenes", "I", "thought", "it", "felt"]


def synthetic_rows(n: int, seed: int = 0, prefix: str = "r") -> pd.DataFrame:
    """Reviews whose label is carried by their sentiment words (learnable), 10-60 words long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab = LABELS[i % 2]
        words = [rng.choice(_FILL) for _ in range(rng.randint(8, 55))]
        for _ in range(rng.randint(1, 4)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_POS if lab == "positive" else _NEG))
        rows.append({"id": f"{prefix}{i:06d}", "text": " ".join(words).capitalize() + ".", "label": lab})
    return pd.DataFrame(rows)


def build_encoder(path: Path, arch: str, *, hidden: int, layers: int, heads: int, max_pos: int = 514) -> dict:
    """A random-weight BERT or RoBERTa sequence classifier (HF folder: model + tokenizer) built from a config.

    RoBERTa as roberta-large has it: type_vocab_size 1, pad id 1 (position ids count from padding_idx + 1), no
    token_type_ids from the tokenizer; the MiniLM WordPiece vocabulary stands in for RoBERTa's BPE."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, num_labels=2, id2label=dict(enumerate(LABELS)),
                  label2id={v: i for i, v in enumerate(LABELS)})
    if arch == "roberta":
        tok = AutoTokenizer.from_pretrained(TOKENIZER, pad_token="[unused0]",
                                            model_input_names=["input_ids", "attention_mask"])
        assert tok.pad_token_id == 1, tok.pad_token_id
        cfg = RobertaConfig(vocab_size=len(tok), type_vocab_size=1, pad_token_id=1, bos_token_id=tok.cls_token_id,
                            eos_token_id=tok.sep_token_id, max_position_embeddings=max_pos, **common)
        model = RobertaForSequenceClassification(cfg)
    else:
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=max_pos, **common)
        model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"arch": arch, "params": sum(p.numel() for p in model.parameters()), "pad_token_id": tok.pad_token_id,
            "tokenizer_inputs": list(tok.model_input_names)}


def _state(folder: str | Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare_weights(init_dir: Path, trained_dir: str) -> dict:
    """Whether the trained folder holds full-size weights (no empty ZeRO-3 partitions) that moved from init.

    bf16 training keeps bf16 copies of the weights, so 'changed' compares with the init cast to bf16."""
    import torch

    init, trained = _state(init_dir), _state(trained_dir)
    common = sorted(set(init) & set(trained))
    shapes_match = all(init[k].shape == trained[k].shape for k in common)
    empty = [k for k, v in trained.items() if v.numel() == 0]
    changed = [k for k in common if init[k].shape == trained[k].shape and
               (trained[k].float() - init[k].to(torch.bfloat16).float()).abs().max() > 0]
    return {"tensors": len(trained), "tensors_in_init": len(init), "common": len(common),
            "params_saved": int(sum(v.numel() for v in trained.values())),
            "params_init": int(sum(v.numel() for v in init.values())), "shapes_match": shapes_match,
            "empty_tensors": len(empty), "changed_tensors": len(changed),
            "changed_fraction": round(len(changed) / max(len(common), 1), 3),
            "unchanged": [k for k in common if k not in set(changed)][:10],
            "classifier_changed": any("classifier" in k for k in changed),
            "full_size": shapes_match and not empty and len(common) == len(init)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


# ------------------------------------------------------------------------------------------ the run
class _Checks:
    """The steps, sharing the work folder, the synthetic rows, the encoders built and the models trained."""

    def __init__(self, quick: bool) -> None:
        import torch

        self.quick = quick
        self.use_gpu = torch.cuda.is_available() and not quick
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_cluster_"))
        self.train_df = synthetic_rows(64 if quick else 512, seed=1)
        self.eval_df = synthetic_rows(32 if quick else 256, seed=2, prefix="e")
        self.inits = {arch: self.work / f"init_{arch}" for arch in ("bert", "roberta")}
        self.trained: dict[str, str] = {}
        self.corpus = self.work / "corpus.parquet"
        synthetic_rows(64, seed=3, prefix="c").to_parquet(self.corpus)

    def env(self) -> dict:
        import deepspeed
        import fastapi
        import pydantic
        import ray
        import ray.data
        import ray.serve
        import ray.train.torch
        import starlette
        import torch
        import transformers
        import uvicorn

        from llambert_ray.config import ServeConfig

        return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "gpus": torch.cuda.device_count(), "ray": ray.__version__, "ray_file": ray.__file__,
                "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                "pydantic": pydantic.VERSION, "fastapi": fastapi.__version__, "starlette": starlette.__version__,
                "uvicorn": uvicorn.__version__, "cpus": os.cpu_count(),
                "serve_gpus_per_replica_field": "gpus_per_replica" in ServeConfig.model_fields}

    def start_ray(self) -> dict:
        import ray

        from llambert_ray.ray_env import init_ray

        init_ray(None, num_cpus=max(os.cpu_count() or 1, 4),
                 object_store_memory=(4 << 30) if self.use_gpu else (1 << 30))
        res = ray.cluster_resources()
        return {"resources": {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory", "object_store_memory")
                              or k.startswith("accelerator_type")},
                "nodes": len([n for n in ray.nodes() if n.get("Alive")])}

    def build(self) -> dict:
        size = dict(hidden=64, layers=2, heads=2) if self.quick else dict(hidden=256, layers=4, heads=4)
        return {arch: build_encoder(path, arch, **size) for arch, path in self.inits.items()}

    def _llm_config_only(self) -> Path:
        """The LLM preflight checks: a config.json alone (light: no GPU asked for, no weights loaded)."""
        llm = self.work / "llm_config_only"
        llm.mkdir(exist_ok=True)
        (llm / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
            "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "vocab_size": 32000, "max_position_embeddings": 2048}))
        return llm

    def preflight(self, tp: int):
        """e. `llambert preflight` against the live one-node cluster, the engine at tensor-parallel `tp`."""
        def run() -> dict:
            from llambert_ray.config_load import load_config
            from llambert_ray.preflight import checks_to_dicts, run_preflight, table

            cfg = load_config(None, {
                "output_dir": str(self.work / "runs"), "corpus.path": str(self.corpus),
                "test": {"path": str(self.corpus)}, "annotate.model": str(self._llm_config_only()),
                "annotate.device": "gpu", "annotate.tensor_parallel_size": tp,
                "train.model": str(self.inits["bert"]), "train.use_gpu": self.use_gpu,
                "label.gpus_per_actor": 1.0 if self.use_gpu else 0.0})
            checks = run_preflight(cfg)
            print(table(checks), flush=True)
            by = {c.check: c for c in checks}
            res = {"checks": checks_to_dicts(checks), "failed": [c.check for c in checks if c.status == "fail"]}
            if tp == 1:
                res["expected"] = "engine replicas ok (1 GPU holds 1 replica of 1 x {GPU: 1, CPU: 1})"
                got = by.get("engine replicas")
                res["as_expected"] = bool(got and got.status == "ok") if self.use_gpu else None
            else:
                res["expected"] = f"engine fits a node fail (TP {tp} on a 1-GPU node)"
                got = by.get("engine fits a node")
                res["as_expected"] = bool(got and got.status == "fail")
            return res
        return run

    def train(self, arch: str, stage: int):
        """b. training: 1 worker, bf16, ZeRO `stage`, `arch` from random init."""
        def run() -> dict:
            from llambert_ray.config import TrainConfig
            from llambert_ray.train import fit

            cfg = TrainConfig(epochs=1, learning_rate=5e-4, batch_size=16 if self.quick else 32,
                              max_length=32 if self.quick else 128, workers=1, use_gpu=self.use_gpu,
                              zero_stage=stage, bf16=True, cpus_per_worker=1.0, warmup_ratio=0.1, max_failures=0)
            r = fit(self.train_df, LABELS, cfg, self.work / f"{arch}_z{stage}", eval_df=self.eval_df,
                    init_model=str(self.inits[arch]), name=f"{arch}-z{stage}")
            self.trained[f"{arch}_z{stage}"] = r.model_dir
            m = r.metrics
            res = {"rows": r.rows, "fit_s": round(r.seconds, 1), "samples_per_s": round(r.samples_per_s, 1),
                   "train_loss": m.get("train_loss"), "eval_accuracy": m.get("eval_accuracy"),
                   "worker_device": m.get("device"), "deepspeed_accelerator": m.get("accelerator"),
                   "bf16": m.get("bf16"), "weights": compare_weights(self.inits[arch], r.model_dir)}
            if self.use_gpu:
                res["on_cuda"] = str(m.get("device", "")).startswith("cuda") and m.get("accelerator") == "cuda"
            return res
        return run

    def _model(self) -> str:
        return self.trained.get("bert_z2") or self.trained.get("bert_z3") or str(self.inits["bert"])

    def labelling(self) -> dict:
        """c. labelling with the Ray Data actor on the GPU."""
        import ray

        from llambert_ray.config import LabelConfig
        from llambert_ray.label import label

        model_dir, quick = self._model(), self.quick
        rows = 512 if quick else 8192
        df = synthetic_rows(rows, seed=4, prefix="l")
        lcfg = LabelConfig(batch_size=128 if quick else 1024, sub_batch_size=32 if quick else 256, max_length=128,
                           cpus_per_actor=1.0, gpus_per_actor=1.0 if self.use_gpu else 0.0,
                           dtype="bfloat16" if self.use_gpu else "auto")
        s = label(ray.data.from_pandas(df), model_dir, lcfg, self.work / "labels")
        lab = pd.read_parquet(self.work / "labels")
        return {"model": Path(model_dir).parent.name if model_dir != str(self.inits["bert"]) else "init (untrained)",
                "rows_in": rows, "rows_out": len(lab), "ids_unique": bool(lab["id"].is_unique),
                "ids_match": set(lab["id"]) == set(df["id"]), "failed_rows": s.failed,
                "accuracy_vs_synthetic_labels": s.accuracy, "rows_per_s_incl_actor_start": round(s.rows_per_s, 1),
                "ok_rows_in_eq_out": len(lab) == rows and bool(lab["id"].is_unique)}

    def serving(self) -> dict:
        """d. Ray Serve: the classifier on a GPU replica, queried over HTTP."""
        from ray import serve

        from llambert_ray.config import ServeConfig
        from llambert_ray.serve import start

        has_field = "gpus_per_replica" in ServeConfig.model_fields
        kw = dict(port=_free_port(), max_batch_size=32, max_texts_per_request=64, max_length=128, cpus_per_replica=1.0)
        if has_field:
            kw["gpus_per_replica"] = 1.0 if self.use_gpu else 0.0
        cfg = ServeConfig(**kw)
        t0 = time.time()
        start(self._model(), cfg, name="gpu-check")
        try:
            return self._query(f"http://127.0.0.1:{cfg.port}", time.time() - t0, kw, has_field)
        finally:
            serve.shutdown()

    def _query(self, url: str, up_s: float, kw: dict, has_field: bool) -> dict:
        texts = synthetic_rows(16, seed=5, prefix="s")
        lat = []
        for _ in range(3):
            t1 = time.time()
            status, body = _http(f"{url}/v1/classify", {"texts": texts["text"].tolist()})
            lat.append(round(time.time() - t1, 3))
        preds = body["predictions"]
        acc = sum(p["label"] == g for p, g in zip(preds, texts["label"], strict=True)) / len(preds)
        info_status, info = _http(f"{url}/v1/model")
        res = {"gpus_per_replica": kw.get("gpus_per_replica", "skipped: no gpus_per_replica in ServeConfig "
                                                             "(served with the default CPU replica instead)"),
               "start_s": round(up_s, 1), "status": status, "predictions": len(preds),
               "accuracy_vs_synthetic_labels": acc, "latency_s": lat, "model_info_status": info_status,
               "model_info": {k: v for k, v in info.items() if k != "model_dir"},
               "reported_device": info.get("device", "not reported by /v1/model")}
        if self.use_gpu and has_field and "device" in info:
            res["on_cuda"] = str(info["device"]).startswith("cuda")
        return res


def _summary(steps: Steps) -> None:
    results = steps.results
    done = {k: v for k, v in results.items() if isinstance(v, dict)}
    ok = all(v.get("ok") for v in done.values())
    expect = [k for k, v in done.items() if v.get("as_expected") is False or v.get("on_cuda") is False
              or (v.get("weights") or {}).get("full_size") is False or v.get("ok_rows_in_eq_out") is False]
    results["summary"] = {"all_ok": ok, "not_as_expected": expect,
                          "failed": [k for k, v in done.items() if not v.get("ok")]}
    steps.save()
    print("ALL OK" if ok and not expect else f"SOME CHECKS FAILED: {results['summary']}", flush=True)


def main() -> None:
    args = check_parser(__doc__).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model here is a local folder
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quick = args.quick
    checks, steps = _Checks(quick), Steps(args.out, RESULT, args.skip)
    # step limits (s): generous on the GPU, where the whole run must fit a device call; none needed in --quick
    lim = (lambda s: None) if quick else (lambda s: s)
    steps.results["mode"] = "quick (cpu)" if quick else ("gpu" if checks.use_gpu else "cpu (no CUDA device)")
    steps.save()
    steps.run("env", checks.env)
    steps.run("ray_start", checks.start_ray, lim(120))
    steps.run("build_encoders", checks.build, lim(120))
    steps.run("preflight_gpu_tp1", checks.preflight(1), lim(120))
    steps.run("preflight_gpu_tp2", checks.preflight(2), lim(120))
    # --quick covers each architecture and each ZeRO stage once (the script, not the GPU, is what it checks)
    for arch, stage in [("bert", 2), ("roberta", 3)] if quick else [("bert", 2), ("bert", 3), ("roberta", 2),
                                                                    ("roberta", 3)]:
        steps.run(f"train_{arch}_zero{stage}_bf16", checks.train(arch, stage), lim(150))
    steps.run("label_gpu_bf16", checks.labelling, lim(150))
    steps.run("serve_gpu_replica", checks.serving, lim(150))
    import ray

    ray.shutdown()
    _summary(steps)


if __name__ == "__main__":
    main()
