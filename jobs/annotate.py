"""Ray job entrypoint for the annotation stage alone (same flags as `llambert annotate`)."""

import sys

from llambert_ray.cli import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(app(["annotate", *args]))
