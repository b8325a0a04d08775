"""`llambert plan`: rows, tokens, device-hours and cost of a run config, estimated before anything runs.

Rows come from the corpus's own metadata (parquet/jsonl/csv read with pyarrow, no Ray) or from --rows; tokens per
row from the model's tokenizer on a sample of the texts rendered into the real prompts (4 characters per token if
the tokenizer is not available offline). Throughput comes from the hardware table (llambert_ray/hardware.yaml: peak
FLOP/s x utilization / FLOPs per token) or, with a manifest of an earlier run on the same hardware, from what that
run measured. Nothing here starts Ray or loads model weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llambert_ray.config import ConfigError, CorpusConfig, RunConfig
from llambert_ray.tasks import Example, Task

HARDWARE = Path(__file__).resolve().parent / "hardware.yaml"
CHARS_PER_TOKEN = 4.0


@dataclass
class StagePlan:
    """One stage's estimate. tokens: tokens the model processes (prompt + output for the LLM, padded-free
    encoder tokens x epochs for training); device_hours: devices x wall hours."""

    stage: str
    rows: int
    tokens: int
    device: str
    devices: float
    tokens_per_device_s: float
    device_hours: float
    wall_hours: float
    cost_usd: float
    basis: str


@dataclass
class Plan:
    stages: list[StagePlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, float]:
        return {"tokens": sum(s.tokens for s in self.stages),
                "device_hours": sum(s.device_hours for s in self.stages),
                "wall_hours": sum(s.wall_hours for s in self.stages),
                "cost_usd": sum(s.cost_usd for s in self.stages)}

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages], "totals": self.totals, "notes": self.notes}

    def table(self) -> str:
        lines = ["| stage | rows | tokens | device | devices | tokens/device-s | device-h | wall h | USD | basis |",
                 "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for s in self.stages:
            lines.append(f"| {s.stage} | {s.rows:,} | {s.tokens:,} | {s.device} | {s.devices:g} | "
                         f"{s.tokens_per_device_s:,.0f} | {s.device_hours:.3g} | {s.wall_hours:.3g} | "
                         f"{s.cost_usd:,.2f} | {s.basis} |")
        t = self.totals
        lines.append(f"| **total** | | {t['tokens']:,} | | | | {t['device_hours']:.3g} | {t['wall_hours']:.3g} | "
                     f"{t['cost_usd']:,.2f} | |")
        return "\n".join(lines + [f"- {n}" for n in self.notes])


def load_hardware(path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path else HARDWARE
    if not p.is_file():
        raise ConfigError(f"hardware table {p} does not exist; fix: pass --hardware with a YAML like "
                          f"llambert_ray/hardware.yaml")
    hw = yaml.safe_load(p.read_text())
    for key in ("devices", "utilization", "models"):
        if not isinstance(hw.get(key), dict):
            raise ConfigError(f"hardware table {p} needs a `{key}:` mapping (see llambert_ray/hardware.yaml)")
    return hw


# ------------------------------------------------------------------ corpus size and text lengths
def corpus_stats(cc: CorpusConfig, *, rows: int | None = None, sample_rows: int = 400) -> tuple[int, list[str]]:
    """(rows after filters, a sample of texts) of a parquet/jsonl/csv corpus, read with pyarrow only."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from llambert_ray.data import CorpusError, _filesystem, detect_format

    if cc.path is None:
        raise ConfigError("the config has no corpus.path; fix: set it (plan reads its size and text lengths)")
    try:
        fmt = detect_format(cc.path) if cc.format == "auto" else cc.format
        if fmt == "aclimdb":
            raise CorpusError("plan reads parquet/jsonl/csv corpora")
        fs, p = _filesystem(cc.path)
        ds = pads.dataset(p, filesystem=fs, format={"parquet": "parquet", "jsonl": "json", "csv": "csv"}[fmt])
        expr = None
        for col, values in cc.filters.items():
            e = pc.field(col).isin(values)
            expr = e if expr is None else expr & e
        n = ds.count_rows(filter=expr)
        texts = ds.head(sample_rows, columns=[cc.text_column], filter=expr).column(0).to_pylist()
    except (CorpusError, OSError, KeyError, ValueError) as e:
        if rows is None:
            raise ConfigError(f"plan cannot read corpus {cc.path!r} ({e}); fix: pass --rows N (and "
                              f"--mean-chars C) to plan without reading it") from None
        return rows, []
    return (rows if rows is not None else n), [t for t in texts if isinstance(t, str)]


def planned_rows(cc: CorpusConfig, n: int) -> int:
    if cc.sample is not None:
        return min(cc.sample, n)
    if cc.fraction is not None:
        return round(cc.fraction * n)
    return n


class TokenCounter:
    """Counts tokens with a model's tokenizer when it is available offline, else 4 characters per token."""

    def __init__(self, model_ref: str):
        self.exact = False
        self.tok = None
        try:
            from transformers import AutoTokenizer

            from llambert_ray.models import resolve_model

            self.tok = AutoTokenizer.from_pretrained(resolve_model(model_ref), local_files_only=True)
            self.exact = True
        except Exception:  # not on this machine: estimate from characters
            self.tok = None

    def count(self, text: str) -> int:
        if self.tok is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN))
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def count_chat(self, messages: list[dict[str, str]]) -> int:
        if self.tok is not None and getattr(self.tok, "chat_template", None):
            # Render, then count: with tokenize=True transformers 5 returns a BatchEncoding, whose len() is its
            # number of keys (2), not of tokens. The template already holds any BOS, so add no special tokens.
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return len(self.tok(text, add_special_tokens=False)["input_ids"])
        return sum(self.count(m["content"]) + 4 for m in messages)


def _mean(xs: list[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


# ------------------------------------------------------------------ the estimate
def plan_run(cfg: RunConfig, task: Task, *, hardware: dict[str, Any], gpu: str = "a100-80gb",
             rows: int | None = None, mean_chars: float | None = None,
             measured: dict[str, Any] | None = None) -> Plan:
    """Estimate every stage of `llambert run` for cfg (see the module doc for where the numbers come from)."""
    if gpu not in hardware["devices"]:
        raise ConfigError(f"--gpu {gpu!r} is not in the hardware table; fix: use one of {sorted(hardware['devices'])}")
    n, texts = corpus_stats(cfg.corpus, rows=rows)
    if mean_chars is not None:
        texts = ["x" * int(mean_chars)] * 8
    if not texts:
        raise ConfigError("plan has no texts to measure lengths on; fix: pass --mean-chars C")
    est = _Estimator(hardware, gpu, measured)
    ann_rows, extra_rows, per_prompt, style, shots = est.annotate(cfg, task, texts, n, rows)
    enc_tok = TokenCounter(cfg.train.model)
    enc_per_row = est.train(cfg.train, enc_tok, texts, ann_rows, extra_rows)
    est.label(cfg, enc_tok, texts, n)
    a, t = cfg.annotate, cfg.train
    est.plan.notes.append(f"corpus {n:,} rows; mean {per_prompt:,.0f} prompt tokens per row for {a.model} "
                          f"({style}, {shots} shots, {a.mode} mode); {enc_per_row:,.0f} tokens per row for {t.model}")
    return est.plan


class _Estimator:
    """Builds a Plan stage by stage: rates from the hardware table (or a measured run's manifest)."""

    def __init__(self, hardware: dict[str, Any], gpu: str, measured: dict[str, Any] | None):
        self.devices, self.util, self.params = hardware["devices"], hardware["utilization"], hardware["models"]
        self.shapes = hardware.get("llm_shapes") or {}
        self.storage = hardware.get("weights_storage") or {}
        self.gpu, self.measured, self.plan = gpu, measured or {}, Plan()

    def model_params(self, ref: str) -> float:
        if ref in self.params:
            return float(self.params[ref])
        raise ConfigError(f"model {ref!r} is not in the hardware table's `models:`; fix: add its non-embedding "
                          f"parameter count there (or pass --hardware with your own table)")

    def rate(self, phase: str, device: str, ref: str, mult: float) -> tuple[float, str]:
        """Tokens per device-second: the device's peak FLOP/s x utilization over mult x the model's parameters."""
        d = self.devices[device]
        u = float((d.get("utilization") or {}).get(phase, self.util[phase]))
        flops = float(d["peak_tflops"]) * 1e12 * u
        return flops / (mult * self.model_params(ref)), f"{u:.0%} of {d['peak_tflops']} TFLOP/s ({phase})"

    def gpu_memory(self, a) -> None:
        """A note on whether one engine's weights and KV cache fit its GPUs (llambert_ray.gpu_memory)."""
        from llambert_ray.gpu_memory import engine_check, shape_of

        shape = shape_of(a.model, self.shapes)
        mem = self.devices[self.gpu].get("memory_gib")
        if shape is None or not mem:
            self.plan.notes.append(f"GPU memory not checked: no shape for {a.model} (config.json not at hand; add "
                                   f"it to the hardware table's llm_shapes)" if shape is None else
                                   f"GPU memory not checked: no memory_gib for {self.gpu} in the hardware table")
            return
        status, detail, fix = engine_check(shape, a, mem, self.gpu)
        self.plan.notes.append(f"GPU memory {status.upper()}: {detail}" + (f"; fix: {fix}" if fix else ""))
        self.weights_load(a, shape)

    def weights_load(self, a, shape) -> None:
        """A note: how long one engine start reads its weights from each storage of the hardware table's
        weights_storage, and what the engine's GPUs cost idle meanwhile (vLLM reads every weight before it serves)."""
        from llambert_ray.gpu_memory import GIB, dtype_bytes

        if not self.storage:
            return
        gib = shape.params * dtype_bytes(a) / GIB
        gpus = a.tensor_parallel_size * a.pipeline_parallel_size
        usd_per_s = gpus * float(self.devices[self.gpu]["usd_per_hour"]) / 3600
        each = [f"{name} {gib / float(rate) / 60:.1f} min (${gib / float(rate) * usd_per_s:.2f})"
                for name, rate in self.storage.items()]
        self.plan.notes.append(f"weights load: {gib:.0f} GiB per engine start ({a.concurrency} engine(s) a call), "
                               f"its {gpus} GPUs idle meanwhile: " + "; ".join(each) +
                               " (cluster/README.md, Weights)")

    def measured_stage(self, stage: str) -> dict[str, Any] | None:
        return self.measured.get("stages", {}).get(stage)

    def measured_rate(self, stage: str, per: str) -> float | None:
        st = self.measured_stage(stage)
        if not st or not st.get("device_seconds"):
            return None
        return float(st.get(per) or 0) / float(st["device_seconds"]) or None

    def add(self, stage: str, nrows: int, tokens: float, device: str, ndev: float, tps: float, basis: str) -> None:
        dev_h = tokens / tps / 3600 if tps > 0 else 0.0
        price = float(self.devices[device]["usd_per_hour"])
        self.plan.stages.append(StagePlan(stage, nrows, int(tokens), device, ndev, tps, dev_h,
                                          dev_h / max(ndev, 1e-9), dev_h * price, basis))

    def annotate(self, cfg: RunConfig, task: Task, texts: list[str], n: int, rows: int | None):
        """annotate (and annotate_extra): prompts rendered exactly as the engine gets them. Returns (annotated
        rows, extra rows, mean prompt tokens, prompt style, shots)."""
        a = cfg.annotate
        defaults = task.defaults_for(a.model)
        from llambert_ray.annotate import engine_devices, resolved_shots

        style, shots = a.prompt_style or defaults["prompt_style"], resolved_shots(task, a)
        llm_tok = TokenCounter((a.endpoint and a.endpoint.tokenizer) or a.model)
        # gold-knn (#17): a row's examples are gold corpus rows; sampled texts stand in for them (same lengths)
        shown = ([Example(text=t, label=task.labels[i % len(task.labels)]) for i, t in enumerate(texts[:shots])]
                 if a.shots_from == "gold-knn" else None)
        if style == "chat":
            counts = [llm_tok.count_chat(task.chat_messages(t, shots, a.max_text_chars, a.truncate, shown))
                      for t in texts]
        else:
            counts = [llm_tok.count(task.completion_prompt(t, shots, a.max_text_chars, a.truncate, shown))
                      for t in texts]
        per_prompt = min(_mean(counts, 0), a.max_model_len)
        out_tokens = 1 if a.mode == "score" else a.max_new_tokens
        llm_gpu = a.device == "gpu"
        dev = self.gpu if llm_gpu else "cpu-core"
        ndev = engine_devices(a, llm_gpu)
        if llm_gpu and a.endpoint is None:
            self.gpu_memory(a)
        if not llm_tok.exact:
            self.plan.notes.append(f"{a.model}: tokenizer not available offline, tokens estimated at "
                                   f"{CHARS_PER_TOKEN:g} characters per token")
        ann_rows, extra_rows = planned_rows(cfg.corpus, n), 0
        # calibration gold: the gold rows go to the LLM too, once (the run's later calls find them cached); with
        # evaluate.llm_test_sample that many test rows ride in the same call
        jobs = [("annotate", ann_rows + (min(a.gold_rows, n) if a.calibration == "gold" else 0)
                 + self.llm_test_rows(cfg))]
        if cfg.extra is not None:
            en, _ = corpus_stats(cfg.extra, rows=rows)
            extra_rows = planned_rows(cfg.extra, en)
            jobs.append(("annotate_extra", extra_rows))
        for stage, nrows in jobs:
            if a.endpoint is not None:
                self.endpoint(stage, nrows, per_prompt, out_tokens, a.endpoint)
                continue
            pre, basis_p = self.rate("prefill", dev, a.model, 2)
            dec, _ = self.rate("decode", dev, a.model, 2)
            m = self.measured_rate(stage, "tokens") or self.measured_rate("annotate", "tokens")
            tokens = nrows * (per_prompt + out_tokens)
            if m:  # tokens per device-second of the whole stage as run
                tps, basis = m, "measured"
            else:  # time = prompt tokens / prefill rate + output tokens / decode rate, as one blended rate
                secs = nrows * (per_prompt / pre + out_tokens / dec)
                tps, basis = (tokens / secs if secs else 0.0), basis_p + f"; {out_tokens} output tok/row at decode"
            self.add(stage, nrows, tokens, dev, ndev, tps, basis)
        return ann_rows, extra_rows, per_prompt, style, shots

    def endpoint(self, stage: str, nrows: int, per_prompt: float, out_tokens: int, ep) -> None:
        """An endpoint's annotation: its tokens at its prices (annotate.endpoint.usd_per_1k_*), no devices of the
        run's; its wall time where a rate limit bounds it (requests_per_s, tokens_per_min), else not estimated."""
        prompt, answer = nrows * per_prompt, nrows * out_tokens
        p, c = ep.usd_per_1k_prompt_tokens, ep.usd_per_1k_completion_tokens
        usd = (prompt * (p or 0.0) + answer * (c or 0.0)) / 1000
        bounds = ([nrows / ep.requests_per_s] if ep.requests_per_s else []) + (
            [(prompt + answer) / (ep.tokens_per_min / 60)] if ep.tokens_per_min else [])
        wall_s = max(bounds, default=0.0)
        basis = (f"endpoint prices: ${p or 0:g} / 1k prompt, ${c or 0:g} / 1k answer tokens" if p is not None or
                 c is not None else "no endpoint prices (annotate.endpoint.usd_per_1k_prompt_tokens, ..._completion_"
                                    "tokens): USD not estimated")
        basis += ("; wall time at its rate limits" if bounds else
                  "; wall time not estimated (no requests_per_s / tokens_per_min)")
        self.plan.stages.append(StagePlan(stage, nrows, int(prompt + answer), "endpoint", 0,
                                          (prompt + answer) / wall_s if wall_s else 0.0, 0.0, wall_s / 3600, usd,
                                          basis))

    def llm_test_rows(self, cfg: RunConfig) -> int:
        """Test rows the LLM labels too (evaluate.llm_test_sample, at most the test split's planned rows)."""
        want = cfg.evaluate.llm_test_sample
        if not want or cfg.test is None:
            return 0
        try:
            tn, _ = corpus_stats(cfg.test)
        except ConfigError:
            self.plan.notes.append(f"annotate: {want} test rows (evaluate.llm_test_sample) counted; the test split "
                                   f"was not read")
            return want
        return min(want, planned_rows(cfg.test, tn))

    def train(self, t, enc_tok: TokenCounter, texts: list[str], ann_rows: int, extra_rows: int) -> float:
        """train[variant]: encoder tokens per row, every variant, every epoch. Returns tokens per row."""
        enc_per_row = _mean([min(enc_tok.count(x) + 2, t.max_length) for x in texts], 0)
        dev = self.gpu if t.use_gpu else "cpu-core"
        ndev = t.workers * (1 if t.use_gpu else t.cpus_per_worker)
        rows_for = {"gold": ann_rows, "llm": ann_rows, "llm+extra": ann_rows + extra_rows, "combined": 2 * ann_rows}
        for variant in t.variants:
            nrows = rows_for[variant]
            st = self.measured_stage(f"train[{variant}]")
            if st and st.get("device_seconds"):  # samples (rows x epochs) per device-second as that run trained
                samples = sum(r["rows"] * r["epochs"] for r in st.get("stages", [])) or st["rows"]
                tps, basis = samples / st["device_seconds"] * enc_per_row, "measured (samples/device-s)"
            else:
                tps, basis = self.rate("train", dev, t.model, 6)
            self.add(f"train[{variant}]", nrows, nrows * t.epochs * enc_per_row, dev, ndev, tps, basis)
        self.training_topology(t)
        return enc_per_row

    ONE_GPU_MINUTES = 30  # training that one GPU does in less than this needs no data parallelism over pods

    def training_topology(self, t) -> None:
        """A note choosing the training topology by this estimate: data-parallel GPU workers all-reduce the encoder's
        gradients every step, over the pod network when each worker is its own 1-GPU pod; where one GPU trains every
        variant in under ONE_GPU_MINUTES, one worker (grad_accum keeping the effective batch) costs less."""
        if not t.use_gpu:
            return
        one_gpu_min = sum(s.device_hours for s in self.plan.stages if s.stage.startswith("train[")) * 60
        grads_gb = 2 * self.model_params(t.model) / 1e9  # bf16 gradients, all-reduced every optimizer step
        if t.workers > 1 and one_gpu_min < self.ONE_GPU_MINUTES:
            self.plan.notes.append(
                f"training topology: one GPU trains every variant in ~{one_gpu_min:.0f} min by this estimate; "
                f"{t.workers} data-parallel workers would all-reduce ~{grads_gb:.1f} GB of gradients every step, "
                f"over the pod network where each is a 1-GPU pod: set train.workers: 1 and train.grad_accum: "
                f"{t.grad_accum * t.workers} (the same effective batch)")
        else:
            self.plan.notes.append(f"training topology: {t.workers} GPU worker(s); one GPU trains every variant in "
                                   f"~{one_gpu_min:.0f} min by this estimate")

    def label(self, cfg: RunConfig, enc_tok: TokenCounter, texts: list[str], n: int) -> None:
        """label the whole corpus; evaluate every variant on the test split."""
        lab = cfg.label
        dev = self.gpu if lab.gpus_per_actor else "cpu-core"
        ndev = (lab.gpus_per_actor or lab.cpus_per_actor) * lab.concurrency
        per_row = _mean([min(enc_tok.count(x) + 2, lab.max_length) for x in texts], 0)
        m = self.measured_rate("label", "rows")
        tps, basis = (m * per_row, "measured (rows/device-s)") if m else self.rate("infer", dev, cfg.train.model, 2)
        self.add("label", n, n * per_row, dev, ndev, tps, basis)
        if cfg.test is None:
            return
        try:
            tn, _ = corpus_stats(cfg.test)
            test_rows = planned_rows(cfg.test, tn) * len(cfg.train.variants)
            self.add("evaluate", test_rows, test_rows * per_row, dev, ndev, tps, basis)
        except ConfigError as e:
            self.plan.notes.append(f"evaluate not estimated: {e}")


def load_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise ConfigError(f"--measured {path}: no manifest.json there; fix: pass a run folder or its manifest.json")
    return json.loads(p.read_text())
