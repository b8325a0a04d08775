"""The real vLLM engine both ways a run uses it, and the checks that differ per request, not per engine.

- The per-call engine (Ray Data LLM's vLLM actor, `annotate.engine_lifetime: call`) through `llambert annotate`:
  the module-scoped `per_call` fixture runs it once, on 40 reviews and a row it rejects.
- The run-long engine (a Ray Serve LLM deployment called by handle, `engine_lifetime: run`): every other test asks
  the ONE engine of the module-scoped `served` fixture (modes, prompt styles, parsing, a rejected row, the answer
  cache, gold-knn shots and gold calibration), as a run's annotate calls do, and it must give the per-call
  engine's answers. So the suite pays two engine starts for all of them.

`served` starts after `per_call` has finished, so the two engines never hold CPUs together. Module-scoped, not
session-scoped: the served engine holds CPUs (0.6 of the 2 here) that other modules' stages need whole (a Ray Data
read task asks for one CPU), so it goes away when this module is done."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import REVIEWS, CountingEngine

from llambert_ray.tasks import load_task

pytestmark = [pytest.mark.ray, pytest.mark.llm, pytest.mark.timeout(1200)]

TASK = load_task("imdb-sentiment")
ROWS = [{"id": f"r{i:02d}", "text": t, "label": lab} for i, (t, lab) in enumerate(REVIEWS)]
ENGINE_CPUS = 0.5  # the served engine's: small enough to share 2 CPUs with the stages around it


@pytest.fixture(scope="module")
def per_call(ray_local, tmp_path_factory):
    """`llambert annotate` on the per-call engine: 40 short reviews and one prompt longer than max_model_len
    (256 here). Returns (output folder, input rows, the command's output)."""
    from typer.testing import CliRunner

    from llambert_ray.cli import app

    tmp = tmp_path_factory.mktemp("per_call")
    rows = [*ROWS, {"id": "too-long", "text": " ".join(r["text"] for r in ROWS[:8]) * 4, "label": "positive"}]
    corpus = tmp / "reviews.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "run.yaml").write_text("annotate: {max_model_len: 256}\n")
    out = tmp / "ann"
    res = CliRunner().invoke(app, ["annotate", "--task", "imdb-sentiment", "--input", str(corpus), "--output",
                                   str(out), "--mode", "score", "--batch-size", "8", "-c", str(tmp / "run.yaml")])
    assert res.exit_code == 0, res.output
    return out, rows, res.output


@pytest.fixture(scope="module")
def served(ray_local, per_call):
    import ray

    from llambert_ray.annotate import SERVED_APP, ServedVLLMEngine
    from llambert_ray.config import AnnotateConfig
    from llambert_ray.models import resolve_model

    cfg = AnnotateConfig(mode="score", batch_size=8, cpus_per_engine=ENGINE_CPUS)
    with ServedVLLMEngine(cfg, resolve_model(cfg.model)) as engine:
        yield engine
    alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in alive if SERVED_APP in n], alive  # the engine is gone with the run


def test_cli_annotates_reviews_with_real_vllm_and_a_row_it_rejects(per_call):
    """The per-call path through `llambert annotate`: 40 short reviews through SmolLM2 (schema, ids, accuracy above
    chance) and one prompt longer than max_model_len, which the real engine rejects alone. Ray Data LLM passes such
    a row around the postprocess step, so this checks the conversion that follows it: the row comes out once, with
    llm_error set, counted as failed, the output has only the documented columns (no `__inference_error__`), and
    the next run sends that row, and only it, to the engine again."""
    import ray

    from llambert_ray.annotate import OUTPUT_COLUMNS, annotate, read_cache
    from llambert_ray.config import AnnotateConfig

    out, rows, output = per_call
    assert "Traceback" not in output and "__inference_error__" not in output
    assert "rows/s" in output
    df = pd.read_parquet(out / "annotations.parquet")
    assert list(df.columns) == ["id", "text", "label", *OUTPUT_COLUMNS]
    assert len(df) == 41 and df["id"].is_unique and set(df["id"]) == {r["id"] for r in rows}
    bad = df.set_index("id").loc["too-long"]
    assert pd.isna(bad["llm_label"]) and "max" in bad["llm_error"].lower(), bad["llm_error"]
    ok = df[df["id"] != "too-long"]
    assert ok["llm_error"].isna().all() and ok["llm_label"].isin(["positive", "negative"]).all()
    assert ok["llm_confidence"].between(0.5, 1.0).all()
    acc = (ok["llm_label"] == ok["label"]).mean()
    assert acc >= 0.75, f"accuracy {acc:.2f} on 40 easy reviews"
    summary = json.loads((out / "annotate_summary.json").read_text())
    assert summary["rows_in"] == 41 and summary["prompt_tokens"] > 40 * 20
    assert summary["failed"] == 1 and summary["labelled"] == 40 and summary["dropped"] == 0
    (folder,) = list((out / ".annotate_cache").iterdir())
    assert all("__inference_error__" not in pd.read_parquet(p).columns for p in folder.glob("*.parquet"))
    assert set(read_cache(folder)["id"]) == {r["id"] for r in ROWS}  # the failure is not reused

    again = CountingEngine()  # the retry decision is the cache's, whatever engine answers
    df2, s2 = annotate(ray.data.from_items(rows), TASK, AnnotateConfig(max_model_len=256, batch_size=8),
                       engine=again, cache_dir=out / ".annotate_cache")
    assert again.rows == 1 and s2.cached == 40 and s2.failed == 0 and len(df2) == 41


def test_vllms_own_openai_server_as_the_endpoint_in_each_mode(per_call, tmp_path):
    """annotate.endpoint against vLLM's own OpenAI-compatible server (started here on 127.0.0.1 with the packaged
    model, max_model_len 256 as the per-call run's), before the served engine starts: score mode by label token ids
    gives the per-call engine's labels and log-probs on the 40 reviews, and the over-long row is the server's 400,
    that row's llm_error; score mode by the answers' top_logprobs text, generate and choice (vLLM's structured
    outputs) label them right too, every id once; preflight's endpoint checks pass for choice mode."""
    import ray

    from bench.endpoint import vllm_server
    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig, EndpointConfig, RunConfig
    from llambert_ray.models import resolve_model
    from llambert_ray.preflight import check_endpoint

    model = "smollm2-135m-instruct"
    out, rows, _ = per_call
    own = pd.read_parquet(out / "annotations.parquet").set_index("id").loc[[r["id"] for r in ROWS]]
    with vllm_server(resolve_model(model), model, max_model_len=256, log=tmp_path / "server.log") as url:
        by_ids = EndpointConfig(base_url=url, tokenizer=model, concurrency=8)
        got = {}
        for name, cfg in (("score-ids", AnnotateConfig(mode="score", max_model_len=256, endpoint=by_ids)),
                          ("score-text", AnnotateConfig(mode="score", endpoint=EndpointConfig(base_url=url))),
                          ("generate", AnnotateConfig(mode="generate", endpoint=EndpointConfig(base_url=url))),
                          ("choice", AnnotateConfig(mode="choice", endpoint=EndpointConfig(base_url=url)))):
            df, s = annotate(ray.data.from_items(rows), TASK, cfg, cache_dir=tmp_path / name)
            assert len(df) == 41 and df["id"].is_unique and set(df["id"]) == {r["id"] for r in rows}, name
            assert s.endpoint["requests"] == 41 and s.endpoint["retries"] == 0, (name, s.endpoint)
            got[name] = df.set_index("id")
        checks = []
        check_endpoint(RunConfig.model_validate({"corpus": {"path": "x.jsonl"}, "annotate": {
            "mode": "choice", "endpoint": {"base_url": url}}}), checks)
    for name, df in got.items():
        bad = df.loc["too-long"]
        assert pd.isna(bad["llm_label"]) and "HTTP 400" in bad["llm_error"], (name, bad["llm_error"])
        ok = df.loc[own.index]
        assert ok["llm_error"].isna().all(), name
        assert (ok["llm_label"] == ok["label"]).mean() >= 0.75, (name, (ok["llm_label"] == ok["label"]).mean())
    same = got["score-ids"].loc[own.index]
    assert (same["llm_label"].to_numpy() == own["llm_label"].to_numpy()).all()
    scores = [json.loads(r) for r in same["llm_raw"]], [json.loads(r) for r in own["llm_raw"]]
    assert max(abs(a[k] - b[k]) for a, b in zip(*scores, strict=True) for k in a) < 0.05
    assert got["choice"].loc[own.index, "llm_label"].notna().all()  # constrained: never unparseable
    assert [c.status for c in checks] == ["ok"] * 3, checks


def test_served_engine_gives_the_per_call_engines_answers(per_call, served):
    """Score mode, completion prompts: the served engine's labels and label log-probs are the per-call engine's
    (Ray Data LLM's vLLM actor, the `per_call` run) on the same 40 reviews, and they come out right."""
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    own = pd.read_parquet(per_call[0] / "annotations.parquet").set_index("id").loc[[r["id"] for r in ROWS]]
    score = AnnotateConfig(mode="score", batch_size=8, cpus_per_engine=ENGINE_CPUS)
    df, s = annotate(ray.data.from_items(ROWS), TASK, score, engine=served)
    assert served.starts == 1
    assert len(df) == 40 and set(df["id"]) == {r["id"] for r in ROWS} and df["id"].is_unique
    assert df["llm_label"].isin(["positive", "negative"]).all()
    assert (df["llm_label"] == df["label"]).mean() >= 0.75 and s.prompt_tokens > 40 * 20
    same = df.set_index("id").loc[own.index]
    assert (same["llm_label"].to_numpy() == own["llm_label"].to_numpy()).all()
    scores = [json.loads(r) for r in same["llm_raw"]], [json.loads(r) for r in own["llm_raw"]]
    assert max(abs(a[k] - b[k]) for a, b in zip(*scores, strict=True) for k in a) < 0.05


@pytest.mark.parametrize("style", ["completion", "chat"])
def test_generate_mode_parses_free_text(served, style):
    """The paper's generate mode, completion and chat prompts: every row accounted for as labelled or dropped,
    raw answers kept also for dropped rows."""
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    cfg = AnnotateConfig(mode="generate", prompt_style=style, max_new_tokens=4)
    df, summary = annotate(ray.data.from_items(ROWS[:12]), TASK, cfg, engine=served)
    assert len(df) == 12 and df["id"].is_unique and set(df["id"]) == {r["id"] for r in ROWS[:12]}
    assert summary.labelled + summary.dropped + summary.failed == 12
    assert df["llm_raw"].notna().all()
    assert summary.labelled >= 6 and served.starts == 1


def test_a_row_the_served_engine_refuses_is_its_llm_error_and_answers_stream_into_the_cache(served, tmp_path):
    """A prompt over the engine's max_model_len (2048 tokens) among others, through the answer cache: that row's
    llm_error, the others answered and cached part by part (no torn parts); the same rows again come from the cache
    alone, and the refused row is the one sent again."""
    import ray

    from llambert_ray.annotate import annotate
    from llambert_ray.config import AnnotateConfig

    too_long = {"id": "long", "text": "What a film, truly great. " * 800, "label": "positive"}
    cfg = AnnotateConfig(mode="score", batch_size=8, max_text_chars=100_000)
    cache = tmp_path / "cache"
    c, cs = annotate(ray.data.from_items([*ROWS[:20], too_long]), TASK, cfg, engine=served, cache_dir=cache)
    assert len(c) == 21 and c["id"].is_unique and cs.failed == 1 and cs.labelled == 20
    assert c.set_index("id").loc["long", "llm_error"] and c["llm_error"].isna().sum() == 20
    assert len(list(cache.rglob("*.parquet"))) >= 1 and not list(cache.rglob("*.tmp"))
    again = CountingEngine()
    df, s = annotate(ray.data.from_items([*ROWS[:20], too_long]), TASK, cfg, engine=again, cache_dir=cache)
    assert s.cached == 20 and again.rows == 1 and len(df) == 21 and served.starts == 1


def test_active_selection_run(served, tweets_frame, tmp_path):
    """`llambert run` with select.strategy active: the LLM budget (corpus.sample) is spent in rounds on rows a probe
    picks; the report shows the learning curve; every other stage runs as usual. The run gets the module's served
    engine (run_pipeline's `engine`, as a notebook keeps one across runs): every round asks it, no other starts."""
    from conftest import balanced

    from llambert_ray.config_load import load_config
    from llambert_ray.pipeline import run_pipeline

    pool = balanced(tweets_frame[tweets_frame["split"] == "train"], 30, seed=1)
    pool[["id", "text", "label"]].to_parquet(tmp_path / "pool.parquet")
    test = balanced(tweets_frame[tweets_frame["split"] == "test"], 30, seed=1)
    test[["id", "text", "label"]].to_parquet(tmp_path / "test.parquet")
    cfg = load_config(None, {
        "name": "active", "output_dir": str(tmp_path / "runs"), "task": "tweet-sentiment",
        "corpus": {"path": str(tmp_path / "pool.parquet"), "sample": 24, "seed": 0},
        "test": {"path": str(tmp_path / "test.parquet")},
        "annotate": {"batch_size": 8, "engine_lifetime": "run", "cpus_per_engine": ENGINE_CPUS},
        "select": {"strategy": "active", "rounds": 2, "max_length": 48, "embed_batch_size": 32,
                   "cpus_per_actor": 0.5},
        "train": {"variants": ["llm"], "epochs": 1, "batch_size": 8, "max_length": 48, "workers": 1,
                  "cpus_per_worker": 0.5},
        "label": {"batch_size": 32, "max_length": 48, "cpus_per_actor": 0.5}, "cluster": {"num_cpus": 2}})
    metrics = run_pipeline(cfg, log=lambda s: None, engine=served)
    run_dir = tmp_path / "runs" / "active"
    ann = pd.read_parquet(run_dir / "annotations.parquet")
    assert len(ann) == 24 and ann["id"].is_unique and set(ann["id"]) <= set(pool["id"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rounds = manifest["stages"]["annotate"]["rounds"]
    assert [r["llm_calls"] for r in rounds] == [12, 24]
    # both rounds asked the one engine (Ray Serve LLM): the model loaded once, not once a round
    assert manifest["engine_starts"] == {"lifetime": "run", "starts": 1} and served.starts == 1
    assert all(r["probe_accuracy"] is not None for r in rounds)
    assert (run_dir / "plots" / "active_selection.png").exists()
    assert "## Active selection" in (run_dir / "report.md").read_text()
    labels = pd.read_parquet(run_dir / "labels.parquet")
    assert len(labels) == 60 and set(labels["id"]) == set(pool["id"])
    assert "llm" in metrics["variants"]


def test_run_then_rerun_skips(served, tmp_path, capsys):
    """The whole pipeline on 40 reviews (annotate with the LLM's test rows in the same engine call and prior
    calibration, train llm + combined, label the corpus, evaluate, report), then `llambert run` on the same config:
    every stage is up to date and nothing is redone. The first run asks the module's served engine, as a notebook
    passes one (`run_pipeline(engine=...)`); the run-long engine a run starts itself, and `llambert run` doing all
    of it, are the rehearsal's (tests/test_rehearsal.py)."""
    from typer.testing import CliRunner

    from llambert_ray import console
    from llambert_ray.cli import app
    from llambert_ray.config_load import load_config
    from llambert_ray.pipeline import run_pipeline

    corpus = pd.DataFrame(ROWS)
    corpus.to_parquet(tmp_path / "corpus.parquet")
    (tmp_path / "run.yaml").write_text(f"""
name: small
output_dir: {tmp_path / 'runs'}
task: imdb-sentiment
corpus: {{path: {tmp_path / 'corpus.parquet'}, sample: 32, seed: 0}}
test: {{path: {tmp_path / 'corpus.parquet'}}}
evaluate: {{llm_test_sample: 6}}
annotate: {{batch_size: 8, calibration: prior, engine_lifetime: run, cpus_per_engine: {ENGINE_CPUS}}}
train: {{variants: [llm, combined], epochs: 1, batch_size: 8, max_length: 48, workers: 1,
         cpus_per_worker: 0.5}}
label: {{batch_size: 16, max_length: 48, cpus_per_actor: 0.5}}
""")
    capsys.readouterr()
    metrics = run_pipeline(load_config(tmp_path / "run.yaml"), log=console.echo, engine=served)
    captured = capsys.readouterr()
    first = captured.out + captured.err  # the stage lines (stdout) and the progress lines (stderr)
    run_dir = tmp_path / "runs" / "small"
    for name in ["annotations.parquet", "labels.parquet", "report.md", "report.html", "manifest.json",
                 "metrics.json", "plots/variants.png", "plots/confusion_llm_labels.png",
                 "models/llm/model/config.json", "label_issues.parquet"]:
        assert (run_dir / name).exists(), name
    ann = pd.read_parquet(run_dir / "annotations.parquet")
    labels = pd.read_parquet(run_dir / "labels.parquet")
    assert len(ann) == 32 and ann["id"].is_unique
    assert len(labels) == 40 and set(labels["id"]) == set(corpus["id"])  # the whole corpus, each id once
    assert Path(metrics["report"]) == run_dir / "report.md"  # what run_pipeline returns: metrics.json and the report
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"llm", "combined"} and metrics["llm"]["accuracy"] > 0.6
    # the LLM's test rows: answered in the one engine call, scored beside every variant on the same rows
    test_ann = pd.read_parquet(run_dir / "test_annotations.parquet")
    assert len(test_ann) == 6 and test_ann["llm_label"].notna().all()
    assert metrics["llm_test"]["rows"] == 6 and {v["rows"] for v in metrics["variants_on_llm_test"].values()} == {6}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    # 32 + 6 rows in one engine call (here the test split is the corpus itself: a row in both is asked once)
    assert stages["annotate"]["rows"] == len(set(ann["id"]) | set(test_ann["id"]))
    assert stages["annotate"]["test_rows"] == 6
    assert manifest["engine_starts"] == {"lifetime": "run", "starts": 1} and served.starts == 1
    assert stages["annotate"]["summary"]["calibration"]  # prior offsets, fitted on the 32 annotated rows
    assert stages["train[combined]"]["reuses"] == "train[llm]"
    assert metrics["speed"]["llm"]["rows_per_s"] > 0 and metrics["speed"]["encoder"]["rows_per_s"] > 0
    assert "(plots/cost_accuracy.png)" in (run_dir / "report.md").read_text()
    assert "## Label issues" in (run_dir / "report.md").read_text() and metrics["label_issues"]["annotated"] == 32
    # what a person reads: stage lines, one progress line per stage; no tracebacks
    assert "Traceback" not in first and len(first.splitlines()) < 100, first
    n_llm = stages["annotate"]["rows"]  # the 32 annotated rows and the LLM's test rows, one progress line
    assert f"annotate  {n_llm}/{n_llm} rows  100%" in first and "label  40/40 rows  100%" in first, first
    assert list(ann.columns) == ["id", "text", "label", "llm_label", "llm_confidence", "llm_raw", "llm_error",
                                 "prompt_tokens"]
    assert (run_dir / "logs" / "llambert.log").stat().st_size > 0
    assert not list(run_dir.glob("models/*/stage*")), "checkpoints left after the models were written"

    second = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "run.yaml")])
    assert second.exit_code == 0, second.output
    for stage in ["annotate", "train[llm]", "train[combined]", "label", "evaluate"]:
        assert f"[{stage}] up to date" in second.output, stage
    assert "| LLM (" in second.output and "Aims:" in second.output and "report:" in second.output
    assert json.loads((run_dir / "manifest.json").read_text())["stages"] == stages
    assert served.starts == 1


NEWS = [  # written for these tests: 4 per topic
    ("The prime minister resigned after losing a vote of no confidence in parliament.", "world"),
    ("Peace talks between the two neighbouring countries collapsed on Tuesday.", "world"),
    ("The United Nations sent aid to the region after the earthquake.", "world"),
    ("Voters in the capital elected a new mayor in a tight race.", "world"),
    ("The striker signed a four-year contract with the league champions.", "sports"),
    ("She won the marathon in record time despite the heat.", "sports"),
    ("The team lost its third match in a row and sacked its coach.", "sports"),
    ("The tennis final was delayed by rain for two hours.", "sports"),
    ("The retailer's quarterly profit rose 12 % on strong online sales.", "business"),
    ("Oil prices fell as stock markets worried about slower growth.", "business"),
    ("The two banks agreed to merge in a deal worth 30 billion dollars.", "business"),
    ("Unemployment dropped to its lowest level in a decade, the ministry said.", "business"),
    ("Researchers sequenced the genome of a rare deep-sea fish.", "science"),
    ("The new telescope captured images of galaxies formed soon after the Big Bang.", "science"),
    ("A software update fixes a security flaw in millions of routers.", "science"),
    ("Physicists measured the mass of the particle with greater precision.", "science"),
]


def test_four_label_topic_task_with_gold_knn_and_gold_calibration(served, tmp_path):
    """The news-topic preset (4 labels) through the real engine: each row's shots are its nearest gold rows
    (MiniLM embeddings), the gold rows are scored too and calibrate the labels; the prompts hold the neighbours."""
    import ray

    from llambert_ray.annotate import SHOTS_COLUMN, annotate
    from llambert_ray.annotate.gold import with_gold
    from llambert_ray.config import AnnotateConfig

    task = load_task("news-topic")
    df = pd.DataFrame([{"id": f"n{i:02d}", "text": t, "label": lab} for i, (t, lab) in enumerate(NEWS)])
    gold_ids = {f"n{i:02d}" for i in range(16) if i % 2 == 0}  # 2 gold rows per topic
    rows = df[~df["id"].isin(gold_ids)].reset_index(drop=True)
    corpus = df.assign(label=[lab if i in gold_ids else None for i, lab in zip(df["id"], df["label"], strict=True)])
    cfg = AnnotateConfig(shots_from="gold-knn", shots=4, calibration="gold", gold_rows=8, batch_size=8)
    rows, gold = with_gold(rows, corpus, task, cfg, encoder="minilm-l6")
    assert len(gold) == 8 and set(gold["id"]) == gold_ids
    for own_id, shots in zip(gold["id"], gold[SHOTS_COLUMN], strict=True):
        picked = json.loads(shots)
        assert len(picked) == 4 and {s["label"] for s in picked} == set(task.labels)
        assert df.set_index("id").loc[own_id, "text"] not in [s["text"] for s in picked]  # never itself
    out, s = annotate(ray.data.from_items(rows.to_dict("records")), task, cfg, gold=gold, cache_dir=tmp_path / "cache",
                      engine=served)
    assert len(out) == 8 and set(out["id"]) == set(rows["id"]) and out["llm_error"].isna().all()
    assert out["llm_label"].isin(task.labels).all() and set(json.loads(out["llm_raw"].iloc[0])) == set(task.labels)
    assert s.calibration_report and s.calibration_report["held_out"] == 4
    # applied (offsets for every label) unless it made the 4 held-out gold rows worse (then the LLM's own labels)
    if s.calibration_report["applied"]:
        assert s.calibration is not None and set(task.labels) <= set(s.calibration)
    else:
        assert s.calibration is None and "not applied" in " ".join(s.lines())
    # no bar on accuracy: the 135M model got 3 of 8 right here (4 labels, chance 25 %; 2026-12-01), too few rows
    assert s.accuracy is not None and s.label_counts, s.lines()
    assert s.shots_from == "gold-knn" and "4 shots (gold-knn)" in s.lines()[0], s.lines()  # says where shots came from
    assert (out["prompt_tokens"] > 80).all()  # the instruction, 4 neighbours and the row
    assert served.starts == 1
