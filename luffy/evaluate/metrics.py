"""Accuracy metrics over per-sample grades.

avg@n: the mean correctness over all samples of all problems (the paper's "accuracy").
pass@k: the unbiased estimator of Chen et al. (2021) per problem with n samples, c correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

averaged over problems.
"""

from __future__ import annotations

from math import comb

import pandas as pd


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
    return out
