"""Grading many answers on all cores, each answer under a hard time limit.

Every answer is graded in a worker process (``pebble``), by the graders its suite names:

    math   -> math_verify (``luffy.reward.math``) and boxed (``luffy.reward.boxed``)
    choice -> choice (``luffy.reward.choice``)

Time limit, two layers:
- in the worker: ``luffy.reward.math.answer_deadline`` (a SIGALRM timer on the worker's main
  thread, re-armed until the answer is done) interrupts the answer's graders after
  ``timeout_s`` (math-verify's own one-shot signal timeouts are off: they would fight over the
  one timer);
- in the parent: a worker still busy at ``timeout_s + grace_s`` (stuck inside C code, such as
  sympy computing ``9^{9^{9^{9}}}``, where no signal handler can run) is killed and replaced.
Either way the answer is graded wrong with reason ``timeout`` (``TIMEOUT``; each suite's results
count these per grader, ``luffy.evaluate.metrics.grading_timeouts``); a worker that crashes or runs
out of its address-space cap (``memory_mb``) gives ``error``. The batch always completes.

Nothing here evaluates model text as code: math-verify and latex2sympy parse LaTeX with
grammars into sympy objects.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Sequence

from pebble import ProcessPool

from luffy.errors import EngineError
from luffy.reward.boxed import grade_boxed
from luffy.reward.choice import grade_choice
from luffy.reward.math import TIMEOUT, AnswerTimeout, Grade, answer_deadline, grade

log = logging.getLogger(__name__)

GRADERS: dict[str, Callable[[str, str], Grade]] = {
    "math_verify": lambda completion, gold: grade(completion, gold, timeout_s=None),
    "boxed": grade_boxed,
    "choice": grade_choice,
}
ANSWER_TYPES: dict[str, tuple[str, ...]] = {"math": ("math_verify", "boxed"), "choice": ("choice",)}


def grade_one(completion: str, gold: str, graders: Sequence[str], timeout_s: float) -> dict[str, Grade]:
    """Every named grader's verdict on one answer, all within ``timeout_s`` (main thread only;
    graders not reached in time are ``timeout``)."""
    out: dict[str, Grade] = {}
    try:
        with answer_deadline(timeout_s):
            for name in graders:
                out[name] = GRADERS[name](completion, gold)
    except AnswerTimeout:
        pass
    return {name: out.get(name, Grade(False, None, TIMEOUT)) for name in graders}


def _init_worker(memory_mb: int) -> None:
    if memory_mb > 0:
        cap = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # A process's first math-verify answer builds its LaTeX parser (a few tenths of a second, over
    # a second on a loaded machine; not inherited from the forkserver): built here, outside any
    # answer's time limit, instead of inside the first one.
    grade_one("</think> \\boxed{\\frac{1}{2}}", "0.5", ("math_verify", "boxed", "choice"), timeout_s=30.0)


class GraderPoolError(EngineError):
    """The grading pool's workers could not be started (the command ends with it in one line)."""


def _ready() -> None:
    """A task that does nothing: scheduling it starts the pool's workers."""


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class GraderPool:
    """``with GraderPool() as pool: verdicts = pool.grade(completions, golds, ("math_verify", "boxed"))``

    The workers start at once, in the background: their forkserver boots (it imports this module
    and the graders: seconds on a small CPU) while the caller goes on, e.g. loading its model, so
    the first ``grade`` does not pay for it. ``ready()`` waits for them."""

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0, grace_s: float = 0.3,
                 memory_mb: int = 4096):
        self.workers = workers or default_workers()
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.memory_mb = memory_mb
        self._pool = self._new_pool()
        self._start_error: BaseException | None = None
        self._starting = threading.Thread(target=self._start, name="grader-pool-start", daemon=True)
        self._starting.start()

    def _new_pool(self) -> ProcessPool:
        context = multiprocessing.get_context("forkserver")  # workers never fork a threaded parent
        context.set_forkserver_preload(["luffy.reward.pool"])  # so a replaced worker starts fast
        return ProcessPool(max_workers=self.workers, context=context, initializer=_init_worker,
                           initargs=(self.memory_mb,))

    def _start(self) -> None:
        try:
            self._pool.schedule(_ready).result()  # starts the forkserver and every worker
        except BaseException as err:  # raised in the caller's thread by ready()
            self._start_error = err

    def ready(self) -> None:
        """Wait until the workers have started and one has its parser built. A start that failed
        in the background (in `make demo`, now and then, a broken pipe while vLLM loaded beside it) is
        logged with its traceback and tried once more, in the caller's thread; a second failure
        raises ``GraderPoolError`` naming both."""
        self._starting.join()
        first, self._start_error = self._start_error, None
        if first is None:
            return
        log.warning("the grading pool's workers did not start (%r); starting them again", first, exc_info=first)
        self._pool.stop()
        self._pool.join()
        self._pool = self._new_pool()
        self._start()
        if self._start_error is not None:
            raise GraderPoolError(f"the grading pool's {self.workers} worker(s) did not start, twice: "
                                  f"{self._start_error!r}, after {first!r}") from self._start_error

    def grade(self, completions: Sequence[str], golds: Sequence[str], graders: Sequence[str]
              ) -> list[dict[str, Grade]]:
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        unknown = [g for g in graders if g not in GRADERS]
        if unknown:
            raise ValueError(f"unknown grader(s) {unknown}; expected some of {sorted(GRADERS)}")
        self.ready()
        futures = [self._pool.schedule(grade_one, args=(c, g, tuple(graders), self.timeout_s),
                                       timeout=self.timeout_s + self.grace_s) for c, g in zip(completions, golds)]
        out = []
        for future in futures:
            try:
                out.append(future.result())
            except FutureTimeout:
                out.append({name: Grade(False, None, TIMEOUT) for name in graders})
            except Exception as err:  # ProcessExpired (a crashed worker), MemoryError...: this answer only
                log.debug("grader worker failed: %r", err)
                out.append({name: Grade(False, None, "error") for name in graders})
        return out

    def close(self) -> None:
        self._starting.join()
        self._pool.close()
        self._pool.join()

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self._starting.join()
            self._pool.stop()
        self.close()
