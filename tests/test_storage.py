"""Outputs in object storage: `llambert label --output s3://...` against a real S3-compatible server (moto in
server mode) on 127.0.0.1: parts, then the manifest written last; readers trust only what a manifest names."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from llambert_ray.cli import app
from llambert_ray.storage import MANIFEST, StorageError, iter_parquet_frames, published_files, write_parquet


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port, and a bucket on it; yields the URI query that points pyarrow at
    it (the credentials come from the environment: tests/conftest.py)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri(f"s3://labels-bucket?{query}&allow_bucket_creation=true")
    fs.create_dir("labels-bucket")
    try:
        yield query
    finally:
        server.stop()


def _bucket(query: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"s3://labels-bucket?{query}")[0]


def test_a_published_output_is_replaced_whole_and_a_failed_write_never_read(s3_endpoint):
    """No Ray: a frame written twice to the same URI, a stray parts folder (a write that died before its
    manifest), a folder with no manifest, and a URI that carries a key."""
    uri = f"s3://labels-bucket/direct/labels.parquet?{s3_endpoint}"
    fs = _bucket(s3_endpoint)
    with fs.open_output_stream("labels-bucket/direct/labels.parquet/parts-dead/part-0.parquet") as f:
        pd.DataFrame({"id": ["ghost"], "label": ["x"]}).to_parquet(f, index=False)
    with pytest.raises(StorageError, match="not a published output"):
        list(iter_parquet_frames(uri))
    write_parquet(pd.DataFrame({"id": ["a", "b"], "label": ["positive", "negative"]}), uri)
    write_parquet(pd.DataFrame({"id": ["a", "b", "c"], "label": ["negative", "negative", "positive"]}), uri)
    frame = pd.concat(iter_parquet_frames(uri))
    assert sorted(frame["id"]) == ["a", "b", "c"]  # the second write only: not the first's, not the ghost
    _, files, manifest = published_files(uri)
    assert manifest["rows"] == 3 and len(files) == 1
    left = [i.path for i in fs.get_file_info(pafs.FileSelector("labels-bucket/direct/labels.parquet"))]
    assert sorted(p.rsplit("/", 1)[1] for p in left) == sorted([MANIFEST, files[0].split("/")[-2]])
    with pytest.raises(StorageError, match="credentials in its query") as e:
        write_parquet(pd.DataFrame({"id": ["a"]}), f"s3://labels-bucket/x?{s3_endpoint}&secret_key=hunter2")
    assert "hunter2" not in str(e.value)




@pytest.mark.timeout(180)
def test_an_engine_node_copies_a_bucket_model_onto_its_own_disk(s3_endpoint, tmp_path):
    """annotate.local_weights_dir: with the env engine_setup gives an engine actor, Ray's downloader (what vLLM's
    stage runs in each engine actor before vLLM loads) copies an s3:// model into that node-local folder, every
    byte; without it the copy lands in the HF cache ($HF_HOME, a cluster's shared volume), which preflight warns of."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bench.weights_load import DOWNLOAD
    from llambert_ray.annotate.engines import engine_setup
    from llambert_ray.config import AnnotateConfig

    fs = _bucket(s3_endpoint)
    weights = os.urandom(3 << 20)
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "model.safetensors": weights}
    for name, data in files.items():
        with fs.open_output_stream(f"labels-bucket/models/tiny/{name}") as f:
            f.write(data)
    port = s3_endpoint.split("endpoint_override=127.0.0.1:")[1].split("&")[0]
    model = "s3://labels-bucket/models/tiny"

    def copy(local_weights_dir, home):
        _, env, _ = engine_setup(AnnotateConfig(model=model, local_weights_dir=local_weights_dir), "gpu")
        run_env = {**os.environ, "HOME": str(home), "HF_HOME": str(tmp_path / "shared-volume" / "hf"),
                   "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", **env}
        out = subprocess.run([sys.executable, "-c", DOWNLOAD, model], env=run_env, capture_output=True, text=True,
                             timeout=150)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-2]  # where the model landed (then the copy's seconds)

    local = tmp_path / "node-nvme"
    path = copy(str(local), tmp_path / "home-a")
    assert path.startswith(str(local)), path
    assert {p.name: p.read_bytes() for p in Path(path).iterdir()} == files
    assert not (tmp_path / "shared-volume").exists()
    default = copy(None, tmp_path / "home-b")
    assert default.startswith(str(tmp_path / "shared-volume" / "hf")), default


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_label_writes_to_a_bucket_and_its_output_reads_back_as_a_corpus(ray_local, s3_endpoint, tweets_frame,
                                                                        untrained_model, tmp_path):
    """`llambert label --output s3://...`: rows in = rows out, each id once, the manifest's rows = the summary's,
    label_summary.json beside the labels; the published folder then reads back as a corpus (its manifest's files
    only, though a stray parts folder lies beside them)."""
    from llambert_ray.config import CorpusConfig
    from llambert_ray.data import read_corpus

    corpus = tmp_path / "tweets.parquet"
    tweets_frame.head(200).to_parquet(corpus, index=False)
    out = f"s3://labels-bucket/runs/r1?{s3_endpoint}"
    res = CliRunner().invoke(app, ["label", "--model", str(untrained_model), "--input", str(corpus), "--output", out,
                                   "--report-dir", str(tmp_path / "report"), "--batch-size", "50",
                                   "--set", "label.cpus_per_actor=0.5", "--set", "label.max_length=48"])
    assert res.exit_code == 0, res.output
    assert "labelled 200 of 200 rows" in res.output and "s3://labels-bucket/runs/r1/labels.parquet" in res.output
    labels = f"s3://labels-bucket/runs/r1/labels.parquet?{s3_endpoint}"
    frame = pd.concat(iter_parquet_frames(labels))
    assert len(frame) == 200 and frame["id"].is_unique and set(frame["id"]) == set(tweets_frame.head(200)["id"])
    fs, files, manifest = published_files(labels)
    assert manifest["rows"] == 200 == sum(pq.read_metadata(fs.open_input_file(f)).num_rows for f in files)
    with fs.open_input_stream("labels-bucket/runs/r1/label_summary.json") as f:
        assert json.loads(f.read())["rows"] == 200
    with fs.open_output_stream("labels-bucket/runs/r1/labels.parquet/parts-dead/part-0.parquet") as f:
        frame.head(7).assign(id=lambda d: "ghost-" + d["id"]).to_parquet(f, index=False)
    ds, info = read_corpus(CorpusConfig(path=labels, text_column="label", label_column=None), hold=False)
    assert info.rows == 200 and not any(i.startswith("ghost-") for i in ds.to_pandas()["id"])
