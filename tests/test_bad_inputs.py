"""Bad input, table-driven, through the real command line: CLI flags, config YAML and corpora. Each case must end
with exit code 2, one clear line naming the input and the fix (no traceback), and no output written (not even a
partial or temporary one). HTTP bad input is the same kind of table in tests/test_serve.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llambert_ray.cli import app

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
runner = CliRunner()

GOOD = [{"id": "a", "text": "A fine film.", "label": "positive"}, {"id": "b", "text": "Dull.", "label": "negative"}]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# name -> file contents; "{corpus}" in args is the case's corpus file, "{cfg}" its config, "{out}" the output dir
CORPORA = {
    "good.jsonl": _jsonl(GOOD),
    "no_text_column.jsonl": _jsonl([{"id": "a", "body": "x"}]),
    "duplicate_ids.jsonl": _jsonl([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]),
    "whitespace_text.jsonl": _jsonl([{"id": "a", "text": "x"}, {"id": "b", "text": " \t\n"}]),
    "empty_text.jsonl": _jsonl([{"id": "a", "text": "x"}, {"id": "b", "text": ""}]),
    "null_text.jsonl": _jsonl([{"id": "a", "text": "x"}, {"id": "b", "text": None}]),
    "numeric_text.jsonl": _jsonl([{"id": "a", "text": 5}, {"id": "b", "text": 6}]),
    "unknown_label.jsonl": _jsonl([{"id": "a", "text": "x", "label": "so-so"}]),
    "not_utf8.csv": b"id,text\na,caf\xe9 \xff\xfe\n",
    "empty.jsonl": b"",
}

CASES = [
    # ---- CLI flags
    ("flag: unknown task", ["annotate", "-t", "no-such-task", "-i", "{corpus}", "-o", "{out}"], None, "unknown task"),
    ("flag: no corpus", ["annotate", "-o", "{out}"], None, "no corpus given"),
    ("flag: unknown mode", ["annotate", "-i", "{corpus}", "-o", "{out}", "--mode", "guess"], None, "annotate.mode"),
    ("flag: zero sample", ["annotate", "-i", "{corpus}", "-o", "{out}", "--sample", "0"], None, "corpus.sample"),
    ("flag: negative sample", ["annotate", "-i", "{corpus}", "-o", "{out}", "--sample", "-5"], None, "corpus.sample"),
    ("flag: fraction > 1", ["annotate", "-i", "{corpus}", "-o", "{out}", "--fraction", "1.5"], None, "fraction"),
    ("flag: unknown model", ["annotate", "-i", "{corpus}", "-o", "{out}", "--model", "a/b/c"], None, "unknown model"),
    ("flag: too many shots", ["annotate", "-i", "{corpus}", "-o", "{out}", "--shots", "50"], None, "shots"),
    ("flag: zero batch", ["annotate", "-i", "{corpus}", "-o", "{out}", "--batch-size", "0"], None, "batch_size"),
    ("flag: unknown variant", ["train", "--train", "{corpus}", "-o", "{out}", "--variant", "magic"], None,
     "train.variants"),
    ("flag: ZeRO stage 5", ["train", "--train", "{corpus}", "-o", "{out}", "--zero-stage", "5"], None, "zero_stage"),
    ("flag: zero workers", ["train", "--train", "{corpus}", "-o", "{out}", "--workers", "0"], None, "train.workers"),
    ("flag: negative epochs", ["train", "--train", "{corpus}", "-o", "{out}", "--epochs", "-1"], None,
     "train.epochs"),
    ("flag: label without a model", ["label", "-m", "{out}", "-i", "{corpus}", "-o", "{out}"], None, "config.json"),
    ("flag: bad autoscale", ["serve", "-m", "{out}", "--autoscale", "4"], None, "MIN:MAX"),
    ("flag: unknown corpus to fetch", ["data", "fetch", "nothing", "--dest", "{out}"], None, "unknown corpus"),
    # ---- config YAML
    ("yaml: syntax error", ["annotate", "-c", "{cfg}", "-o", "{out}"], "annotate: [1, 2", "not valid YAML"),
    ("yaml: unknown key", ["annotate", "-c", "{cfg}", "-o", "{out}"], "corpus: {lables: x}", "corpus.lables"),
    ("yaml: wrong type", ["annotate", "-c", "{cfg}", "-o", "{out}"], "annotate: {batch_size: many}",
     "annotate.batch_size"),
    ("yaml: a list, not sections", ["annotate", "-c", "{cfg}", "-o", "{out}"], "- a\n- b\n", "mapping"),
    ("yaml: not UTF-8", ["annotate", "-c", "{cfg}", "-o", "{out}"], b"name: caf\xe9\xff\n", "UTF-8"),
    ("yaml: sample and fraction", ["annotate", "-c", "{cfg}", "-o", "{out}"],
     "corpus: {sample: 5, fraction: 0.5}", "not both"),
    ("yaml: serve replicas", ["serve", "-m", "{out}", "-c", "{cfg}"], "serve: {min_replicas: 3, max_replicas: 1}",
     "max_replicas"),
    ("yaml: missing file", ["annotate", "-c", "{out}/nope.yaml", "-o", "{out}"], None, "does not exist"),
    ("yaml: llm+extra without extra", ["run", "-c", "{cfg}"],
     "corpus: {path: x.jsonl}\ntrain: {variants: [llm+extra]}", "extra"),
    # ---- corpora (read and validated by Ray Data before any engine starts)
    ("corpus: missing path", ["annotate", "-i", "{out}/missing.parquet", "-o", "{out}"], None, "does not exist"),
    ("corpus: no text column", ["annotate", "-i", "no_text_column.jsonl", "-o", "{out}"], None, "no column 'text'"),
    ("corpus: mistyped column flag", ["annotate", "-i", "good.jsonl", "-o", "{out}", "--text-column", "body"],
     None, "no column 'body'"),
    ("corpus: duplicate ids", ["annotate", "-i", "duplicate_ids.jsonl", "-o", "{out}"], None, "duplicate ids"),
    ("corpus: whitespace text", ["annotate", "-i", "whitespace_text.jsonl", "-o", "{out}"], None, "empty text"),
    ("corpus: empty text", ["annotate", "-i", "empty_text.jsonl", "-o", "{out}"], None, "empty text"),
    ("corpus: null text", ["annotate", "-i", "null_text.jsonl", "-o", "{out}"], None, "no text"),
    ("corpus: numbers as text", ["annotate", "-i", "numeric_text.jsonl", "-o", "{out}"], None, "not text"),
    ("corpus: unknown gold label", ["annotate", "-i", "unknown_label.jsonl", "-o", "{out}"], None, "gold_label_map"),
    ("corpus: non-UTF-8 bytes", ["annotate", "-i", "not_utf8.csv", "-o", "{out}"], None, "UTF"),
    ("corpus: empty file", ["annotate", "-i", "empty.jsonl", "-o", "{out}"], None, "no rows"),
    ("corpus: sample > rows", ["annotate", "-i", "good.jsonl", "-o", "{out}", "--sample", "3"], None,
     "at most 2"),
]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    for name, data in CORPORA.items():
        (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("name,args,config,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(ray_local, corpora, tmp_path, name, args, config, needle):
    out = tmp_path / "out"
    cfg = tmp_path / "run.yaml"
    if config is not None:
        cfg.write_bytes(config if isinstance(config, bytes) else config.encode())

    def fill(a: str) -> str:
        a = a.replace("{corpus}", str(corpora / "good.jsonl")).replace("{cfg}", str(cfg)).replace("{out}", str(out))
        return str(corpora / a) if a in CORPORA else a

    res = runner.invoke(app, [fill(a) for a in args])
    assert res.exit_code == 2, f"{name}: exit {res.exit_code}\n{res.output[-3000:]}"
    # Ray's own worker logs may come first (log_to_driver); our message is the last thing printed
    assert "\nerror: " in "\n" + res.output, f"{name}: no error line in\n{res.output[-3000:]}"
    msg = res.output[("\n" + res.output).rindex("\nerror: "):]
    # Ray workers of earlier tests may still print (log_to_driver) after our message: keep only our lines
    msg = "\n".join(line for line in msg.splitlines() if not line.startswith(("\x1b[", "(")))
    assert needle in msg, f"{name}: {needle!r} not in\n{msg}"
    assert "Traceback" not in msg and ("fix" in msg or "does not exist" in msg), msg
    written = [p for p in out.rglob("*")] if out.exists() else []
    assert written == [], f"{name}: wrote {written}"
    assert not list(corpora.glob("*.tmp*"))
