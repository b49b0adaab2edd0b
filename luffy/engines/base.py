"""What a training engine is: train one experiment into a checkpoint directory with a
manifest, export it to HuggingFace format, and say which MLflow run a resumed job continues.

``stages.train`` and ``stages.convert`` reach an engine only through
``luffy.engines.registry.make_engine``; the engines never import each other.

A finished training job's checkpoint directory (``results/train/<experiment>/final``) holds
``checkpoint.json``, the manifest::

    engine      the engine that wrote it (local | verl); absent in older local outputs
    base_model  where training started (a model directory or hub id)
    steps       training steps run
    selected    {"step", "rule"}: which step's weights the directory holds
    settings    the experiment's resolved settings
    weights     the weights inside the directory, relative to it (engine-specific format)
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from luffy.errors import EngineError  # noqa: F401  (raised by the engines; importable from here)
from luffy.io import read_json

if TYPE_CHECKING:
    from luffy.chain import Deadline
    from luffy.config import TrainConfig

MANIFEST = "checkpoint.json"
MetricsSink = Callable[[dict[str, float], int], None]


@dataclass
class TrainJob:
    """One experiment's training job, as the workflow hands it to an engine."""

    experiment: str
    settings: "TrainConfig"
    data: str                # the LUFFY training parquet
    base_model: str          # the model training starts from
    out_dir: Path            # the checkpoint directory (manifest + weights), written atomically
    metrics_out: Path        # one JSON line of metrics per step
    work_dir: Path           # resumable state; not a workflow output
    threads: int = 2
    validation: dict[str, Any] | None = None  # in-training validation settings and file
    runtime: dict[str, Any] | None = None     # the engine's own runtime settings (e.g. rollout parallelism)
    nodes: int = 1                            # the job's allocation: nodes ...
    gpus: int = 0                             # ... and GPUs, all nodes together
    time_limit_s: float | None = None         # the job's run time (resources.runtime); None: no limit
    deadline: "Deadline | None" = None        # a chained SLURM job's end: stop at a checkpoint before it


class Engine(Protocol):
    name: str

    def resume_run_id(self, work_dir: Path) -> str | None:
        """The MLflow run of an interrupted job in ``work_dir`` (None: a fresh start)."""

    def train(self, job: TrainJob, sink: MetricsSink, run_id: Callable[[], str | None]) -> None:
        """Train ``job``, resuming from ``job.work_dir`` if a previous attempt left state there;
        every step's metrics go to ``sink`` and ``job.metrics_out``; the end result is
        ``job.out_dir`` with its manifest. ``run_id`` gives the MLflow run to record for resume."""

    def export(self, checkpoint_dir: Path, manifest: dict[str, Any], out_dir: Path) -> float:
        """Write the checkpoint's weights as a verified HuggingFace model directory; returns the
        largest absolute probe-logit difference found by the verification."""


def torch_file_problem(path: Path) -> str | None:
    """Why the ``torch.save`` file ``path`` cannot be loaded, judged cheaply from its zip archive's
    directory without reading any tensor (a file cut short loses that directory, at its end):
    a few words (missing, empty, truncated or corrupt), or None when it looks whole."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty"
        with zipfile.ZipFile(path) as archive:
            whole = any(name.endswith("data.pkl") for name in archive.namelist())
    except FileNotFoundError:
        return "missing"
    except zipfile.BadZipFile:
        return f"truncated or corrupt: not a whole zip archive, {size} bytes"
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    return None if whole else "not a torch file: no data.pkl in its archive"


def checkpoint_dirs(root: Path, folder: re.Pattern[str]) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoint folders under ``root`` whose names match ``folder`` (its
    group 1: the step), newest first."""
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := folder.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def resume_candidates(root: Path, pointer: Path, folder: re.Pattern[str], named: re.Pattern[str],
                      folder_of: Callable[[int], str]) -> tuple[list[tuple[int, Path]], list[str]]:
    """Both engines' rule for what a resume may use: the checkpoint folders under ``root`` up to
    the step ``pointer`` names (its text matched by ``named``, group 1 the step; all of them when
    it names none), newest first, and what is wrong with the pointer itself (it names no
    checkpoint, or one ``folder_of(step)`` that does not exist). No pointer: nothing to resume."""
    if not pointer.exists():
        return [], []
    text = pointer.read_text(errors="replace").strip()
    found = checkpoint_dirs(root, folder)
    match = named.fullmatch(text)
    if match is None:
        return found, [f"{pointer} names no checkpoint ({text[:40]!r})"]
    step = int(match.group(1))
    missing = root / folder_of(step)
    problems = [] if missing.is_dir() else [f"checkpoint {missing} (named by {pointer}) does not exist"]
    return [(s, path) for s, path in found if s <= step], problems


def write_manifest(directory: Path, *, engine: str, base_model: str, steps: int, selected: dict[str, Any],
                   settings: dict[str, Any], weights: str) -> None:
    (directory / MANIFEST).write_text(json.dumps(
        {"engine": engine, "base_model": base_model, "steps": steps, "selected": selected, "settings": settings,
         "weights": weights}, indent=2))


def read_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory (outputs written before the engine field was
    added are the local engine's)."""
    manifest = read_json(Path(checkpoint_dir) / MANIFEST)
    manifest.setdefault("engine", "local")
    manifest.setdefault("weights", "model.pt")
    return manifest
