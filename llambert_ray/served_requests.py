"""vLLM's OpenAI request classes as the run-long engine's requests are built from rows.

A row's nested values can come as numpy arrays (pandas rows, e.g. `logprob_token_ids` or a row's own examples),
which the pydantic request classes refuse; these subclasses turn arrays back into lists first. Kept apart from
`annotate` because importing vLLM's OpenAI layer is slow (the served engine imports it while its model loads).
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
