"""Will an LLM engine fit its GPUs? Weights + the KV cache of `max_model_len`-token sequences, per GPU, against
`gpu_memory_utilization` x the GPU's memory: what vLLM checks only after minutes of loading (it refuses to start
when not even one sequence of max_model_len fits), checked in `llambert plan` and `llambert preflight` first.

The shape comes from the model's config.json (layers, hidden size, attention / KV heads, MLP width, vocabulary), or
from the hardware table's `llm_shapes:` where the config is not at hand (plan runs offline). Estimates: the
weights of a decoder with a gated MLP (Llama, Mistral, Qwen), split evenly over TP x PP ranks; vLLM's own
activation and CUDA-graph overhead is put at a fixed share of the GPU (OVERHEAD)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
OVERHEAD = 0.06  # of the GPU's memory: activations, CUDA graphs, the allocator's slack (vLLM profiles it)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


@dataclass(frozen=True)
class ModelShape:
    params: float  # all parameters, embeddings included
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """From a config.json (a multimodal one's text_config); params counted for a gated-MLP decoder."""
        cfg = {**cfg, **(cfg.get("text_config") or {})}
        hidden, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o; k, v
        mlp = 3 * hidden * cfg.get("intermediate_size", 4 * hidden)  # gate, up, down
        embed = cfg.get("vocab_size", 32000) * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
        return cls(params=float(layers * (attn + mlp) + embed), layers=layers, kv_heads=kv, head_dim=head_dim)


def engine_memory(shape: ModelShape, *, dtype_bytes: int, tp: int, pp: int, max_model_len: int,
                  gpu_gib: float, utilization: float, batch: int) -> dict[str, Any]:
    """Per GPU of one engine: weights GiB, KV cache GiB for one max_model_len sequence, the GiB vLLM may use, and
    how many such sequences fit at once beside the weights (at most `batch` are asked for)."""
    ranks = tp * pp
    weights = shape.params * dtype_bytes / ranks / GIB
    # K and V, each layer (a PP rank holds its share of the layers), each KV head (a TP rank holds its share)
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes / ranks
    per_seq = kv_per_token * max_model_len / GIB
    usable = gpu_gib * (utilization - OVERHEAD)
    fits = int((usable - weights) // per_seq) if per_seq and usable > weights else 0
    return {"weights_gib": weights, "kv_gib_per_sequence": per_seq, "usable_gib": usable, "sequences": fits,
            "batch": batch}


def memory_verdict(m: dict[str, Any], where: str) -> tuple[str, str, str]:
    """(status, detail, fix) of engine_memory's numbers: fail when not one max_model_len sequence fits beside the
    weights (vLLM refuses to start), warn when fewer than `batch` fit (vLLM runs fewer at once: slower)."""
    detail = (f"per GPU ({where}): weights {m['weights_gib']:.1f} GiB + {m['kv_gib_per_sequence']:.2f} GiB of KV "
              f"cache a max_model_len sequence, of {m['usable_gib']:.1f} GiB usable: {m['sequences']} sequences "
              f"at once (batch_size {m['batch']})")
    if m["sequences"] < 1:
        return ("fail", detail, "more GPUs per engine (tensor_parallel_size), a smaller max_model_len, a GPU with "
                "more memory, or a higher engine_kwargs.gpu_memory_utilization")
    if m["sequences"] < m["batch"]:
        return "warn", detail, "fine, but slower: a smaller max_model_len or more tensor parallelism fits more"
    return "ok", detail, ""


def shape_of(model: str, table: dict[str, Any]) -> ModelShape | None:
    """The shape of `model`: the hardware table's llm_shapes entry, else its config.json where it is at hand
    without a network (a local folder or a packaged model); None when neither is."""
    if model in table:
        return ModelShape.from_config(table[model])
    import json
    from pathlib import Path

    from llambert_ray.models import resolve_model

    try:
        path = Path(resolve_model(model))
        return ModelShape.from_config(json.loads((path / "config.json").read_text())) if path.is_dir() else None
    except Exception:  # a hub id or a bucket: plan reads no network
        return None


def dtype_bytes(a: Any) -> int:
    """Bytes per weight of a GPU engine of AnnotateConfig `a` (dtype auto = bfloat16 on GPU)."""
    return DTYPE_BYTES.get(a.dtype if a.dtype != "auto" else "bfloat16", 2)


def engine_check(shape: ModelShape, a: Any, gpu_gib: float, where: str) -> tuple[str, str, str]:
    """memory_verdict for one engine of AnnotateConfig `a` on GPUs of `gpu_gib`."""
    m = engine_memory(shape, dtype_bytes=dtype_bytes(a), tp=a.tensor_parallel_size,
                      pp=a.pipeline_parallel_size, max_model_len=a.max_model_len, gpu_gib=gpu_gib,
                      utilization=float(a.engine_kwargs.get("gpu_memory_utilization", 0.9)), batch=a.batch_size)
    return memory_verdict(m, f"{where}, TP {a.tensor_parallel_size} x PP {a.pipeline_parallel_size}")
