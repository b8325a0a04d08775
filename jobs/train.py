"""Ray job entrypoint: `llambert train` on the job's cluster (same flags; `--address auto` added).

    make submit STAGE=train CONFIG=configs/imdb-llama2-70b.yaml ADDRESS=http://HEAD:8265 \
        JOB_ARGS="--train /mnt/shared/runs/imdb70b/annotations.parquet --output /mnt/shared/runs/imdb70b/train"

Paths are absolute, on storage every node mounts: Ray Data workers write on their own node, so a relative
--output would scatter the results over the nodes' working dirs (`llambert preflight` refuses one).
"""

from _entry import run_command

if __name__ == "__main__":
    run_command("train")
