"""Shared by the job entrypoints: run one `llambert` command on the cluster the Ray job runs on.

A Ray job's driver joins its cluster with address "auto" (Ray sets RAY_ADDRESS for it), so every entrypoint adds
`--address auto` unless the caller gave an address. The entrypoints call the same CLI (and so the same stage
functions) as a laptop run. Before a stage runs, `llambert preflight` checks the job's config against the cluster
(`llambert run` does this itself; the single-stage jobs run it here when they are given a --config).
"""

from __future__ import annotations

import sys

from llambert_ray.cli import app


def run_command(command: str) -> None:
    args = sys.argv[1:]
    if command != "evaluate" and "--address" not in args:
        args += ["--address", "auto"]
    if command in ("annotate", "train", "label") and ("--config" in args or "-c" in args):
        i = args.index("--config") if "--config" in args else args.index("-c")
        address = args[args.index("--address") + 1]
        code = app(["preflight", "--config", args[i + 1], "--address", address], standalone_mode=False)
        if code:
            sys.exit(code)
    sys.exit(app([command, *args]))
