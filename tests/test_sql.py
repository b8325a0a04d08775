"""SQL databases as corpus and label sink: SQLite (the standard library) and a real PostgreSQL server that this
module starts on 127.0.0.1 (the machine's own PostgreSQL binaries, else the ones the pgserver wheel ships), with
password authentication: the password comes from an environment variable and must reach no output."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from bench.pg_server import postgres_server
from llambert_ray.cli import app
from llambert_ray.config import ConfigError, CorpusConfig, LabelConfig, SqlConfig
from llambert_ray.config_load import load_config
from llambert_ray.sql import SqlError, connector, text_hashes

SECRET = "s3cret-Pg-passw0rd-7f3a"
PW_ENV = "LLAMBERT_TEST_PG_PASSWORD"


# ------------------------------------------------------------------------------------------ no Ray
def test_a_url_with_a_password_is_refused_without_repeating_it():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"corpus.sql.url": f"postgresql://labeller:{SECRET}@db:5432/reviews",
                           "corpus.sql.table": "reviews"})
    assert "password_env" in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(ConfigError, match="sqlite:///"):
        load_config(None, {"corpus.sql.url": "mysql://db/x", "corpus.sql.table": "t"})
    with pytest.raises(ConfigError, match="table or a query"):
        load_config(None, {"corpus.sql.url": "sqlite:///x.db"})
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, {"corpus.sql.url": "sqlite:///x.db", "corpus.sql.table": "t", "corpus.path": "x.parquet"})


def test_the_password_comes_from_its_variable_and_stays_out_of_reprs(monkeypatch):
    cfg = SqlConfig(url="postgresql://labeller@db:5432/reviews", password_env=PW_ENV, table="reviews")
    monkeypatch.delenv(PW_ENV, raising=False)
    with pytest.raises(SqlError, match=f"{PW_ENV} .* is not set"):
        connector(cfg)
    monkeypatch.setenv(PW_ENV, SECRET)
    c = connector(cfg)
    assert c.password == SECRET and SECRET not in repr(c) and SECRET not in cfg.model_dump_json()


# ------------------------------------------------------------------------------------------ PostgreSQL server
@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this module's own on a loopback port (bench.pg_server), password SECRET."""
    with postgres_server(SECRET) as url:
        yield url


def _pg(url: str):
    return connector(SqlConfig(url=url, password_env=PW_ENV, table="x"))()


# ------------------------------------------------------------------------------------------ with Ray


def _tweets_rows(tweets_frame, n: int):
    df = tweets_frame.head(n)
    return [(str(i), str(t), lab) for i, t, lab in zip(df["id"], df["text"], df["label"], strict=True)]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sqlite_corpus_read_in_shards_and_labelled_into_a_table(ray_local, tweets_frame, untrained_model,
                                                                tmp_path):
    """A SQLite table of 900 tweets read in 3 shards (by the id hash) through a query, labelled into a table of
    the same file: rows in = rows out, each id once, the summary = the table's own GROUP BY."""
    from llambert_ray.data import read_corpus
    from llambert_ray.label import label

    db = tmp_path / "corpus.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE tweets (tweet_id TEXT, body TEXT, sentiment TEXT, lang TEXT)")
    rows = _tweets_rows(tweets_frame, 1000)
    con.executemany("INSERT INTO tweets VALUES (?, ?, ?, ?)",
                    [(i, t, lab, "en" if k < 900 else "xx") for k, (i, t, lab) in enumerate(rows)])
    con.commit()
    con.close()
    src = SqlConfig(url=f"sqlite:///{db}", query="SELECT tweet_id, body, sentiment FROM tweets WHERE lang = 'en'",
                    rows_per_shard=300)
    ds, info = read_corpus(CorpusConfig(sql=src, id_column="tweet_id", text_column="body",
                                        label_column="sentiment"), hold=False)
    assert info.rows == 900 and ds.materialize().num_blocks() == 3  # one read task a shard (ds stays lazy)
    sink = SqlConfig(url=f"sqlite:///{db}", table="tweet_labels")
    s = label(ds, untrained_model, LabelConfig(batch_size=100, cpus_per_actor=0.5, max_length=48), sink)
    con = sqlite3.connect(db)
    got = con.execute("SELECT id, label, prob_positive + prob_negative, gold, error FROM tweet_labels").fetchall()
    groups = dict(con.execute("SELECT label, COUNT(*) FROM tweet_labels GROUP BY label").fetchall())
    con.close()
    ids = [r[0] for r in got]
    assert len(got) == 900 == s.rows and len(set(ids)) == 900 and set(ids) == {r[0] for r in rows[:900]}
    assert all(abs(r[2] - 1) < 1e-4 and r[4] is None for r in got) and s.failed == 0
    assert s.label_counts == groups and s.accuracy is not None
    gold = {i: lab for i, _, lab in rows}
    assert s.accuracy == pytest.approx(sum(r[1] == gold[r[0]] for r in got) / 900)

    # incremental: 9 rows join the corpus, 3 texts change, 2 rows failed before: just those 14 are labelled
    con = sqlite3.connect(db)
    first_run = con.execute("SELECT DISTINCT run_id, model FROM tweet_labels").fetchall()
    new_ids, changed, failed = [r[0] for r in rows[900:909]], [r[0] for r in rows[:3]], [r[0] for r in rows[3:5]]
    con.executemany("UPDATE tweets SET lang = 'en' WHERE tweet_id = ?", [(i,) for i in new_ids])
    con.executemany("UPDATE tweets SET body = body || ' (edited)' WHERE tweet_id = ?", [(i,) for i in changed])
    con.executemany("UPDATE tweet_labels SET label = NULL, error = 'RuntimeError: x' WHERE id = ?",
                    [(i,) for i in failed])
    con.commit()
    con.close()
    ds, info = read_corpus(CorpusConfig(sql=src, id_column="tweet_id", text_column="body",
                                        label_column="sentiment"), hold=False)
    s2 = label(ds, untrained_model, LabelConfig(batch_size=100, cpus_per_actor=0.5, max_length=48,
                                                incremental=True), sink, rows=info.rows)
    con = sqlite3.connect(db)
    after = {r[0]: r[1:] for r in con.execute("SELECT id, run_id, text_hash, error FROM tweet_labels")}
    texts = dict(con.execute("SELECT tweet_id, body FROM tweets WHERE lang = 'en'").fetchall())
    con.close()
    assert len(first_run) == 1 and first_run[0][1].startswith("sha256:")
    relabelled = {i for i, (run, _, _) in after.items() if run != first_run[0][0]}
    assert relabelled == set(new_ids) | set(changed) | set(failed) and s2.rows == 14 and s2.kept == 895
    assert len(after) == 909 == info.rows and all(after[i][2] is None for i in relabelled)
    assert all(after[i][1] == text_hashes([texts[i]])[0] for i in after)  # every row's hash is its text's now
    assert "kept 895 rows" in "\n".join(s2.lines())


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_postgres_corpus_labelled_into_postgres_by_the_cli_twice(ray_local, postgres, tweets_frame,
                                                                 untrained_model, tmp_path, monkeypatch):
    """`llambert label` from a PostgreSQL table into a PostgreSQL table, password from its variable, run twice:
    the second run replaces the first's rows (one row an id, every row of the second run), and the password is
    in no output: stdout, label_summary.json, logs."""
    monkeypatch.setenv(PW_ENV, SECRET)
    rows = _tweets_rows(tweets_frame, 600)
    with _pg(postgres) as con:
        con.execute("CREATE TABLE reviews (id BIGINT PRIMARY KEY, txt TEXT NOT NULL)")
        con.cursor().executemany("INSERT INTO reviews VALUES (%s, %s)", [(k, t) for k, (_, t, _) in enumerate(rows)])
    report = tmp_path / "report"
    args = ["label", "--model", str(untrained_model), "--input", postgres, "--table", "reviews",
            "--password-env", PW_ENV, "--text-column", "txt", "--output", postgres, "--output-table", "labels",
            "--output-password-env", PW_ENV, "--report-dir", str(report), "--batch-size", "100",
            "--set", "label.cpus_per_actor=0.5", "--set", "label.max_length=48",
            "--set", "corpus.sql.rows_per_shard=250"]
    runs = []
    for n in (600, 6):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert f"labelled {n} of {n} rows" in res.output and SECRET not in res.output
        with _pg(postgres) as con:
            runs.append(con.execute("SELECT id, label, run_id, text_hash FROM labels").fetchall())
        if n == 600:  # then 4 new rows, 2 texts edited: labelled again incrementally (2 upserts replace rows)
            with _pg(postgres) as con:
                con.cursor().executemany("INSERT INTO reviews VALUES (%s, %s)",
                                         [(600 + k, f"new review {k}") for k in range(4)])
                con.execute("UPDATE reviews SET txt = txt || ' (edited)' WHERE id IN (7, 8)")
            args.append("--incremental")
    first, second = runs
    assert "kept 598 rows" in res.output
    assert len(second) == 604 and len({r[0] for r in second}) == 604
    assert {r[0] for r in second} == {str(k) for k in range(604)}
    assert len({r[2] for r in first}) == 1 and len({r[2] for r in second}) == 2
    moved = {r[0] for r in second if r[2] != first[0][2]}
    assert moved == {"7", "8", "600", "601", "602", "603"}
    old_hash = {r[0]: r[3] for r in first}
    assert all(old_hash[r[0]] != r[3] for r in second if r[0] in ("7", "8"))
    for f in report.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f
    assert (report / "label_summary.json").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_bad_database_inputs_name_the_input_and_lose_nothing(ray_local, postgres, untrained_model, tmp_path,
                                                             monkeypatch):
    """A wrong password, a query that fails, a missing text column, NULL and blank texts (an error naming them, or
    dropped and counted with corpus.empty_text: drop) and a labels table of another shape: each a clear message
    that names what to fix; the existing table is left as it was."""
    from llambert_ray.data import CorpusError, read_corpus
    from llambert_ray.label import label

    monkeypatch.setenv(PW_ENV, "not-the-password")
    with pytest.raises(CorpusError, match="cannot connect") as e:
        read_corpus(CorpusConfig(sql=SqlConfig(url=postgres, password_env=PW_ENV, table="reviews")))
    assert "not-the-password" not in str(e.value)
    monkeypatch.setenv(PW_ENV, SECRET)
    with _pg(postgres) as con:
        con.execute("CREATE TABLE shards (id TEXT PRIMARY KEY, text TEXT)")
        con.cursor().executemany("INSERT INTO shards VALUES (%s, %s)", [(f"k{i}", f"row {i}") for i in range(200)])
    ds, info = read_corpus(CorpusConfig(sql=SqlConfig(url=postgres, password_env=PW_ENV, table="shards",
                                                      rows_per_shard=50)))
    blocks = [b["id"].to_pylist() for b in ray_local.get(ds.select_columns(["id"]).to_arrow_refs())]
    assert info.rows == 200 and len(blocks) == 4 and sum(map(len, blocks)) == 200  # 4 shards, each id in one
    assert len({i for b in blocks for i in b}) == 200 and all(blocks)
    with pytest.raises(CorpusError, match="check the table name or the query"):
        read_corpus(CorpusConfig(sql=SqlConfig(url=postgres, password_env=PW_ENV, query="SELEC id FROM nowhere")))
    db = tmp_path / "c.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (id TEXT, body TEXT)")
    con.execute("INSERT INTO t VALUES ('a', 'fine'), ('b', 'also fine'), ('c', NULL), ('d', '  ')")
    con.execute("CREATE TABLE dups (id TEXT, text TEXT, label TEXT)")
    con.execute("INSERT INTO dups VALUES ('x', 'one', 'pos'), ('y', 'two', 'neg'), ('x', 'three', 'pos')")
    con.execute("CREATE TABLE old_labels (id TEXT PRIMARY KEY, verdict TEXT)")
    con.execute("INSERT INTO old_labels VALUES ('a', 'kept')")
    con.commit()
    con.close()
    with pytest.raises(CorpusError, match="no column 'text'.*text_column"):
        read_corpus(CorpusConfig(sql=SqlConfig(url=f"sqlite:///{db}", table="t")))
    with pytest.raises(CorpusError, match=r"1 rows .* no text \(null\) \(e.g. ids \['c'\]\).*empty_text: drop"):
        read_corpus(CorpusConfig(sql=SqlConfig(url=f"sqlite:///{db}", table="t"), text_column="body"))
    ds, info = read_corpus(CorpusConfig(sql=SqlConfig(url=f"sqlite:///{db}", table="t"), text_column="body",
                                        label_column=None, empty_text="drop"), hold=False)
    assert info.rows == 2 and info.dropped == 2 and sorted(ds.to_pandas()["id"]) == ["a", "b"]
    with pytest.raises(CorpusError, match=r"1 duplicate ids in column 'id' \(e.g. \['x'\]\)"):  # asked of the database
        read_corpus(CorpusConfig(sql=SqlConfig(url=f"sqlite:///{db}", table="dups")), hold=False)
    with pytest.raises(SqlError, match="old_labels.*has columns.*another table"):
        label(ds, untrained_model, LabelConfig(cpus_per_actor=0.5), SqlConfig(url=f"sqlite:///{db}",
                                                                                table="old_labels"))
    con = sqlite3.connect(db)
    assert con.execute("SELECT * FROM old_labels").fetchall() == [("a", "kept")]
    con.close()
