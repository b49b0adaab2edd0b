"""Faults during training, through `luffy train`: a run killed after a checkpoint (with a metrics
line cut off mid-write) resumes and ends where an uninterrupted run ends, logging each step
once; a work directory has one writer at a time; a full disk is named."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch


SETTINGS = {"algorithm": "luffy", "steps": 12, "prompts_per_step": 4, "n": 4, "max_response_tokens": 96,
            "checkpoint_every": 3, "mini_batches": 2, "lr": 1.0e-3, "loss_agg": "token_mean"}


@pytest.fixture(scope="module")
def train_data(train_parquet):
    return train_parquet(40)


def train_command(tiny_model_dir, data, root: Path):
    return ["luffy", "train", "--settings", json.dumps(SETTINGS), "--data", data, "--base-model", tiny_model_dir,
            "--out-dir", str(root / "final"), "--metrics", str(root / "metrics.jsonl"),
            "--work-dir", str(root / "work"), "--threads", "1", "--group", "resume-test"]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tiny_model_dir, train_data, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    subprocess.run(["luffy", "init-tracking", "--resolved-config", json.dumps(
        {"data": {}, "base_model": {}, "evaluation": {}, "experiments": {}})], env=env, check=True)

    straight = tmp_path / "straight"
    subprocess.run(train_command(tiny_model_dir, train_data, straight), env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(tiny_model_dir, train_data, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while logged_steps(killed) <= SETTINGS["checkpoint_every"]:  # a step after the first checkpoint is logged
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    (latest,) = (killed / "work").glob("*/latest")
    checkpoint_step = int(latest.read_text().split("_")[1])
    assert SETTINGS["checkpoint_every"] <= checkpoint_step < SETTINGS["steps"]
    assert logged_steps(killed) >= checkpoint_step, "killed right at a checkpoint: no step to repeat"
    (work_metrics,) = (killed / "work").glob("*/metrics.jsonl")
    with open(work_metrics, "a") as fh:  # a crash in the middle of a write
        fh.write('{"step": 7, "reward/me')

    resumed = subprocess.run(train_command(tiny_model_dir, train_data, killed), env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {checkpoint_step}" in resumed.stderr
    assert f"{work_metrics}: dropped its last line, cut off by an interrupted write" in resumed.stderr

    a = torch.load(straight / "final" / "model.pt")
    b = torch.load(killed / "final" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(SETTINGS["steps"]))

    # the resumed run continued the same MLflow run: one value per step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("luffy").experiment_id],
                              filter_string="tags.`luffy.stage` = 'train'")
    assert len(runs) == 2
    for run in runs:
        for key in ("reward/mean", "lr", "preflight/rows"):
            history = client.get_metric_history(run.info.run_id, key)
            expected = [0] if key.startswith("preflight/") else list(range(SETTINGS["steps"]))
            assert sorted(m.step for m in history) == expected, key
        assert run.info.status == "FINISHED"


def logged_steps(root: Path) -> int:
    """How many steps the run in ``root`` has logged to its work directory's metrics file."""
    files = list((root / "work").glob("*/metrics.jsonl"))
    return len(files[0].read_text().splitlines()) if files else 0


@pytest.mark.slow
def test_a_work_directory_has_one_writer(tiny_model_dir, train_data, tmp_path):
    """A second trainer on the same work directory (e.g. after a killed Snakemake left the first
    running and `--unlock` was used) fails at once, naming the process that writes it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    root = tmp_path / "run"
    long = [arg if arg != json.dumps(SETTINGS) else json.dumps({**SETTINGS, "steps": 100_000})
            for arg in train_command(tiny_model_dir, train_data, root)]
    first = subprocess.Popen(long, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while logged_steps(root) < 1:
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run(long, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by process " + str(first.pid) in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None, "the first trainer must go on"
        steps = [json.loads(line)["step"] for line in next((root / "work").glob("*/metrics.jsonl")).read_text().splitlines()]
        assert steps == list(range(len(steps)))
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_training_run_as_killed_in_one_line(tiny_model_dir, train_data, tmp_path, signum):
    """SIGTERM (kill, a job manager, SLURM's scancel) or Ctrl-C: `luffy train` unwinds, says so
    in one line, ends by the signal, and its MLflow run is KILLED, not left RUNNING."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    root = tmp_path / "run"
    long = [arg if arg != json.dumps(SETTINGS) else json.dumps({**SETTINGS, "steps": 100_000})
            for arg in train_command(tiny_model_dir, train_data, root)]
    # as typed in a terminal: SIGINT at its default (a test suite started in the background, with
    # `&`, passes it on ignored, and a command then keeps ignoring it, as it should)
    run = subprocess.Popen(long, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while logged_steps(root) < 1:
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.1)
    run.send_signal(signum)
    assert run.wait(timeout=120) == -signum  # ended by the signal after its cleanup (a shell: 128 + signum)
    name = signal.Signals(signum).name
    stderr = run.stderr.read()
    assert stderr.strip().splitlines()[-1].endswith(f"luffy train: cancelled by {name}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (train,) = client.search_runs([client.get_experiment_by_name("luffy").experiment_id],
                                  filter_string="tags.`luffy.stage` = 'train'")
    assert train.info.status == "KILLED", stderr[-3000:]
    assert "MLflow logging disabled" not in stderr  # every write before the signal finished


def test_a_full_disk_names_the_path(tiny_model_dir, train_data, tmp_path):
    """The work directory on a 300 KiB file system (a private mount): the first checkpoint does
    not fit, and the error says which path and that space ran out (not an iostream error)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    settings = {**SETTINGS, "steps": 2, "checkpoint_every": 1, "prompts_per_step": 2, "n": 2, "mini_batches": 1}
    command = [arg if arg != json.dumps(SETTINGS) else json.dumps(settings)
               for arg in train_command(tiny_model_dir, train_data, disk)]
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    probe = subprocess.run([*unshare, "mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {probe.stderr.strip()}")
    script = f"mount -t tmpfs -o size=300k tmpfs {disk} && exec " + " ".join(f"'{a}'" for a in command)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run([*unshare, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("luffy train: error: no space left on the device of " + str(disk / "work")), error
    assert "MiB free" in error
