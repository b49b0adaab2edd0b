"""Evaluate one model on several suites with a single engine load."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import pandas as pd
from transformers import AutoTokenizer

from luffy.config import SuiteConfig
from luffy.data.schema import load_benchmark
from luffy.data.templates import encode_prompts
from luffy.evaluate.backends import Backend, Sampling
from luffy.evaluate.metrics import suite_metrics
from luffy.reward.math import grade

log = logging.getLogger(__name__)


@dataclass
class SuiteResult:
    samples: pd.DataFrame
    metrics: dict[str, float]


def run_suite(backend: Backend, tokenizer, name: str, path: str, cfg: SuiteConfig, seed: int) -> SuiteResult:
    problems = load_benchmark(path)
    _, prompt_ids = encode_prompts(tokenizer, problems["prompt"].tolist())
    began = time.perf_counter()
    completions = backend.generate(prompt_ids, Sampling(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                                        max_tokens=cfg.max_tokens, seed=seed))
    generation_s = time.perf_counter() - began
    rows = []
    for problem, group in zip(problems.itertuples(index=False), completions):
        if len(group) != cfg.n:
            raise RuntimeError(f"backend {backend.name} returned {len(group)} samples for a problem, expected {cfg.n}")
        for index, text in enumerate(group):
            g = grade(text, problem.ground_truth)
            rows.append({"problem_id": problem.problem_id, "sample_index": index, "data_source": problem.data_source,
                         "ground_truth": problem.ground_truth, "completion": text, "extracted": g.extracted,
                         "correct": g.correct, "reason": g.reason})
    samples = pd.DataFrame(rows)
    metrics = suite_metrics(samples)
    metrics.update({"generation_s": generation_s, "samples": len(samples)})
    metrics.update({f"reason/{k}": v / len(samples) for k, v in Counter(samples["reason"]).items()})
    log.info("%s: accuracy %.4f over %d problems x %d samples (%.1fs generation)", name, metrics["accuracy"],
             metrics["problems"], cfg.n, generation_s)
    return SuiteResult(samples, metrics)


def evaluate_model(backend: Backend, model_path: str, suites: dict[str, tuple[str, SuiteConfig]],
                   seed: int) -> dict[str, SuiteResult]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return {name: run_suite(backend, tokenizer, name, path, cfg, seed) for name, (path, cfg) in suites.items()}
