"""Evaluate one model on several suites with a single engine load."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
from transformers import AutoTokenizer

from luffy.config import GRADERS_FOR, GradingConfig, SuiteConfig
from luffy.data.schema import DataError, load_benchmark
from luffy.data.templates import encode_prompts
from luffy.evaluate.backends import Backend, Sampling
from luffy.evaluate.metrics import grading_timeouts, suite_metrics
from luffy.reward.pool import GraderPool

log = logging.getLogger(__name__)


@dataclass
class SuiteResult:
    samples: pd.DataFrame
    metrics: dict[str, Any]  # figures, the grader's name, and grading_timeouts (grader -> answers)


def eval_prompts(prompts: list[list[dict[str, str]]], system_prompt: str,
                 model_system_prompt: str | None = None) -> list[list[dict[str, str]]]:
    """The chat turns the model sees: without the file's system message under ``drop``; with
    a model's own system message (an external model's ``system_prompt``) in its place."""
    if system_prompt == "keep" and model_system_prompt is None:
        return prompts
    turns = [[m for m in messages if m["role"] != "system"] for messages in prompts]
    if model_system_prompt is None:
        return turns
    return [[{"role": "system", "content": model_system_prompt}, *messages] for messages in turns]


def run_suite(backend: Backend, tokenizer, pool: GraderPool, name: str, path: str, cfg: SuiteConfig,
              seed: int, system_prompt: str | None = None) -> SuiteResult:
    """Generate ``cfg.n`` samples per problem in one engine call, grade them with every grader
    of the suite's answer type; ``correct`` / ``extracted`` / ``reason`` are those of
    ``cfg.grader`` and each grader's own verdict is kept as ``<field>_<grader>``. The metrics
    count, per grader, the answers whose grading timed out (``grading_timeouts``: each was
    graded wrong), with a warning when there are any."""
    problems = load_benchmark(path)
    if cfg.max_problems is not None:
        problems = problems.head(cfg.max_problems)
    _, prompt_ids = encode_prompts(tokenizer, eval_prompts(problems["prompt"].tolist(), cfg.system_prompt,
                                                              system_prompt))
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + cfg.max_tokens > backend.max_context]
    if too_long:
        longest = max(len(prompt_ids[i]) for i in too_long)
        raise DataError(f"suite {name} ({path}): {len(too_long)} prompt(s) (problems {too_long[:10]}, longest "
                        f"{longest} tokens) plus max_tokens={cfg.max_tokens} exceed the model's context of "
                        f"{backend.max_context} tokens; lower max_tokens or use a longer-context model")
    began = time.perf_counter()
    completions = backend.generate(prompt_ids, Sampling(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                                        max_tokens=cfg.max_tokens, seed=seed))
    generation_s = time.perf_counter() - began
    rows = []
    for problem, group in zip(problems.itertuples(index=False), completions):
        if len(group) != cfg.n:
            raise RuntimeError(f"backend {backend.name} returned {len(group)} samples for a problem, expected {cfg.n}")
        for index, text in enumerate(group):
            rows.append({"problem_id": problem.problem_id, "sample_index": index, "data_source": problem.data_source,
                         "ground_truth": problem.ground_truth, "completion": text})
    graders = GRADERS_FOR[cfg.answer_type]
    began = time.perf_counter()
    verdicts = pool.grade([r["completion"] for r in rows], [r["ground_truth"] for r in rows], graders)
    grading_s = time.perf_counter() - began
    for row, verdict in zip(rows, verdicts):
        counted = verdict[cfg.grader]
        row.update({"extracted": counted.extracted, "correct": counted.correct, "reason": counted.reason})
        for grader, g in verdict.items():
            row.update({f"correct_{grader}": g.correct, f"extracted_{grader}": g.extracted,
                        f"reason_{grader}": g.reason})
    samples = pd.DataFrame(rows)
    metrics = suite_metrics(samples)
    metrics.update({"generation_s": generation_s, "grading_s": grading_s, "samples": len(samples),
                    "grader": cfg.grader})
    for grader in graders:
        metrics[f"accuracy_{grader}"] = float(samples[f"correct_{grader}"].mean())
    metrics.update({f"reason/{k}": v / len(samples) for k, v in Counter(samples["reason"]).items()})
    metrics["grading_timeouts"] = grading_timeouts(samples, graders)
    if any(metrics["grading_timeouts"].values()):
        log.warning("%s: grading timed out on %s of %d answers (graded wrong; limit %.3gs per answer)", name,
                    ", ".join(f"{n} ({g})" for g, n in metrics["grading_timeouts"].items() if n), len(samples),
                    pool.timeout_s)
    log.info("%s: accuracy %.4f (%s) over %d problems x %d samples (%.1fs generation, %.1fs grading)", name,
             metrics["accuracy"], cfg.grader, metrics["problems"], cfg.n, generation_s, grading_s)
    return SuiteResult(samples, metrics)


def grader_pool(grading: GradingConfig, workers: int) -> GraderPool:
    """The grading pool of an evaluation: ``grading.workers`` workers (0: ``workers``). Started
    before the backend loads, its workers boot meanwhile."""
    return GraderPool(workers=grading.workers or workers, timeout_s=grading.timeout_s, memory_mb=grading.memory_mb)


def evaluate_model(backend: Backend, model_path: str, suites: dict[str, tuple[str, SuiteConfig]],
                   seed: int, pool: GraderPool, revision: str | None = None, chat_template: str | None = None,
                   system_prompt: str | None = None) -> dict[str, SuiteResult]:
    """Every suite on one loaded backend, graded in ``pool``; ``chat_template`` (Jinja text)
    replaces the model's own, ``system_prompt`` replaces each suite's system message setting."""
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return {name: run_suite(backend, tokenizer, pool, name, path, cfg, seed, system_prompt)
            for name, (path, cfg) in suites.items()}
