"""How fast can an engine node get its weights here? The two reads a GPU engine start waits on, measured on this
machine, then the hardware table's storages for a 70B model beside them.

1. disk    a weights file read sequentially from this machine's disk, past the page cache (O_DIRECT: what a
           node's first load reads) and through it (a second load on the same node)
2. bucket  Ray's model downloader (what vLLM's stage runs in each engine actor before vLLM loads; with
           annotate.local_weights_dir it writes to the node's own disk) copying the same file as an s3:// model
           from a local S3-compatible server (moto on 127.0.0.1): the copy path's own ceiling on this machine,
           not S3's (moto is one Python process on the same 2 cores)

    python -m bench.weights_load [--gib 2] [--repeats 3]

Writes bench/results/weights_load.json and .md; the file goes to bench/results/bench_tmp/weights_load/ (removed).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, save_results, spread

TMP = RESULTS / "bench_tmp" / "weights_load"
GIB = 2**30
CHUNK = 64 << 20
LLAMA70_GIB = 128.5  # Llama-2-70b in bf16 (llambert plan's GPU memory note)
# What vLLM's stage runs in each engine actor before vLLM loads (ray.llm), as a process of its own: its environment
# (HF_HUB_CACHE, HOME for its lock, the S3 endpoint) is the engine actor's. Prints where the model landed, then the
# copy's seconds. tests/test_storage.py runs it too.
DOWNLOAD = """
import sys, time
from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable, download_model_files
t = time.perf_counter()
print(download_model_files(model_id=sys.argv[1], mirror_config=None,
                           download_model=NodeModelDownloadable.MODEL_AND_TOKENIZER, download_extra_files=False))
print(time.perf_counter() - t)
"""


def write_file(path: Path, gib: float) -> int:
    block = os.urandom(CHUNK)
    n = int(gib * GIB) // CHUNK
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return n * CHUNK


def read_gibs(path: Path, cold: bool) -> float:
    """GiB/s reading the whole file in CHUNK reads: cold with O_DIRECT (from the device, past the page cache), warm
    through the page cache (a second load on the same node)."""
    import mmap

    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if cold else 0))
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    try:
        t, size = time.perf_counter(), 0
        while n := os.preadv(fd, [buf], size):
            size += n
        return size / GIB / (time.perf_counter() - t)
    finally:
        os.close(fd)
        buf.close()


def bucket_gibs(weights: Path, repeats: int) -> list[float]:
    """Ray's downloader from moto on loopback into a fresh node-local folder, `repeats` times."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="m/config.json", Body=b'{"model_type": "llama"}')
        s3.upload_file(str(weights), "models", "m/model.safetensors")
        out = []
        for i in range(repeats):
            dest = TMP / f"node-{i}"
            run_env = {**env, "HF_HUB_CACHE": str(dest), "HOME": str(TMP / f"home-{i}")}
            done = subprocess.run([sys.executable, "-c", DOWNLOAD, "s3://models/m"], env=run_env,
                                  capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            secs = float(done.stdout.strip().splitlines()[-1])  # the copy itself, not the process's imports
            got = sum(p.stat().st_size for p in dest.rglob("*.safetensors"))
            out.append(got / GIB / secs)
            shutil.rmtree(dest)
        return out
    finally:
        server.stop()


def summary_md(r: dict[str, Any]) -> str:
    lines = ["# Weights: what an engine start reads, measured here", "",
             f"`python -m bench.weights_load`: a {r['gib']:g} GiB file, {r['repeats']} runs each (median, min-max); "
             f"{r['machine']}.", "",
             "| read | GiB/s median | min | max | 128.5 GiB (Llama-2-70b bf16) takes |", "|---|---:|---:|---:|---:|"]
    for name, s in r["measured"].items():
        lines.append(f"| {name} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | "
                     f"{LLAMA70_GIB / s['median'] / 60:.1f} min |")
    lines += ["", "The hardware table's storages (llambert_ray/hardware.yaml `weights_storage`, not measured here):",
              "", "| storage | GiB/s a node | 128.5 GiB takes |", "|---|---:|---:|"]
    for name, rate in r["table"].items():
        lines.append(f"| {name} | {rate:g} | {LLAMA70_GIB / rate / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="size of the weights file")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import yaml

    TMP.mkdir(parents=True, exist_ok=True)
    weights = TMP / "model.safetensors"
    try:
        write_file(weights, a.gib)
        cold = [read_gibs(weights, cold=True) for _ in range(a.repeats)]
        warm = [read_gibs(weights, cold=False) for _ in range(a.repeats)]
        bucket = bucket_gibs(weights, a.repeats)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    table = yaml.safe_load(Path("llambert_ray/hardware.yaml").read_text())["weights_storage"]
    res = {"gib": a.gib, "repeats": a.repeats, "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
           "measured": {"disk, O_DIRECT (a first load)": spread(cold), "disk, page cache (a second load)": spread(warm),
                        "bucket (moto, loopback) -> node-local folder, Ray's downloader": spread(bucket)},
           "table": table}
    save_results("weights_load", res, summary_md(res))


if __name__ == "__main__":
    main()
