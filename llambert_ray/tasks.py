"""Classification tasks: label set, prompts, verbalizers, few-shot examples and the answer parse rule.

A task is a YAML file (presets live in `llambert_ray/task_presets/`). Two prompt styles:
- `chat`: system + user message through the model's chat template (the LlamBERT paper's prompts);
- `completion`: plain few-shot text ("Review: ...\\nSentiment: positive"), which small models follow far better.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

OTHER = "other"
# What a model is known to need, for the tasks that say nothing about it (`model_defaults`): SmolLM2-135M does not
# follow the paper's chat prompt (53.8-55.4 % on IMDb, near chance, bench/results/annotate_modes.md) but labels well
# from plain few-shot text (84.2 % with completion, 2 shots). Keyed like model_defaults (the model reference).
KNOWN_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {"prompt_style": "completion", "shots": 2},
}
# The paper strips whitespace and these characters before matching an answer to a verbalizer.
_STRIP_CHARS = " \t\r\n.,!?;'\""


class TaskError(ValueError):
    """A task name or task file is wrong; the message names it and the fix."""


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    label: str


class Task(BaseModel):
    """A text classification task as the LLM sees it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    labels: list[str] = Field(min_length=2)
    verbalizers: dict[str, list[str]] = Field(description="answer words per label, first one is canonical")
    system_prompt: str
    user_template: str = Field(description="chat style user message; {text} is the row's text")
    completion_instruction: str = Field("", description="completion style: text before the examples")
    completion_template: str = Field("Text: {text}\nLabel:", description="completion style: one row")
    examples: list[Example] = Field(default_factory=list)
    gold_label_map: dict[str, str] = Field(default_factory=dict,
                                           description="raw gold values (as strings) -> label names")
    default_style: Literal["chat", "completion"] = "chat"
    default_shots: int = 0
    # Per-model defaults, keyed by model reference: small models need the completion style.
    model_defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    example_max_chars: int = 400

    @model_validator(mode="after")
    def _check(self) -> Task:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        if OTHER in self.labels:
            raise ValueError(f"{OTHER!r} is reserved for unparseable answers; rename that label")
        missing = [lab for lab in self.labels if not self.verbalizers.get(lab)]
        if missing:
            raise ValueError(f"labels {missing} have no verbalizers; add answer words for each label")
        extra = set(self.verbalizers) - set(self.labels)
        if extra:
            raise ValueError(f"verbalizers for unknown labels {sorted(extra)}")
        for tmpl_name in ("user_template", "completion_template"):
            if "{text}" not in getattr(self, tmpl_name):
                raise ValueError(f"{tmpl_name} must contain {{text}}")
        bad = [e.label for e in self.examples if e.label not in self.labels]
        if bad:
            raise ValueError(f"examples use unknown labels {sorted(set(bad))}")
        return self

    # ---------------------------------------------------------------- prompting
    def defaults_for(self, model: str) -> dict[str, Any]:
        """The prompt style and shot count that work for `model`: the task's `model_defaults` for it, else what the
        model is known to need (KNOWN_MODEL_DEFAULTS; shots capped at the task's examples), else the task's
        defaults."""
        d = {"prompt_style": self.default_style, "shots": self.default_shots}
        if model in self.model_defaults:
            d.update(self.model_defaults[model])
        elif model in KNOWN_MODEL_DEFAULTS:
            known = KNOWN_MODEL_DEFAULTS[model]
            d.update(known, shots=min(known["shots"], len(self.examples)))
        return d

    def prompt_warning(self, model: str, style: str, shots: int) -> str | None:
        """Why `model` is known to label near chance with this prompt (None when nothing is known against it)."""
        known = KNOWN_MODEL_DEFAULTS.get(model)
        if known is None or (style == known["prompt_style"] and shots >= known["shots"]):
            return None
        if style != known["prompt_style"]:
            why = f"{model} does not follow {style} prompts (near chance on IMDb: 54-55 %)"
        elif not self.examples:
            why = f"task {self.name!r} has no few-shot examples, and {model} needs {known['shots']} to label well"
        else:
            why = f"{model} needs {known['shots']} few-shot examples, {shots} given"
        return (f"{why}; {known['prompt_style']} style with {known['shots']} shots gives 84 % (README, "
                f"`Measured here`); fix: annotate.prompt_style: {known['prompt_style']}, annotate.shots: "
                f"{known['shots']} (and examples in the task YAML), or a larger model")

    def pick_examples(self, shots: int) -> list[Example]:
        """The first `shots` examples, interleaving labels so no label dominates the context."""
        if shots > len(self.examples):
            raise TaskError(f"task {self.name!r} has {len(self.examples)} examples, {shots} shots asked; "
                            f"fix: lower --shots or add examples to the task YAML")
        by_label = {lab: [e for e in self.examples if e.label == lab] for lab in self.labels}
        out: list[Example] = []
        i = 0
        while len(out) < shots:
            for lab in self.labels:
                if i < len(by_label[lab]) and len(out) < shots:
                    out.append(by_label[lab][i])
            i += 1
        return out

    def _render(self, template: str, text: str, max_chars: int, truncate: str = "head") -> str:
        return template.replace("{text}", cut_text(text, max_chars, truncate))

    def chat_messages(self, text: str, shots: int = 0, max_chars: int = 6000, truncate: str = "head",
                      examples: list[Example] | None = None) -> list[dict[str, str]]:
        """System + (few-shot turns) + user message, the paper's chat prompt. `examples` (e.g. the row's
        retrieved gold neighbours) replace the task's first `shots` examples."""
        msgs = [{"role": "system", "content": self.system_prompt}]
        for ex in self.pick_examples(shots) if examples is None else examples:
            msgs.append({"role": "user", "content": self._render(self.user_template, ex.text,
                                                                 self.example_max_chars)})
            msgs.append({"role": "assistant", "content": self.verbalizers[ex.label][0]})
        msgs.append({"role": "user", "content": self._render(self.user_template, text, max_chars, truncate)})
        return msgs

    def completion_prefix(self, shots: int, examples: list[Example] | None = None) -> str:
        """The shared part of every completion prompt (instruction + shots): the engine caches it. `examples`
        replace the task's first `shots` examples."""
        parts = [self.completion_instruction] if self.completion_instruction else []
        for ex in self.pick_examples(shots) if examples is None else examples:
            shot = self._render(self.completion_template, ex.text, self.example_max_chars)
            parts.append(f"{shot} {self.verbalizers[ex.label][0]}")
        return "\n\n".join(parts) + ("\n\n" if parts else "")

    def completion_prompt(self, text: str, shots: int = 0, max_chars: int = 6000, truncate: str = "head",
                          examples: list[Example] | None = None) -> str:
        return (self.completion_prefix(shots, examples)
                + self._render(self.completion_template, text, max_chars, truncate))

    def answer_words(self, style: str) -> dict[str, str]:
        """The canonical answer string per label as it follows the prompt (completion: after a space)."""
        lead = " " if style == "completion" else ""
        return {lab: lead + self.verbalizers[lab][0] for lab in self.labels}

    # ------------------------------------------------------------------ parsing
    def parse(self, answer: str | None) -> str:
        """The paper's parse rule: a label name, or OTHER when the answer is not clearly one label."""
        if answer is None:
            return OTHER
        cleaned = answer.strip(_STRIP_CHARS).lower()
        for lab in self.labels:
            if cleaned in (v.lower() for v in self.verbalizers[lab]):
                return lab
        hits = [lab for lab in self.labels
                if any(re.search(rf"\b{re.escape(v.lower())}\b", cleaned) for v in self.verbalizers[lab])]
        return hits[0] if len(hits) == 1 else OTHER

    def gold_label(self, raw: Any) -> str | None:
        """Map a raw gold value (1, 'pos', 'positive') to a label name; None if it is missing."""
        if raw is None:
            return None
        if isinstance(raw, float) and raw != raw:  # NaN
            return None
        key = str(raw).strip()
        if key in self.labels:
            return key
        if key in self.gold_label_map:
            return self.gold_label_map[key]
        low = key.lower()
        for lab in self.labels:
            if low == lab.lower() or low in (v.lower() for v in self.verbalizers[lab]):
                return lab
        raise TaskError(f"gold label {raw!r} is not a label of task {self.name!r} ({self.labels}); fix: add "
                        f"it to gold_label_map in the task YAML or set corpus.label_column: null")


TRUNCATION_GAP = " ... "


def cut_text(text: str, max_chars: int, truncate: str = "head") -> str:
    """A text cut to at most `max_chars` characters: its start (`head`), or its start and its end joined by
    " ... " (`head_tail`: a review's closing verdict stays in the prompt). Texts that fit are left as they are."""
    if len(text) <= max_chars:
        return text
    if truncate not in ("head", "head_tail"):
        raise TaskError(f"unknown truncation {truncate!r}; fix: use 'head' or 'head_tail'")
    keep = max_chars - len(TRUNCATION_GAP)
    if truncate == "head" or keep < 2:  # too short to hold both ends and the gap
        return text[:max_chars]
    head = (keep + 1) // 2
    return text[:head].rstrip() + TRUNCATION_GAP + text[len(text) - (keep - head):].lstrip()


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("llambert_ray.task_presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_task(ref: str) -> Task:
    """A task by preset name (`imdb-sentiment`) or by path to a task YAML file."""
    path = Path(ref)
    if ref.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise TaskError(f"task file {ref} does not exist; fix: give a task YAML path or one of the "
                            f"presets {preset_names()}")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    else:
        res = resources.files("llambert_ray.task_presets") / f"{ref}.yaml"
        if not res.is_file():
            raise TaskError(f"unknown task {ref!r}; fix: use one of the presets {preset_names()} or a path "
                            f"to a task YAML")
        text = res.read_text(encoding="utf-8")
        source = f"preset {ref}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TaskError(f"task {source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise TaskError(f"task {source} must be a mapping with name, labels, verbalizers, prompts")
    try:
        return Task.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise TaskError(f"task {source} is invalid: {msgs}") from None
