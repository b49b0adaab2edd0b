"""Accuracy metrics over per-sample grades.

avg@n: the mean correctness over all samples of all problems (the paper's "accuracy").
pass@k: the unbiased estimator of Chen et al. (2021) per problem with n samples, c correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems.

Grading timeouts: per grader, the number of answers whose grading ran out of time (reason
``timeout``, graded wrong): load on the machine or a pathological answer decided those verdicts.

Bootstrap 95% interval (percentile): resample the problems with replacement B times, take
each resample's mean of per-problem accuracies, report the 2.5th and 97.5th percentiles.
For the average over suites, each suite is resampled independently and the resampled
suite accuracies are averaged (the suites are fixed; their problems are the sample).
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np
import pandas as pd

from luffy.reward.math import TIMEOUT

BOOTSTRAP_RESAMPLES = 1000


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def suite_metrics(samples: pd.DataFrame) -> dict[str, float]:
    """``samples`` has one row per (problem_id, sample_index) with a boolean ``correct``."""
    per_problem = samples.groupby("problem_id")["correct"].agg(["count", "sum"])
    n_values = per_problem["count"].unique()
    if len(n_values) != 1:
        raise ValueError(f"problems have different sample counts {sorted(n_values)}")
    n = int(n_values[0])
    out = {"n": n, "problems": int(len(per_problem)), f"avg@{n}": float(samples["correct"].mean())}
    for k in ks_for(n):
        out[f"pass@{k}"] = float(sum(pass_at_k(n, int(c), k) for c in per_problem["sum"]) / len(per_problem))
    out["accuracy"] = out[f"avg@{n}"]
    low, high = bootstrap_interval([per_problem["sum"].to_numpy() / n])
    out["accuracy_ci_low"], out["accuracy_ci_high"] = low, high
    return out


def grading_timeouts(samples: pd.DataFrame, graders: Sequence[str]) -> dict[str, int]:
    """Per grader, the answers whose grading timed out (``reason_<grader>`` is ``timeout``)."""
    return {grader: int((samples[f"reason_{grader}"] == TIMEOUT).sum()) for grader in graders}


def per_problem_accuracy(samples: pd.DataFrame) -> np.ndarray:
    """Mean correctness of each problem, in problem order."""
    return samples.groupby("problem_id")["correct"].mean().to_numpy(dtype=float)


def bootstrap_interval(suites: Sequence[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean over ``suites`` of each suite's mean per-problem accuracy
    (one suite: that suite's accuracy), resampling each suite's problems with replacement."""
    if not suites or any(len(s) == 0 for s in suites):
        raise ValueError("bootstrap needs at least one suite with at least one problem")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for accuracies in suites:
        picks = rng.integers(0, len(accuracies), size=(resamples, len(accuracies)))
        means += np.asarray(accuracies, dtype=float)[picks].mean(axis=1)
    means /= len(suites)
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
