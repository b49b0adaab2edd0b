"""``luffy generate``: one question through a model's own chat template (the paper's example).

The reference's inference example: vLLM, the model's chat template applied to the question
as the user turn, temperature 0.6, top_p 1.0, up to 8192 new tokens.
"""

from __future__ import annotations

from luffy.config import ConfigError, EvaluationConfig, VllmConfig
from luffy.models import model_source


def generate_answers(model: str, question: str, system: str | None = None, temperature: float = 0.6,
                     top_p: float = 1.0, max_tokens: int = 8192, n: int = 1, seed: int = 0,
                     backend: str = "auto", vllm: VllmConfig | None = None) -> list[str]:
    if not question.strip():
        raise ConfigError("the question is empty")
    if temperature == 0 and n > 1:
        raise ConfigError(f"temperature 0 (greedy) gives {n} identical samples; use n 1 or a temperature > 0")
    model = model_source(model)
    from transformers import AutoTokenizer  # after the checks: bad input is refused before it loads

    from luffy.data.templates import encode_prompts
    from luffy.evaluate.backends import Sampling, make_backend

    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    _, (prompt_ids,) = encode_prompts(tokenizer, [messages])
    if vllm is None:
        import torch

        # on a CPU: no graph compilation, float32, a modest share of host RAM for the KV cache
        vllm = VllmConfig() if torch.cuda.is_available() else VllmConfig(gpu_memory_utilization=0.2,
                                                                          enforce_eager=True, dtype="float32")
    engine = make_backend(model, EvaluationConfig(backend=backend, seed=seed, vllm=vllm))
    max_tokens = min(max_tokens, engine.max_context - len(prompt_ids))
    if max_tokens < 1:
        raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context ({engine.max_context})")
    (samples,) = engine.generate([prompt_ids], Sampling(n=n, temperature=temperature, top_p=top_p,
                                                         max_tokens=max_tokens, seed=seed))
    return samples
