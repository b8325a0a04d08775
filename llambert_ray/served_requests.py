"""vLLM's OpenAI request classes as the run-long engine's Ray Data stage builds them from rows.

Ray Data hands a row's nested lists over as numpy arrays (e.g. `logprob_token_ids`), which the pydantic request
classes refuse; these subclasses turn arrays back into lists first. Kept apart from `annotate` because importing
vLLM's OpenAI layer is slow, and importable by name because the stage's actors unpickle the classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest


def plain(value: Any) -> Any:
    """`value` with numpy arrays (at any depth of dicts and lists) as lists."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


class CompletionRequestFromRow(CompletionRequest):
    @model_validator(mode="before")
    @classmethod
    def _lists(cls, data: Any) -> Any:
        return plain(data)


class ChatCompletionRequestFromRow(ChatCompletionRequest):
    @model_validator(mode="before")
    @classmethod
    def _lists(cls, data: Any) -> Any:
        return plain(data)


DTYPES = {"CompletionRequest": CompletionRequestFromRow, "ChatCompletionRequest": ChatCompletionRequestFromRow}
