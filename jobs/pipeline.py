"""Ray job entrypoint: the whole LlamBERT pipeline on the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/pipeline.py --config configs/imdb-llama2-70b.yaml

It calls the same stage functions as `llambert run` (and joins the job's cluster with address "auto").
"""

import sys

from llambert_ray.cli import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(app(["run", *args]))
