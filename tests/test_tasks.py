import pytest

from llambert_ray.tasks import OTHER, TaskError, cut_text, load_task, preset_names


def test_presets_load():
    assert {"imdb-sentiment", "umls-nervous-system", "mesh-anatomy"} <= set(preset_names())
    for name in preset_names():
        t = load_task(name)
        assert len(t.labels) >= 2


def test_imdb_prompts_are_the_papers():
    t = load_task("imdb-sentiment")
    assert t.system_prompt == "Please answer with 'positive' or 'negative' only!"
    msgs = t.chat_messages("Great film.")
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    head = "Decide if the following movie review is positive or negative: \nGreat film.\n"
    assert msgs[-1]["content"].startswith(head)
    assert msgs[-1]["content"].endswith("Make your decision based on the whole text.")
    shots = t.chat_messages("x", shots=2)
    assert [m["role"] for m in shots] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert {shots[2]["content"], shots[4]["content"]} == {"positive", "negative"}


def test_completion_prompt_and_prefix():
    t = load_task("imdb-sentiment")
    p = t.completion_prompt("Nice.", shots=2)
    assert p.startswith(t.completion_prefix(2))
    assert p.endswith("Review: Nice.\nSentiment:")
    assert p.count("Sentiment: positive") == 1 and p.count("Sentiment: negative") == 1
    assert t.answer_words("completion") == {"positive": " positive", "negative": " negative"}
    with pytest.raises(TaskError, match="shots"):
        t.completion_prompt("x", shots=99)


def test_head_tail_truncation_keeps_the_verdict():
    review = "I went in with high hopes. " + "The plot meanders. " * 40 + "Verdict: a dull waste of time, 2/10."
    assert cut_text("short", 10, "head_tail") == "short" == cut_text("short", 10)
    head = cut_text(review, 120)
    both = cut_text(review, 120, "head_tail")
    assert head == review[:120] and "2/10" not in head
    assert len(both) <= 120 and both.startswith("I went in") and both.endswith("waste of time, 2/10.")
    assert " ... " in both
    t = load_task("imdb-sentiment")
    p = t.completion_prompt(review, shots=2, max_chars=120, truncate="head_tail")
    assert p.endswith(f"Review: {both}\nSentiment:")
    assert t.chat_messages(review, 0, 120, "head_tail")[-1]["content"].count(both) == 1
    assert all(0 < len(cut_text(review, n, "head_tail")) <= n for n in (1, 6, 7, 8, 9))  # never longer
    with pytest.raises(TaskError, match="head_tail"):
        cut_text(review, 120, "middle")


@pytest.mark.parametrize("answer,label", [
    ("positive", "positive"), ("  Negative.", "negative"), ("'positive'!", "positive"),
    ("The sentiment is negative", "negative"), ("positive or negative", OTHER), ("I cannot tell", OTHER),
    ("", OTHER), (None, OTHER), ("positively", OTHER),
])
def test_paper_parse_rule(answer, label):
    assert load_task("imdb-sentiment").parse(answer) == label


def test_gold_labels_and_model_defaults():
    t = load_task("imdb-sentiment")
    assert t.gold_label(1) == "positive" and t.gold_label("neg") == "negative" and t.gold_label(None) is None
    with pytest.raises(TaskError, match="gold_label_map"):
        t.gold_label("maybe")
    assert t.defaults_for("smollm2-135m-instruct")["prompt_style"] == "completion"
    assert t.defaults_for("meta-llama/Llama-2-70b-chat-hf") == {"prompt_style": "chat", "shots": 0}


def test_unknown_and_bad_task_files(tmp_path):
    with pytest.raises(TaskError, match="unknown task"):
        load_task("no-such-task")
    bad = tmp_path / "t.yaml"
    bad.write_text("name: t\nlabels: [a, b]\nverbalizers: {a: [x]}\nsystem_prompt: s\nuser_template: '{text}'\n")
    with pytest.raises(TaskError, match="no verbalizers"):
        load_task(str(bad))
    bad.write_text("name: t\nlabels: [a, b]\nverbalizers: {a: [x], b: [y]}\nsystem_prompt: s\nuser_template: nope\n")
    with pytest.raises(TaskError, match="text"):
        load_task(str(bad))


def test_the_packaged_llm_gets_its_known_good_prompt_unless_the_task_says_otherwise(tmp_path, monkeypatch):
    """A task without model_defaults must not run SmolLM2-135M with the chat prompt and 0 shots (near chance)."""

    from llambert_ray.annotate import make_plan
    from llambert_ray.config import AnnotateConfig

    base = ("name: t\nlabels: [good, bad]\nverbalizers: {good: [good], bad: [bad]}\nsystem_prompt: s\n"
            "user_template: '{text}'\nexamples: [{text: fine, label: good}, {text: awful, label: bad}, "
            "{text: nice, label: good}]\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text(base)
    t = load_task(str(plain))
    assert t.defaults_for("smollm2-135m-instruct") == {"prompt_style": "completion", "shots": 2}
    assert t.defaults_for("org/other-model") == {"prompt_style": "chat", "shots": 0}
    assert t.prompt_warning("smollm2-135m-instruct", "completion", 2) is None
    assert "does not follow chat" in t.prompt_warning("smollm2-135m-instruct", "chat", 2)
    assert t.prompt_warning("org/other-model", "chat", 0) is None
    own = tmp_path / "own.yaml"
    own.write_text(base + "model_defaults: {smollm2-135m-instruct: {prompt_style: chat, shots: 1}}\n")
    assert load_task(str(own)).defaults_for("smollm2-135m-instruct") == {"prompt_style": "chat", "shots": 1}
    one = tmp_path / "one.yaml"
    one.write_text(base.split("examples:")[0] + "examples: [{text: fine, label: good}]\n")
    t1 = load_task(str(one))
    assert t1.defaults_for("smollm2-135m-instruct")["shots"] == 1
    assert "needs 2 few-shot examples" in t1.prompt_warning("smollm2-135m-instruct", "completion", 1)

    import llambert_ray.annotate.prompts as annotate_module

    annotate_module._warned.clear()  # warned once per process: earlier tests may have warned already
    said: list[str] = []
    # an earlier command in this process may have routed llambert_ray's log records to its own log file: look at
    # what make_plan logs, not at where the logging config sends it
    monkeypatch.setattr(annotate_module.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    cfg = AnnotateConfig(mode="generate", prompt_style="chat")  # what the user asked for runs, with a warning
    assert make_plan(t, cfg, "unused").style == "chat"
    make_plan(t, cfg, "unused")  # planned again inside the stage: warned once
    warnings = [m for m in said if "does not follow chat" in m]
    assert len(warnings) == 1 and "fix:" in warnings[0]
