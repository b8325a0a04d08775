"""`python -m llambert_ray.cli`: the `llambert` command."""

import sys

from llambert_ray.cli import app

sys.exit(app())
