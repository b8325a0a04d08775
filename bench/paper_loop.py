"""The paper's annotation loop, the reference our annotation stage is timed and scored against (bench.run,
bench.cost_accuracy)."""

from __future__ import annotations

import time


def paper_loop(texts: list[str], task, seed: int = 0, sample: bool = True
               ) -> tuple[list[str | None], list[float], int, float]:
    """The paper's loop: one text at a time through transformers `generate` (sampling as published: T=1, top_k 50;
    or greedy), 10 new tokens, the paper's 0-shot chat prompt, then its parse rule. Returns (labels, None where
    unparseable; each row's seconds; prompt tokens; the model's load seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llambert_ray.models import resolve_model
    from llambert_ray.tasks import OTHER

    t0 = time.perf_counter()
    path = resolve_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    torch.manual_seed(seed)
    decoding = {"do_sample": True, "temperature": 1.0, "top_k": 50} if sample else {"do_sample": False}
    preds: list[str | None] = []
    seconds: list[float] = []
    prompt_tokens = 0
    with torch.inference_mode():
        for text in texts:
            t0 = time.perf_counter()
            ids = tok.apply_chat_template(task.chat_messages(text, 0, 6000), add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            prompt_tokens += ids["input_ids"].shape[1]
            out = model.generate(**ids, **decoding, max_new_tokens=10, pad_token_id=tok.eos_token_id)
            label = task.parse(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
            preds.append(None if label == OTHER else label)
            seconds.append(time.perf_counter() - t0)
    return preds, seconds, prompt_tokens, load
