"""Ray job entrypoint: `llambert train` on the job's cluster (same flags; `--address auto` added).

    make submit STAGE=train CONFIG=configs/imdb-llama2-70b.yaml ADDRESS=http://HEAD:8265 \
        JOB_ARGS="--train runs/imdb70b/annotations.parquet --output runs/imdb70b/train"
"""

from _entry import run_command

if __name__ == "__main__":
    run_command("train")
