"""Ray job entrypoint: `llambert run` on the job's cluster (same flags; `--address auto` added).

    make submit STAGE=pipeline CONFIG=configs/imdb-llama2-70b.yaml ADDRESS=http://HEAD:8265
"""

from _entry import run_command

if __name__ == "__main__":
    run_command("run")
