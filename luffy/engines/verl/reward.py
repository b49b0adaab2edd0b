"""Our graders as verl's custom reward function (``reward.custom_reward_function``).

verl's reward loop calls ``compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **reward_kwargs)`` for every response, from a thread of its executor, where
math-verify's own SIGALRM time limits cannot work (the reference then silently scored such
answers 0 after hanging). Here the answer is graded in a process of ``luffy.reward.pool``'s
grader pool, one pool per reward worker process, so the limit holds: a SIGALRM timer inside the
grader process, and the parent kills a grader still busy ``grace_s`` after the limit.

Protocol of the reference: math-verify, gold first, on the text after the first ``</think>``;
no ``</think>`` scores 0; the teacher trace is graded like any response.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

from luffy.reward.pool import GraderPool

_pools: dict[tuple[int, float], GraderPool] = {}
_lock = threading.Lock()


def _pool(processes: int, timeout_s: float) -> GraderPool:
    key = (processes, timeout_s)
    with _lock:
        if key not in _pools:
            _pools[key] = GraderPool(workers=processes, timeout_s=timeout_s)
        return _pools[key]


@atexit.register
def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  timeout_s: float = 5.0, processes: int = 2, **_: Any) -> dict[str, float]:
    """The binary reward of one response, with why it failed: ``{"score", "no_think_end"}``
    (verl keeps the extra keys as per-sample reward info)."""
    verdict = _pool(processes, timeout_s).grade([solution_str], [str(ground_truth)], ("math_verify",))[0]["math_verify"]
    return {"score": verdict.reward, "no_think_end": float(verdict.reason == "no_think_end")}
