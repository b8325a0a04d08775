import numpy as np
import pandas as pd
import pytest

from llambert_ray.metrics import classification_metrics


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


def test_gold_outside_the_labels_counts_as_wrong_and_leaves_the_matrix_empty():
    m = classification_metrics(["x", "y"], ["a", "b"], ["a", "b"])
    assert m["accuracy"] == 0 and m["macro_f1"] == 0 and m["confusion"] == [[0, 0], [0, 0]]


def test_label_issues_flag_contradicted_llm_labels_first():
    import pandas as pd

    from llambert_ray.screening import label_issue_summary, label_issues

    ann = pd.DataFrame({"id": list("abcdef"), "text": list("ABCDEF"),
                        "llm_label": ["pos", "pos", "neg", "neg", "pos", None],
                        "label": ["pos", "neg", "neg", "pos", "pos", "neg"]})
    pred = pd.DataFrame({"id": list("abcdefg"), "prob_pos": [0.9, 0.2, 0.1, 0.7, 0.8, 0.5, 0.5],
                         "prob_neg": [0.1, 0.8, 0.9, 0.3, 0.2, 0.5, 0.5]})
    issues = label_issues(ann, pred, ["pos", "neg"])
    # thresholds: pos 0.63 (mean p_pos over a, b, e), neg 0.6 (over c, d); b (LLM pos, p_neg 0.8) and d (LLM neg,
    # p_pos 0.7) are flagged, b (p of its LLM label 0.2) before d (0.3); f has no LLM label, g no annotation
    assert issues["id"].tolist() == ["b", "d"] and issues["classifier_label"].tolist() == ["neg", "pos"]
    assert issues["p_llm_label"].tolist() == pytest.approx([0.2, 0.3])
    s = label_issue_summary(issues, ann)
    assert s["annotated"] == 5 and s["flagged"] == 2 and s["flag_precision"] == 1.0
    assert s["llm_error_rate"] == pytest.approx(2 / 5)
    assert s["flags_informative"] is True  # flagged labels all wrong vs 40 % of all
    # flags that point at wrong labels no more often than any label is wrong: not evidence, and the report says so
    from llambert_ray.report import label_issue_section

    chance = label_issue_summary(issues[issues["id"] == "b"].assign(label="pos"), ann.assign(
        label=["pos", "pos", "neg", "neg", "neg", "neg"]))
    assert chance["flag_precision"] == 0.0 and chance["llm_error_rate"] == pytest.approx(1 / 5)
    assert chance["flags_informative"] is False
    assert "no better than chance" in " ".join(label_issue_section(chance, issues.iloc[:0]))
    assert "no better than chance" not in " ".join(label_issue_section(s, issues.iloc[:0]))


def test_failed_rows_are_left_out_and_counted():
    gold = ["a", "a", "b", "b", None]
    pred = ["a", None, "b", "a", None]
    err = [None, "RuntimeError: too long", "", None, "RuntimeError: too long"]  # "" / None: labelled
    m = classification_metrics(gold, pred, ["a", "b"], failed=err)
    assert m["rows"] == 3 and m["failed"] == 1 and m["accuracy"] == pytest.approx(2 / 3) and m["dropped"] == 0
    assert classification_metrics(gold, pred, ["a", "b"])["failed"] == 0  # no error column: nothing left out


def test_cv_label_issues_flag_planted_flips_far_above_the_random_rate():
    from llambert_ray.screening import cv_label_issues, label_issue_summary, screen_llm_labels
    from llambert_ray.train import variant_stages

    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    n = 400
    y = rng.integers(0, 4, n)
    centres = rng.normal(0, 1, (4, 16))
    x = centres[y] + rng.normal(0, 0.6, (n, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    llm = y.copy()
    flipped = rng.choice(n, 40, replace=False)  # 10 % of the LLM labels wrong
    llm[flipped] = (y[flipped] + rng.integers(1, 4, 40)) % 4
    ann = pd.DataFrame({"id": [f"r{i:03d}" for i in range(n)], "text": "t", "llm_label": [labels[i] for i in llm],
                        "llm_confidence": 0.9, "label": [labels[i] for i in y]})
    ann.loc[5, "llm_label"] = None  # an unparseable answer is not judged
    issues = cv_label_issues(ann, x, labels, folds=5)
    s = label_issue_summary(issues, ann)
    assert 20 <= len(issues) <= 80 and "r005" not in set(issues["id"])
    assert s["flag_precision"] >= 3 * s["llm_error_rate"], s  # random flags would be right 10 % of the time
    assert (issues["classifier_label"] != issues["llm_label"]).mean() > 0.9
    dropped = screen_llm_labels(ann, issues, "drop")
    # every row stays: the flagged ones lose their LLM label only, so gold-label variants still train on them
    assert len(dropped) == n and dropped["llm_label"].isna().sum() == len(issues) + 1
    assert dropped.set_index("id").loc[list(issues["id"]), "llm_label_before"].notna().all()
    assert len(variant_stages("llm", dropped)[0][1]) == n - len(issues) - 1
    assert len(variant_stages("gold", dropped)[0][1]) == n
    fixed = screen_llm_labels(ann, issues, "relabel")
    assert (fixed["llm_label"] == fixed["label"]).mean() > (ann["llm_label"] == ann["label"]).mean()
    assert screen_llm_labels(ann, issues, "keep") is ann


def test_llm_label_warnings_fire_on_labels_not_worth_training_on_and_not_on_good_ones():
    """metrics.llm_label_warnings: silent on a good label set; by gold, a weak 6-class labeller (the collapse seen
    in the issue: most rows one class); without gold, one label on > 90 % of rows, or confidences of a guesser."""
    from llambert_ray.metrics import llm_label_warnings

    rng = np.random.default_rng(0)
    two = ["positive", "negative"]
    gold = rng.choice(two, 200)
    right = rng.random(200) < 0.85
    good = pd.DataFrame({"label": gold, "llm_label": np.where(right, gold, np.where(gold == "positive", "negative",
                                                                                  "positive")),
                         "llm_confidence": rng.uniform(0.6, 1.0, 200)})
    assert llm_label_warnings(good, two) == []
    # gold that says the labels are good outranks what the labels alone suggest (a skewed corpus, low confidences)
    assert llm_label_warnings(good.assign(llm_confidence=0.52), two) == []
    six = ["abbr", "desc", "entity", "human", "loc", "num"]
    g6 = rng.choice(six, 300)
    weak = pd.DataFrame({"label": g6, "llm_label": np.where(rng.random(300) < 0.7, "desc", g6),
                         "llm_confidence": 0.6})
    (w,) = [x for x in llm_label_warnings(weak, six) if "agree poorly" in x]
    assert "macro F1" in w and "labelled 'desc'" in w and "gold-knn" in w, w
    no_gold = good.drop(columns="label").assign(llm_label=np.where(rng.random(200) < 0.95, "positive", "negative"))
    (w,) = llm_label_warnings(no_gold, two)
    assert "gave 'positive' to 9" in w and "learns little" in w, w
    guessing = good.drop(columns="label").assign(llm_confidence=rng.uniform(0.5, 0.56, 200))
    (w,) = llm_label_warnings(guessing, two)
    assert "it is guessing" in w
    assert llm_label_warnings(good.assign(llm_label=None), two)[0].startswith("the LLM labelled none of 200")
