"""Training longer than one SLURM job may run: a chain of jobs under one SLURM job id.

A train job whose ``runtime`` exceeds ``resources.job_time_limit`` is submitted with the limit
as its time and ``--requeue`` (``luffy.workflow.train_job_resources``); ``luffy train --chain 1``
then reads the job's end time from SLURM, and the engine stops at a checkpoint while a step and a
checkpoint still fit before it (``TimeLimitReached``). The job then requeues itself
(``scontrol requeue``): SLURM ends this part and starts the same job again (after its
requeue delay, about two minutes on SLURM 22.05), and the rerun resumes from the checkpoint.
The SLURM executor sees PENDING/RUNNING throughout and one COMPLETED job at the end, so
Snakemake sees one job. A job preempted or requeued by SLURM itself resumes the same way, from
its newest checkpoint.

Every SLURM query goes through ``scontrol`` with the job's id (``SLURM_JOB_ID``, which the
SLURM executor's job step keeps).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

REQUEUE_WAIT_S = 300.0  # after `scontrol requeue`, SLURM ends this part within seconds


class TimeLimitReached(Exception):
    """Training stopped at a checkpoint because the job's end is near; it resumes from ``step``."""

    def __init__(self, step: int, steps: int, end: float):
        super().__init__(f"stopped at step {step} of {steps} with a checkpoint, "
                         f"{max(0.0, end - time.time()):.0f} s before the job's time limit")
        self.step, self.steps, self.end = step, steps, end


@dataclass
class Deadline:
    """When this part of a chain must have stopped (epoch seconds), and how to decide in time."""

    end: float
    floor_s: float = 30.0  # always kept in hand: SLURM's signal and start-up jitter

    def left(self) -> float:
        return self.end - time.time()

    def stop_before_next(self, longest_step_s: float, checkpoint_s: float) -> bool:
        """Whether one more step and its checkpoint might not fit before the end (with twice
        the longest step seen, since steps vary)."""
        return self.left() < 2.0 * longest_step_s + checkpoint_s + self.floor_s


def _job_fields(job_id: str, run=subprocess.run) -> dict[str, str]:
    done = run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol show job {job_id}: {done.stderr.strip() or done.returncode}")
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def job_deadline(env: dict[str, str] | None = None, run=subprocess.run) -> Deadline | None:
    """This SLURM job's end (its EndTime), or None outside SLURM or for a job without a limit."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    fields = _job_fields(job_id, run)
    end = fields.get("EndTime", "")
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", end):
        return None  # Unknown / no limit
    deadline = Deadline(end=time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S")))
    log.info("SLURM job %s, part %d of its chain: ends at %s (%.0f s from now)", job_id,
             int(fields.get("Restarts", "0") or 0) + 1, end, deadline.left())
    return deadline


def requeue(stop: TimeLimitReached, env: dict[str, str] | None = None, run=subprocess.run,
            wait_s: float = REQUEUE_WAIT_S) -> None:
    """Requeue this SLURM job to go on from ``stop.step``; returns only if SLURM did not end
    this part (then raises RuntimeError naming what to do)."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise RuntimeError(f"training {stop}, outside a SLURM job: rerun the workflow to go on from it")
    log.warning("training %s: requeueing SLURM job %s to go on from it", stop, job_id)
    done = run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"training {stop}, but SLURM job {job_id} cannot requeue itself "
                           f"({done.stderr.strip() or done.returncode}); rerun the workflow to go on from step "
                           f"{stop.step}")
    time.sleep(wait_s)  # SLURM ends this part now
    raise RuntimeError(f"SLURM job {job_id} was requeued but not ended within {wait_s:.0f} s")
