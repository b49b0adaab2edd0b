import logging
import time

import pandas as pd
import pytest

from luffy.config import DataConfig, ToyTaskConfig
from luffy.stages import make_toy_traces
from luffy.tracking import StageRun, flatten


def test_flatten_nested_settings():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {"a.b": "1", "a.c.d": "x", "e": "None"}


def test_unreachable_store_warns_and_the_stage_still_completes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    settings = DataConfig(system_prompt="S", toy=ToyTaskConfig(n_train=5, n_pretrain=5, n_eval_id=3, n_eval_ood=3))
    began = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        make_toy_traces(settings, str(tmp_path / "toy"), group="data", rule="make_toy_traces")
    assert time.perf_counter() - began < 60
    assert "MLflow logging disabled" in caplog.text
    assert len(pd.read_parquet(tmp_path / "toy" / "raw_traces.parquet")) == 5
    with StageRun("x", "g") as run:
        run.log_metrics({"a": 1.0}, step=0)  # a no-op, not an error
        assert run.run_id is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # an MLflow server and 16 processes importing MLflow at once: a minute on 2 cores
def test_sixteen_concurrent_stages_log_every_run_and_metric_through_a_tracking_server(tmp_path):
    """Jobs on several nodes share one store through an MLflow tracking server (a SQLite file
    written by many processes at once is not safe); every run and every metric arrives."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from luffy.tracking import init_tracking

    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/store.db",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the tracking server did not start"
                time.sleep(0.5)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "concurrent"}
        os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="concurrent")
        try:
            init_tracking({f"g{g}": {"group": g} for g in range(4)})
        finally:
            del os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"]
        code = ("import sys\nfrom luffy.tracking import StageRun\ni = int(sys.argv[1])\n"
                "with StageRun('stage', f'g{i % 4}', params={'job': i}) as run:\n"
                "    for step in range(25):\n"
                "        run.log_metrics({'value': float(step), 'job': float(i)}, step)\n"
                "    assert run.client is not None, 'logging was disabled'\n")
        jobs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stderr=subprocess.PIPE, text=True)
                for i in range(16)]
        for job in jobs:
            _, err = job.communicate(timeout=600)
            assert job.returncode == 0 and "MLflow logging disabled" not in err, err[-2000:]
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id],
                                  filter_string="tags.`luffy.role` = 'stage'")
        assert sorted(int(r.data.params["job"]) for r in runs) == list(range(16))
        for run in runs:
            assert run.info.status == "FINISHED"
            assert [m.value for m in client.get_metric_history(run.info.run_id, "value")] == [float(s) for s in range(25)]
            parent = run.data.tags["mlflow.parentRunId"]
            assert client.get_run(parent).data.tags["luffy.group"] == run.data.tags["luffy.group"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # eight stages at once on 2 cores: half a minute
def test_stages_started_at_once_on_an_uninitialised_store_keep_every_run(tmp_path):
    """Eight `luffy make-toy-traces` started together on a SQLite store nobody initialised: each
    logs its run (no lost runs, no 'MLflow logging disabled') and the store stays usable."""
    import json
    import os
    import subprocess

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/fresh.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "race"}
    settings = json.dumps({"toy": {"n_train": 5, "n_pretrain": 5, "n_eval_id": 2, "n_eval_ood": 2}})
    jobs = [subprocess.Popen(["luffy", "make-toy-traces", "--settings", settings, "--out-dir", str(tmp_path / f"o{i}"),
                              "--group", f"g{i % 3}"], env=env, stderr=subprocess.PIPE, text=True)
            for i in range(8)]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0 and "MLflow logging disabled" not in err and "not usable" not in err, err[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id],
                              filter_string="tags.`luffy.role` = 'stage'")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    parents = client.search_runs([client.get_experiment_by_name("race").experiment_id],
                                 filter_string="tags.`luffy.role` = 'parent'")
    assert sorted(p.data.tags["luffy.group"] for p in parents) == ["g0", "g1", "g2"]  # one parent per group


def test_verl_logger_of_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    """verl's own Tracking (MLflow backend) behind the LUFFY trainer's ``logger``: a resumed run
    repeats the steps after its checkpoint, and MLflow gets each step once, at our step numbers
    (verl's step 1 is our step 0, as in metrics.jsonl); the stage's preflight figures, logged at
    step 0 before verl starts, do not hide step 0."""
    from mlflow.tracking import MlflowClient
    from verl.utils.tracking import Tracking

    from luffy.engines.verl.trainer import LuffyTrainer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/verl.db")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("verl")).info.run_id
    client.log_metric(run_id, "preflight/seconds", 1.0, step=0)
    for attempt, steps in enumerate(((1, 2, 3), (3, 4, 5))):  # killed after step 3, resumed from checkpoint 2
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # as the engine sets it for each attempt (end_run unsets it)
        trainer = LuffyTrainer.__new__(LuffyTrainer)  # the attribute alone: no GPUs, no workers here
        trainer.logger = Tracking(project_name="verl", experiment_name="run", default_backend=["mlflow"])
        for step in steps:
            trainer.logger.log(data={"reward/mean": float(attempt), "training/global_step": step}, step=step)
        trainer.logger.finish()
    history = client.get_metric_history(run_id, "reward/mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]


def test_a_verl_steps_checkpoint_is_saved_after_its_metrics_are_logged(monkeypatch):
    """verl's loop saves a step's checkpoint (step 2 of its fit), then records the step (step 5:
    metrics.jsonl, MLflow). A run ended in between resumed after a step no record held (on two
    SLURM nodes, Ctrl-C just after checkpoint 1: MLflow never got step 0). The LUFFY trainer
    saves once the step is logged, also when logging fails."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from luffy.engines.verl.trainer import LuffyTrainer

    events = []

    class Logged:
        def log(self, data, step):
            events.append(("log", step))
            if data.get("fail"):
                raise ConnectionError("tracking server gone")

    monkeypatch.setattr(PPOTrainerSync, "_save_checkpoint", lambda self: events.append(("save", self.global_steps)))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    trainer = LuffyTrainer.__new__(LuffyTrainer)  # the attributes alone: no GPUs, no workers here
    trainer.logger = Logged()
    for trainer.global_steps in (1, 2):
        trainer._save_checkpoint()  # where verl's fit saves: the step is not recorded yet
        assert ("save", trainer.global_steps) not in events
        trainer.logger.log(data={"reward/mean": 0.5}, step=trainer.global_steps)
    trainer.logger.log(data={"reward/mean": 0.5}, step=3)  # a step without a checkpoint saves nothing
    trainer.global_steps = 4
    trainer._save_checkpoint()
    with pytest.raises(ConnectionError):
        trainer.logger.log(data={"fail": True}, step=4)
    assert events == [("log", 0), ("save", 1), ("log", 1), ("save", 2), ("log", 2), ("log", 3), ("save", 4)]


def test_a_signal_in_the_middle_of_a_tracking_write_lets_it_finish_then_the_run_is_killed(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) while a stage writes to the tracking store: the write completes (a
    write cut in half could leave the store locked and the run RUNNING), then the stage unwinds
    and its run is marked KILLED."""
    import os
    import signal

    from mlflow.tracking import MlflowClient

    from luffy.errors import Cancelled, cancellable

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    log_batch = MlflowClient.log_batch
    after_signal = []

    def signalled_mid_write(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the write runs
        after_signal.append("write")
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", signalled_mid_write)
    with pytest.raises(Cancelled), cancellable():
        with StageRun("train", "g") as run:
            run.log_metrics({"loss": 1.5}, step=0)
            after_signal.append("next step")
    assert after_signal == ["write"]  # the write finished; nothing after it ran
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [1.5]
