"""What annotation adds to a row, and the stage's error: the leaf of the annotate package."""

from __future__ import annotations

OUTPUT_COLUMNS = ["llm_label", "llm_confidence", "llm_raw", "llm_error", "prompt_tokens"]
# A row's own few-shot examples (gold-knn: annotate.gold.attach_gold_shots), JSON [{text, label}, ...]
SHOTS_COLUMN = "llm_shots"
# What a cached answer was given for: a hash of the row's text and its own examples (the model and the rest of the
# prompt are in the cache folder's name), so a row whose text changed under the same id is asked again.
PROMPT_KEY = "prompt_key"


class AnnotationError(RuntimeError):
    """The annotation stage cannot run as configured; the message says why and what to change."""
