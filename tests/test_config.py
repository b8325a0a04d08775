import pytest

from llambert_ray.config import ConfigError, config_hash, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nannotate: {mode: generate, shots: 3}\ncorpus: {path: a.parquet, sample: 10}\n")
    cfg = load_config(p, {"annotate.mode": "score", "corpus.seed": 7, "annotate.model": None})
    assert cfg.annotate.mode == "score"  # flag beats YAML
    assert cfg.annotate.shots == 3
    assert cfg.corpus.sample == 10 and cfg.corpus.seed == 7
    assert cfg.annotate.model == "smollm2-135m-instruct"  # None override leaves the default
    assert cfg.run_dir.name == "x"


@pytest.mark.parametrize("text,needle", [
    ("annotate: {mode: guess}", "annotate.mode"),
    ("annotate: {lables: 3}", "annotate.lables"),
    ("corpus: {sample: 0}", "corpus.sample"),
    ("corpus: {sample: -5}", "corpus.sample"),
    ("corpus: {fraction: 1.5}", "corpus.fraction"),
    ("corpus: {sample: 5, fraction: 0.5}", "not both"),
    ("train: {variants: [magic]}", "train.variants"),
    ("annotate: [1, 2", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_configs_name_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_changes_with_content():
    a, b = load_config(None), load_config(None, {"annotate.mode": "choice"})
    assert config_hash(a.annotate) != config_hash(b.annotate)
    assert config_hash(a.annotate) == config_hash(load_config(None).annotate)
