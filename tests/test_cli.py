"""The command line: help texts, evaluate, data fetch (bad input through the CLI: tests/test_bad_inputs.py)."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from llambert_ray.cli import app

runner = CliRunner()


# command path -> {command: words of its purpose its help row must hold}
COMMANDS = {
    (): {"annotate": "with the LLM", "train": "Fine-tune the encoder", "label": "with a trained classifier",
         "evaluate": "confusion matrix", "run": "The whole pipeline", "preflight": "Check a config", "plan": "Estimate",
         "serve": "over HTTP", "data": "Get corpora", "models": "Models"},
    ("data",): {"fetch": "Fetch a corpus"},
    ("models",): {"list": "Packaged models", "prepare": "Resolve every packaged model", "pull": "Download a model",
                  "push": "Copy a model"},
}


def _panel(output, title):
    """{first word: the rest} of each row of a panel of rich --help output (a row's wrapped lines joined)."""
    lines = output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"╭─ {title} "))
    rows, key = {}, None
    for ln in lines[start + 1:]:
        if ln.startswith("╰"):
            break
        body = ln[1:-1]
        if len(body) - len(body.lstrip()) <= 4:  # a new row (after the required-column's `*`); deeper: wrapped text
            key, _, rest = body.strip().removeprefix("* ").strip().partition(" ")
            rows[key] = rest.strip()
        else:
            rows[key] += " " + body.strip()
    return rows


def test_help_lists_every_stage():
    """The app registers exactly the stage commands and the data / models subcommands, and each --help lists every
    one as a row of its Commands panel with help that says what it is for; annotate lists --sample as an option."""
    import typer

    root = typer.main.get_command(app)
    for path, names in COMMANDS.items():
        group = root
        for p in path:
            group = group.commands[p]
        assert set(group.commands) == set(names), path
        res = runner.invoke(app, [*path, "--help"])
        assert res.exit_code == 0, res.output
        rows = _panel(res.output, "Commands")
        assert set(rows) == set(names), (path, res.output)
        for name, text in rows.items():
            assert names[name] in " ".join(text.split()), (name, text)
    res = runner.invoke(app, ["annotate", "--help"])
    assert res.exit_code == 0, res.output
    options = _panel(res.output, "Options")
    assert options["--sample"].startswith("<int>") and "sample of this many rows" in options["--sample"], options
    assert "--set corpus.filters='{split: [test]}'" in " ".join(options["--set"].split())  # not eaten as markup
    (sample,) = [p for p in root.commands["annotate"].params if "--sample" in p.opts]
    assert sample.param_type_name == "option" and sample.type_descriptor.annotation is int and not sample.required


def test_evaluate_an_annotations_file(tmp_path):
    p = tmp_path / "annotations.parquet"
    pd.DataFrame({"id": ["a", "b", "c", "d"], "label": ["positive", "negative", "positive", "negative"],
                  "llm_label": ["positive", "negative", None, "positive"]}).to_parquet(p)
    res = runner.invoke(app, ["evaluate", "--input", str(p), "--task", "imdb-sentiment",
                              "--output", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "accuracy 50.00%" in res.output and "dropped 25.00%" in res.output
    assert json.loads((tmp_path / "m.json").read_text())["confusion"] == [[1, 0], [1, 1]]


def test_fetch_tweets_and_offline_imdb(tmp_path):
    res = runner.invoke(app, ["data", "fetch", "tweets", "--dest", str(tmp_path)])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tmp_path / "tweets.parquet")
    assert len(df) > 15000 and df["id"].is_unique and set(df["label"]) == {"positive", "negative"}
    assert set(df["split"]) == {"train", "test"}

    from llambert_ray.data import CorpusError
    from llambert_ray.fetch import fetch_imdb

    with pytest.raises(CorpusError, match="offline"):  # a closed loopback port stands in for no network
        fetch_imdb(tmp_path / "imdb", url="http://127.0.0.1:9/aclImdb_v1.tar.gz", timeout_s=5)
    assert not list((tmp_path / "imdb").glob("*.part"))


def test_help_is_true_to_the_files_and_lists_every_preset():
    from pathlib import Path

    from llambert_ray.tasks import preset_names

    presets = {p.stem for p in (Path(__file__).parents[1] / "llambert_ray" / "task_presets").glob("*.yaml")}
    assert set(preset_names()) == presets and "tweet-sentiment" in presets
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for cmd in ["annotate", "train", "label"]:
        text = " ".join(runner.invoke(app, [cmd, "--help"], terminal_width=200).output.split())
        assert all(p in text for p in presets), (cmd, text)
    ann = " ".join(runner.invoke(app, ["annotate", "--help"], terminal_width=200).output.split())
    assert "annotate_summary.json" in ann and " summary.json" not in ann and "logs/" in ann
    for cmd, files in {"train": ["model/", "train_summary.json", "logs/"],
                       "label": ["labels.parquet", "label_summary.json", "logs/"],
                       "run": ["annotations.parquet", "labels.parquet", "report.md", "manifest.json", "logs/"]}.items():
        text = " ".join(runner.invoke(app, [cmd, "--help"], terminal_width=200).output.split())
        assert all(f in text for f in files), (cmd, text)
    assert all(f"`{p}`" in readme for p in presets)  # the README's preset list is complete


@pytest.mark.parametrize("path,needle", [("/dev/null", "not a regular file"), ("{tmp}", "is a folder"),
                                         ("{tmp}/empty.yaml", "is empty")])
def test_config_that_is_not_a_yaml_file(tmp_path, path, needle):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    p = path.replace("{tmp}", str(tmp_path))
    res = runner.invoke(app, ["run", "--config", p])
    assert res.exit_code == 2 and needle in res.output and p in res.output and "fix:" in res.output, res.output


# Each must fail with one error line, in seconds, and never start Ray (init_ray is replaced by a tripwire).
FAST_FAILURES = [
    ("annotate: missing corpus", ["annotate", "-i", "{tmp}/missing.jsonl", "-o", "{out}"], "does not exist"),
    ("annotate: bad model", ["annotate", "-i", "{corpus}", "-o", "{out}", "--model", "a/b/c"], "unknown model"),
    ("annotate: model not on the hub", ["annotate", "-i", "{corpus}", "-o", "{out}", "--model",
                                        "nobody-here/no-such-model"], "not in the local cache"),
    ("annotate: bad task", ["annotate", "-i", "{corpus}", "-o", "{out}", "-t", "sentiment"], "unknown task"),
    ("train: missing train file", ["train", "--train", "{tmp}/missing.parquet", "-o", "{out}"], "does not exist"),
    ("train: missing eval file", ["train", "--train", "{corpus}", "--eval", "{tmp}/nope.jsonl", "-o", "{out}"],
     "does not exist"),
    ("train: bad model", ["train", "--train", "{corpus}", "-o", "{out}", "--model", "no/such/encoder"],
     "unknown model"),
    ("train: encoder not on the hub", ["train", "--train", "{corpus}", "-o", "{out}", "--model",
                                       "nobody-here/no-such-encoder"], "not in the local cache"),
    ("train: bad task", ["train", "--train", "{corpus}", "-o", "{out}", "-t", "nope"], "unknown task"),
    ("label: missing model folder", ["label", "-m", "{tmp}/model", "-i", "{corpus}", "-o", "{out}"], "config.json"),
    ("label: missing corpus", ["label", "-m", "{model}", "-i", "{tmp}/missing.jsonl", "-o", "{out}"],
     "does not exist"),
    ("label: bad task", ["label", "-m", "{model}", "-i", "{corpus}", "-o", "{out}", "-t", "nope"], "unknown task"),
    ("serve: missing model folder", ["serve", "-m", "{tmp}/model"], "config.json"),
    ("run: missing corpus", ["run", "-c", "{cfg}"], "does not exist"),
    ("run: missing test split", ["run", "-c", "{cfg}"], "test.path"),
    ("run: bad LLM", ["run", "-c", "{cfg}"], "unknown model"),
    ("run: bad encoder", ["run", "-c", "{cfg}"], "no-such-folder"),
    ("run: bad task", ["run", "-c", "{cfg}"], "unknown task"),
]
RUN_CONFIGS = {
    "run: missing corpus": "corpus: {path: '{tmp}/missing.parquet'}",
    "run: missing test split": "corpus: {path: '{corpus}'}\ntest: {path: '{tmp}/test.parquet'}",
    "run: bad LLM": "corpus: {path: '{corpus}'}\nannotate: {model: not/a/model}",
    "run: bad encoder": "corpus: {path: '{corpus}'}\ntrain: {model: ./no-such-folder}",
    "run: bad task": "corpus: {path: '{corpus}'}\ntask: sentimental",
}


@pytest.mark.parametrize("name,args,needle", FAST_FAILURES, ids=[c[0] for c in FAST_FAILURES])
def test_wrong_paths_models_and_tasks_fail_before_ray_starts(tmp_path, monkeypatch, name, args, needle):
    import time

    import llambert_ray.ray_env

    def tripwire(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(llambert_ray.ray_env, "init_ray", tripwire)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub check fails at once instead of waiting on a network
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "A fine film.", "label": "positive"}\n')
    model = tmp_path / "trained"
    model.mkdir()
    (model / "config.json").write_text('{"id2label": {"0": "positive", "1": "negative"}}')
    subs = {"{tmp}": str(tmp_path), "{out}": str(tmp_path / "out"), "{corpus}": str(corpus), "{model}": str(model),
            "{cfg}": str(tmp_path / "run.yaml")}

    def fill(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    if name in RUN_CONFIGS:
        (tmp_path / "run.yaml").write_text(fill(RUN_CONFIGS[name]))
    t0 = time.time()
    res = runner.invoke(app, [fill(a) for a in args])
    seconds = time.time() - t0
    assert res.exit_code == 2, res.output
    assert needle in res.output and "error:" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists()
    assert seconds < 20, f"{name}: {seconds:.1f}s"


def test_verbose_flag_on_the_app_and_on_a_command(tmp_path, monkeypatch):
    from llambert_ray import console

    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert runner.invoke(app, ["-v", "models", "list"]).exit_code == 0 and console.verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    res = runner.invoke(app, ["annotate", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"), "-v"])
    assert res.exit_code == 2 and console.verbose()


def test_set_reaches_the_config_of_every_command_and_a_wrong_key_says_which_are_valid(monkeypatch):
    """`--set KEY=VALUE` on the commands that take a config: YAML-typed, after the command's own flags."""
    from conftest import REPO

    import llambert_ray.plan as plan_module

    seen = []

    class Estimate:
        stages: list = []

        def table(self):
            return "estimate"

    def plan_run(cfg, task, **kwargs):
        seen.append(cfg)
        return Estimate()

    monkeypatch.setattr(plan_module, "plan_run", plan_run)
    demo = str(REPO / "configs" / "demo.yaml")
    res = runner.invoke(app, ["plan", "-c", demo, "--set", "train.epochs=5", "--set", "corpus.filters={split: [test]}"])
    assert res.exit_code == 0, res.output
    assert seen[-1].train.epochs == 5 and seen[-1].corpus.filters == {"split": ["test"]}
    res = runner.invoke(app, ["annotate", "-c", demo, "-o", "unused", "--dry-run", "--shots", "1",
                              "--set", "annotate.shots=2", "--set", "annotate.temperature=0.5"])
    assert res.exit_code == 0, res.output
    assert seen[-1].annotate.shots == 2 and seen[-1].annotate.temperature == 0.5
    for cmd in (["plan"], ["preflight"], ["run"], ["annotate", "-o", "x"], ["train", "--train", "x", "-o", "x"],
                ["label", "-m", "x", "-i", "x", "-o", "x"], ["serve", "-m", "x"]):
        res = runner.invoke(app, [*cmd, "-c", demo, "--set", "train.epoch=5"])
        assert res.exit_code == 2, (cmd, res.output)
        assert "train has no key 'epoch'; valid keys: " in res.output and "epochs" in res.output, (cmd, res.output)


def test_a_jobs_preflight_checks_the_config_its_stage_runs(monkeypatch, tmp_path):
    """jobs/*.py: the preflight sees the job's flags and --set items, not only its --config file."""
    import sys
    from pathlib import Path

    import llambert_ray.preflight as preflight
    import llambert_ray.ray_env as ray_env

    sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))
    from _entry import job_args

    seen = []

    def stop(cfg, log=print):
        seen.append(cfg)
        raise preflight.PreflightError("preflight failed; nothing was run")

    monkeypatch.setattr(ray_env, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(preflight, "preflight_or_raise", stop)
    (tmp_path / "c.yaml").write_text("annotate: {shots: 1}\n")
    args = job_args("annotate", ["--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "out"),
                                 "--sample", "7", "--set", "annotate.shots=3"])
    assert args[-3:] == ["--address", "auto", "--preflight"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "preflight failed" in res.output
    assert seen[0].annotate.shots == 3 and seen[0].corpus.sample == 7 and seen[0].cluster.address == "auto"
    assert job_args("evaluate", ["--input", "x"]) == ["evaluate", "--input", "x"]
