import pytest

from llambert_ray.evaluate import classification_metrics


def test_metrics_by_hand():
    gold = ["a", "a", "a", "b", "b", None]
    pred = ["a", "a", "b", "b", None, "a"]  # the None-gold row is ignored; the None prediction counts as wrong
    m = classification_metrics(gold, pred, ["a", "b"])
    assert m["rows"] == 5 and m["accuracy"] == pytest.approx(3 / 5) and m["dropped"] == pytest.approx(1 / 5)
    assert m["confusion"] == [[2, 1], [0, 1]]
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5) and m["per_class"]["b"]["recall"] == 0.5
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5) / 2)


def test_no_gold_rows():
    assert classification_metrics([None], ["a"], ["a", "b"])["accuracy"] is None
