"""Kill a training run after its first checkpoint; rerunning resumes and ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch


SETTINGS = {"algorithm": "luffy", "steps": 12, "prompts_per_step": 4, "n": 4, "max_response_tokens": 96,
            "checkpoint_every": 2, "mini_batches": 2, "lr": 1.0e-3, "loss_agg": "token_mean"}


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
    while not list((killed / "work").glob("*/latest")):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    (latest,) = (killed / "work").glob("*/latest")
    checkpoint_step = int(latest.read_text().split("_")[1])
    assert 2 <= checkpoint_step < SETTINGS["steps"]

    resumed = subprocess.run(train_command(tiny_model_dir, train_data, killed), env=env, capture_output=True,
                             text=True, check=True)
    assert f"at step {checkpoint_step}" in resumed.stderr

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
        history = client.get_metric_history(run.info.run_id, "reward/mean")
        assert sorted(m.step for m in history) == list(range(SETTINGS["steps"]))
        assert run.info.status == "FINISHED"
