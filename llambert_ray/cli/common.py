"""What every `llambert` command shares: the config a command runs (YAML, flags, --set, optional preflight), the
options and help texts, and one clear line (exit 2) for a user's error instead of a traceback."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import typer

from llambert_ray import console
from llambert_ray.config import ConfigError, RunConfig
from llambert_ray.config_load import load_config
from llambert_ray.tasks import preset_names

# From the installed presets, so the help lists every one (a new preset file appears here by itself).
TASK_HELP = f"task preset ({', '.join(preset_names())}) or a task YAML path"
VerboseOpt = typer.Option(False, "--verbose", "-v", help="show Ray's, vLLM's and DeepSpeed's logs live (they "
                                                          "always go to the output's logs/ folder)")


def _user_errors() -> tuple[type[BaseException], ...]:
    from llambert_ray.annotate import AnnotationError
    from llambert_ray.data import CorpusError
    from llambert_ray.label import LabelError
    from llambert_ray.models import ModelNotFoundError
    from llambert_ray.preflight import PreflightError
    from llambert_ray.ray_env import RayStartError, UnsharedPathError
    from llambert_ray.serve import ServeError
    from llambert_ray.sql import SqlError
    from llambert_ray.storage import StorageError
    from llambert_ray.tasks import TaskError
    from llambert_ray.train import TrainError

    return (ConfigError, CorpusError, TaskError, ModelNotFoundError, AnnotationError, TrainError, LabelError,
            PreflightError, UnsharedPathError, RayStartError, ServeError, SqlError, StorageError)


def friendly_errors(fn):
    """Turn known input errors into one clear line on stderr and exit code 2 (no traceback, no log folder).
    A `verbose` flag of the command turns on live logs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("verbose"):
            console.set_verbose(True)
        console.setup_console()
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            console.discard_logs()
            console.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def command_config(config: Path | None, overrides: dict[str, Any], sets: list[str] | None = None,
            preflight: bool = False) -> RunConfig:
    """The command's config: YAML, then its flags, then --set. With preflight, `llambert preflight`'s checks run
    on exactly this config (a failure raises PreflightError: exit 2, nothing run)."""
    cfg = load_config(config, overrides, sets)
    if preflight:
        from llambert_ray.preflight import preflight_or_raise
        from llambert_ray.ray_env import init_ray

        init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus)
        preflight_or_raise(cfg, log=typer.echo)
    return cfg


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config; flags override its values.")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="set any config key, e.g. --set annotate.shots=2 "
                      "--set corpus.filters='{split: \\[test]}' (repeatable; VALUE read as YAML; after the other "
                      "flags)")
PreflightOpt = typer.Option(False, "--preflight", help="first run `llambert preflight`'s checks on this command's "
                            "config (its flags and --set included); a failure stops it (the jobs/ entrypoints "
                            "pass this)")


DB_URL_HELP = "sqlite:///FILE.db or postgresql://USER@HOST:PORT/DBNAME (no password in it: --password-env)"


def is_db_url(value: str | None) -> bool:
    return bool(value) and value.split("://", 1)[0].split("+")[0] in ("sqlite", "postgresql", "postgres")
