"""Resumable training checkpoints of the local engine.

Layout under the run's work directory (keyed by a hash of the settings, so a changed
config never resumes from a stale run):

    step_000040/ model.pt optimizer.pt scheduler.pt state.json
    latest                      name of the newest complete checkpoint
    metrics.jsonl               one line per finished step

A checkpoint directory is written atomically and ``latest`` is updated after it, so a kill
at any moment leaves a loadable checkpoint (or none).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luffy.io import atomic_dir, write_text


@dataclass
class Resumed:
    step: int
    state: dict[str, Any]


def save(work_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, state: dict[str, Any], keep: int = 1) -> Path:
    name = f"step_{step:06d}"
    with atomic_dir(work_dir / name) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    write_text(work_dir / "latest", name)
    old = sorted(p for p in work_dir.glob("step_*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return work_dir / name


def _latest_dir(work_dir: Path) -> Path | None:
    pointer = work_dir / "latest"
    return work_dir / pointer.read_text().strip() if pointer.exists() else None


def latest_state(work_dir: Path) -> dict[str, Any] | None:
    """state.json of the newest checkpoint (step, MLflow run id), without loading weights."""
    ckpt = _latest_dir(work_dir)
    return json.loads((ckpt / "state.json").read_text()) if ckpt else None


def load_latest(work_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> Resumed | None:
    ckpt = _latest_dir(work_dir)
    if ckpt is None:
        return None
    model.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu"))
    state = latest_state(work_dir)
    return Resumed(step=int(state["step"]), state=state)

