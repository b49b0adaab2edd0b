"""The errors that end a ``luffy`` command with one line and exit status 2 (``luffy.cli``).

They live in this light module, so that the command line catches them without importing
torch, transformers or pandas: a command that refuses its input answers in well under a
second. Each is also importable from the module that raises it.
"""

from __future__ import annotations


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


def one_line(err: BaseException | str) -> str:
    """A library's error text on one line: runs of whitespace (newlines included) become one
    space, other control characters are escaped."""
    text = " ".join(str(err).split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
