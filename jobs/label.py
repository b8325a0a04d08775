"""Ray job entrypoint: `llambert label` on the job's cluster (same flags; `--address auto` added).

    make submit STAGE=label CONFIG=configs/imdb-llama2-70b.yaml ADDRESS=http://HEAD:8265 \
        JOB_ARGS="--model runs/imdb70b/train/model --input s3://BUCKET/corpus.parquet --output runs/imdb70b"
"""

from _entry import run_command

if __name__ == "__main__":
    run_command("label")
