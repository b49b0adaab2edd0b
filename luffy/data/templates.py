"""Prompt rendering with the model's own chat template, and teacher-trace alignment.

The reference's template ends its generation prompt with ``<think>\\n``; a teacher trace
that starts with the same text is appended without it, so that the policy sees exactly
the token sequence it would have produced itself.
"""

from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase

THINK_PREFIX = "<think>\n"


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def response_text(rendered_prompt: str, trace: str) -> str:
    """The trace as a continuation of ``rendered_prompt`` (its duplicate ``<think>\\n`` removed)."""
    if rendered_prompt.endswith(THINK_PREFIX) and trace.startswith(THINK_PREFIX):
        return trace[len(THINK_PREFIX):]
    return trace


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict[str, str]]]
                   ) -> tuple[list[str], list[list[int]]]:
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return rendered, [list(x) for x in ids]


def encode_traces(tokenizer: PreTrainedTokenizerBase, rendered_prompts: Sequence[str],
                  traces: Sequence[str]) -> list[list[int]]:
    """Token ids of each teacher trace as a response, followed by EOS."""
    texts = [response_text(p, t) for p, t in zip(rendered_prompts, traces)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(x) + [tokenizer.eos_token_id] for x in ids]
