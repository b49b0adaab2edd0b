"""The errors that end a ``luffy`` command with one line and exit status 2 (``luffy.cli``).

They live in this light module, so that the command line catches them without importing
torch, transformers or pandas: a command that refuses its input answers in well under a
second. Each is also importable from the module that raises it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator


class DataError(ValueError):
    """A dataset that does not match its schema; the message names the column or rows."""


class EngineError(RuntimeError):
    """An engine could not do the job (its own tool failed or refused); the message says why."""


class ExportMismatch(RuntimeError):
    """The exported model does not reproduce the trained model's logits."""


class ModelUnreadable(Exception):
    """A model that cannot be read (missing, not a model directory, unknown hub id or revision),
    named with where it was looked for."""


class DiskFull(OSError):
    """A write failed because the device (or the user's quota) ran out of space."""

    def __str__(self) -> str:
        return str(self.strerror)


class Busy(RuntimeError):
    """A resource another process holds (its lock file names the process)."""


class RehearsalFailed(RuntimeError):
    """A job of the rehearsal failed; Snakemake printed which, and its log."""


class Cancelled(BaseException):
    """A signal asked the command to stop: SIGTERM (``kill``, a job manager, SLURM's ``scancel``)
    or SIGINT (Ctrl-C). Raised where the signal arrives (``luffy.engines.verl.launcher``), so
    that the cleanups on the way out run (a verl run's processes ended, its checkpoints kept);
    the command then ends by the signal itself (a shell reports 128 + its number)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"cancelled by {signal.Signals(self.signum).name}"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stopping: list[int] = []  # the signal being handled, while a Cancelled unwinds
_deferring: list[bool] = []  # one entry per open signals_deferred() block (main thread)
_deferred: list[int] = []  # a signal that arrived in such a block, raised at its end


def _on_stop_signal(signum: int, frame) -> None:
    if _stopping or _deferred:  # a second signal while the first one's cleanup runs: let the cleanup finish
        logging.getLogger(__name__).warning("%s again: still stopping", signal.Signals(signum).name)
        return
    if _deferring:
        _deferred.append(signum)
        return
    _stopping.append(signum)
    raise Cancelled(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A stop signal that arrives inside the block raises ``Cancelled`` when the block ends, not
    in its middle: a write to the tracking store is not cut in half (once, a Ctrl-C right after a
    step's metrics left the run RUNNING, likely a SQLite write cut while it held the store's lock).
    The signal then waits for the call, at most the tracking client's timeout. Off the main
    thread, where signals are not delivered, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
        if not _deferring and _deferred:
            signum = _deferred.pop()
            _stopping.append(signum)
            raise Cancelled(signum)


@contextlib.contextmanager
def cancellable() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise ``Cancelled`` where they arrive, once: a
    further signal while that unwinds is logged and otherwise ignored, so that the cleanups on
    the way out finish. A SIGINT the process was started ignoring (a command started with
    ``&`` from a script) stays ignored. Nested blocks share the outermost one's handlers; off
    the main thread (where Python cannot install handlers) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _on_stop_signal:
        yield
        return
    _stopping.clear()
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS
                if not (signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stopping.clear()
        _deferred.clear()


def one_line(err: BaseException | str) -> str:
    """A library's error text on one line: runs of whitespace (newlines included) become one
    space, other control characters are escaped."""
    text = " ".join(str(err).split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
