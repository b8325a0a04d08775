"""Corpus input: read any corpus into a validated Ray Dataset[id, text, label?] and sample it (outputs:
llambert_ray.storage; the corpora the project fetches: llambert_ray.fetch).

Formats: parquet, jsonl, csv (a file or a folder of them) and the aclImdb layout (folder or .tar.gz), from a
local path or any pyarrow filesystem URI (s3://, gs://). Validation fails with a message that names the bad
input and the fix: missing column, non-string / empty text, duplicate ids, unknown gold labels.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from llambert_ray.config import CorpusConfig
from llambert_ray.ray_env import LIGHT, LIGHT_CPUS
from llambert_ray.storage import MANIFEST, filesystem, is_uri, published_files
from llambert_ray.tasks import Task, TaskError


class CorpusError(ValueError):
    """The corpus cannot be used as given; the message names the input and the fix."""


@dataclass
class CorpusInfo:
    """What validation found: row count and gold label distribution (label name -> rows)."""

    rows: int
    has_label: bool
    label_counts: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # rows left out for an empty or null text (corpus.empty_text: drop)


# ------------------------------------------------------------------------------------------ reading
def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(path, error=CorpusError, what="corpus ")


def detect_format(path: str) -> str:
    """parquet / jsonl / csv / aclimdb from the path (and, for folders, their contents)."""
    fs, p = _filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus path {path!r} does not exist; fix: pass an existing file or folder "
                          f"(parquet, jsonl, csv, aclImdb)")
    names = [p]
    if info.type == pafs.FileType.Directory:
        children = fs.get_file_info(pafs.FileSelector(p, recursive=False))
        base = {Path(c.path).name for c in children}
        if {"train", "test"} & base and any(c.type == pafs.FileType.Directory for c in children):
            return "aclimdb"
        if "aclImdb" in base:
            return "aclimdb"
        if MANIFEST in base:  # an output write_parquet published in object storage
            return "parquet"
        names = [c.path for c in children if c.type == pafs.FileType.File]
    for n in names:
        low = n.lower()
        if low.endswith((".tar.gz", ".tgz")):
            return "aclimdb"
        if low.endswith(".parquet"):
            return "parquet"
        if low.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
            return "jsonl"
        if low.endswith((".csv", ".csv.gz", ".tsv")):
            return "csv"
    raise CorpusError(f"cannot tell the format of corpus {path!r}; fix: use .parquet/.jsonl/.csv files or "
                      f"set corpus.format")


def check_corpus_path(cfg: CorpusConfig | None, where: str = "corpus.path") -> None:
    """Fail before Ray starts when a corpus is not given or a local corpus path does not exist (a URI is read, and
    checked, by the Ray Data read itself: its credentials may exist only on the cluster). `where`: the key or flag
    that gave the path, for the message."""
    if cfg is None or cfg.sql is not None:  # a database is checked by read_corpus, on the driver, before any task
        return
    if not cfg.path:
        raise CorpusError(f"no corpus given ({where}); fix: pass --input PATH or set {where} in the config")
    if "://" not in cfg.path and not Path(cfg.path).expanduser().exists():
        raise CorpusError(f"corpus path {cfg.describe()} ({where}) does not exist; fix: pass an existing file or "
                          f"folder (parquet, jsonl, csv, aclImdb)")


def _aclimdb_rows(path: str) -> Iterator[dict[str, Any]]:
    """Rows of an aclImdb tree: id = '<split>/<pos|neg|unsup>/<file stem>', label pos/neg/None; split train, test,
    or unsup for the 50k unlabelled reviews under train/unsup (so `split: [train]` is the 25k labelled ones)."""
    pat = re.compile(r"(?:^|/)(train|test)/(pos|neg|unsup)/([^/]+)\.txt$")
    fs, p = _filesystem(path)
    if p.lower().endswith((".tar.gz", ".tgz")):
        with fs.open_input_stream(p, compression=None) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                m = pat.search(member.name)
                if m and member.isfile():
                    fobj = tar.extractfile(member)
                    assert fobj is not None
                    yield _acl_row(m, fobj.read())
        return
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        m = pat.search(info.path)
        if m and info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                yield _acl_row(m, f.read())


def _acl_row(m: re.Match[str], data: bytes) -> dict[str, Any]:
    split, cls, stem = m.groups()
    return {"id": f"{split}/{cls}/{stem}", "text": data.decode("utf-8", errors="replace"),
            "label": None if cls == "unsup" else cls, "split": "unsup" if cls == "unsup" else split}


def _read_aclimdb(path: str):
    import ray

    tables, chunk = [], []
    for row in _aclimdb_rows(path):
        chunk.append(row)
        if len(chunk) == 5000:
            tables.append(pa.Table.from_pylist(chunk))
            chunk = []
    if chunk:
        tables.append(pa.Table.from_pylist(chunk))
    if not tables:
        raise CorpusError(f"{path!r} has no aclImdb reviews (expected train|test/pos|neg|unsup/*.txt); "
                          f"fix: point at the aclImdb folder or aclImdb_v1.tar.gz")
    return ray.data.from_arrow(tables)


def _read_raw(cfg: CorpusConfig):
    import ray

    if cfg.sql is not None:
        from llambert_ray.sql import SqlError, read_dataset, source_columns

        try:
            _, rows = source_columns(cfg.sql)
        except SqlError as e:
            raise CorpusError(f"corpus.sql: {e}") from e
        return read_dataset(cfg.sql, cfg.id_column, rows, LIGHT_CPUS)
    assert cfg.path is not None
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    if fmt == "aclimdb":
        return _read_aclimdb(cfg.path)
    fs, p = _filesystem(cfg.path)
    # read tasks ask a light CPU share, as write tasks do: an actor pool downstream (labelling) may hold all but a
    # fraction of the CPUs, and a read task waiting for a whole CPU there would never start (a hang). Ray 2.60's
    # V2 parquet reader starts with a file-listing task that asks a whole CPU whatever ray_remote_args say (2
    # labelling actors of 0.9 CPU on 2 CPUs hung before reading a row): parquet goes through the V1 reader.
    light = dict(LIGHT)  # num_cpus
    ray.data.DataContext.get_current().use_datasource_v2 = False
    if fmt == "parquet":
        if is_uri(cfg.path) and fs.get_file_info(f"{p.rstrip('/')}/{MANIFEST}").type == pafs.FileType.File:
            fs, files, _ = published_files(cfg.path)  # an output we published: its manifest's files, nothing else
            return ray.data.read_parquet(files, filesystem=fs, **light)
        return ray.data.read_parquet(p, filesystem=fs, **light)
    if fmt == "jsonl":
        return ray.data.read_json(p, filesystem=fs, **light)
    return ray.data.read_csv(p, filesystem=fs, **light)


_INVALID = "\x00invalid:"


def _normalize_batch(df: pd.DataFrame, *, id_col: str | None, text_col: str, label_col: str | None,
                     filters: dict[str, list[Any]], task: Task | None) -> pd.DataFrame:
    for col, allowed in filters.items():
        df = df[df[col].astype(str).isin([str(v) for v in allowed])]
    out = pd.DataFrame({"id": df[id_col].astype(str).to_numpy() if id_col else ["" for _ in range(len(df))],
                        "text": df[text_col].to_numpy()})
    if label_col:
        out["label"] = df[label_col].map(lambda v: _gold(v, task)).to_numpy()
    return out


def _gold(v: Any, task: Task | None) -> str | None:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 1.0 read from a float column is the gold label 1
    if task is None:
        return str(v)
    try:
        return task.gold_label(v)
    except TaskError:
        return _INVALID + str(v)  # reported on the driver with the fix; raising here would bury it in Ray


def _batch_stats(df: pd.DataFrame) -> pd.DataFrame:
    texts = df["text"]
    nonstr = texts.map(lambda t: t is not None and not isinstance(t, str))
    null = texts.isna()
    empty = ~null & ~nonstr & texts.map(lambda t: isinstance(t, str) and not t.strip())
    labels = df["label"].dropna().unique().tolist() if "label" in df else []
    # gold label counts of the rows that stay (empty ones are dropped or fail the read), as JSON: a block's own keys
    counts = df.loc[~(empty | null), "label"].value_counts() if "label" in df else pd.Series(dtype=int)
    return pd.DataFrame({
        "rows": [len(df)],
        "null_ids": [df["id"][null].head(5).tolist()], "n_null": [int(null.sum())],
        "nonstr_ids": [df["id"][nonstr].head(5).tolist()], "n_nonstr": [int(nonstr.sum())],
        "empty_ids": [df["id"][empty].head(5).tolist()], "n_empty": [int(empty.sum())],
        "labels": [sorted(map(str, labels))],
        "label_counts": [json.dumps({str(k): int(v) for k, v in counts.items()})],
    })


def read_corpus(cfg: CorpusConfig, task: Task | None = None, *, validate: bool = True, hold: bool = True):
    """Read and validate a corpus into a Ray Dataset with columns id (str), text (str) and label (str|None).

    hold (the default): the rows are read once and held in Ray's object store, for stages that pass over them more
    than once (sampling, training). hold=False streams, for one pass over a corpus larger than the object store
    (labelling a whole database): the checks read the source (the id check only its id column), the returned
    dataset reads it again as it is consumed, and nothing is held but what is in flight. Numbering rows
    (corpus.id_column: null) needs them held.

    Gold labels are mapped to the task's label names when a task is given (e.g. IMDb 1 -> positive).
    Raises CorpusError for a missing path or column, non-string / empty texts, duplicate ids or an empty corpus.
    Returns (dataset, CorpusInfo).
    """
    if not cfg.path and cfg.sql is None:
        raise CorpusError("no corpus given; fix: pass --input PATH or set corpus.path (or corpus.sql) in the config")
    if cfg.sql is not None and validate and not hold and cfg.id_column and not cfg.filters:
        return _read_sql_checked(cfg, task)
    ds = _read_raw(cfg)
    try:
        schema = ds.schema()
    except Exception as e:
        raise CorpusError(f"cannot read corpus {cfg.describe()}: {_root_message(e)}; fix: check that the file is "
                          f"valid {cfg.format if cfg.format != 'auto' else 'parquet/jsonl/csv'} in UTF-8") from e
    if schema is None:
        raise CorpusError(f"corpus {cfg.describe()} is empty (no rows); fix: pass a corpus with rows")
    label_col = _check_columns(cfg, schema)
    ds = ds.map_batches(_normalize_batch, batch_format="pandas", **LIGHT,
                        fn_kwargs=dict(id_col=cfg.id_column, text_col=cfg.text_column, label_col=label_col,
                                       filters=cfg.filters, task=task))
    info = CorpusInfo(rows=0, has_label=label_col is not None)
    if not validate:
        return (_number_rows(ds) if cfg.id_column is None else ds), info
    return _validate_rows(cfg, task, ds, label_col, info, hold or cfg.id_column is None), info


def _read_sql_checked(cfg: CorpusConfig, task: Task | None):
    """A database corpus streamed, its checks asked of the database (sql.corpus_stats: aggregate queries) rather
    than of Ray Data passes over its rows: the table is read once, by what consumes the dataset. The same checks and
    messages as _validate_rows, which they feed."""
    from llambert_ray.sql import SqlError, corpus_stats, read_dataset, source_columns

    assert cfg.sql is not None and cfg.id_column
    try:
        cols, rows = source_columns(cfg.sql)
        if rows == 0:
            raise CorpusError(f"corpus {cfg.describe()} is empty (no rows); fix: pass a corpus with rows")
        label_col = _check_columns(cfg, pa.schema([(c, pa.string()) for c in cols]))  # types: corpus_stats
        st = corpus_stats(cfg.sql, cfg.id_column, cfg.text_column, label_col)
    except SqlError as e:
        raise CorpusError(f"corpus.sql: {e}") from e
    gold: dict[str, int] = {}
    for value, n in st.gold:
        g = _gold(value, task)
        if g is not None:
            gold[g] = gold.get(g, 0) + n
    stats = pd.DataFrame({"rows": [st.rows], "n_null": [st.n_null], "null_ids": [st.examples.get("null", [])],
                          "n_nonstr": [st.n_nonstr], "nonstr_ids": [st.examples.get("nonstr", [])],
                          "n_empty": [st.n_empty], "empty_ids": [st.examples.get("empty", [])],
                          "labels": [sorted(gold)], "label_counts": [json.dumps(gold)]})
    ds = read_dataset(cfg.sql, cfg.id_column, rows, LIGHT_CPUS)
    ds = ds.map_batches(_normalize_batch, batch_format="pandas", **LIGHT,
                        fn_kwargs=dict(id_col=cfg.id_column, text_col=cfg.text_column, label_col=label_col,
                                       filters={}, task=task))
    info = CorpusInfo(rows=0, has_label=label_col is not None)
    ds = _validate_rows(cfg, task, ds, label_col, info, hold=False, stats=stats,
                        duplicates=(st.n_dup, st.examples.get("dup", [])))
    return ds, info


def _check_columns(cfg: CorpusConfig, schema) -> str | None:
    """The configured columns exist and the text column holds text; returns the gold label column, or None when
    the corpus has none (gold labels are optional: an unlabelled corpus is the normal case)."""
    cols = list(schema.names)
    roles = [("text_column", cfg.text_column)] + ([("id_column", cfg.id_column)] if cfg.id_column else [])
    for key, col in roles:
        if col not in cols:
            raise CorpusError(f"corpus {cfg.describe()} has no column {col!r} (corpus.{key}); it has {cols}; "
                              f"fix: set corpus.{key} (--{key.replace('_', '-')}) to one of them")
    for col in cfg.filters:
        if col not in cols:
            raise CorpusError(f"corpus {cfg.describe()} has no column {col!r} to filter on; it has {cols}; "
                              f"fix: correct corpus.filters")
    text_type = schema.types[cols.index(cfg.text_column)]
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)
            or pa.types.is_dictionary(text_type)):
        if pa.types.is_binary(text_type) or pa.types.is_large_binary(text_type):
            raise CorpusError(f"column {cfg.text_column!r} of {cfg.describe()} holds bytes that are not valid UTF-8 "
                              f"text; fix: re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        raise CorpusError(f"column {cfg.text_column!r} of {cfg.describe()} holds {text_type}, not text; fix: point "
                          f"corpus.text_column at the column with the texts")
    return cfg.label_column if not cfg.label_column or cfg.label_column in cols else None


def _with_text(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose text is neither null nor blank."""
    return df[df["text"].notna() & (df["text"].astype(str).str.strip() != "")]


def _validate_rows(cfg: CorpusConfig, task: Task | None, ds, label_col: str | None, info: CorpusInfo,
                   hold: bool = True, stats: pd.DataFrame | None = None,
                   duplicates: tuple[int, list[str]] | None = None):
    """The rows' checks (rows present, texts, gold labels, unique ids); fills info's rows and label counts,
    returns the dataset (empty texts dropped with empty_text: drop): materialized with `hold` (one read of the
    source, every check on those blocks), else lazy (see read_corpus). `stats` (_batch_stats' columns) and
    `duplicates` (duplicate_ids' answer): given when the source answered them itself (a database)."""
    if stats is None:
        try:
            if hold:
                ds = ds.materialize()
            # one row of stats a block (not a batch): the driver holds a few hundred bytes per block of the corpus
            stats = ds.map_batches(_batch_stats, batch_format="pandas", batch_size=None, **LIGHT).to_pandas()
        except Exception as e:
            raise CorpusError(f"cannot read corpus {cfg.describe()}: {_root_message(e)}; fix: check the file is "
                              f"valid and UTF-8 encoded") from e
    info.rows = int(stats["rows"].sum()) if len(stats) else 0
    if info.rows == 0:
        raise CorpusError(f"corpus {cfg.describe()} has no rows" + (f" after filters {cfg.filters}"
                          if cfg.filters else "") + "; fix: pass a corpus with rows or loosen the filters")
    for kind, what in (("null", "no text (null)"), ("nonstr", "non-string text"), ("empty", "empty text")):
        n = int(stats[f"n_{kind}"].sum())
        if n and not (kind in ("empty", "null") and cfg.empty_text == "drop"):
            ids = [i for sub in stats[f"{kind}_ids"] for i in sub][:5]
            raise CorpusError(f"{n} rows of {cfg.describe()} have {what} (e.g. ids {ids}); fix: clean the "
                              f"corpus" + (" or set corpus.empty_text: drop" if kind != "nonstr" else ""))
    labels = sorted({lab for sub in stats["labels"] for lab in sub})
    bad = [lab[len(_INVALID):] for lab in labels if lab.startswith(_INVALID)]
    if bad and task is not None:
        raise CorpusError(f"corpus {cfg.describe()}, column {label_col!r}: gold labels {bad[:5]} are not labels "
                          f"of task {task.name!r} ({task.labels}); fix: add them to gold_label_map in the "
                          f"task YAML, or set corpus.label_column: null")
    info.dropped = int(stats["n_empty"].sum() + stats["n_null"].sum()) if cfg.empty_text == "drop" else 0
    if info.dropped:  # a database's NULL texts too
        ds = ds.map_batches(_with_text, batch_format="pandas", **LIGHT)
        ds = ds.materialize() if hold else ds
        info.rows -= info.dropped
    if cfg.id_column is None:
        ds = _number_rows(ds).materialize()  # ids '0'..'n-1': unique, nothing to check
    else:
        n_dup, dup = duplicates if duplicates is not None else duplicate_ids(ds, info.rows)
        if n_dup:
            raise CorpusError(f"corpus {cfg.describe()} has {n_dup} duplicate ids in column {cfg.id_column!r} (e.g. "
                              f"{dup}); fix: make ids unique or set corpus.id_column: null to number the rows")
    if label_col:
        counts: dict[str, int] = {}
        for part in stats["label_counts"]:
            for k, v in json.loads(part).items():
                counts[k] = counts.get(k, 0) + v
        info.label_counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return ds


IDS_PER_PARTITION = 2_000_000  # ids one duplicate-check task holds (~100 MB of a worker's memory at most)


def duplicate_ids(ds, rows: int, show: int = 5) -> tuple[int, list[str]]:
    """Ids of `ds` that occur more than once: how many, and the first `show`. Exact, and hash-partitioned on the
    cluster: each block's ids are split by a hash into partitions, each partition is checked by a task of its own,
    so the driver holds object refs only, never the ids (its memory does not grow with the corpus), and a worker
    holds at most about IDS_PER_PARTITION ids."""
    import ray

    refs = ds.select_columns(["id"], **LIGHT).to_arrow_refs()
    if not refs:
        return 0, []
    parts = int(min(256, max(1, -(-rows // IDS_PER_PARTITION))))
    split = ray.remote(num_cpus=LIGHT_CPUS, num_returns=parts)(_split_ids)
    pieces = [split.remote(r, parts) for r in refs]
    if parts == 1:
        pieces = [[p] for p in pieces]
    check = ray.remote(num_cpus=LIGHT_CPUS)(_repeated_ids)
    found = ray.get([check.remote(show, *[p[i] for p in pieces]) for i in range(parts)])
    return sum(n for n, _ in found), [i for _, ids in found for i in ids][:show]


def _split_ids(table: pa.Table, parts: int):
    """A block's ids in `parts` partitions by a hash of the id (the same id always lands in the same one)."""
    ids = table.column("id").combine_chunks()
    if parts == 1:
        return ids
    where = pd.util.hash_array(ids.to_numpy(zero_copy_only=False)) % parts
    return tuple(ids.filter(pa.array(where == p)) for p in range(parts))


def _repeated_ids(show: int, *arrays: pa.Array) -> tuple[int, list[str]]:
    """Within one partition: how many ids occur more than once, and the first `show` of them."""
    ids = pa.chunked_array([a.cast(pa.large_string()) for a in arrays], type=pa.large_string())
    ids = pd.Series(ids.to_numpy(zero_copy_only=False), dtype=object)
    dup = ids[ids.duplicated()].unique()
    return len(dup), [str(i) for i in dup[:show]]


def _number_rows(ds):
    """Give rows the ids '0'..'n-1' in block order (for corpora without an id column)."""
    import ray

    @ray.remote(num_cpus=LIGHT_CPUS)
    def _with_ids(table: pa.Table, start: int) -> pa.Table:
        ids = pa.array([str(i) for i in range(start, start + table.num_rows)])
        return table.set_column(table.schema.get_field_index("id"), "id", ids)

    refs = ds.to_arrow_refs()
    sizes = ray.get([ray.remote(num_cpus=LIGHT_CPUS)(lambda t: t.num_rows).remote(r) for r in refs])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return ray.data.from_arrow_refs([_with_ids.remote(r, int(s)) for r, s in zip(refs, starts, strict=True)])


def _root_message(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    for line in reversed(msg):
        if line.strip():
            return line.strip()[:300]
    return type(e).__name__


# ----------------------------------------------------------------------------------------- sampling
def sample_ids(ids: pd.Series | list[str], *, n: int | None = None, fraction: float | None = None,
               seed: int = 0) -> list[str]:
    """Seeded choice of ids, independent of the order the corpus was read in."""
    pool = np.array(sorted(map(str, ids)), dtype=object)
    if fraction is not None:
        n = max(1, int(round(fraction * len(pool))))
    if n is None or n >= len(pool):
        if n is not None and n > len(pool):
            raise CorpusError(f"sample of {n} rows asked from a corpus of {len(pool)} rows; fix: lower "
                              f"--sample to at most {len(pool)} or drop it")
        return list(pool)
    rng = np.random.default_rng(seed)
    return list(pool[np.sort(rng.choice(len(pool), size=n, replace=False))])


def sample_corpus(ds, cfg: CorpusConfig, *, exclude: set[str] | None = None):
    """The seeded subset of `ds` that cfg.sample / cfg.fraction ask for (all rows when neither is set)."""
    if cfg.sample is None and cfg.fraction is None and not exclude:
        return ds
    ids = ds.select_columns(["id"], **LIGHT).to_pandas()["id"]
    if exclude:
        ids = ids[~ids.isin(exclude)]
    keep = sample_ids(ids, n=cfg.sample, fraction=cfg.fraction, seed=cfg.seed)
    # Materialized: the sample is small, and the engine stage downstream then starts on ready blocks.
    return ds.map_batches(lambda df: df[df["id"].isin(keep)], batch_format="pandas", **LIGHT).materialize()


# ------------------------------------------------------------------------------------------ writing
# ------------------------------------------------------------------------------------------ object storage
# An output folder in object storage (s3://, gs://) is published by this manifest, written last: the parquet files
# it names, their rows and bytes. Object stores have no atomic rename, so a write puts its files in a folder of its
# own (parts-<token>/) and then replaces the manifest (one PUT: a reader sees the old version or the new one, never a
# mix); readers trust only the files a manifest names (a failed write's parts are never read) and refuse a folder
# with no manifest.
