"""Group construction: how much of the teacher trace each off-policy member carries.

Full-trace mode (the paper's main run) is prefix ratio 1: the member is the whole trace
tau (+EOS). With a ratio r < 1 (the reference's partial-prefix guidance) the member is
tau[:floor(r * |tau|)] followed by the policy's own continuation, and only the prefix
tokens count as off-policy.
"""

from __future__ import annotations

import math
import random

PREFIX_STRATEGIES = ("random", "fixed", "linear")


def prefix_ratios(strategy: str, n_off: int, ratio_min: float, ratio_max: float, rng: random.Random,
                  progress: float = 0.0) -> list[float]:
    """Prefix ratios of the ``n_off`` off-policy members of one group.

    random: r_k ~ U[ratio_min, ratio_max], independently per member
    fixed:  evenly spaced from ratio_max down to ratio_min (one member: ratio_max)
    linear: every member r = ratio_max - (ratio_max - ratio_min) * progress, progress in [0, 1]
            being the share of training done (guidance decays over steps)
    """
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(f"need 0 <= ratio_min <= ratio_max <= 1, got [{ratio_min}, {ratio_max}]")
    if strategy == "random":
        return [rng.uniform(ratio_min, ratio_max) for _ in range(n_off)]
    if strategy == "fixed":
        if n_off == 1:
            return [ratio_max]
        return [ratio_max - (ratio_max - ratio_min) * k / (n_off - 1) for k in range(n_off)]
    if strategy == "linear":
        progress = min(max(progress, 0.0), 1.0)
        return [ratio_max - (ratio_max - ratio_min) * progress] * n_off
    raise ValueError(f"unknown prefix strategy '{strategy}', expected one of {PREFIX_STRATEGIES}")


def prefix_length(trace_tokens: int, ratio: float) -> int:
    """Teacher tokens kept for ratio r: floor(r * |tau|) (``trace_tokens`` excludes EOS)."""
    return min(trace_tokens, math.floor(ratio * trace_tokens + 1e-9))
