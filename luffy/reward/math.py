"""The reward: binary math-verify grading of the answer that follows ``</think>``.

Protocol of the reference: ``verify(parse("$" + gold + "$"), parse(solution))`` with the gold
answer first (``verify`` is asymmetric); a response without ``</think>`` scores 0; the
teacher trace is graded like any response. On the main thread ``answer_deadline`` (one
SIGALRM timer, re-armed until the answer is done) bounds the whole grade, parse and
comparison together; the grade records why an answer failed. math-verify parses LaTeX with
its own grammar into sympy and never evaluates the text as Python code.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from dataclasses import dataclass

from math_verify import parse, verify

THINK_END = "</think>"
TIMEOUT = "timeout"  # the reason of a grade whose time ran out (graded wrong); suites count these per grader
REASONS = ("correct", "wrong", "no_think_end", "no_answer", "parse_failure", TIMEOUT, "error")


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


class AnswerTimeout(BaseException):
    """Raised by ``answer_deadline``'s timer; a BaseException so graders' ``except Exception``
    let it pass."""


class answer_deadline:
    """``with answer_deadline(seconds): ...`` raises ``AnswerTimeout`` inside the block once
    ``seconds`` have passed, and again every ``again_every_s`` until the block ends.

    Why again: Python only prints an exception raised inside a finaliser or a weakref callback
    (the garbage collector runs them between any two bytecodes), so a one-shot alarm that lands
    there is lost and the answer runs on. The timer raises only in code the block called, never
    in the frame that entered it nor while leaving the block, and stops itself if it finds the
    block left, so it cannot leak into the caller. SIGALRM exists only on the main thread:
    elsewhere, or with ``seconds`` None, it bounds nothing. One timer per process, so deadlines
    do not nest (an inner block must pass None).
    """

    def __init__(self, seconds: float | None, again_every_s: float = 0.05):
        main = threading.current_thread() is threading.main_thread()
        self.seconds = seconds if seconds and main else None
        self.again_every_s = again_every_s
        self._owner = None  # the frame that entered the block, while the timer runs
        self._previous = None

    def __enter__(self) -> "answer_deadline":
        if self.seconds:
            self._owner = sys._getframe(1)
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds, self.again_every_s)
        return self

    def __exit__(self, *exc) -> bool:
        self._stop()
        return False

    def _stop(self) -> None:
        if self._owner is not None:
            self._owner = None
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)

    def _on_alarm(self, signum, frame) -> None:
        owner = self._owner
        if owner is None or frame is owner or frame.f_code in _LEAVING:
            return  # leaving the block (or between two calls in it): the next tick decides
        # Python reporting an exception a finaliser lost (a Python sys.unraisablehook, such as
        # pytest's, formatting its traceback): raising inside the hook would break the report
        # itself; the next tick decides
        hook = getattr(sys.unraisablehook, "__code__", None)
        caller = frame
        while caller is not None and caller is not owner:
            if caller.f_code is hook:
                return
            caller = caller.f_back
        if caller is None:  # the block is left: stop
            self._stop()
            return
        raise AnswerTimeout()


_LEAVING = frozenset({answer_deadline.__exit__.__code__, answer_deadline._stop.__code__})


class _OwnTimeouts(logging.Filter):
    """math-verify warns that its own (one-shot) timeouts are off: ``answer_deadline`` is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_OwnTimeouts())


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return parse(f"${gold}$", parsing_timeout=None, raise_on_error=True)


VERDICTS_KEPT = 4096  # answer texts whose verdict a process remembers (the oldest forgotten first)
_verdicts: dict[tuple[str, str], Grade] = {}


def grade_answer(answer: str, gold: str, timeout_s: float | None = 2) -> Grade:
    """math-verify's verdict on an answer text (gold first), within ``timeout_s`` for parse and
    comparison together (``answer_deadline``: main thread only; elsewhere the caller bounds the
    time, as ``luffy.reward.pool`` does).

    A verdict math-verify reached is remembered for the same answer text and gold (the group's
    samples often end in the same answer, and a prompt's teacher trace recurs every epoch): the
    same text is graded once. A time-out or a grader error is never remembered."""
    key = (answer, gold)
    known = _verdicts.get(key)
    if known is not None:
        return known
    verdict = _grade_answer(answer, gold, timeout_s)
    if verdict.reason not in (TIMEOUT, "error"):
        while _verdicts and len(_verdicts) >= VERDICTS_KEPT:
            del _verdicts[next(iter(_verdicts))]
        _verdicts[key] = verdict
    return verdict


def _grade_answer(answer: str, gold: str, timeout_s: float | None) -> Grade:
    extracted = None
    try:
        with answer_deadline(timeout_s):
            predicted = parse(answer, parsing_timeout=None, raise_on_error=True)
            if not predicted:  # a box that does not parse is a parse failure; no box and no math, no answer
                return Grade(False, None, "parse_failure" if "\\boxed" in answer else "no_answer")
            extracted = str(predicted[-1])
            ok = verify(_parse_gold(gold), predicted, timeout_seconds=None, raise_on_error=True)
    except AnswerTimeout:
        return Grade(False, extracted, TIMEOUT)
    except Exception:  # a grader crash on model text is a wrong answer, never a failed batch
        return Grade(False, extracted, "error")
    return Grade(bool(ok), extracted, "correct" if ok else "wrong")


def grade(completion: str, gold: str, timeout_s: float | None = 2) -> Grade:
    """Grade one completion against the gold answer (math-verify, gold first)."""
    answer = answer_part(completion)
    if answer is None:
        return Grade(False, None, "no_think_end")
    return grade_answer(answer, gold, timeout_s)
