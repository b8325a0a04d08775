"""Shared by the job entrypoints: run one `llambert` command on the cluster the Ray job runs on.

A Ray job's driver joins its cluster with address "auto" (Ray sets RAY_ADDRESS for it), so every entrypoint adds
`--address auto` unless the caller gave an address. The entrypoints call the same CLI (and so the same stage
functions) as a laptop run.
"""

from __future__ import annotations

import sys

from llambert_ray.cli import app


def run_command(command: str) -> None:
    args = sys.argv[1:]
    if command != "evaluate" and "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(app([command, *args]))
