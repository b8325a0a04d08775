"""Where outputs live: a local or shared-disk path, or object storage (s3://, gs://: pyarrow filesystems). Local
writes are atomic (a temporary name, then a rename); object stores have none, so an output there is its parts
then a manifest written last (MANIFEST), and readers trust only published outputs."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from llambert_ray.ray_env import LIGHT

MANIFEST = "_SUCCESS"
_SECRET_PARAMS = ("secret_key", "access_key", "session_token")


class StorageError(ValueError):
    """An output location cannot be written or read as given; the message names it and the fix."""


def is_uri(path: str | Path) -> bool:
    """An object-storage (or other pyarrow filesystem) URI rather than a local / shared-disk path."""
    return "://" in str(path)


def join_path(base: str | Path, name: str) -> str | Path:
    """`base`/`name` for a local path or a URI (a URI's ?query, e.g. endpoint_override, stays at the end)."""
    if not is_uri(base):
        return Path(base) / name
    head, sep, query = str(base).partition("?")
    return f"{head.rstrip('/')}/{name}{sep}{query}"


def filesystem(path: str | Path, *, error: type[Exception] = StorageError, what: str = ""
               ) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for `path` (a local path, resolved, or a URI: s3://, gs://, ...) and the path in it.
    Credentials come from the environment (AWS_* / GOOGLE_*, instance roles) on every node, never from the URI:
    it is written to manifests and logs, so one carrying them is refused. Errors are the caller's kind (`error`:
    CorpusError for a corpus, ...), naming `what` it is."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    uri = str(path)
    shown = uri.partition("?")[0]
    query = uri.partition("?")[2].lower()
    if any(f"{k}=" in query for k in _SECRET_PARAMS):
        raise error(f"the URI {shown} carries credentials in its query; fix: give them as the environment's "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance role) on every node, never in the URI")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:
        raise error(f"cannot open {what}{shown}: {e}; fix: check the scheme (s3://, gs://), the bucket and the "
                    f"credentials (AWS_* / GOOGLE_APPLICATION_CREDENTIALS or the node's role)") from e


def _published(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError) as e:
        if fs.get_file_info(f"{root}/{MANIFEST}").type == pafs.FileType.NotFound:
            return None
        raise StorageError(f"cannot read the manifest {root}/{MANIFEST}: {e}") from e


def published_files(uri: str) -> tuple[pafs.FileSystem, list[str], dict[str, Any]]:
    """The filesystem and the parquet files of the published output at `uri` (its manifest's), and the manifest.
    Raises StorageError for a folder no write published."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    manifest = _published(fs, root)
    if manifest is None:
        raise StorageError(f"{str(uri).partition('?')[0]} is not a published output (no {MANIFEST} manifest: its "
                           f"write has not finished, or failed); fix: run the stage that writes it (again)")
    return fs, [f"{root}/{name}" for name in manifest["files"]], manifest


def write_text(path: str | Path, text: str) -> None:
    """A small text file (a summary) at a local path or a URI."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, p = filesystem(str(path))
    with fs.open_output_stream(p) as f:
        f.write(text.encode("utf-8"))


def _write_parquet_uri(ds, uri: str) -> str:
    """write_parquet into object storage: the parts into a folder of their own, then the manifest, then the earlier
    writes' parts removed."""
    import pyarrow.parquet as pq

    fs, root = filesystem(uri)
    root = root.rstrip("/")
    name = f"parts-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    parts = f"{root}/{name}"
    try:
        if isinstance(ds, pd.DataFrame):
            with fs.open_output_stream(f"{parts}/part-0.parquet") as f:
                ds.to_parquet(f, index=False)
        else:
            ds.write_parquet(parts, filesystem=fs, ray_remote_args=dict(LIGHT))
    except BaseException:
        try:
            fs.delete_dir(parts)
        except Exception:  # nothing written yet, or the store is gone: the parts are never read either way
            pass
        raise
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parts, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    entries = []
    for f in files:
        with fs.open_input_file(f) as fh:
            entries.append({"file": f[len(root) + 1:], "rows": pq.read_metadata(fh).num_rows, "bytes": fh.size()})
    manifest = {"format": "parquet", "files": [e["file"] for e in entries], "rows": sum(e["rows"] for e in entries),
                "bytes": sum(e["bytes"] for e in entries), "parts": entries,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:  # published: from here on readers see this write
        f.write(json.dumps(manifest, indent=1).encode("utf-8"))
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        base = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and base.startswith("parts-") and base != name:
            fs.delete_dir(info.path)  # an earlier write's (or a failed one's): no manifest names it any more
    return uri


def write_parquet(ds, path: str | Path) -> Path | str:
    """Write a Ray Dataset (or pandas frame) to a parquet folder atomically: tmp name, then rename; in object
    storage (s3://, gs://) parts then a manifest (see MANIFEST).

    A reader never sees a partial output: until the rename, only `<path>.tmp-*` exists (removed again if the write
    fails). A Dataset is written by Ray Data's own streaming write: its write tasks take the blocks as the upstream
    stages make them, so a lazy Dataset is never held whole. They ask for a light CPU share: an actor pool upstream
    (labelling) holds its CPUs until the last block, and a write task wanting a whole CPU beside a pool that holds
    every CPU would never start, while backpressure pauses the pool until the blocks are written: a hang.
    """
    if is_uri(path):
        return _write_parquet_uri(ds, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(ds, pd.DataFrame):
            tmp.mkdir()
            ds.to_parquet(tmp / "part-0.parquet", index=False)
        else:
            ds.write_parquet(str(tmp), ray_remote_args=dict(LIGHT))  # a copy: Ray may add keys to it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)
    return path


def iter_parquet_frames(path: str | Path, columns: list[str] | None = None,
                        batch_rows: int = 65_536) -> Iterator[pd.DataFrame]:
    """Those of `columns` (None: all) that each file has, from the parquet folder (or file) at `path`, as frames of
    at most `batch_rows` rows, one after another: an aggregate over an output too large for memory holds one frame
    at a time (only the named columns are read). Each file is read with its own schema, so files that disagree on a
    column's type (a column with no value written as Arrow's null type) are each read as they are."""
    import pyarrow.parquet as pq

    if is_uri(path):
        fs, names, _ = published_files(str(path))
        files: list[Any] = [fs.open_input_file(n) for n in names]
    else:
        path = Path(path)
        if not path.exists():
            raise StorageError(f"{path} does not exist; fix: run the stage that writes it first")
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    for f in files:
        pf = pq.ParquetFile(f)
        have = set(pf.schema_arrow.names)
        cols = None if columns is None else [c for c in columns if c in have]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            yield batch.to_pandas()


def read_parquet_frame(path: str | Path, columns: list[str] | None = None, ids=None) -> pd.DataFrame:
    """A parquet folder or file as one frame. With `ids` (any iterable of ids), only the rows with those ids, read
    a frame at a time: the labels of a sample's rows from a labels output of the whole corpus, which is never held
    whole; with `columns`, those of them the files have (a caller checks for what it needs)."""
    if not is_uri(path):
        path = Path(path)
        if not path.exists():
            raise StorageError(f"{path} does not exist; fix: run the stage that writes it first")
    if ids is None and columns is None and not is_uri(path):
        return pd.read_parquet(path)
    keep = None if ids is None else set(map(str, ids))
    frames = [f if keep is None else f[f["id"].astype(str).isin(keep)] for f in iter_parquet_frames(path, columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or [])
