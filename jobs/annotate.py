"""Ray job entrypoint: `llambert annotate` on the job's cluster (same flags; `--address auto` added).

    make submit STAGE=annotate CONFIG=configs/imdb-llama2-70b.yaml ADDRESS=http://HEAD:8265 \
        JOB_ARGS="--output runs/imdb70b"
"""

from _entry import run_command

if __name__ == "__main__":
    run_command("annotate")
