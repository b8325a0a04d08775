"""`llambert`: the command line. Every command builds the typed config tree and calls the stage functions,
the same ones the `jobs/` entrypoints call on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from llambert_ray import console
from llambert_ray.cli.common import (
    DB_URL_HELP,
    TASK_HELP,
    ConfigOpt,
    PreflightOpt,
    SetOpt,
    VerboseOpt,
    command_config,
    friendly_errors,
    is_db_url,
)
from llambert_ray.cli.tools import data_app, models_app
from llambert_ray.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LlamBERT on Ray: an LLM labels a subset of your corpus, an encoder learns from those "
                       "labels and labels the whole corpus.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")


@app.callback()
def main_options(verbose: bool = VerboseOpt) -> None:
    """LlamBERT on Ray: an LLM labels a subset of your corpus, an encoder learns from those labels and labels the
    whole corpus."""
    if verbose:
        console.set_verbose(True)


@app.command()
@friendly_errors
def annotate(
    input: str | None = typer.Option(None, "--input", "-i", help="corpus: parquet/jsonl/csv file or folder, "
                                        "aclImdb folder or .tar.gz; local or s3://, gs://"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for annotations.parquet, "
                                "annotate_summary.json, logs/ and the answer cache .annotate_cache/"),
    task: str | None = typer.Option(None, "--task", "-t", help=TASK_HELP),
    sample: int | None = typer.Option(None, help="annotate a seeded sample of this many rows"),
    fraction: float | None = typer.Option(None, help="annotate a seeded fraction of the rows"),
    seed: int | None = typer.Option(None, help="sampling seed (default 0)"),
    mode: str | None = typer.Option(None, help="generate | choice | score (default score)"),
    shots: int | None = typer.Option(None, help="few-shot examples (default: the task's for this model)"),
    prompt_style: str | None = typer.Option(None, "--prompt-style", help="chat | completion"),
    model: str | None = typer.Option(None, help="packaged name, local folder, .gguf or hub id"),
    id_column: str | None = typer.Option(None, "--id-column", help="column with row ids"),
    text_column: str | None = typer.Option(None, "--text-column", help="column with the texts"),
    label_column: str | None = typer.Option(None, "--label-column", help="column with gold labels"),
    gold: str | None = typer.Option(None, "--gold", help="gold-labelled rows for gold-knn shots and calibration "
                                    "gold (same columns as --input); default: --input's own labelled rows that are "
                                    "not being annotated"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="rows per engine call"),
    concurrency: int | None = typer.Option(None, help="engine replicas"),
    tensor_parallel_size: int | None = typer.Option(None, "--tp", help="GPUs per engine (tensor parallel)"),
    address: str | None = typer.Option(None, help="Ray address (default: start a local Ray)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only estimate rows, tokens, device-hours and cost "
                                 "(as `llambert plan`), run nothing"),
    config: Path | None = ConfigOpt,
    verbose: bool = VerboseOpt,
    set_: list[str] | None = SetOpt,
    preflight: bool = PreflightOpt,
) -> None:
    """Label a (sampled) corpus with the LLM: writes OUTPUT/annotations.parquet (id, text, label if gold exists,
    llm_label, llm_confidence, llm_raw, llm_error, prompt_tokens), OUTPUT/annotate_summary.json and OUTPUT/logs/,
    and prints a summary."""
    cfg = command_config(config, {
        "task": task, "corpus.path": input, "corpus.sample": sample, "corpus.fraction": fraction,
        "corpus.seed": seed, "corpus.id_column": id_column, "corpus.text_column": text_column,
        "corpus.label_column": label_column, "annotate.mode": mode, "annotate.shots": shots,
        "annotate.prompt_style": prompt_style, "annotate.model": model, "annotate.batch_size": batch_size,
        "annotate.concurrency": concurrency, "annotate.tensor_parallel_size": tensor_parallel_size,
        "cluster.address": address}, set_, preflight)
    if dry_run:
        from llambert_ray.plan import load_hardware, plan_run
        from llambert_ray.tasks import load_task

        est = plan_run(cfg, load_task(cfg.task), hardware=load_hardware())
        est.stages = [s for s in est.stages if s.stage.startswith("annotate")]
        typer.echo(est.table())
        return
    from llambert_ray.commands import annotate_corpus

    summary = annotate_corpus(cfg, output, gold_path=gold)
    typer.echo("\n".join(summary.lines()))
    typer.echo(f"wrote {output / 'annotations.parquet'}; logs: {output / 'logs'}")


@app.command()
@friendly_errors
def train(
    train_path: str = typer.Option(..., "--train", help="annotations.parquet from `llambert annotate`, or any "
                                   "corpus with gold labels"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for model/, train_summary.json and logs/ "
                                "(Ray Train's checkpoints in stage<N>/ray_train/ go once model/ is written, unless "
                                "train.keep_checkpoints)"),
    task: str | None = typer.Option(None, "--task", "-t", help=TASK_HELP + " (for the label names)"),
    variant: str | None = typer.Option(None, help="gold | llm | llm+extra | combined (default llm)"),
    extra: str | None = typer.Option(None, help="annotations of unlabelled extra rows (llm+extra, combined)"),
    eval_path: str | None = typer.Option(None, "--eval", help="gold-labelled corpus to evaluate on"),
    model: str | None = typer.Option(None, help="encoder: packaged name, local folder or hub id"),
    workers: int | None = typer.Option(None, help="Ray Train workers"),
    zero_stage: int | None = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3"),
    epochs: int | None = typer.Option(None),
    learning_rate: float | None = typer.Option(None, "--lr"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="per-worker micro batch"),
    max_length: int | None = typer.Option(None, "--max-length", help="tokens per text"),
    use_gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="train on GPUs (bf16) or CPUs (fp32)"),
    address: str | None = typer.Option(None, help="Ray address (default: start a local Ray)"),
    config: Path | None = ConfigOpt,
    verbose: bool = VerboseOpt,
    set_: list[str] | None = SetOpt,
    preflight: bool = PreflightOpt,
) -> None:
    """Fine-tune the encoder with Ray Train + DeepSpeed on LLM (or gold) labels; writes OUTPUT/model (an HF
    folder), OUTPUT/train_summary.json and OUTPUT/logs/."""
    cfg = command_config(config, {
        "task": task, "train.variants": [variant] if variant else None, "train.model": model,
        "train.workers": workers, "train.zero_stage": zero_stage, "train.epochs": epochs,
        "train.learning_rate": learning_rate, "train.batch_size": batch_size, "train.max_length": max_length,
        "train.use_gpu": use_gpu, "cluster.address": address}, set_, preflight)
    from llambert_ray.commands import train_from_files
    from llambert_ray.config import CorpusConfig
    from llambert_ray.evaluate import evaluate_on_corpus
    from llambert_ray.tasks import load_task

    def score(model_dir: Path) -> dict[str, Any]:
        return evaluate_on_corpus(CorpusConfig(path=eval_path), load_task(cfg.task), model_dir, cfg.label)

    result, metrics = train_from_files(cfg, train_path, output, extra_path=extra, eval_path=eval_path,
                                       evaluate=score)
    typer.echo(f"trained {cfg.train.variants[0]} on {result.rows} rows in {result.seconds:.1f}s "
               f"({result.samples_per_s:.1f} samples/s) -> {result.model_dir}")
    if metrics:
        typer.echo(f"  eval accuracy {metrics['accuracy']:.2%}, macro F1 {metrics['macro_f1']:.2%} "
                   f"on {metrics['rows']} rows")
    typer.echo(f"logs: {output / 'logs'}")


@app.command()
@friendly_errors
def label(
    model: Path = typer.Option(..., "--model", "-m", help="trained model folder (OUTPUT/model of train)"),
    input: str | None = typer.Option(None, "--input", "-i", help="corpus to label: a file or folder (any supported "
                                     "format), or a database: " + DB_URL_HELP + " with --table or --query"),
    output: str = typer.Option(..., "--output", "-o", help="folder for labels.parquet, label_summary.json and "
                               "logs/; a bucket folder (s3://BUCKET/PREFIX, gs://..., published by a _SUCCESS "
                               "manifest written last; credentials from the environment); or a database ("
                               + DB_URL_HELP + "): labels upserted into --output-table"),
    table: str | None = typer.Option(None, "--table", help="database corpus: the table to read"),
    query: str | None = typer.Option(None, "--query", help="database corpus: a SELECT to read (instead of --table)"),
    password_env: str | None = typer.Option(None, "--password-env", help="database corpus: the environment "
                                            "variable holding its password"),
    output_table: str | None = typer.Option(None, "--output-table", help="database output: the labels table "
                                            "(default llambert_labels; created when missing, rows keyed by id)"),
    output_password_env: str | None = typer.Option(None, "--output-password-env", help="database output: the "
                                                   "environment variable holding its password"),
    via: str | None = typer.Option(None, "--via", help="actors (default): a classifier actor pool of this job; "
                                   "serve: through the running Serve application --serve-app that `llambert serve` "
                                   "deployed (one model for online requests and the backlog, scaled by Serve)"),
    serve_app: str | None = typer.Option(None, "--serve-app", help="--via serve: the Serve application's name "
                                         "(default llambert, as `llambert serve` names it)"),
    incremental: bool = typer.Option(False, "--incremental", help="database output: label only rows the table has "
                                     "no label for from this model, whose text changed, or that failed; keep the "
                                     "rest (label.incremental)"),
    report_dir: Path | None = typer.Option(None, "--report-dir", help="folder for label_summary.json and logs/ "
                                           "(default: the output folder; ./label-report for a database)"),
    id_column: str | None = typer.Option(None, "--id-column"),
    text_column: str | None = typer.Option(None, "--text-column"),
    label_column: str | None = typer.Option(None, "--label-column", help="gold labels, kept as `gold`"),
    task: str | None = typer.Option(None, "--task", "-t", help=TASK_HELP + " (maps gold labels to label names)"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    concurrency: int | None = typer.Option(None, help="classifier actors"),
    address: str | None = typer.Option(None),
    config: Path | None = ConfigOpt,
    verbose: bool = VerboseOpt,
    set_: list[str] | None = SetOpt,
    preflight: bool = PreflightOpt,
) -> None:
    """Label a whole corpus with a trained classifier: OUTPUT/labels.parquet (id, label, prob_<class>..., error,
    gold when the corpus has labels), OUTPUT/label_summary.json and OUTPUT/logs/. A database corpus or output
    (SQLite, PostgreSQL) is read and written by Ray Data's read_sql / write_sql: reads sharded by the id column,
    labels upserted by id, so a rerun replaces rows and never duplicates them."""
    overrides: dict[str, Any] = {"task": task, "corpus.id_column": id_column, "corpus.text_column": text_column,
                                 "corpus.label_column": label_column, "label.batch_size": batch_size,
                                 "label.concurrency": concurrency, "cluster.address": address,
                                 "label.incremental": True if incremental else None, "label.via": via,
                                 "label.serve_app": serve_app,
                                 **_label_io(input, table, query, password_env, output, output_table,
                                             output_password_env)}
    cfg = command_config(config, overrides, set_, preflight)
    where, report, summary = _label_to(cfg, model, output, report_dir)
    typer.echo("\n".join(summary.lines()))
    typer.echo(f"wrote {where}; summary and logs: {report}")


def _label_io(input: str | None, table: str | None, query: str | None, password_env: str | None, output: str,
              output_table: str | None, output_password_env: str | None) -> dict[str, Any]:
    """`llambert label`'s corpus and output flags as config overrides: a file / folder or a database each way."""
    overrides: dict[str, Any] = {}
    if is_db_url(input):
        overrides.update({"corpus.sql.url": input, "corpus.sql.table": table, "corpus.sql.query": query,
                          "corpus.sql.password_env": password_env})
    else:
        if table or query:
            raise typer.BadParameter("--table / --query read a database; --input is not a database URL ("
                                     + DB_URL_HELP + ")")
        overrides["corpus.path"] = input
    if is_db_url(output):
        overrides.update({"label.sql.url": output, "label.sql.table": output_table,
                          "label.sql.password_env": output_password_env})
    return overrides


def _label_to(cfg: Any, model: Path, output: str, report_dir: Path | None) -> tuple[str, Path, Any]:
    """Run the label stage into `output` (a folder, a bucket folder or a database): (where the labels went, the
    report folder, the stage's summary)."""
    from llambert_ray.commands import label_corpus

    if is_db_url(output):
        report = report_dir or Path("label-report")
        summary = label_corpus(cfg, model, None, report)
        return f"table {cfg.label.sql.table or 'llambert_labels'} of {output}", report, summary
    from llambert_ray.storage import is_uri, join_path

    report = report_dir or (Path("label-report") if is_uri(output) else Path(output))
    labels_at = join_path(output, "labels.parquet")
    summary = label_corpus(cfg, model, labels_at, report)
    return str(labels_at).partition("?")[0], report, summary


@app.command()
@friendly_errors
def evaluate(
    input: Path = typer.Option(..., "--input", "-i", help="annotations.parquet (llm_label vs label) or "
                               "labels.parquet (label vs gold)"),
    task: str | None = typer.Option(None, "--task", "-t"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write the metrics as JSON here"),
) -> None:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix of predictions vs gold."""
    import json as _json

    import pandas as pd

    from llambert_ray.data import CorpusError
    from llambert_ray.metrics import classification_metrics
    from llambert_ray.storage import read_parquet_frame
    from llambert_ray.tasks import load_task

    df = read_parquet_frame(input)
    if "llm_label" in df:
        pred, gold, failed = df["llm_label"], df.get("label"), None  # failed LLM rows count as dropped
    else:
        pred, gold, failed = df.get("label"), df.get("gold"), df.get("error")  # rows the classifier failed on
    if pred is None or gold is None or gold.isna().all():
        raise CorpusError(f"{input} has no predictions with gold labels to compare; fix: pass annotations of a "
                          f"labelled corpus, or labels.parquet of a corpus with --label-column")
    labels = load_task(task).labels if task else sorted(set(pd.concat([pred, gold]).dropna()))
    m = classification_metrics(gold, pred, labels, failed=failed)
    typer.echo(f"rows {m['rows']}  accuracy {m['accuracy']:.2%}  macro F1 {m['macro_f1']:.2%}  "
               f"dropped {m['dropped']:.2%}" + (f"  (left out: {m['failed']} rows the classifier failed on)"
                                                if m["failed"] else ""))
    for lab, c in m["per_class"].items():
        typer.echo(f"  {lab:>12}: precision {c['precision']:.2%} recall {c['recall']:.2%} f1 {c['f1']:.2%} "
                   f"support {c['support']}")
    typer.echo(f"  confusion (rows gold, columns predicted, order {labels}): {m['confusion']}")
    if output:
        output.write_text(_json.dumps(m, indent=2))


@app.command()
@friendly_errors
def run(
    config: Path = typer.Option(..., "--config", "-c", help="pipeline YAML (see configs/demo.yaml)"),
    name: str | None = typer.Option(None, help="run name (folder under output_dir)"),
    output_dir: str | None = typer.Option(None, "--output-dir", help="parent folder of run folders"),
    address: str | None = typer.Option(None, help="Ray address (default: start a local Ray)"),
    skip_preflight: bool = typer.Option(False, "--skip-preflight", help="do not run `llambert preflight`'s checks "
                                        "before the first stage"),
    verbose: bool = VerboseOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """The whole pipeline: annotate -> train each variant -> label the corpus -> evaluate -> report, into
    OUTPUT_DIR/NAME/: annotations.parquet, models/<variant>/model/, labels.parquet, test_predictions.parquet,
    label_issues.parquet, metrics.json, report.md, report.html, plots/, manifest.json, cache/ and logs/.
    `llambert preflight`'s checks run first (a failed check stops the run before any stage). Stages whose outputs
    exist for the same config are skipped, so a rerun resumes."""
    cfg = command_config(config, {"name": name, "output_dir": output_dir, "cluster.address": address}, set_)
    from llambert_ray.pipeline import run_pipeline
    from llambert_ray.report import headline_table, story_text

    metrics = run_pipeline(cfg, log=console.echo, preflight=not skip_preflight)
    console.echo("")
    console.echo(headline_table(metrics))
    story = story_text(metrics)
    if story:
        console.echo("\n" + story)
    console.echo(f"\nreport: {metrics['report']} (and report.html); labels: {cfg.run_dir / 'labels.parquet'}; "
                 f"logs: {cfg.run_dir / 'logs'}")


@app.command()
@friendly_errors
def preflight(
    config: Path = typer.Option(..., "--config", "-c", help="pipeline YAML to check"),
    address: str | None = typer.Option(None, help="Ray address of the cluster it will run on (default: the "
                                                  "config's cluster.address; none = a local Ray)"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the checks as JSON here"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Check a config against the cluster it will run on, in seconds, before any GPU is used: every model resolves
    and loads on the nodes (HF_TOKEN where a gated model loads), the corpus is readable from the workers,
    output_dir is shared by all nodes, each engine's TP x PP bundles fit one node shape and the replicas fit the
    cluster (live nodes and autoscaler node types), TP divides the model's heads. One table; exit 2 on a failure."""
    cfg = command_config(config, {"cluster.address": address}, set_)
    from llambert_ray.preflight import PreflightError, checks_to_dicts, run_preflight, table
    from llambert_ray.ray_env import init_ray

    init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus)
    checks = run_preflight(cfg)
    typer.echo(table(checks))
    if json_out:
        import json as _json

        json_out.write_text(_json.dumps(checks_to_dicts(checks), indent=2))
    if any(c.status == "fail" for c in checks):
        raise PreflightError("preflight failed (see the table above)")


@app.command()
@friendly_errors
def plan(
    config: Path = typer.Option(..., "--config", "-c", help="pipeline YAML to estimate"),
    gpu: str = typer.Option("a100-80gb", help="GPU kind for the stages the config puts on GPUs (a row of "
                                              "the hardware table)"),
    hardware: Path | None = typer.Option(None, help="hardware table YAML (default: the packaged "
                                                    "llambert_ray/hardware.yaml: peak FLOP/s, utilization, prices)"),
    measured: Path | None = typer.Option(None, help="a finished run folder (or its manifest.json) on the same "
                                                    "hardware: use its measured throughput instead of FLOP estimates"),
    rows: int | None = typer.Option(None, help="corpus rows, when plan cannot read the corpus (e.g. no "
                                               "credentials for s3:// here)"),
    mean_chars: float | None = typer.Option(None, "--mean-chars", help="mean characters per text, with --rows"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the estimate as JSON here"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Estimate rows, tokens, device-hours and cost of every stage of a config before running anything
    (no Ray, no model weights: corpus metadata, the tokenizers and a hardware table)."""
    from llambert_ray.plan import load_hardware, load_manifest, plan_run
    from llambert_ray.tasks import load_task

    cfg = command_config(config, {}, set_)
    est = plan_run(cfg, load_task(cfg.task), hardware=load_hardware(hardware), gpu=gpu, rows=rows,
                   mean_chars=mean_chars, measured=load_manifest(measured) if measured else None)
    typer.echo(est.table())
    if json_out:
        import json as _json

        json_out.write_text(_json.dumps(est.to_dict(), indent=2))


@app.command()
@friendly_errors
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="trained model folder"),
    host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="HTTP port (default 8000)"),
    replicas: int | None = typer.Option(None, help="fixed number of replicas"),
    autoscale: str | None = typer.Option(None, help="MIN:MAX replicas, scaled on ongoing requests"),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size", help="texts per forward pass"),
    batch_wait_timeout_s: float | None = typer.Option(None, "--batch-wait-timeout-s"),
    address: str | None = typer.Option(None),
    config: Path | None = ConfigOpt,
    verbose: bool = VerboseOpt,
    set_: list[str] | None = SetOpt,
) -> None:
    """Serve a trained classifier over HTTP (Ray Serve, dynamic batching); runs until Ctrl-C. Writes no files;
    the replicas' logs stay in Ray's session folder (printed at start; -v shows them live)."""
    mn = mx = replicas
    if autoscale:
        try:
            mn, mx = (int(x) for x in autoscale.split(":"))
        except ValueError:
            raise ConfigError(f"--autoscale {autoscale!r} is not MIN:MAX; fix: give two replica counts, "
                              f"e.g. --autoscale 1:4") from None
    cfg = command_config(config, {"serve.host": host, "serve.port": port, "serve.min_replicas": mn,
                           "serve.max_replicas": mx, "serve.max_batch_size": max_batch_size,
                           "serve.batch_wait_timeout_s": batch_wait_timeout_s, "cluster.address": address}, set_)
    from llambert_ray.label import model_labels

    model_labels(model)  # a wrong model folder fails here, before Ray (or Ray Serve) is even imported
    from llambert_ray.ray_env import init_ray
    from llambert_ray.serve import start

    init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus)
    logs = console.session_logs()
    typer.echo(f"serving {model} on http://{cfg.serve.host}:{cfg.serve.port} (docs at /docs); Ctrl-C stops"
               + (f"; logs: {logs}" if logs else ""))
    start(model, cfg.serve, blocking=True)


def main() -> None:  # pragma: no cover - console script entry
    app()


