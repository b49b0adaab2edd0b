"""What the workflow checks at start, before any job runs or is submitted.

Each check ends in one line that names the problem and what to type, instead of a run that
fails job by job (a jobs' command that cannot run), waits forever (a SLURM status command that
cannot see the jobs), or overwrites another study's results (a results folder shared by two
configs). Called from the Snakefile (``workflow/rules/common.smk`` and ``onstart``); nothing
here imports Snakemake.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from luffy.config import ConfigError
from luffy.io import write_json

STUDY_FILE = ".luffy-study.json"  # in a results folder: the config that writes into it
SBATCH_HINT = "docs/slurm.md: Running on a SLURM cluster"


def job_command_problem(command: str, from_env: bool) -> str | None:
    """Whether ``command --version`` runs in the jobs' environment; None when it does, else one
    line naming ``LUFFY_COMMAND`` and what is wrong."""
    source = f"LUFFY_COMMAND={command}" if from_env else f"the jobs' command {command} (LUFFY_COMMAND is not set)"
    try:
        done = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return f"{source}: no such executable; set LUFFY_COMMAND to the luffy of the job environment ({SBATCH_HINT})"
    except PermissionError:
        return f"{source}: not executable; set LUFFY_COMMAND to the luffy of the job environment ({SBATCH_HINT})"
    except subprocess.TimeoutExpired:
        return f"{source}: `--version` did not answer within 120 s"
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    why = lines[-1].strip() if lines else f"exit status {done.returncode}"
    why = why.removeprefix("luffy: error: ")
    return f"{source} cannot run the jobs: {why}; set LUFFY_COMMAND to the luffy of the job environment ({SBATCH_HINT})"


# --- the SLURM executor's status command ---------------------------------------------------------

def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(command, 127, "", str(err))


def sacct_problem(run=_run) -> str | None:
    """None when ``sacct`` answers (SLURM accounting is on), else its error in one line."""
    done = run(["sacct", "-X", "-n", "-S", "now", "-o", "JobID"])
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit status {done.returncode}").removeprefix("sacct: error: ")


def min_job_age(run=_run) -> int | None:
    """SLURM's MinJobAge in seconds (how long squeue still lists a finished job), or None."""
    done = run(["scontrol", "show", "config"])
    match = re.search(r"^MinJobAge\s*=\s*(\d+)\s*(sec|s)?\b", done.stdout or "", flags=re.M)
    return int(match.group(1)) if done.returncode == 0 and match else None


def slurm_status_command(requested: str | None, init_seconds: int, run=_run) -> tuple[str, str | None]:
    """The status command that can see this cluster's jobs: ``(command, notice)``.

    The SLURM executor polls ``sacct`` by default. Without SLURM accounting ``sacct`` fails and
    the executor waits forever, even for a failed job; ``squeue`` then sees the jobs, but only
    for MinJobAge seconds after they end, and the executor itself goes back to ``sacct`` when
    MinJobAge < 3 x ``init_seconds`` (its ``--slurm-init-seconds-before-status-checks``). So:
    accounting on -> the requested command; off -> ``squeue`` when MinJobAge allows it, with a
    one-line notice; else a ConfigError saying what to change.
    """
    broken = sacct_problem(run)
    if broken is None:
        return requested or "sacct", None
    age = min_job_age(run)
    needed = 3 * init_seconds
    if age is None or age < needed:
        raise ConfigError(
            f"SLURM accounting is off here (sacct: {broken}), so job states must come from squeue, but squeue keeps "
            f"a finished job only MinJobAge={age if age is not None else '?'} s, under the {needed} s the SLURM "
            f"executor needs (3 x --slurm-init-seconds-before-status-checks={init_seconds}): lower that setting "
            f"to {max(1, (age or 0) // 3)} or ask the admins for MinJobAge >= {needed}")
    notice = None
    if requested != "squeue":
        notice = f"SLURM accounting is off here (sacct: {broken}): job states are read with squeue"
    return "squeue", notice


def fit_executor(plugin: str | None, settings, run=_run) -> str | None:
    """Snakemake's SLURM executor (``plugin`` 'slurm', its ``settings`` object) set to a status
    command that sees this cluster's jobs (``slurm_status_command``); returns the notice to log,
    if any. Other executors: nothing to do."""
    if plugin != "slurm":
        return None
    requested = getattr(settings, "status_command", None)
    command, notice = slurm_status_command(
        requested, getattr(settings, "init_seconds_before_status_checks", None) or 40, run)
    if command != requested:
        if requested is None:  # an executor version without the setting: the user adds it
            raise ConfigError(f"{notice}: add --slurm-status-command {command}")
        settings.status_command = command  # read by the executor at each status check
    return notice


# --- one study per results folder ----------------------------------------------------------------

def _shown(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


def _study(configfiles: list[str], experiment: str) -> dict:
    return {"config": [str(Path(f).resolve()) for f in configfiles], "experiment": experiment}


def study_problem(results_dir: str, configfiles: list[str], experiment: str) -> str | None:
    """None when ``results_dir`` is new or holds this config's study, else one line naming both."""
    marker = Path(results_dir) / STUDY_FILE
    if not marker.is_file():
        return None
    try:
        held = json.loads(marker.read_text())
        held_files = [str(f) for f in held["config"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable marker: claimed again at start
    mine = _study(configfiles, experiment)["config"]
    if held_files == mine:
        return None
    held_text = " + ".join(_shown(f) for f in held_files) or "a config given without a file"
    mine_text = " + ".join(_shown(f) for f in mine) or "a config given without a file"
    again = " ".join(f"--configfile {shlex.quote(_shown(f))}" for f in held_files)
    return (f"{results_dir}/ holds the study of {held_text} (MLflow experiment {held.get('experiment', '?')!r}), "
            f"not of this run's {mine_text}: add {again} to work on that study, or give this config its own "
            f"results_dir (or delete {marker} to hand the folder over)")


def tracking_problem() -> str | None:
    """Where Snakemake is typed, before any job: the tracking server's refusal of the study's
    credentials (``luffy.tracking.check_access``) as one line, else None."""
    from luffy.tracking import TrackingAccessError, check_access

    try:
        check_access()
    except TrackingAccessError as err:
        return str(err)
    return None


def claim_results_dir(results_dir: str, configfiles: list[str], experiment: str) -> None:
    """Record which config writes into ``results_dir`` (atomically; refuses another config's)."""
    problem = study_problem(results_dir, configfiles, experiment)
    if problem:
        raise ConfigError(problem)
    marker = Path(results_dir) / STUDY_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, _study(configfiles, experiment))
