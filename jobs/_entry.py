"""Shared by the job entrypoints: run one `llambert` command on the cluster the Ray job runs on.

A Ray job's driver joins its cluster with address "auto" (Ray sets RAY_ADDRESS for it), so every entrypoint adds
`--address auto` unless the caller gave an address. The entrypoints call the same CLI (and so the same stage
functions) as a laptop run. Before a stage runs, `llambert preflight`'s checks run on the config the stage will
run, its flags and `--set` items included (`llambert run` does this itself; the single-stage jobs ask for it with
`--preflight` when they are given a --config).
"""

from __future__ import annotations

import sys

from llambert_ray.cli import app


def job_args(command: str, args: list[str]) -> list[str]:
    """The command line a job runs: `--address auto` unless one is given; `--preflight` for a single stage run
    from a config (a preflight of the config alone would miss the job's flags and --set overrides)."""
    args = list(args)
    if command != "evaluate" and "--address" not in args:
        args += ["--address", "auto"]
    if command in ("annotate", "train", "label") and ("--config" in args or "-c" in args):
        args.append("--preflight")
    return [command, *args]


def run_command(command: str) -> None:
    sys.exit(app(job_args(command, sys.argv[1:])))
