import logging
import time

import pandas as pd

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
