"""ray_env: the environment engines need reaches workers without clashing with a Ray job's own runtime_env."""

import json
from pathlib import Path

import pytest

from llambert_ray.ray_env import torch_threads, worker_env


def test_worker_env_outside_and_inside_a_ray_job(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    env = worker_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert "VLLM_CPU_OMP_THREADS_BIND" in env
    # a job driver: Ray refuses a driver runtime_env that repeats the job's env_vars keys, so those are left out
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1",
                                                                       "DS_ACCELERATOR": "cpu"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = worker_env()
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and "DS_ACCELERATOR" not in env
    assert "VLLM_CPU_OMP_THREADS_BIND" in env and "TOKENIZERS_PARALLELISM" in env


def test_deepspeed_accelerator_follows_the_training_device(monkeypatch):
    """A DS_ACCELERATOR=cpu in the driver's environment must not put GPU training on DeepSpeed's CPU backend."""
    from llambert_ray.train_loop import train_worker_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert train_worker_env(use_gpu=True)["DS_ACCELERATOR"] == "cuda"
    assert train_worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("LLAMBERT_CACHE", "~/llambert-cache")  # DeepSpeed's compiled op lands in the one cache dir
    assert train_worker_env(use_gpu=False)["TORCH_EXTENSIONS_DIR"] == str(Path.home() / "llambert-cache"
                                                                          / "torch_extensions")
    # inside a Ray job that sets it, the job's value reaches the workers and is not repeated
    job = {"runtime_env": {"env_vars": {"DS_ACCELERATOR": "cpu"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert "DS_ACCELERATOR" not in train_worker_env(use_gpu=False)


def test_torch_threads_follow_the_cpus_ray_reserves():
    assert [torch_threads(c) for c in (0.25, 0.9, 1.0, 1.5, 2.6, 4)] == [1, 1, 1, 2, 3, 4]


def test_a_local_ray_that_times_out_starting_says_what_to_do(monkeypatch, tmp_path):
    """Two commands starting their local Rays at once: the one whose start times out ends with one line."""
    import ray
    import typer.testing

    from llambert_ray.cli import app

    def start_times_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", start_times_out)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"id2label": {"0": "a", "1": "b"}}')
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "x", "text": "y"}\n')
    res = typer.testing.CliRunner().invoke(app, ["label", "-m", str(model), "-i", str(corpus), "-o",
                                                 str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert "another command" in line and "--address auto" in line and "ray start --head" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_frames_become_a_dataset_while_an_engine_holds_the_cpus(ray_local):
    """A run's served engine keeps its CPUs for the whole run: on a 2-CPU machine ray.data.from_pandas then waits
    forever (its metadata task asks for a whole CPU; CI hung there). from_frames starts no task."""
    import pandas as pd
    import pyarrow as pa
    from ray.util.placement_group import placement_group, remove_placement_group

    from llambert_ray.ray_env import from_frames

    pg = placement_group([{"CPU": 1.5}])  # what the engine's bundle and replica hold, and more
    assert pg.wait(60)
    try:
        frames = [pd.DataFrame({"id": [f"r{i}", f"s{i}"], "text": ["a", "b"]}) for i in range(3)]
        out = from_frames(frames).to_pandas()
        assert len(out) == 6 and out["id"].is_unique
        assert from_frames(frames[0]).count() == 2
        assert from_frames([pa.Table.from_pandas(f) for f in frames]).count() == 6
    finally:
        remove_placement_group(pg)
