"""Ray Serve: real HTTP requests against a local deployment of a classifier folder, then a clean shutdown."""

import socket

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llambert_ray.config import ServeConfig
    from llambert_ray.models import resolve_model
    from llambert_ray.serve import start

    src = resolve_model("minilm-l6")
    model_dir = tmp_path_factory.mktemp("serve") / "model"
    m = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label={0: "positive", 1: "negative"}, label2id={"positive": 0, "negative": 1})
    m.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
    cfg = ServeConfig(port=_free_port(), max_batch_size=8, max_texts_per_request=16, max_chars_per_text=500,
                      cpus_per_replica=0.5, max_length=64, gpus_per_replica=0)
    start(model_dir, cfg, name="test-llambert")
    yield f"http://127.0.0.1:{cfg.port}", model_dir
    from ray import serve

    serve.shutdown()


def test_classify_single_and_batch(served):
    import httpx

    url, _ = served
    r = httpx.post(f"{url}/v1/classify", json={"texts": ["A wonderful film."]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    (pred,) = body["predictions"]
    assert pred["label"] in {"positive", "negative"} and abs(sum(pred["probs"].values()) - 1) < 1e-4
    texts = [f"review {i}: {'great' if i % 2 else 'awful'} movie" for i in range(12)]
    r = httpx.post(f"{url}/v1/classify", json={"texts": texts}, timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 12
    assert r.json()["model"] == body["model"]


@pytest.mark.parametrize("payload,status,needle", [
    (b"{not json", 422, "JSON decode error"),
    (b'{"texts": ["caf\xe9 \xff"]}', 400, "error parsing the body"),  # not UTF-8
    ({"texts": "just a string"}, 422, "texts"),
    ({"texts": [1, 2]}, 422, "texts"),
    ({"text": ["wrong key"]}, 422, "texts"),
    ({"texts": []}, 422, "empty"),
    ({"texts": ["   "]}, 422, "whitespace"),
    ({"texts": ["ok", ""]}, 422, "texts[1]"),
    ({"texts": ["x"] * 17}, 413, "limit is 16"),
    ({"texts": ["x" * 501]}, 413, "limit is 500"),
    ({"texts": ["x" * 1_000_000]}, 413, "limit is 500"),  # a 1 MB text
])
def test_bad_requests_get_clear_4xx(served, payload, status, needle):
    import httpx

    url, _ = served
    if isinstance(payload, bytes):
        r = httpx.post(f"{url}/v1/classify", content=payload, headers={"content-type": "application/json"},
                       timeout=30)
    else:
        r = httpx.post(f"{url}/v1/classify", json=payload, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_2000_requests_of_loopback_load_without_errors(served):
    """A bounded load of 2,000 requests from 16 concurrent loopback clients: every one answered 200."""
    import asyncio
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    from bench.serve_load import load

    url, _ = served
    res = asyncio.run(load(f"{url}/v1/classify", requests=2000, concurrency=16, time_limit_s=800))
    print(f"serve load: {res}")
    assert res["requests"] == 2000 and res["errors"] == 0
    assert res["p99_ms"] >= res["p50_ms"] > 0


def test_health_model_docs(served):
    import httpx

    url, model_dir = served
    assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert info["labels"] == ["positive", "negative"] and len(info["version"]) == 12
    from llambert_ray.label import model_fingerprint

    # the version names the model as a labels table's `model` column does (its first 12 hex digits)
    assert model_fingerprint(model_dir).startswith("sha256:" + info["version"])
    # gpus_per_replica 0: the replica stays on the CPU in fp32, as before the GPU option existed
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert "/v1/classify" in httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]


def test_a_second_start_on_another_port_is_refused(served):
    """Serve keeps one HTTP address per cluster: asking for another names the running one instead of
    silently serving there (Ray itself only logs a warning)."""
    from llambert_ray.config import ServeConfig
    from llambert_ray.serve import ServeError, start

    url, model_dir = served
    running_port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ServeError, match=f"already running .*127.0.0.1:{running_port}.*serve shutdown"):
        start(model_dir, ServeConfig(port=_free_port(), cpus_per_replica=0.5, gpus_per_replica=0), name="other")


def test_label_corpus_through_the_deployment(served, tweets_frame, tmp_path):
    """label.via serve: the corpus labelled by the running deployment (by handle) into the same parquet sink as the
    actor pool: rows in = rows out, each id once, and the answers are the model's own (a Classifier in this process,
    same max_length); an app that is not running, or that serves another folder, is refused before any work."""
    import shutil

    import numpy as np
    import pandas as pd
    import ray

    from llambert_ray.config import LabelConfig
    from llambert_ray.label import Classifier, LabelError, label

    _, model_dir = served
    rows = tweets_frame.head(200)[["id", "text", "label"]]
    cfg = LabelConfig(via="serve", serve_app="test-llambert", batch_size=50)
    s = label(ray.data.from_pandas(rows), model_dir, cfg, tmp_path / "labels.parquet")
    out = pd.read_parquet(tmp_path / "labels.parquet").set_index("id").loc[rows["id"]]
    assert s.rows == 200 == len(out) and out.index.is_unique and s.failed == 0 and out["error"].isna().all()
    local = Classifier(str(model_dir), max_length=64).predict_proba(rows["text"].tolist())
    assert np.allclose(out[["prob_positive", "prob_negative"]].to_numpy(), local, atol=1e-4)
    assert (out["gold"].to_numpy() == rows["label"].to_numpy()).all()
    with pytest.raises(LabelError, match="no Serve application 'nope'.*llambert serve"):
        label(ray.data.from_pandas(rows), model_dir, cfg.model_copy(update={"serve_app": "nope"}),
              tmp_path / "never.parquet")
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    with pytest.raises(LabelError, match="serves .*, not --model"):
        label(ray.data.from_pandas(rows), other, cfg, tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()


def test_serve_config_yaml_and_app_builder(tmp_path):
    """configs/serve.yaml is a valid Serve config whose import path builds the app from its args."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from llambert_ray.config import ServeConfig
    from llambert_ray.serve import build_app, deployment_options

    doc = yaml.safe_load((Path(__file__).parents[1] / "configs" / "serve.yaml").read_text())
    app_cfg = ServeDeploySchema.model_validate(doc).applications[0]
    assert app_cfg.import_path == "llambert_ray.serve:build_app"
    with pytest.raises(ValueError, match="model_dir is required"):
        build_app({})
    from llambert_ray.label import LabelError

    with pytest.raises(LabelError, match="config.json"):
        build_app({**app_cfg.args, "model_dir": str(tmp_path)})
    auto = deployment_options(ServeConfig(min_replicas=1, max_replicas=4, max_batch_size=16))
    assert auto["autoscaling_config"]["max_replicas"] == 4 and auto["max_ongoing_requests"] >= 32
    fixed = deployment_options(ServeConfig(min_replicas=2, max_replicas=2))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed


def test_gpus_per_replica_reaches_the_replica_options_without_a_gpu(tmp_path):
    """gpus_per_replica > 0 asks Ray for GPUs per replica (so the autoscaler adds GPU nodes); 0 asks for none."""
    import json

    from llambert_ray.config import ServeConfig
    from llambert_ray.serve import build_app, deployment_options, replica_device

    assert "num_gpus" not in deployment_options(ServeConfig())["ray_actor_options"]
    assert deployment_options(ServeConfig(gpus_per_replica=1, cpus_per_replica=2))["ray_actor_options"] == {
        "num_cpus": 2, "num_gpus": 1}
    # as `serve deploy` passes a Serve config's args (and `serve run` key=value strings)
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "yes", "1": "no"}}))
    app = build_app({"model_dir": str(tmp_path), "gpus_per_replica": "0.5", "min_replicas": 1, "max_replicas": 3})
    dep = app._bound_deployment
    assert dep.ray_actor_options["num_gpus"] == 0.5
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ValueError, match="gpus_per_replica"):
        ServeConfig(gpus_per_replica=-1)
    assert replica_device(0) == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="gpus_per_replica is 1.*fix: .*gpus_per_replica: 0"):
            replica_device(1)


def test_replica_methods_see_every_global_name_they_use():
    """Serve's decorators snapshot the class's module globals when they run: a helper defined below the class
    is missing in the replica (NameError at start-up), though every import and unit test passes."""
    import builtins
    import dis
    import inspect

    from llambert_ray.serve import ClassifierService

    def global_names(code):
        names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        for const in code.co_consts:
            if inspect.iscode(const):
                names |= global_names(const)
        return names

    checked = 0
    for klass in ClassifierService.func_or_class.__mro__:
        if klass.__module__ != "llambert_ray.serve":
            continue
        for attr in vars(klass).values():
            fn = inspect.unwrap(attr) if callable(attr) else None
            if fn is None or not hasattr(fn, "__code__"):
                continue
            missing = {n for n in global_names(fn.__code__) if n not in fn.__globals__ and not hasattr(builtins, n)}
            assert not missing, f"{fn.__qualname__} uses {missing}: define them above ClassifierService"
            checked += 1
    assert checked >= 5
