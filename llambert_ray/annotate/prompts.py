"""The prompt plan: how a row becomes an engine request (completion or chat, few-shot examples, sampling per
mode) and how an engine's answer becomes llm_label / llm_confidence / llm_raw / llm_error."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from llambert_ray.annotate.calibration import prior_vector
from llambert_ray.annotate.columns import SHOTS_COLUMN, AnnotationError
from llambert_ray.config import AnnotateConfig, config_hash
from llambert_ray.models import local_model_dir
from llambert_ray.tasks import OTHER, Example, Task, TaskError

log = logging.getLogger(__name__)
_warned: set[tuple[str, str, str, int]] = set()  # prompt warnings already given in this process


@dataclass(frozen=True)
class PromptPlan:
    """Everything needed to turn a row into an engine request and an engine answer into a label."""

    task: Task
    mode: str
    style: str
    shots: int
    max_text_chars: int
    max_new_tokens: int
    temperature: float
    label_token_ids: dict[str, int] = field(default_factory=dict)  # score mode: first answer token per label
    truncate: str = "head"
    # score mode without the model's tokenizer (an endpoint's): alternatives asked per answer, matched by text
    top_logprobs: int = 0

    def request(self, text: str, examples: list[Example] | None = None) -> dict[str, Any]:
        """The prompt (or chat messages) and sampling params for one row; `examples` (the row's own, gold-knn)
        replace the task's fixed ones."""
        if self.style == "chat":
            req: dict[str, Any] = {"messages": self.task.chat_messages(text, self.shots, self.max_text_chars,
                                                                             self.truncate, examples)}
        else:
            req = {"prompt": self.task.completion_prompt(text, self.shots, self.max_text_chars, self.truncate,
                                                         examples)}
        if self.mode == "score" and not self.label_token_ids:
            sp = {"max_tokens": 1, "temperature": 0.0, "top_logprobs": self.top_logprobs}
        elif self.mode == "score":
            sp = {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": list(self.label_token_ids.values())}
        elif self.mode == "choice":
            words = list(self.task.answer_words("chat").values())
            sp = {"max_tokens": self.max_new_tokens, "temperature": self.temperature,
                  "structured_outputs": {"choice": words}}
        else:
            sp = {"max_tokens": self.max_new_tokens, "temperature": self.temperature}
        req["sampling_params"] = sp
        return req

    def result(self, generated_text: str | None, logprobs: Any, error: str | None) -> dict[str, Any]:
        """llm_label / llm_confidence / llm_raw / llm_error from one engine answer."""
        if error:
            return {"llm_label": None, "llm_confidence": None, "llm_raw": None, "llm_error": error}
        if self.mode == "score":
            scores = self._label_logprobs(logprobs)
            if scores is None:
                why = ("no label word among the answer's top alternatives; fix: annotate.mode generate or choice"
                       if not self.label_token_ids and logprobs else "engine returned no logprobs for the label "
                       "tokens; fix: annotate.mode generate (the paper's parse) where the LLM's server gives none")
                return {"llm_label": None, "llm_confidence": None, "llm_raw": generated_text, "llm_error": why}
            top = max(scores, key=scores.get)
            z = max(scores.values())
            total = sum(math.exp(v - z) for v in scores.values())
            return {"llm_label": top, "llm_confidence": 1.0 / total,
                    "llm_raw": json.dumps({k: round(v, 4) for k, v in scores.items()}), "llm_error": None}
        label = self.task.parse(generated_text)
        return {"llm_label": None if label == OTHER else label, "llm_confidence": None,
                "llm_raw": generated_text, "llm_error": None}

    def _label_logprobs(self, logprobs: Any) -> dict[str, float] | None:
        if not logprobs:
            return None
        first = logprobs[0]
        if isinstance(first, str):
            first = json.loads(first)
        if not self.label_token_ids:
            return self._label_logprobs_by_text(first)
        by_id = {int(k): (v["logprob"] if isinstance(v, dict) else float(v)) for k, v in first.items()
                 if v is not None}
        out = {}
        for label, tid in self.label_token_ids.items():
            if tid not in by_id:
                return None
            out[label] = float(by_id[tid])
        return out


    def _label_logprobs_by_text(self, top: dict[str, float]) -> dict[str, float] | None:
        """Label scores from an answer's top alternatives by token text (no tokenizer at hand): a label's score is
        the best log-prob among the tokens that begin its answer word and no other label's; a label not among them
        gets the lowest log-prob shown (its own is at most that). None when no label is among them."""
        words = {lab: w.strip().lower() for lab, w in self.task.answer_words(self.style).items()}
        out: dict[str, float] = {}
        for tok, lp in top.items():
            t = str(tok).strip().lower()
            owners = [lab for lab, w in words.items() if t and w.startswith(t)]
            if len(owners) == 1 and lp is not None:
                out[owners[0]] = max(out.get(owners[0], -math.inf), float(lp))
        if not out:
            return None
        floor = min(float(v) for v in top.values() if v is not None)
        return {lab: out.get(lab, floor) for lab in words}


def resolved_shots(task: Task, cfg: AnnotateConfig) -> int:
    """Few-shot examples per prompt: annotate.shots, else the task's default for the model; gold-knn with none
    set takes two per label."""
    shots = cfg.shots if cfg.shots is not None else task.defaults_for(cfg.model)["shots"]
    return shots or 2 * len(task.labels) if cfg.shots_from == "gold-knn" and cfg.shots is None else shots


def make_plan(task: Task, cfg: AnnotateConfig, model_path: str | None = None) -> PromptPlan:
    """Resolve the prompt style, shots and (score mode) answer token ids for this task and model."""
    style = cfg.prompt_style or task.defaults_for(cfg.model)["prompt_style"]
    shots = resolved_shots(task, cfg)
    if cfg.shots_from != "gold-knn":  # gold-knn's examples come from the gold rows, not the task's list
        try:
            task.pick_examples(shots)
        except TaskError as e:
            raise AnnotationError(str(e)) from None
    warning = task.prompt_warning(cfg.model, style, shots)
    if warning and (cfg.model, task.name, style, shots) not in _warned:
        _warned.add((cfg.model, task.name, style, shots))  # make_plan runs before Ray and again in the stage
        log.warning(warning)
    token_ids: dict[str, int] = {}
    top = 0
    ep = cfg.endpoint
    if cfg.mode == "score" and ep is not None and ep.tokenizer is None:
        top = ep.top_logprobs  # no tokenizer of the endpoint's model: its answers' alternatives matched by text
    elif cfg.mode == "score":
        # the tokenizer only: an s3:// / gs:// LLM is not copied whole onto the driver
        ref = ep.tokenizer if ep is not None else model_path or cfg.model
        token_ids = label_token_ids(task, style, local_model_dir(ref, tokenizer_only=True))
    if cfg.calibration == "prior":
        prior_vector(task.labels, cfg.label_prior)  # a bad prior fails here, before any LLM call
    if cfg.calibration == "gold" and cfg.mode != "score":
        raise AnnotationError("annotate.calibration gold fits offsets to label log-probabilities, which only score "
                              "mode has; fix: annotate.mode: score, or another calibration")
    return PromptPlan(task=task, mode=cfg.mode, style=style, shots=shots, max_text_chars=cfg.max_text_chars,
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      label_token_ids=token_ids, truncate=cfg.truncate, top_logprobs=top)


def label_token_ids(task: Task, style: str, model_path: str) -> dict[str, int]:
    """The first token of each label's answer word; they must differ between labels to be scored."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = {}
    for label, word in task.answer_words(style).items():
        toks = tok(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise AnnotationError(f"verbalizer {word!r} of label {label!r} tokenizes to nothing")
        ids[label] = toks[0]
    if len(set(ids.values())) < len(ids):
        raise AnnotationError(f"labels {list(ids)} share a first answer token under this tokenizer, so score "
                              f"mode cannot tell them apart; fix: use --mode choice or distinct verbalizers")
    return ids


def row_examples(row: dict[str, Any]) -> list[Example] | None:
    """A row's own few-shot examples (its SHOTS_COLUMN), None when it has none (the task's fixed ones apply)."""
    raw = row.get(SHOTS_COLUMN)
    if not isinstance(raw, str) or not raw:
        return None
    return [Example(**e) for e in json.loads(raw)]


def prompt_keys(rows: pd.DataFrame) -> pd.Series:
    """Per row: a hash of what its prompt holds beside the shared parts (its text and its own examples)."""
    shots = rows[SHOTS_COLUMN] if SHOTS_COLUMN in rows else pd.Series("", index=rows.index)
    return pd.Series([hashlib.sha256(json.dumps([str(t), s if isinstance(s, str) else ""]).encode()).hexdigest()[:16]
                      for t, s in zip(rows["text"], shots, strict=True)], index=rows.index, dtype=object)


def plan_hash(plan: PromptPlan, model: str) -> str:
    """What an answer depends on: the model and everything that shapes the prompt and its decoding."""
    # "head" (the default) is left out of the hash so caches written before `truncate` existed stay valid.
    cut = (() if plan.truncate == "head" else (plan.truncate,)) + ((plan.top_logprobs,) if plan.top_logprobs else ())
    return config_hash(plan.task, model, plan.mode, plan.style, plan.shots, plan.max_text_chars,
                       plan.max_new_tokens, plan.temperature, plan.label_token_ids, *cut)
