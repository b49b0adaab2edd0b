"""Checks before a long training run, on either engine: seconds of work that catch what would
otherwise show up hours later as zero reward or a crash.

- context: every prompt plus ``max_response_tokens`` fits the base model's context, and every
  teacher trace (+EOS) fits ``max_response_tokens`` (the teacher member is the whole trace);
- template: when the chat template's generation prompt already ends with ``<think>``, the
  traces are appended without a second one; every trace closes its reasoning (``</think>``);
- reward: the grader scores the teacher traces, decoded exactly as a rollout is, as correct
  (at least ``MIN_TEACHER_REWARD`` of an evenly spaced sample of ``TRACE_SAMPLE`` rows);
- the engine's own checks (verl: its config composes and validates).

Each failure is a ``PreflightError`` naming the setting or the rows at fault.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from luffy.data.schema import DataError

log = logging.getLogger(__name__)

TRACE_SAMPLE = 256          # teacher traces graded before training
MIN_TEACHER_REWARD = 0.9    # share of them the grader must score correct
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_LISTED = 5


class PreflightError(DataError):
    """Training would start but could not learn (or would crash later); the message says why."""


def _rows(rows: list[int], first: int = 0) -> str:
    """Row positions of the training file (``first``: where the data_start slice begins)."""
    return ", ".join(str(first + r) for r in rows[:MAX_LISTED]) + (" ..." if len(rows) > MAX_LISTED else "")


def model_context(model: str) -> int | None:
    """The model's context length (``max_position_embeddings``), if its config states one."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` row positions spread over ``total`` rows (all of them when fewer)."""
    if total <= count:
        return list(range(total))
    return sorted({round(k * (total - 1) / (count - 1)) for k in range(count)})


def preflight(job: Any, engine: Any | None = None) -> dict[str, float]:
    """Run every check for ``job`` (a ``luffy.engines.base.TrainJob``); returns the figures it
    measured (logged as ``preflight/*`` metrics). ``engine.check(job, figures)`` adds the engine's own."""
    from transformers import AutoTokenizer

    from luffy.data.training import load_train_data
    from luffy.reward.math import grade

    began = time.perf_counter()
    cfg = job.settings
    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    data = load_train_data(job.data, tokenizer, cfg.data_start, cfg.data_end, cfg.teacher_logprobs)
    context = model_context(job.base_model)
    prompt_tokens = [len(p) for p in data.prompt_ids]
    trace_tokens = [len(t) for t in data.trace_ids]
    what = f"training data {job.data}"

    if context is not None:
        limit = context - (cfg.max_response_tokens if cfg.algorithm != "sft" else 0)
        over = [r for r, (p, t) in enumerate(zip(prompt_tokens, trace_tokens))
                if p > limit or (cfg.algorithm == "sft" and p + t > context)]
        if over:
            raise PreflightError(
                f"{what}: {len(over)} row(s) [{_rows(over, data.first_row)}] do not fit the base model's context of {context} tokens "
                f"(prompt + max_response_tokens={cfg.max_response_tokens}; longest prompt {max(prompt_tokens)}); "
                "lower max_response_tokens, shorten the prompts, or raise the model's context")
    uses_traces_as_responses = cfg.algorithm in ("luffy", "rl_sft") and (cfg.n_off > 0 or cfg.algorithm == "rl_sft")
    if uses_traces_as_responses:
        too_long = [r for r, t in enumerate(trace_tokens) if t > cfg.max_response_tokens]
        if too_long:
            raise PreflightError(
                f"{what}: {len(too_long)} teacher trace(s) [{_rows(too_long, data.first_row)}] (+EOS) exceed max_response_tokens="
                f"{cfg.max_response_tokens} (longest {max(trace_tokens)}); raise it or lower data.max_trace_tokens")

    sample = evenly_spaced(len(data.trace_ids), TRACE_SAMPLE)
    texts = tokenizer.batch_decode([data.trace_ids[r] for r in sample], skip_special_tokens=True)
    ends_open = data.rendered[0].rstrip().endswith(THINK_OPEN)
    doubled = [r for r, text in zip(sample, texts) if ends_open and text.lstrip().startswith(THINK_OPEN)]
    if doubled:
        raise PreflightError(
            f"{what}: the chat template's generation prompt ends with {THINK_OPEN} and trace(s) [{_rows(doubled, data.first_row)}] "
            f"start with another one; strip it from the traces (only an exact '{THINK_OPEN}\\n' prefix is "
            "stripped automatically)")
    unclosed = [r for r, text in zip(sample, texts) if THINK_CLOSE not in text]
    if unclosed:
        raise PreflightError(
            f"{what}: trace(s) [{_rows(unclosed, data.first_row)}] never close their reasoning with {THINK_CLOSE}, so the reward "
            f"(the answer after {THINK_CLOSE}) would score them 0")

    figures: dict[str, float] = {"rows": float(len(data.trace_ids)), "longest_prompt_tokens": float(max(prompt_tokens)),
                                 "longest_trace_tokens": float(max(trace_tokens))}
    if cfg.algorithm != "sft":
        grades = [grade(text, data.answers[r]) for r, text in zip(sample, texts)]
        reward = sum(g.reward for g in grades) / len(grades)
        figures["teacher_reward"] = reward
        if reward < MIN_TEACHER_REWARD:
            wrong = [(r, g.reason) for r, g in zip(sample, grades) if not g.correct]
            listed = "; ".join(f"row {data.first_row + r}: {reason}" for r, reason in wrong[:MAX_LISTED])
            raise PreflightError(
                f"{what}: the grader scores only {reward:.1%} of {len(grades)} sampled teacher traces correct "
                f"(needed {MIN_TEACHER_REWARD:.0%}): {listed}. Check the gold answers, the answer format "
                f"(\\boxed{{}} after {THINK_CLOSE}) and the chat template")
    if engine is not None and hasattr(engine, "check"):
        figures.update(engine.check(job, figures))
    figures["seconds"] = time.perf_counter() - began
    log.info("preflight passed: %s", {k: round(v, 3) for k, v in figures.items()})
    return figures
