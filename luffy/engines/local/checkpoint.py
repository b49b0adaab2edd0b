"""Resumable training checkpoints of the local engine.

Layout under the run's work directory (keyed by a hash of the settings, so a changed
config never resumes from a stale run):

    step_000040/ model.pt optimizer.pt scheduler.pt state.json
    latest                      name of the newest complete checkpoint
    metrics.jsonl               one line per finished step

A checkpoint directory is written atomically and ``latest`` is updated after it, so a kill
at any moment leaves a loadable checkpoint (or none). The ``keep`` newest are kept: a resume
checks the checkpoint ``latest`` names and, when a file of it is unreadable (cut short, corrupt,
missing), falls back to the newest older one that reads, or starts over when none does, saying
so in one warning line.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from luffy.engines.base import checkpoint_dirs, resume_candidates, torch_file_problem
from luffy.io import atomic_dir, write_text

log = logging.getLogger(__name__)
LATEST, STATE = "latest", "state.json"
FILES = ("model.pt", "optimizer.pt", "scheduler.pt")
_STEP_DIR = re.compile(r"step_(\d+)")
_warned: set[str] = set()  # the unreadable checkpoint files already named in this process


@dataclass
class Resumed:
    step: int
    state: dict[str, Any]


def save(work_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, state: dict[str, Any], keep: int = 1) -> Path:
    """Write the checkpoint of ``step``, point ``latest`` at it, then keep it and the ``keep - 1``
    newest before it (checkpoints after it, left by an attempt that resumed before them, go)."""
    name = _folder(step)
    with atomic_dir(work_dir / name) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
    write_text(work_dir / LATEST, name)
    found = checkpoint_dirs(work_dir, _STEP_DIR)
    older = [path for s, path in found if s < step]
    for stale in [path for s, path in found if s > step] + older[max(0, keep - 1):]:
        shutil.rmtree(stale, ignore_errors=True)
    return work_dir / name


def latest_state(work_dir: Path) -> dict[str, Any] | None:
    """state.json (step, MLflow run id) of the newest checkpoint whose files look whole, without
    loading weights; None without one."""
    found = _newest_readable(work_dir, _glance)
    return found[1] if found else None


def load_latest(work_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> Resumed | None:
    """Load the newest readable checkpoint into ``model``, ``optimizer`` and ``scheduler`` (None:
    there is none, a fresh start). Its three files are read into memory and checked against the
    model first, so a checkpoint that fails to load leaves all three untouched."""
    found = _newest_readable(work_dir, lambda ckpt: _read(ckpt, model, optimizer, scheduler))
    if found is None:
        return None
    _, state, loaded = found
    optimizer.load_state_dict(loaded["optimizer.pt"])  # validates its groups before changing anything
    model.load_state_dict(loaded["model.pt"])
    scheduler.load_state_dict(loaded["scheduler.pt"])
    return Resumed(step=int(state["step"]), state=state)


def _folder(step: int) -> str:
    return f"step_{step:06d}"


def _candidates(work_dir: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints a resume may use, newest first (the one ``latest`` names and those before
    it), and what is wrong with ``latest`` itself (it names no existing checkpoint)."""
    found, problems = resume_candidates(work_dir, work_dir / LATEST, _STEP_DIR, _STEP_DIR, _folder)
    return [path for _, path in found], problems


def _newest_readable(work_dir: Path, check: Callable[[Path], tuple[Any, str | None]]
                     ) -> tuple[Path, dict[str, Any], Any] | None:
    """(checkpoint, its state, what ``check`` read) of the newest checkpoint that passes ``check``
    (which returns (what it read, None) or (None, the problem)); the unreadable ones passed over
    are named in one warning line, once per process."""
    candidates, problems = _candidates(work_dir)
    found = read = None
    for ckpt in candidates:
        state, problem = _read_state(ckpt)
        if problem is None:
            read, problem = check(ckpt)
        if problem is None:
            found = (ckpt, state, read)
            break
        problems.append(problem)
    new = [p for p in problems if p not in _warned]
    if new:
        _warned.update(new)
        outcome = f"resuming from {found[0]}" if found else "no readable checkpoint left: starting over from step 0"
        log.warning("%s; %s", "; ".join(new), outcome)
    return found


def _unreadable(path: Path, reason: str) -> str:
    return f"checkpoint file {path} is unreadable ({reason})"


def _read_state(ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = ckpt / STATE
    try:
        state = json.loads(path.read_text())
        int(state["step"])
        return state, None
    except FileNotFoundError:
        return None, _unreadable(path, "missing")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, _unreadable(path, f"not a checkpoint state: {_short(err)}")


def _glance(ckpt: Path) -> tuple[None, str | None]:
    """Whether the checkpoint's torch files look whole (their zip directories), cheaply."""
    for name in FILES:
        reason = torch_file_problem(ckpt / name)
        if reason:
            return None, _unreadable(ckpt / name, reason)
    return None, None


def _read(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint's three files in memory, each checked to load and to fit what it restores."""
    loaded: dict[str, Any] = {}
    fits = {"model.pt": lambda d: _same_shapes(d, model.state_dict()),
            "optimizer.pt": lambda d: isinstance(d, dict) and {"state", "param_groups"} <= d.keys() and
            [len(g["params"]) for g in d["param_groups"]] == [len(g["params"]) for g in optimizer.param_groups],
            "scheduler.pt": lambda d: isinstance(d, dict) and scheduler.state_dict().keys() & {"lr_lambdas",
                                                                                              "last_epoch"} <= d.keys()}
    for name in FILES:
        path = ckpt / name
        reason = torch_file_problem(path)
        if reason is None:
            try:
                loaded[name] = torch.load(path, map_location="cpu")
                if not fits[name](loaded[name]):
                    reason = "its contents do not fit this run's model"
            except Exception as err:  # noqa: BLE001 - whatever fails to load makes the checkpoint unusable
                reason = f"truncated or corrupt: {_short(err)}"
        if reason:
            return None, _unreadable(path, reason)
    return loaded, None


def _same_shapes(found: Any, expected: dict[str, torch.Tensor]) -> bool:
    return isinstance(found, dict) and found.keys() == expected.keys() and all(
        isinstance(found[k], torch.Tensor) and found[k].shape == v.shape for k, v in expected.items())


def _short(err: BaseException) -> str:
    """The first line of an error, cut to a few words."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 100 else text[:97] + "..."
