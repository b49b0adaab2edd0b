"""Atomic outputs: everything is written to a temporary sibling and renamed into place.

A killed job therefore leaves either the previous output or none, never half a file. A
device that runs out of space is named (``DiskFull``), and a directory that must have one
writer at a time is held with a lock (``exclusive``) whose holder a second writer is told.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from luffy.errors import Busy, DiskFull  # noqa: F401  (raised here; importable from here)

log = logging.getLogger(__name__)

LOW_SPACE_BYTES = 64 * 2**20  # below this, a failed write is taken for a full device


def _free_bytes(path: Path) -> int | None:
    for parent in (path, *path.parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def space_ran_out(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether ``err``, raised while writing ``path``, means that space ran out: ENOSPC or
    EDQUOT, or an error without an errno (torch.save's "unexpected pos", safetensors) on a
    device that has less than LOW_SPACE_BYTES left."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    free = _free_bytes(Path(path))
    return isinstance(err, (OSError, RuntimeError)) and free is not None and free < LOW_SPACE_BYTES


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write failure for lack of space into ``DiskFull`` naming ``path``."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, RuntimeError) as err:
        if not space_ran_out(err, path):
            raise
        free = _free_bytes(Path(path))
        raise DiskFull(errno.ENOSPC, f"no space left on the device of {path} ({(free or 0) / 2**20:.1f} MiB free) "
                       f"while writing it; free some space and rerun ({type(err).__name__}: {err})") from None


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` for the block; the file names the holder
    (process, host, start time). With ``wait_s`` 0 a held lock is a ``Busy`` error naming the
    holder at once, else it waits up to ``wait_s`` seconds. The lock dies with its process (a
    killed holder never blocks the next one). On a file system without locks (some Lustre
    mounts) it warns and goes on."""
    import fcntl

    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    log.warning("%s: file locks are not supported here (%s); one writer at a time is not enforced",
                                lock, err)
                    break
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                    raise Busy(f"{what} is in use by {holder} (lock {lock}); one writer at a time: wait for it to "
                               "end, or stop it") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _umask() -> int:
    """The process's current umask. Linux reports it in /proc without changing it; elsewhere
    it is read by setting and restoring it (briefly 0 for the whole process)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0)
    os.umask(current)
    return current


def _publishable(path: str | os.PathLike, directory: bool = False) -> None:
    """The permissions a plainly created file or directory would have (mkstemp/mkdtemp make
    them private, 0600/0700, which outputs shared on a cluster must not be)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with writing(target):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    try:
        with writing(target):
            yield Path(tmp)
        if os.path.exists(tmp):
            _publishable(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with writing(target):
            yield tmp
        _publishable(tmp, directory=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A hard link to ``source`` at ``target`` where the file system allows, else a copy (large
    model files are shared, not duplicated, within one file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when it does not exist). A last line cut off by a
    crash (no newline at its end, and not JSON) is dropped with a warning naming the file;
    any other line that is not JSON is a ValueError naming the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        lines = fh.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # the text after the last newline: a write cut off
                log.warning("%s: dropped its last line, cut off by an interrupted write (%d characters: %r)",
                            path, len(line), line[:60])
                continue
            raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
    return records


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as a line (one write call; flushed), naming the file if space ran out."""
    with writing(path), open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite a JSON-lines file (atomically) with the records ``keep`` accepts, a cut-off last
    line dropped (see ``read_jsonl``); returns how many records were dropped."""
    if not os.path.exists(path):
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)
