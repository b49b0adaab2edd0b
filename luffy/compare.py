"""The study's comparison in the MLflow UI, one URL away: ``luffy compare <config>``.

MLflow 3's UI opens an experiment on a GenAI traces overview and shows no metric columns
until they are ticked; what it does restore from a URL is a stored view (an experiment tag
``mlflow.sharedViewState.<key>``, opened with ``viewStateShareKey=<key>``) in the "Model
training" layout (``workflowType=machine_learning``). ``init-tracking`` stores two:

- ``luffy-models``: one row per model (the current parent run of each model group; the
  ``data`` and ``report`` groups and superseded runs are filtered out), with each suite's
  accuracy and its 95% interval in percent, as in the report, and the end-of-training figures;
- ``luffy-curves``: the current training run of every experiment, as charts (one chart per
  training metric, every experiment's curve on it).

``luffy compare`` prints both URLs for the config's store; with ``--serve`` it also starts
``mlflow ui`` on a SQLite store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from luffy.algo import metrics as names
from luffy.tracking import CURRENT_TAG, KIND_TAG, STAGE_TAG, _metric_key, is_server

MODELS_VIEW, CURVES_VIEW = "luffy-models", "luffy-curves"
# the figures each model's parent run carries (the evaluate and train stages log them there)
HEADLINE_EVAL = ("accuracy", "accuracy_ci_low", "accuracy_ci_high")  # a suite's, logged in percent:
SUITE_FIGURES = tuple(key.replace("accuracy", "accuracy_pct") for key in HEADLINE_EVAL)
HEADLINE_TRAIN = (names.REWARD_ON_POLICY, names.ENTROPY, names.LOSS_SFT)  # at the end of training, as:
TRAIN_FIGURES = tuple(f"train/final_{key.replace('/', '_')}" for key in HEADLINE_TRAIN)
CURVES = "reward|entropy|loss|accuracy|off_policy|response_length"  # the chart view's metric filter (a regex)
DEFAULT_PORT = 5000


def suite_headline(suite: str, metrics: dict[str, Any]) -> dict[str, float]:
    """A suite's figures for its model's parent run: accuracy and its interval in percent, as in
    the report (the suite's JSON and the evaluate run keep fractions)."""
    return {f"{suite}/{figure}": 100.0 * metrics[key] for key, figure in zip(HEADLINE_EVAL, SUITE_FIGURES)}


def training_headline(lines: list[dict[str, Any]], last: int = 10) -> dict[str, float]:
    """A training run's figures for its parent run: the mean of each headline metric over its
    last ``last`` steps, as ``train/final_<metric>``."""
    out = {}
    for key, figure in zip(HEADLINE_TRAIN, TRAIN_FIGURES):
        values = [line[key] for line in lines[-last:] if isinstance(line.get(key), (int, float))]
        if values:
            out[figure] = sum(values) / len(values)
    return out


def _metric(name: str) -> str:
    return f"metrics.`{_metric_key(name)}`"


def views(suites: list[str]) -> dict[str, dict[str, Any]]:
    """The two stored views of a study with these evaluation suites."""
    columns = [_metric(f"{suite}/{figure}") for suite in suites for figure in SUITE_FIGURES]
    columns += [_metric(name) for name in TRAIN_FIGURES]
    by_name = {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": True}
    return {
        MODELS_VIEW: {"name": "LUFFY: models (accuracy %, 95% interval)", "state": {
            "searchFilter": f"tags.`{KIND_TAG}` = 'model' and tags.`{CURRENT_TAG}` = 'true'",
            "selectedColumns": columns, **by_name}},
        CURVES_VIEW: {"name": "LUFFY: training curves", "state": {
            "searchFilter": f"tags.`{STAGE_TAG}` = 'train' and tags.`{CURRENT_TAG}` = 'true'",
            "chartsSearchFilter": CURVES, "runsHiddenMode": "SHOW_ALL", **by_name}},
    }


def ui_base(tracking_uri: str, port: int = DEFAULT_PORT) -> str:
    """Where the UI of this store is: the tracking server itself, or ``mlflow ui`` on this machine."""
    if is_server(tracking_uri):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


def urls(base: str, experiment_id: str) -> dict[str, str]:
    page = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return {MODELS_VIEW: f"{page}&viewStateShareKey={MODELS_VIEW}",
            CURVES_VIEW: f"{page}&compareRunsMode=CHART&viewStateShareKey={CURVES_VIEW}"}


def compare(tracking_uri: str, experiment: str, suites: list[str], port: int = DEFAULT_PORT,
            serve: bool = False) -> dict[str, str]:
    """Store the views in ``experiment`` (again: a config's suites may have changed), print their
    URLs, and with ``serve`` run ``mlflow ui`` on the store until interrupted."""
    from mlflow.tracking import MlflowClient

    from luffy.config import ConfigError
    from luffy.tracking import set_views

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"MLflow experiment {experiment!r} is not in {tracking_uri} (has the workflow run?)")
    set_views(client, found.experiment_id, views(suites))
    links = urls(ui_base(tracking_uri, port), found.experiment_id)
    print(f"models, accuracy (%) per suite: {links[MODELS_VIEW]}")
    print(f"training curves:                {links[CURVES_VIEW]}", flush=True)
    if serve:
        if is_server(tracking_uri):
            raise ConfigError(f"--serve: {tracking_uri} is a tracking server with its own UI; open the URLs above")
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        subprocess.run([mlflow if os.path.exists(mlflow) else "mlflow", "ui", "--backend-store-uri", tracking_uri,
                        "--host", "127.0.0.1", "--port", str(port)], check=False)
    return links
