"""Ray Serve: the trained classifier as an HTTP service with dynamic batching and autoscaling.

    POST /v1/classify {"texts": [...]}  -> {"predictions": [{"label", "probs": {label: p}}], "model": ...}
    GET  /healthz                       -> {"status": "ok"}
    GET  /v1/model                      -> model folder, labels, version (as a labels table names the model)
    GET  /docs                          -> OpenAPI docs

Each text is one element of a `@serve.batch` batch, so texts from concurrent requests share a forward pass.
`serve run llambert_ray.serve:build_app model_dir=runs/demo/models/llm/model` works as well as `llambert serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from llambert_ray.config import ServeConfig
from llambert_ray.label import Classifier, model_fingerprint, model_labels


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(..., description="texts to classify", examples=[["A wonderful film."]])


class Prediction(BaseModel):
    label: str
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    model: str


api = FastAPI(title="llambert-ray classifier", version="1",
              description="Classify texts with an encoder fine-tuned on LLM labels (LlamBERT).")


def model_version(model_dir: str | Path) -> str:
    """The model's version as GET /v1/model reports it: the first 12 hex digits of its fingerprint (the `model` column
    of a labels table, label.model_fingerprint: a hash of every file of the folder), so a served prediction and
    a labelled row name the same model the same way."""
    return model_fingerprint(model_dir).removeprefix("sha256:")[:12]


# Above ClassifierService: the replica sees the module globals as they were when its decorators ran.
def replica_device(gpus_per_replica: float) -> str:
    """The torch device of a replica given `gpus_per_replica` GPUs: "cuda" with a GPU share, else "cpu"."""
    if not gpus_per_replica:
        # cpu even where this node has GPUs: Ray gave the replica none, so another actor may be using them.
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"serve gpus_per_replica is {gpus_per_replica} but this replica sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}); "
            f"fix: run it on a Ray node with a GPU and a CUDA build of torch, or set gpus_per_replica: 0")
    return "cuda"


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ClassifierService:
    def __init__(self, model_dir: str, limits: dict[str, Any]):
        self.cfg = ServeConfig(**limits)
        self.model_dir = str(model_dir)
        self.clf = Classifier(self.model_dir, max_length=self.cfg.max_length, sub_batch=self.cfg.max_batch_size,
                              threads=self.cfg.threads_per_replica, device=replica_device(self.cfg.gpus_per_replica),
                              quantize=self.cfg.quantize)
        self.version = model_version(self.model_dir)
        self._predict.set_max_batch_size(self.cfg.max_batch_size)
        self._predict.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _predict(self, texts: list[str]) -> list[dict[str, Any]]:
        probs = await asyncio.get_running_loop().run_in_executor(None, self.clf.predict_proba, texts)
        return [{"label": self.clf.labels[int(row.argmax())],
                 "probs": {lab: float(p) for lab, p in zip(self.clf.labels, row, strict=True)}} for row in probs]

    async def classify_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """For Serve handles (e.g. labelling a corpus through the deployment): no HTTP limits."""
        return list(await asyncio.gather(*[self._predict(t) for t in texts]))

    @api.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(self, req: ClassifyRequest) -> ClassifyResponse:
        if not req.texts:
            raise HTTPException(422, "texts is empty; send at least one text")
        if len(req.texts) > self.cfg.max_texts_per_request:
            raise HTTPException(413, f"{len(req.texts)} texts in one request; the limit is "
                                     f"{self.cfg.max_texts_per_request}: split the request")
        for i, t in enumerate(req.texts):
            if len(t) > self.cfg.max_chars_per_text:
                raise HTTPException(413, f"texts[{i}] has {len(t)} characters; the limit is "
                                         f"{self.cfg.max_chars_per_text}: shorten it")
            if not t.strip():
                raise HTTPException(422, f"texts[{i}] is empty or whitespace")
        preds = await self.classify_texts(req.texts)
        return ClassifyResponse(predictions=[Prediction(**p) for p in preds], model=self.version)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model_info(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "labels": self.clf.labels, "version": self.version,
                "device": self.clf.device, "dtype": self.clf.precision,
                "max_batch_size": self.cfg.max_batch_size, "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
                "max_texts_per_request": self.cfg.max_texts_per_request,
                "max_chars_per_text": self.cfg.max_chars_per_text}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Replicas or autoscaling, resources per replica, and max_ongoing_requests large enough to fill a batch."""
    actor: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        # Ray schedules the replica on a GPU node and sets its CUDA_VISIBLE_DEVICES; the autoscaler adds GPU nodes.
        actor["num_gpus"] = cfg.gpus_per_replica
    # A replica must accept at least a full batch of concurrent requests, or batches never fill.
    opts: dict[str, Any] = {"max_ongoing_requests": max(2 * cfg.max_batch_size, int(2 * cfg.target_ongoing_requests)),
                            "ray_actor_options": actor}
    if cfg.max_replicas > cfg.min_replicas:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = max(1, cfg.min_replicas)
    return opts


def build_app(args: dict[str, Any] | None = None, cfg: ServeConfig | None = None):
    """Serve application for a model folder; also the `serve run` / Serve-config import path.

    args (from `serve run ... key=value` or a Serve config's `args:`): model_dir (required) and any
    ServeConfig field (max_batch_size, min_replicas, ...).
    """
    args = dict(args or {})
    model_dir = args.pop("model_dir", None)
    if not model_dir:
        raise ValueError("model_dir is required: serve run llambert_ray.serve:build_app model_dir=PATH")
    model_labels(model_dir)  # a clear error before any replica starts
    cfg = cfg or ServeConfig(**{k: _coerce(v) for k, v in args.items()})
    return ClassifierService.options(**deployment_options(cfg)).bind(str(Path(model_dir).resolve()),
                                                                    cfg.model_dump())


def _coerce(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


class ServeError(RuntimeError):
    """Serve cannot start as asked (the message names the running instance and the fix)."""


def start(model_dir: str | Path, cfg: ServeConfig, *, name: str = "llambert", blocking: bool = False):
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns its handle."""
    from ray.serve.context import _get_global_client

    running = _get_global_client(raise_if_no_controller_running=False)
    if running is not None and (running.http_config.host, running.http_config.port) != (cfg.host, cfg.port):
        # serve.start would only log a warning and go on serving on the old address.
        raise ServeError(
            f"Ray Serve is already running on this cluster at {running.http_config.host}:"
            f"{running.http_config.port}, not at the requested {cfg.host}:{cfg.port}. Either use "
            f"--port {running.http_config.port} (and host {running.http_config.host}), or stop the running "
            f"Serve first with `serve shutdown -y` (this deletes its applications).")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app({"model_dir": str(model_dir)}, cfg), name=name, route_prefix="/", blocking=blocking)
