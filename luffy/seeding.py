"""Seeds: their valid range, and the one derivation of a stream's seed from a run's seed.

A run's seed (``seed`` settings, ``seeds``, ``--seed``) is in ``[0, SEED_MAX]``: the range
every consumer takes without overflow (NumPy's legacy seeding, which vLLM and verl call,
takes ``< 2**32``; ``torch.manual_seed`` takes 64 bits). Each random stream of a run (the
data order of an epoch, the rollouts of a step, the teacher-prefix plan of a group) is seeded by
``derived_seed(seed, *parts)`` and nowhere else, so the arithmetic is written once and its
result always fits ``torch.manual_seed``.
"""

from __future__ import annotations

SEED_MAX = 2**31 - 1
MULTIPLIER = 1_000_003
STREAM_SEED_BOUND = 2**63  # derived seeds are in [0, 2**63): a signed 64-bit integer, as torch takes


def derived_seed(seed: int, *parts: int) -> int:
    """The seed of one stream of a run: ``((seed * M + p1) * M + p2) ... mod 2**63`` with
    ``M = 1_000_003``. With a seed in ``[0, SEED_MAX]`` and small parts (steps, epochs, row
    indices) no term wraps, so the streams of different (seed, parts) differ."""
    value = seed
    for part in parts:
        value = value * MULTIPLIER + part
    return value % STREAM_SEED_BOUND
