"""SQL databases as a corpus and as the label sink, through Ray Data's `read_sql` / `write_sql`.

Two dialects, each a DB-API 2 connection: SQLite (`sqlite:///file.db`, the standard library's sqlite3: nothing to
install, one file every node must see) and PostgreSQL (`postgresql://USER@HOST:PORT/DBNAME`, psycopg 3).

- Reading: a table or a SELECT, split into shards of about `rows_per_shard` rows by a hash of the id column, one
  Ray Data read task per shard (each task's query selects its shard; the database scans once per shard).
- Writing: a labels table keyed by id, created when missing; every write task upserts its rows (INSERT ... ON
  CONFLICT (id) DO UPDATE), so a rerun, or a write task Ray retries, replaces rows and never duplicates them. Each
  row carries the `run_id` of the `llambert label` call that wrote it: the summary counts that run's rows with one
  GROUP BY in the database (no row reaches the driver).
- Incremental relabelling: each row also carries a hash of the text it was labelled from (`text_hash`) and the
  fingerprint of the model folder that labelled it (`model`); with label.incremental a run drops, before the
  classifier, every corpus row the table already holds from this model with the same text and no error (a look-up
  by id, a batch of ids at a time, on the table's primary key), so only new rows, changed texts, rows a failed row
  or another model labelled are labelled and upserted.
- Secrets: a URL with a password is refused (config.SqlConfig); the password comes from the environment variable
  named by `password_env`, read on the driver, and travels to Ray's tasks inside the connection factory only:
  never in a config dump, manifest, log line, report or error message.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from llambert_ray.config import SqlConfig

LABELS_TABLE = "llambert_labels"
# written with every row, so that a later incremental run knows what it may keep (a table written before they
# existed gets them added, empty: its rows count as not yet labelled)
TRACK_COLUMNS = ("text_hash", "model")


class SqlError(ValueError):
    """The database cannot be used as configured; the message names the input and the fix (never a password)."""


def quote(name: str) -> str:
    """A SQL identifier, quoted (both dialects use double quotes); `schema.table` quotes each part."""
    parts = name.split(".")
    for p in parts:
        if not p or "\x00" in p:
            raise SqlError(f"{name!r} is not a table or column name; fix: name it as the database does")
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def _shard_hash(value: Any) -> int:
    """SQLite's shard hash (registered as llambert_shard on every connection): CRC-32 of the value's text."""
    return zlib.crc32(str(value).encode("utf-8"))


@dataclass(frozen=True)
class Connector:
    """A picklable DB-API connection factory for Ray's tasks. Its repr leaves the password out."""

    dialect: str
    url: str
    password: str | None = None

    def __repr__(self) -> str:
        return f"Connector({self.url}{', password set' if self.password else ''})"

    def __call__(self):
        if self.dialect == "sqlite":
            import sqlite3

            conn = sqlite3.connect(sqlite_path(self.url), timeout=300)  # write tasks wait for SQLite's one writer
            conn.create_function("llambert_shard", 1, _shard_hash, deterministic=True)
            return conn
        try:
            import psycopg
        except ImportError as e:
            raise SqlError("PostgreSQL needs psycopg; fix: pip install 'psycopg[binary]' (make setup installs "
                           "it)") from e
        parts = urlsplit(self.url)
        kwargs: dict[str, Any] = {"host": parts.hostname or "localhost", "port": parts.port or 5432,
                                  "dbname": unquote(parts.path.lstrip("/")) or "postgres",
                                  "user": unquote(parts.username or "") or None, "password": self.password,
                                  "connect_timeout": 30}
        return psycopg.connect(**{k: v for k, v in kwargs.items() if v is not None})


def sqlite_path(url: str) -> str:
    """The file of a sqlite:/// URL (sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db)."""
    return url.split("://", 1)[1][1:]


def connector(cfg: SqlConfig) -> Connector:
    """The connection factory for `cfg`, its password read from the environment variable `cfg.password_env`."""
    password = None
    if cfg.password_env:
        password = os.environ.get(cfg.password_env)
        if password is None:
            raise SqlError(f"the environment variable {cfg.password_env} (password_env of {cfg.url}) is not set; "
                           f"fix: export {cfg.password_env}=... where the job starts")
    return Connector(cfg.dialect, cfg.url, password)


def open_connection(conn_factory: Connector, what: str):
    try:
        return conn_factory()
    except SqlError:
        raise
    except Exception as e:
        raise SqlError(f"cannot connect to {what}: {_reason(e, conn_factory)}; fix: check the URL, that the "
                       f"server runs, the user and its password (password_env)") from e


def _reason(e: BaseException, conn_factory: Connector) -> str:
    """An exception's message with the password taken out, should a driver ever repeat it."""
    msg = " ".join(str(e).split())[:400]
    return msg.replace(conn_factory.password, "***") if conn_factory.password else msg


def source_query(cfg: SqlConfig) -> str:
    if cfg.query:
        return cfg.query.strip().rstrip(";")
    assert cfg.table
    return f"SELECT * FROM {quote(cfg.table)}"


def source_columns(cfg: SqlConfig) -> tuple[list[str], int]:
    """The columns of the corpus's table / query and its row count, asked on the driver (clear errors before any
    Ray task starts)."""
    conn_factory = connector(cfg)
    conn = open_connection(conn_factory, cfg.url)
    q = source_query(cfg)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT * FROM ({q}) AS llambert_src WHERE 1 = 0")
        cols = [d[0] for d in cur.description]
        cur.execute(f"SELECT COUNT(*) FROM ({q}) AS llambert_src")
        rows = int(cur.fetchone()[0])
    except Exception as e:
        raise SqlError(f"cannot read {cfg.describe()}: {_reason(e, conn_factory)}; fix: check the table name or "
                       f"the query (it must be one SELECT)") from e
    finally:
        conn.close()
    return cols, rows


@dataclass
class SourceStats:
    """What the database says of a corpus table / query (corpus_stats): rows, texts that are null, not text or
    blank (a few ids of each), ids that occur more than once, and the raw gold values with their row counts."""

    rows: int
    n_null: int
    n_nonstr: int
    n_empty: int
    examples: dict[str, list[str]]  # null / nonstr / empty / dup -> up to 5 ids
    n_dup: int
    gold: list[tuple[Any, int]]  # (raw gold value, rows with a non-blank text), for the label column


def corpus_stats(cfg: SqlConfig, id_column: str, text_column: str, label_column: str | None,
                 max_gold_values: int = 100_000) -> SourceStats:
    """The corpus checks in the database, a few aggregate queries on the driver, instead of Ray Data passes over the
    rows: one read of the table through Ray (the labelling) instead of three."""
    conn_factory = connector(cfg)
    src = f"({source_query(cfg)}) AS llambert_src"
    t, i = quote(text_column), quote(id_column)
    if cfg.dialect == "sqlite":
        nonstr = f"(typeof({t}) NOT IN ('text', 'null'))"
        blank = f"(TRIM({t}, ' ' || char(9) || char(10) || char(13)) = '')"
    else:
        nonstr = "FALSE"  # a typed column: checked once, below
        blank = f"(btrim(CAST({t} AS text), E' \\t\\n\\r') = '')"
    conds = {"null": f"{t} IS NULL", "nonstr": nonstr, "empty": f"({t} IS NOT NULL AND NOT {nonstr} AND {blank})"}
    conn = open_connection(conn_factory, cfg.url)
    try:
        cur = conn.cursor()
        if cfg.dialect != "sqlite":
            cur.execute(f"SELECT pg_typeof({t})::text FROM {src} LIMIT 1")
            row = cur.fetchone()
            if row and row[0] not in ("text", "character varying", "character", "name", "unknown"):
                raise SqlError(f"column {text_column!r} of {cfg.describe()} holds {row[0]}, not text; fix: point "
                               f"corpus.text_column at the column with the texts (or CAST it in corpus.sql.query)")
        sums = ", ".join(f"SUM(CASE WHEN {c} THEN 1 ELSE 0 END)" for c in conds.values())
        cur.execute(f"SELECT COUNT(*), {sums}, COUNT(DISTINCT {i}), COUNT({i}) FROM {src}")
        rows, n_null, n_nonstr, n_empty, distinct, with_id = (int(v or 0) for v in cur.fetchone())
        examples: dict[str, list[str]] = {}
        for kind, n in (("null", n_null), ("nonstr", n_nonstr), ("empty", n_empty)):
            if n:
                cur.execute(f"SELECT {i} FROM {src} WHERE {conds[kind]} LIMIT 5")
                examples[kind] = [str(r[0]) for r in cur.fetchall()]
        n_dup = 0
        if distinct < with_id:
            dup_ids = f"SELECT {i} FROM {src} GROUP BY {i} HAVING COUNT(*) > 1"
            cur.execute(f"SELECT COUNT(*) FROM ({dup_ids}) AS llambert_dup")
            n_dup = int(cur.fetchone()[0])
            cur.execute(f"{dup_ids} LIMIT 5")
            examples["dup"] = [str(r[0]) for r in cur.fetchall()]
        gold: list[tuple[Any, int]] = []
        if label_column:
            lab = quote(label_column)
            cur.execute(f"SELECT {lab}, COUNT(*) FROM {src} WHERE NOT ({conds['null']}) AND NOT {conds['empty']} "
                        f"GROUP BY {lab} LIMIT {int(max_gold_values) + 1}")
            gold = [(r[0], int(r[1])) for r in cur.fetchall()]
            if len(gold) > max_gold_values:
                raise SqlError(f"column {label_column!r} of {cfg.describe()} has over {max_gold_values:,} distinct "
                               f"values: not gold labels; fix: point corpus.label_column at the labels, or null")
    except SqlError:
        raise
    except Exception as e:
        raise SqlError(f"cannot check {cfg.describe()}: {_reason(e, conn_factory)}; fix: check the columns "
                       f"(corpus.id_column, text_column, label_column) and the query") from e
    finally:
        conn.close()
    return SourceStats(rows, n_null, n_nonstr, n_empty, examples, n_dup, gold)


def read_dataset(cfg: SqlConfig, id_column: str | None, rows: int, num_cpus: float):
    """A Ray Dataset of the table / query's rows, in shards of about cfg.rows_per_shard rows by a hash of
    `id_column` (one read task, one block, when there is no id column or one shard does)."""
    import ray

    conn_factory = connector(cfg)
    shards = max(1, -(-rows // cfg.rows_per_shard))
    kwargs: dict[str, Any] = {}
    if id_column and shards > 1:
        keys, fn = _shard_key(cfg.dialect, quote(id_column))
        _check_shard_key(cfg, conn_factory, keys, fn, id_column)
        kwargs = dict(shard_keys=[keys], shard_hash_fn=fn, override_num_blocks=shards)
    return ray.data.read_sql(source_query(cfg), conn_factory, num_cpus=num_cpus, **kwargs)


def _shard_key(dialect: str, col: str) -> tuple[str, str]:
    """(key, hash function) for Ray's shard filter `MOD(ABS(<fn>(<key>)), n) = i`."""
    if dialect == "sqlite":
        return col, "llambert_shard"
    return f"hashtext(CAST({col} AS text))::bigint", ""  # an int4 hash widened first: ABS never overflows


def _check_shard_key(cfg: SqlConfig, conn_factory: Connector, keys: str, fn: str, id_column: str) -> None:
    """Ray falls back to reading everything in one task, silently, when the shard filter fails: a table that does
    not fit one worker's memory would then fail late. Try the filter on one row first."""
    conn = open_connection(conn_factory, cfg.url)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT MOD(ABS({fn}({keys})), 2) FROM ({source_query(cfg)}) AS llambert_src LIMIT 1")
        cur.fetchall()
    except Exception as e:
        raise SqlError(f"cannot split {cfg.describe()} into shards by its id column {id_column!r}: "
                       f"{_reason(e, conn_factory)}; fix: check corpus.id_column, or set corpus.sql.rows_per_shard "
                       f"above the row count to read it in one task") from e
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ the label sink
def _sql_type(name: str) -> str:
    return "DOUBLE PRECISION" if name.startswith("prob_") else "TEXT"


def label_columns(columns: list[str]) -> list[str]:
    """The labels table's columns in order: id, the predictions' `columns`, text_hash, model, run_id."""
    return ["id", *[c for c in columns if c not in ("id", *TRACK_COLUMNS)], *TRACK_COLUMNS, "run_id"]


def prepare_labels_table(cfg: SqlConfig, columns: list[str]) -> str:
    """Create the labels table when missing (label_columns(columns): id the primary key) or check that the one
    there has these columns (adding text_hash and model to a table written before them); returns the upsert
    statement for rows in that column order."""
    table = cfg.table or LABELS_TABLE
    conn_factory = connector(cfg)
    conn = open_connection(conn_factory, cfg.url)
    cols = label_columns(columns)
    try:
        cur = conn.cursor()
        defs = ", ".join(f"{quote(c)} {'TEXT PRIMARY KEY' if c == 'id' else _sql_type(c)}" for c in cols)
        cur.execute(f"CREATE TABLE IF NOT EXISTS {quote(table)} ({defs})")
        cur.execute(f"SELECT * FROM {quote(table)} WHERE 1 = 0")
        have = [d[0] for d in cur.description]
        missing = [c for c in cols if c not in have]
        if missing and set(missing) <= set(TRACK_COLUMNS) and sorted(have) == sorted(set(cols) - set(missing)):
            for c in missing:
                cur.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(c)} TEXT")
            have += missing
        conn.commit()
    except Exception as e:
        raise SqlError(f"cannot create or read the labels table {table} in {cfg.url}: {_reason(e, conn_factory)}; "
                       f"fix: a user allowed to create tables, or create it yourself") from e
    finally:
        conn.close()
    if sorted(have) != sorted(cols):
        raise SqlError(f"the labels table {table} in {cfg.url} has columns {have}, this model writes {cols}; fix: "
                       f"set another table (--output-table / label.sql.table) or drop that one")
    mark = "?" if cfg.dialect == "sqlite" else "%s"
    updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in cols if c != "id")
    return (f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in cols)}) VALUES "
            f"({', '.join([mark] * len(cols))}) ON CONFLICT ({quote('id')}) DO UPDATE SET {updates}")


def sql_rows(table, columns: list[str], run_id: str, model: str):
    """A batch of predictions (Arrow) as the labels table's rows: its columns in table order, NaN -> NULL (a
    failed row's probabilities), the model's fingerprint and the run's id added."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for c in columns:
        col = table.column(c) if c in table.column_names else pa.nulls(table.num_rows, pa.string())
        if pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        elif pa.types.is_null(col.type):
            col = col.cast(pa.string())
        out[c] = col
    out["model"] = pa.array([model] * table.num_rows, pa.string())
    out["run_id"] = pa.array([run_id] * table.num_rows, pa.string())
    return pa.table(out)


def text_hashes(texts) -> list[str]:
    """A hash of each text (BLAKE2b, 128 bits, hex): what incremental relabelling compares."""
    return [hashlib.blake2b(str(t).encode("utf-8"), digest_size=16).hexdigest() for t in texts]


# ids a look-up query asks at a time (SQLite allows 32,766 bound values; older builds 999)
_LOOKUP_IDS = {"sqlite": 900, "postgresql": 10_000}


class UnlabelledRows:
    """A Ray Data batch step ahead of the classifier: adds each row's text_hash and, with `skip_labelled`, drops
    the rows the labels table already holds from `model` with the same text_hash and no error. `progress` (a
    Progress tally) is told of the dropped rows, so the stage's line counts the whole corpus."""

    def __init__(self, cfg: SqlConfig, model: str, skip_labelled: bool, progress=None):
        self.conn_factory = connector(cfg)
        self.url, self.dialect = cfg.url, cfg.dialect
        self.table = quote(cfg.table or LABELS_TABLE)
        self.model, self.skip_labelled, self.progress = model, skip_labelled, progress

    def labelled(self, ids: list[str]) -> dict[str, str]:
        """id -> text_hash of the rows among `ids` this model labelled without error."""
        found: dict[str, str] = {}
        conn = open_connection(self.conn_factory, self.url)
        try:
            cur = conn.cursor()
            step = _LOOKUP_IDS[self.dialect]
            head = (f"SELECT {quote('id')}, {quote('text_hash')} FROM {self.table} WHERE {quote('model')} = "
                    f"{'?' if self.dialect == 'sqlite' else '%s'} AND {quote('error')} IS NULL AND {quote('id')}")
            for start in range(0, len(ids), step):
                chunk = ids[start:start + step]
                if self.dialect == "sqlite":
                    cur.execute(f"{head} IN ({', '.join('?' * len(chunk))})", (self.model, *chunk))
                else:
                    cur.execute(f"{head} = ANY(%s)", (self.model, chunk))
                found.update((str(i), h) for i, h in cur.fetchall())
        finally:
            conn.close()
        return found

    def __call__(self, batch):
        import pyarrow as pa

        hashes = text_hashes(batch.column("text").to_pylist())
        batch = batch.append_column("text_hash", pa.array(hashes, pa.string()))
        if not self.skip_labelled or batch.num_rows == 0:
            return batch
        ids = [str(i) for i in batch.column("id").to_pylist()]
        done = self.labelled(ids)
        keep = pa.array([done.get(i) != h for i, h in zip(ids, hashes, strict=True)], pa.bool_())
        out = batch.filter(keep)
        if self.progress is not None and out.num_rows < batch.num_rows:
            self.progress(range(batch.num_rows - out.num_rows))
        return out


def unlabelled_rows(ds, cfg: SqlConfig, model: str, skip_labelled: bool, num_cpus: float, progress=None):
    """`ds` (id, text[, label]) with text_hash added and, with skip_labelled, only the rows still to label (see
    UnlabelledRows). The labels table must exist (prepare_labels_table first)."""
    return ds.map_batches(UnlabelledRows(cfg, model, skip_labelled, progress), batch_format="pyarrow",
                          batch_size=None, num_cpus=num_cpus)


def write_labels(ds, cfg: SqlConfig, statement: str, columns: list[str], run_id: str, model: str,
                 num_cpus: float) -> None:
    """Upsert the predictions of `ds` into the labels table with `statement` (prepare_labels_table(cfg, columns)),
    streaming: each write task commits its blocks. SQLite takes one writer at a time: one write task there."""
    cols = label_columns(columns)[:-2]  # model and run_id are added by sql_rows
    rows = ds.map_batches(sql_rows, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
                          fn_kwargs={"columns": cols, "run_id": run_id, "model": model})
    rows.write_sql(statement, connector(cfg), ray_remote_args={"num_cpus": num_cpus},
                   concurrency=1 if cfg.dialect == "sqlite" else None)


def run_counts(cfg: SqlConfig, run_id: str, reason_chars: int = 200) -> list[tuple[Any, ...]]:
    """(label, error reason (its first `reason_chars` characters) or None, gold, rows) of the rows `run_id`
    wrote, grouped in the database."""
    table = quote(cfg.table or LABELS_TABLE)
    mark = "?" if cfg.dialect == "sqlite" else "%s"
    gold = quote("gold")
    conn_factory = connector(cfg)
    conn = open_connection(conn_factory, cfg.url)
    try:
        cur = conn.cursor()
        reason = f"SUBSTR({quote('error')}, 1, {int(reason_chars)})"
        cur.execute(f"SELECT {quote('label')}, {reason}, {gold}, COUNT(*) FROM {table} "
                    f"WHERE {quote('run_id')} = {mark} GROUP BY 1, 2, 3", (run_id,))
        return [tuple(r) for r in cur.fetchall()]
    finally:
        conn.close()

