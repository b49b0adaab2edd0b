"""The reward: binary math-verify grading of the answer that follows ``</think>``.

Protocol of the reference: ``verify(parse("$" + gold + "$"), parse(solution))`` with the gold
answer first (``verify`` is asymmetric); a response without ``</think>`` scores 0; the
teacher trace is graded like any response. math-verify's own time limits (SIGALRM) bound
each parse and comparison on the main thread; the grade records why an answer failed.
math-verify parses LaTeX with its own grammar into sympy and never evaluates the text as
Python code.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

from math_verify import parse, verify
from math_verify.errors import TimeoutException

THINK_END = "</think>"
REASONS = ("correct", "wrong", "no_think_end", "no_answer", "parse_failure", "timeout", "error")


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    reason: str  # one of REASONS

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def answer_part(completion: str) -> str | None:
    """Text after the first ``</think>``, or None when the reasoning never closed."""
    if THINK_END not in completion:
        return None
    return completion.split(THINK_END, 1)[1]


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, limit: int | None):
    return parse(f"${gold}$", parsing_timeout=limit, raise_on_error=True)


def grade_answer(answer: str, gold: str, timeout_s: int | None = 2) -> Grade:
    """math-verify's verdict on an answer text (gold first). ``timeout_s`` bounds each parse and
    comparison with math-verify's SIGALRM timer, which exists only on a main thread (elsewhere
    it is disabled, and the caller must bound the time, as ``luffy.reward.pool`` does)."""
    limit = timeout_s if timeout_s and threading.current_thread() is threading.main_thread() else None
    extracted = None
    try:
        predicted = parse(answer, parsing_timeout=limit, raise_on_error=True)
        if not predicted:  # a box that does not parse is a parse failure; no box and no math, no answer
            return Grade(False, None, "parse_failure" if "\\boxed" in answer else "no_answer")
        extracted = str(predicted[-1])
        ok = verify(_parse_gold(gold, limit), predicted, timeout_seconds=limit, raise_on_error=True)
    except (TimeoutError, TimeoutException):
        return Grade(False, extracted, "timeout")
    except Exception:  # a grader crash on model text is a wrong answer, never a failed batch
        return Grade(False, extracted, "error")
    return Grade(bool(ok), extracted, "correct" if ok else "wrong")


def grade(completion: str, gold: str, timeout_s: int | None = 2) -> Grade:
    """Grade one completion against the gold answer (math-verify, gold first)."""
    answer = answer_part(completion)
    if answer is None:
        return Grade(False, None, "no_think_end")
    return grade_answer(answer, gold, timeout_s)
