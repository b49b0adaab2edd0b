"""An unreadable checkpoint (a file cut short, a bad state.json, ``latest`` naming nothing): a
resume names it in one warning line and goes on from the newest older checkpoint that reads, or
starts over when none does; both engines keep ``keep_checkpoints`` checkpoints to fall back to."""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from luffy.config import VerlConfig, resolve_train_config, to_dict
from luffy.engines.base import TrainJob, torch_file_problem
from luffy.engines.local import checkpoint
from luffy.engines.local.engine import LocalEngine

SETTINGS = {"algorithm": "luffy", "steps": 4, "prompts_per_step": 2, "n": 2, "max_response_tokens": 64,
            "checkpoint_every": 2, "mini_batches": 1, "lr": 1.0e-3}


def truncate(path: Path) -> None:
    """Cut a file to half its length, as a write that ran out of disk or time leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "checkpoint" in r.getMessage()]


def weights_equal(a: Path, b: Path) -> bool:
    x, y = torch.load(a), torch.load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- the local engine, through `luffy train` ----

def luffy_train(tiny_model_dir, data, root: Path, env) -> subprocess.CompletedProcess:
    return subprocess.run(["luffy", "train", "--settings", json.dumps(SETTINGS), "--data", data, "--base-model",
                           tiny_model_dir, "--out-dir", str(root / "final"), "--metrics", str(root / "metrics.jsonl"),
                           "--work-dir", str(root / "work"), "--threads", "1", "--group", "fallback-test"],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, train_parquet, tmp_path):
    """The newest checkpoint's model.pt cut short: the rerun warns once, naming the file, resumes
    from the checkpoint before it and ends with the weights of a run resumed from that one (and
    of the uninterrupted run)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    subprocess.run(["luffy", "init-tracking", "--resolved-config", json.dumps(
        {"data": {}, "base_model": {}, "evaluation": {}, "experiments": {}})], env=env, check=True)
    data = train_parquet(8)
    straight = tmp_path / "straight"
    first = luffy_train(tiny_model_dir, data, straight, env)
    assert first.returncode == 0, first.stderr[-3000:]
    (work,) = (straight / "work").iterdir()
    assert sorted(p.name for p in work.glob("step_*")) == ["step_000002", "step_000004"]  # keep_checkpoints: 2

    truncated, earlier = tmp_path / "truncated", tmp_path / "earlier"
    for root in (truncated, earlier):
        shutil.copytree(straight / "work", root / "work")
    bad = truncated / "work" / work.name / "step_000004" / "model.pt"
    truncate(bad)
    shutil.rmtree(earlier / "work" / work.name / "step_000004")
    (earlier / "work" / work.name / "latest").write_text("step_000002")

    resumed = luffy_train(tiny_model_dir, data, truncated, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    warned = [line for line in resumed.stderr.splitlines() if "unreadable" in line]
    assert len(warned) == 1, resumed.stderr[-3000:]
    assert " WARNING " in warned[0]
    assert f"checkpoint file {bad} is unreadable (truncated or corrupt: " in warned[0]
    assert warned[0].endswith(f"; resuming from {bad.parent.parent / 'step_000002'}")
    assert "at step 2" in resumed.stderr

    reference = luffy_train(tiny_model_dir, data, earlier, env)
    assert reference.returncode == 0 and "unreadable" not in reference.stderr, reference.stderr[-3000:]
    assert weights_equal(truncated / "final" / "model.pt", earlier / "final" / "model.pt")
    assert weights_equal(truncated / "final" / "model.pt", straight / "final" / "model.pt")
    # the rerun wrote step 4 anew: every kept checkpoint reads again
    assert torch_file_problem(bad) is None


# ---- the local engine, through its train entry ----

def local_job(settings, data, model, root: Path) -> TrainJob:
    return TrainJob(experiment="x", settings=settings, data=data, base_model=model, out_dir=root / "final",
                    metrics_out=root / "metrics.jsonl", work_dir=root / "work", threads=1)


def train_locally(job: TrainJob) -> None:
    """What ``stages.train`` does with the engine: the MLflow run to resume, then training."""
    engine = LocalEngine()
    run_id = engine.resume_run_id(job.work_dir)
    engine.train(job, sink=lambda metrics, step: None, run_id=lambda: run_id or "run-1")


def test_keep_checkpoints_keeps_that_many(tiny_model_dir, train_parquet, tmp_path):
    settings = resolve_train_config("x", {}, {**SETTINGS, "checkpoint_every": 1, "keep_checkpoints": 3})
    job = local_job(settings, train_parquet(8), tiny_model_dir, tmp_path)
    train_locally(job)
    assert sorted(p.name for p in job.work_dir.glob("step_*")) == ["step_000002", "step_000003", "step_000004"]
    assert (job.work_dir / "latest").read_text() == "step_000004"


def test_with_no_readable_checkpoint_the_run_starts_over(tiny_model_dir, train_parquet, tmp_path, caplog):
    """Both kept checkpoints unreadable (a model.pt cut short, an empty optimizer.pt): one warning
    names them and says the run starts over; it ends where an uninterrupted run ends."""
    settings = resolve_train_config("x", {}, dict(SETTINGS))
    job = local_job(settings, train_parquet(8), tiny_model_dir, tmp_path)
    train_locally(job)
    straight = torch.load(job.out_dir / "model.pt")
    truncate(job.work_dir / "step_000004" / "model.pt")
    (job.work_dir / "step_000002" / "optimizer.pt").write_bytes(b"")

    with caplog.at_level(logging.INFO):
        train_locally(job)
    (warned,) = warnings_of(caplog)
    assert warned.startswith(f"checkpoint file {job.work_dir / 'step_000004' / 'model.pt'} is unreadable "
                             "(truncated or corrupt: not a whole zip archive, ")
    assert f"; checkpoint file {job.work_dir / 'step_000002' / 'optimizer.pt'} is unreadable (empty); " in warned
    assert warned.endswith("; no readable checkpoint left: starting over from step 0")
    resumed = torch.load(job.out_dir / "model.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert sorted(p.name for p in job.work_dir.glob("step_*")) == ["step_000002", "step_000004"]
    assert all(torch_file_problem(p) is None for p in job.work_dir.glob("step_*/*.pt"))


# ---- the local checkpoint files, one by one ----

def tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    return model, optimizer, scheduler


def saved_steps(work: Path, steps, keep: int = 5):
    model, optimizer, scheduler = tiny_state()
    weights = {}
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        checkpoint.save(work, step, model, optimizer, scheduler, {"run_id": f"run-{step}"}, keep=keep)
        weights[step] = model.weight.detach().clone()
    return weights


@pytest.mark.parametrize("damage,reason", [
    (lambda work: (work / "step_000003" / "state.json").write_text('{"step": 3, "run_'),
     "state.json is unreadable (not a checkpoint state: "),
    (lambda work: (work / "step_000003" / "scheduler.pt").unlink(), "scheduler.pt is unreadable (missing)"),
    (lambda work: (work / "step_000003" / "optimizer.pt").write_bytes(b"\0" * 64),
     "optimizer.pt is unreadable (truncated or corrupt: not a whole zip archive, 64 bytes)"),
])
def test_a_damaged_checkpoint_is_passed_over_for_the_one_before(tmp_path, caplog, damage, reason):
    """The MLflow run id and the weights both come from the checkpoint before the damaged one,
    with one warning for the two readers; a checkpoint that fails leaves the model untouched."""
    work = tmp_path / "work"
    weights = saved_steps(work, (1, 2, 3))
    damage(work)
    with caplog.at_level(logging.INFO):
        assert LocalEngine().resume_run_id(work) == "run-2"
        model, optimizer, scheduler = tiny_state()
        resumed = checkpoint.load_latest(work, model, optimizer, scheduler)
    assert resumed.step == 2 and torch.equal(model.weight, weights[2])
    (warned,) = warnings_of(caplog)
    assert warned.startswith(f"checkpoint file {work / 'step_000003'}/{reason}")
    assert warned.endswith(f"; resuming from {work / 'step_000002'}")


def test_latest_naming_a_missing_checkpoint_falls_back(tmp_path, caplog):
    work = tmp_path / "work"
    weights = saved_steps(work, (1, 2))
    (work / "latest").write_text("step_000007")
    with caplog.at_level(logging.INFO):
        model, optimizer, scheduler = tiny_state()
        assert checkpoint.load_latest(work, model, optimizer, scheduler).step == 2
    assert torch.equal(model.weight, weights[2])
    assert warnings_of(caplog) == [f"checkpoint {work / 'step_000007'} (named by {work / 'latest'}) does not exist; "
                                   f"resuming from {work / 'step_000002'}"]


def test_a_checkpoint_that_fails_to_load_leaves_the_model_untouched(tmp_path, caplog):
    """Its model.pt reads, its optimizer.pt does not: nothing of it is applied."""
    work = tmp_path / "work"
    saved_steps(work, (5,))
    truncate(work / "step_000005" / "optimizer.pt")
    model, optimizer, scheduler = tiny_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        assert checkpoint.load_latest(work, model, optimizer, scheduler) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {}
    (warned,) = warnings_of(caplog)
    assert warned.endswith("; no readable checkpoint left: starting over from step 0")


def test_saving_after_a_fall_back_drops_the_checkpoints_after_it(tmp_path):
    work = tmp_path / "work"
    saved_steps(work, (2, 4, 6), keep=3)
    saved_steps(work, (3,), keep=2)  # resumed from step 2 (4 and 6 unreadable): their directories go
    assert sorted(p.name for p in work.glob("step_*")) == ["step_000002", "step_000003"]


# ---- the verl engine: the checkpoint verl's tracker names, checked before verl starts ----

def verl_checkpoint(folder: Path, world: int = 1, sft: bool = False) -> None:
    """A checkpoint in verl's layout (FSDP shards per rank, the data loader's state), small files."""
    shards = folder if sft else folder / "actor"
    shards.mkdir(parents=True)
    for rank in range(world):
        for kind in ("model", "optim", "extra_state"):
            torch.save({"x": torch.ones(64)}, shards / f"{kind}_world_size_{world}_rank_{rank}.pt")
    (shards / "fsdp_config.json").write_text("{}")
    torch.save({"epoch": 0}, folder / ("data_0.pt" if sft else "data.pt"))


def test_verl_resumes_from_the_newest_readable_checkpoint(tmp_path, caplog):
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    from luffy.engines.verl.engine import TRACKER, resume_check

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        verl_checkpoint(root / f"global_step_{step}", world=2)
    (root / TRACKER).write_text("4")
    bad = root / "global_step_4" / "actor" / "model_world_size_2_rank_1.pt"
    truncate(bad)
    with caplog.at_level(logging.INFO):
        assert resume_check(root, sft=False) == 2
    (warned,) = warnings_of(caplog)
    assert warned == (f"checkpoint file {bad} is unreadable (truncated or corrupt: not a whole zip archive, "
                      f"{bad.stat().st_size} bytes); verl resumes from {root / 'global_step_2'} (its tracker "
                      f"{root / TRACKER} now names step 2)")
    # verl's own resume (trainer.resume_mode=auto) now finds the older checkpoint
    assert find_latest_ckpt_path(str(root)) == str(root / "global_step_2")
    caplog.clear()
    assert resume_check(root, sft=False) == 2 and warnings_of(caplog) == []  # readable now: nothing to say


def test_verl_starts_over_when_no_checkpoint_reads(tmp_path, caplog):
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    from luffy.engines.verl.engine import TRACKER, resume_check

    root = tmp_path / "checkpoints"
    for step in (3, 6):
        verl_checkpoint(root / f"global_step_{step}", sft=True)
    (root / TRACKER).write_text("")  # verl writes it in place: a kill can leave it empty
    (root / "global_step_6" / "model_world_size_1_rank_0.pt").unlink()
    truncate(root / "global_step_3" / "data_0.pt")
    with caplog.at_level(logging.INFO):
        assert resume_check(root, sft=True) is None
    (warned,) = warnings_of(caplog)
    assert warned.startswith(f"{root / TRACKER} names no checkpoint (''); checkpoint {root / 'global_step_6'} has "
                             "no model shards")
    assert f"; checkpoint file {root / 'global_step_3' / 'data_0.pt'} is unreadable (truncated or corrupt" in warned
    assert warned.endswith(f"; no readable checkpoint left: verl starts over from step 0 (its tracker "
                           f"{root / TRACKER} removed)")
    assert find_latest_ckpt_path(str(root)) is None


def test_verl_is_launched_after_the_check_with_its_resume_settings_unchanged(tiny_model_dir, train_parquet, tmp_path,
                                                                             monkeypatch, caplog):
    """Through the engine's train entry, verl's process standing in: at launch verl's resume
    (trainer.resume_mode=auto) finds the readable checkpoint, and the overrides are those of the
    first attempt (verl logs them as the MLflow run's parameters, which a resumed run may not
    change). Only verl's process is stood in (it records what verl would start from): the
    fallback is decided before launch, and verl's own ``find_latest_ckpt_path``, which its
    resume_mode=auto calls, runs for real; verl's loop resuming from it is the resume the
    verl_e2e tests run (tests/test_verl_e2e.py)."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    from luffy.engines.verl.engine import TRACKER, VerlEngine

    def overrides_of(command):
        return {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in command if "=" in o}

    launched = []

    def fake_verl(command, env, nodes, gpus, watch):
        values = overrides_of(command)
        root, steps = Path(values["trainer.default_local_dir"]), int(values["trainer.total_training_steps"])
        launched.append((values, find_latest_ckpt_path(str(root))))
        if not (root / f"global_step_{steps}").exists():
            verl_checkpoint(root / f"global_step_{steps}")
        (root / TRACKER).write_text(str(steps))
        with open(values["luffy.metrics_path"].strip("'"), "a") as fh:
            fh.write("".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in range(steps)))
        return 0

    monkeypatch.setattr(VerlEngine, "_launch", staticmethod(fake_verl))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    settings = resolve_train_config("luffy", {}, {"engine": "verl", "steps": 6, "micro_batch_tokens": 16384})
    job = TrainJob(experiment="luffy", settings=settings, data=train_parquet(8), base_model=tiny_model_dir,
                   out_dir=tmp_path / "final", metrics_out=tmp_path / "metrics.jsonl", work_dir=tmp_path / "work",
                   runtime=to_dict(VerlConfig()), nodes=1, gpus=8)
    root = job.work_dir.resolve() / "checkpoints"
    for step in (2, 4):
        verl_checkpoint(root / f"global_step_{step}")
    (root / TRACKER).write_text("4")
    bad = root / "global_step_4" / "data.pt"
    truncate(bad)

    engine = VerlEngine()
    with caplog.at_level(logging.INFO):
        engine.train(job, sink=lambda m, s: None, run_id=lambda: "run-1")
    ((values, resumes_from),) = launched
    assert resumes_from == str(root / "global_step_2")
    assert values["trainer.resume_mode"] == "auto" and "trainer.resume_from_path" not in values
    assert [o for o in engine.overrides(job)[1] if "resume" in o] == ["trainer.resume_mode=auto"]
    (warned,) = warnings_of(caplog)
    assert warned.startswith(f"checkpoint file {bad} is unreadable (truncated or corrupt: ")
    assert json.loads((job.out_dir / "checkpoint.json").read_text())["selected"]["verl_global_step"] == 6


def test_the_cheap_check_tells_a_whole_torch_file_from_a_cut_one(tmp_path):
    path = tmp_path / "x.pt"
    assert torch_file_problem(path) == "missing"
    torch.save({"w": torch.zeros(1000)}, path)
    assert torch_file_problem(path) is None
    truncate(path)
    assert torch_file_problem(path).startswith("truncated or corrupt: not a whole zip archive, ")
    path.write_bytes(b"")
    assert torch_file_problem(path) == "empty"
