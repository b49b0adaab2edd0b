"""A chained training job's parts (luffy.chain): the job's end read from SLURM, the stop at a
checkpoint before it, the requeue, and a resumed run that ends where an uninterrupted one does.
SLURM's answers are given as recorded text here; tests/test_slurm.py runs the chain on a real
SLURM."""

import json
import subprocess
import time

import pytest
import torch

from luffy.chain import Deadline, TimeLimitReached, job_deadline, requeue
from luffy.config import resolve_train_config
from luffy.engines.local.trainer import LocalTrainer
from luffy.engines.verl.launcher import Watch, _time_up

SETTINGS = {"algorithm": "luffy", "steps": 6, "prompts_per_step": 2, "n": 3, "max_response_tokens": 32,
            "checkpoint_every": 100, "lr": 1.0e-3}


def scontrol(stdout: str = "", rc: int = 0, stderr: str = ""):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, rc, stdout, stderr)
    run.calls = calls
    return run


def test_the_jobs_end_comes_from_scontrol():
    assert job_deadline({}) is None
    end = time.localtime(time.time() + 600)
    line = f"JobId=42 JobName=x Restarts=1 EndTime={time.strftime('%Y-%m-%dT%H:%M:%S', end)} Partition=debug"
    deadline = job_deadline({"SLURM_JOB_ID": "42"}, run=scontrol(line))
    assert 590 < deadline.left() <= 600
    assert job_deadline({"SLURM_JOB_ID": "42"}, run=scontrol("JobId=42 EndTime=Unknown")) is None
    with pytest.raises(RuntimeError, match="scontrol show job 42: Invalid job id specified"):
        job_deadline({"SLURM_JOB_ID": "42"}, run=scontrol(rc=1, stderr="Invalid job id specified"))


def test_a_requeue_that_slurm_refuses_says_how_to_go_on():
    stop = TimeLimitReached(40, 100, time.time() + 60)
    with pytest.raises(RuntimeError, match=r"stopped at step 40 of 100 with a checkpoint, \d+ s before the job's "
                                           r"time limit, but SLURM job 7 cannot requeue itself \(Requested "
                                           r"operation is presently disabled\); rerun the workflow to go on from "
                                           r"step 40"):
        requeue(stop, {"SLURM_JOB_ID": "7"}, run=scontrol(rc=1, stderr="Requested operation is presently disabled"))
    run = scontrol()
    with pytest.raises(RuntimeError, match="requeued but not ended within 0 s"):
        requeue(stop, {"SLURM_JOB_ID": "7"}, run=run, wait_s=0.0)
    assert run.calls == [["scontrol", "requeue", "7"]]
    with pytest.raises(RuntimeError, match="outside a SLURM job: rerun the workflow"):
        requeue(stop, {})


def test_stopping_near_the_end_then_resuming_ends_where_an_uninterrupted_run_ends(tiny_model_dir, train_parquet,
                                                                                 tmp_path):
    data = train_parquet(12)
    cfg = resolve_train_config("chain", {}, dict(SETTINGS))

    def train(work, deadline=None):
        LocalTrainer(cfg, data, tiny_model_dir, tmp_path / work, deadline=deadline).run(
            tmp_path / work / "final", tmp_path / work / "metrics.jsonl")

    train("straight")
    with pytest.raises(TimeLimitReached) as stop:  # less left than it keeps in hand: one step, then stop
        train("chained", Deadline(end=time.time() + 60.0, floor_s=60.0))
    assert stop.value.step == 1 and (tmp_path / "chained" / "latest").read_text() == "step_000001"
    assert not (tmp_path / "chained" / "final").exists()
    train("chained", Deadline(end=time.time() + 3600.0))
    straight, chained = (torch.load(tmp_path / w / "final" / "model.pt") for w in ("straight", "chained"))
    assert all(torch.equal(straight[k], chained[k]) for k in straight)
    steps = [line.split(",")[0] for line in (tmp_path / "chained" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [f'{{"step": {i}' for i in range(6)]


class SlowStartPool:
    """A grading pool whose workers take ``boot_s`` to start (a forkserver importing the graders
    on a loaded machine); it grades in this process."""

    def __init__(self, boot_s: float):
        self.boot_s, self.waited = boot_s, False

    def ready(self):
        if not self.waited:
            time.sleep(self.boot_s)
            self.waited = True

    def grade(self, completions, golds, graders):
        from luffy.reward.pool import grade_one

        self.ready()
        return [grade_one(c, g, tuple(graders), timeout_s=30.0) for c, g in zip(completions, golds)]


def test_the_grading_pools_start_up_is_not_a_steps_time(tiny_model_dir, train_parquet, tmp_path):
    """A chained part decides to stop by its longest step: the pool's start-up is waited for
    before the first step's clock starts, so it is not counted in it (else a part with 35 s left
    stopped after one step whose time was mostly the pool's seconds of start-up, as CI's SLURM
    chain did five times in a row)."""
    cfg = resolve_train_config("chain", {}, {**SETTINGS, "steps": 2})
    pool = SlowStartPool(0.5)
    trainer = LocalTrainer(cfg, train_parquet(12), tiny_model_dir, tmp_path / "work", pool=pool,
                           deadline=Deadline(end=time.time() + 3600.0))
    started_after_the_pool = []
    step = trainer.rl_step
    trainer.rl_step = lambda i: started_after_the_pool.append(pool.waited) or step(i)
    trainer.run(tmp_path / "final", tmp_path / "metrics.jsonl")
    assert started_after_the_pool == [True, True]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_the_verl_supervisor_ends_a_run_at_the_checkpoint_saved_near_the_end():
    saved = {"step": 3}
    watch = Watch(progress=lambda: None, stall_s=60, startup_s=60, deadline=Deadline(end=time.time() + 3600),
                  checkpointed=lambda: saved["step"], total_steps=10)
    watch.step_times = {1: 10.0, 2: 14.0, 3: 18.0}
    assert _time_up(watch, saved_before=3) is None  # an hour left
    watch.deadline = Deadline(end=time.time() + 80)  # 2 x 4 s + 60 s to save + 30 s in hand > 80 s
    assert _time_up(watch, saved_before=3) is None  # closing, but no checkpoint since this part began
    saved["step"] = 4
    assert _time_up(watch, saved_before=3) == 4
    watch.deadline = Deadline(end=time.time() + 10)  # the last moment: whatever checkpoint there is
    assert _time_up(watch, saved_before=4) == 4
    assert _time_up(Watch(progress=lambda: None, stall_s=60, startup_s=60), None) is None
    # the trainer says it saved for the time limit: at once, whatever the supervisor would judge
    told = Watch(progress=lambda: None, stall_s=60, startup_s=60, deadline=Deadline(end=time.time() + 3600),
                 checkpointed=lambda: 7, saved_for_time=lambda: 7)
    assert _time_up(told, saved_before=2) == 7
