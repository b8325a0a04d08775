import pytest

from llambert_ray.config import ConfigError, config_hash
from llambert_ray.config_load import load_config


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


def test_set_items_are_yaml_typed_and_checked_against_the_tree(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("corpus: {path: a.parquet, label_column: gold}\ntest: null\n")
    cfg = load_config(p, {"annotate.shots": 1}, ["annotate.shots=2", "train.bf16=true", "corpus.label_column=null",
                                                  "corpus.filters.split=[test, dev]", "test.path=b.parquet",
                                                  "train.learning_rate=3e-5"])
    assert cfg.annotate.shots == 2  # --set comes after the flags
    assert cfg.train.bf16 is True and cfg.corpus.label_column is None and cfg.test.path == "b.parquet"
    assert cfg.corpus.filters == {"split": ["test", "dev"]} and cfg.train.learning_rate == 3e-5


@pytest.mark.parametrize("item,needle", [
    ("annotate.shotz=2", "annotate has no key 'shotz'; valid keys: model, mode"),
    ("anotate.shots=2", "the config has no key 'anotate'; valid keys: name, output_dir, task, corpus"),
    ("name.first=x", "name is a value, not a section"),
    ("annotate.shots", "is not KEY=VALUE"),
    ("annotate.shots=two", "annotate.shots: Input should be a valid integer"),
    ("annotate.shots=[1", "not valid YAML"),
])
def test_bad_set_items_name_the_key(item, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, None, [item])
    assert needle in str(e.value)


def test_gold_label_keys_validate():
    cfg = load_config(None, sets=["annotate.shots_from=gold-knn", "annotate.gold_rows=50", "annotate.calibration=gold",
                                  "annotate.calibration_temperature=true", "train.label_issues=relabel"])
    assert (cfg.annotate.shots_from, cfg.annotate.gold_rows, cfg.annotate.calibration) == ("gold-knn", 50, "gold")
    assert cfg.train.label_issues == "relabel" and cfg.train.label_issue_folds == 5
    for bad in ["annotate.shots_from=nearest", "annotate.gold_rows=0", "train.label_issues=fix",
                "train.label_issue_folds=1"]:
        with pytest.raises(ConfigError):
            load_config(None, sets=[bad])
