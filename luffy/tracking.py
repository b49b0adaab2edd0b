"""MLflow tracking: one parent run per run group (an experiment, or a shared group such as
``data``), each stage a child run tagged with its stage and Snakemake rule.

The store is initialised once (``init_tracking``, called by the workflow's ``onstart``); a
SQLite store is also created and migrated under a lock file, so stages started at once on a
store that was never initialised (jobs on a cluster, stages run by hand) never race. Each
stage opens a ``StageRun``; if the store cannot be reached, the stage goes on, its metrics
still land in the files next to its outputs, and a warning says so. A resumed training run
logs each step once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from luffy.config.checking import ConfigError
from luffy.errors import Cancelled, signals_deferred

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
GROUP_TAG = "luffy.group"
ROLE_TAG = "luffy.role"
HASH_TAG = "luffy.config_hash"
STAGE_TAG = "luffy.stage"
RULE_TAG = "snakemake.rule"
KIND_TAG = "luffy.kind"        # a parent's kind: model (a row of the comparison) or shared (data, report)
JOB_TAG = "luffy.job"          # a stage run's job (group/stage): its reruns share it
CURRENT_TAG = "luffy.current"  # 'true' on the newest parent of a group and the newest run of a job
MAX_PARAM_LENGTH = 6000

# An unreachable tracking server must cost seconds, not minutes of retries (a refused connection
# fails at once). A busy one must not look dead: a request waits up to 60 s for its answer, longer
# than a server on a SQLite store makes a write wait for the store's lock (MLflow's busy_timeout,
# 20 s), which sixteen stages writing at once on a loaded 2-core machine reached beside a 10 s limit.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


# the study user's credentials file (tracking.credentials), set by the workflow for every job
CREDENTIALS_ENV = "LUFFY_TRACKING_CREDENTIALS"
CREDENTIALS_SECTION = "mlflow"  # the file's layout is MLflow's own ~/.mlflow/credentials
USERNAME_KEY, PASSWORD_KEY = "mlflow_tracking_username", "mlflow_tracking_password"


class TrackingAccessError(ConfigError):
    """The tracking server cannot be used with the study's credentials: refused before any work."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def read_credentials(path: str) -> tuple[str, str]:
    """(user, password) from a credentials file in MLflow's layout ([mlflow] with
    mlflow_tracking_username and mlflow_tracking_password), which must be readable by its owner
    only: anything else is a ``TrackingAccessError`` naming the file (never the password)."""
    import configparser
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise TrackingAccessError(f"tracking credentials {path}: file not found (`luffy tracking-server` writes it "
                                  "on its first start)") from None
    if stat.S_IMODE(mode) & 0o077:
        raise TrackingAccessError(f"tracking credentials {path}: readable by others (mode "
                                  f"{stat.S_IMODE(mode):04o}); make it the owner's only: chmod 600 {path}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
        user, password = parser[CREDENTIALS_SECTION][USERNAME_KEY], parser[CREDENTIALS_SECTION][PASSWORD_KEY]
    except (configparser.Error, KeyError):
        raise TrackingAccessError(f"tracking credentials {path}: not a credentials file (expected "
                                  f"[{CREDENTIALS_SECTION}] with {USERNAME_KEY} and {PASSWORD_KEY})") from None
    if not user or not password:
        raise TrackingAccessError(f"tracking credentials {path}: empty {USERNAME_KEY} or {PASSWORD_KEY}")
    return user, password


def use_credentials(path: str | None = None) -> tuple[str, str] | None:
    """Authenticate this process's MLflow calls (and its children's) as the user in ``path``
    (default: the file ``LUFFY_TRACKING_CREDENTIALS`` names); None when no file is named. An
    explicit MLFLOW_TRACKING_USERNAME / _PASSWORD in the environment is left as it is."""
    path = path or os.environ.get(CREDENTIALS_ENV)
    if not path:
        return None
    user, password = read_credentials(path)
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")


def check_access() -> None:
    """Before a stage's work: with a tracking server, its credentials (``use_credentials``) are
    read and tried once on the study's experiment. Refused (401: no or wrong password; 403: no
    permission on the experiment) is a ``TrackingAccessError`` naming the credentials file, so
    the stage fails in one line before it starts, not hours later. A server that cannot be
    reached is left to ``StageRun`` (the stage goes on, its metrics in its files)."""
    uri = tracking_uri()
    if not is_server(uri):
        return
    import requests

    path = os.environ.get(CREDENTIALS_ENV)
    creds = use_credentials()
    try:
        answer = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": experiment_name()}, auth=creds, timeout=30)
    except requests.RequestException:
        return
    if answer.status_code == 401:
        if path:
            raise TrackingAccessError(f"the MLflow tracking server {uri} refused the credentials in {path} (401 "
                                      "Unauthorized): a wrong user or password")
        raise TrackingAccessError(f"the MLflow tracking server {uri} needs credentials (401 Unauthorized): set "
                                  "tracking.credentials to the file `luffy tracking-server` wrote")
    if answer.status_code == 403:
        raise TrackingAccessError(f"the MLflow tracking server {uri} refused user {creds[0] if creds else '?'} "
                                  f"(credentials {path}) the experiment {experiment_name()!r} (403 Permission denied)")


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "luffy")


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {'a.b.c': str(value)} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = str(obj)[:MAX_PARAM_LENGTH]
    return out


def _metric_key(name: str) -> str:
    """A metric name MLflow accepts: avg@32 -> avg_at_32, then any character MLflow refuses
    (it takes letters, digits, _ - . / : and spaces) -> '_', e.g. 'Avg (math)' -> 'Avg _math_'."""
    return re.sub(r"[^\w.\-/: ]", "_", name.replace("@", "_at_"))


def config_hash(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _DeferringClient:
    """An MlflowClient whose calls finish before a stop signal takes effect (``signals_deferred``):
    a run cancelled in the middle of a write can still be marked KILLED."""

    def __init__(self, client):
        self._inner = client

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with signals_deferred():
                return attr(*args, **kwargs)

        return call


def _client():
    from mlflow.tracking import MlflowClient

    return _DeferringClient(MlflowClient(tracking_uri=tracking_uri()))


STORE_LOCK_WAIT_S = 600.0


@contextlib.contextmanager
def _store_lock() -> Iterator[None]:
    """For a SQLite store, a lock file next to the database while it is created or migrated
    and while experiments and parent runs are looked up or made: stages started at once on a
    store that was never initialised (cluster jobs, stages run by hand) would otherwise race to
    create its tables and leave it broken. A server store needs none."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    from luffy.io import exclusive

    database = Path(uri[len("sqlite:///"):])
    with exclusive(database.with_name(database.name + ".lock"), f"MLflow store {database}", wait_s=STORE_LOCK_WAIT_S):
        yield


def logged_through(run_id: str | None, key: str | None = None) -> int | None:
    """The last step an MLflow run holds any metric of (or the metric ``key`` of; None: no run, no
    metrics, or no store)."""
    if not run_id:
        return None
    try:
        client = _client()
        keys = [key] if key else list(client.get_run(run_id).data.metrics)
        steps = [m.step for key in keys for m in client.get_metric_history(run_id, key)]
        return max(steps) if steps else None
    except Exception as err:  # noqa: BLE001 - tracking is best-effort
        log.warning("MLflow run %s: cannot read its logged steps (%s); steps may be logged twice", run_id, err)
        return None


class OnceLogger:
    """A metrics logger (``log(data, step)``) that logs at ``step - shift`` (verl counts steps
    from 1, this pipeline from 0) and passes over the steps through ``through``, which its run
    already holds (a resumed run repeats the steps after its checkpoint)."""

    def __init__(self, inner: Any, through: int | None, shift: int = 0):
        self.inner, self.through, self.shift = inner, through, shift

    def log(self, data: dict[str, Any], step: int, *args: Any, **kwargs: Any) -> Any:
        step -= self.shift
        if self.through is not None and step <= self.through:
            return None
        return self.inner.log(data, step, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _experiment_id(client) -> str:
    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - made meanwhile by another stage (a server store takes no lock)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _supersede(client, experiment_id: str, filter_string: str, keep: str) -> None:
    """Mark every current run matching ``filter_string`` but ``keep`` as superseded (a rerun's
    older runs stay in the store, out of the comparison's filter). Best-effort: runs of one job
    started at once (never in a workflow) may race for the same tag; logging goes on."""
    try:
        for run in client.search_runs([experiment_id], max_results=1000,
                                      filter_string=f"{filter_string} and tags.`{CURRENT_TAG}` = 'true'"):
            if run.info.run_id != keep:
                client.set_tag(run.info.run_id, CURRENT_TAG, "false")
                client.set_tag(run.info.run_id, "luffy.superseded_by", keep)
    except Exception as err:  # noqa: BLE001 - the older run keeps its mark; nothing is lost
        log.info("could not mark the older runs of %s as superseded (%s)", filter_string, err)


def _latest_parent(client, experiment_id: str, group: str):
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{GROUP_TAG}` = '{group}' and tags.`{ROLE_TAG}` = 'parent'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def _create_parent(client, experiment_id: str, group: str, settings: dict[str, Any], kind: str = "shared") -> str:
    run = client.create_run(experiment_id, run_name=group, tags={
        GROUP_TAG: group, ROLE_TAG: "parent", HASH_TAG: config_hash(settings), KIND_TAG: kind, CURRENT_TAG: "true"})
    _log_params(client, run.info.run_id, flatten(settings))
    client.set_terminated(run.info.run_id, "FINISHED")
    _supersede(client, experiment_id, f"tags.`{GROUP_TAG}` = '{group}' and tags.`{ROLE_TAG}` = 'parent'",
               run.info.run_id)
    return run.info.run_id


def init_tracking(groups: dict[str, dict[str, Any]], models: Iterable[str] = (),
                  views: dict[str, dict[str, Any]] | None = None) -> None:
    """Create the store, the experiment and a parent run per group (a new parent when the
    group's resolved settings changed; ``models``: the groups that are models, one row each in
    the comparison), and store the comparison ``views`` (luffy.compare). Never raises: tracking
    is best-effort."""
    try:
        with _store_lock():
            experiment_id = _init_groups(groups, set(models))
            if views:
                set_views(_client(), experiment_id, views)
        log.info("MLflow tracking ready at %s (experiment %s)", tracking_uri(), experiment_name())
    except Exception as err:  # noqa: BLE001 - any store failure means "run without MLflow"
        log.warning("MLflow store %s not usable (%s); stages will write local metrics only", tracking_uri(), err)


def _init_groups(groups: dict[str, dict[str, Any]], models: set[str]) -> str:
    client = _client()
    experiment_id = _experiment_id(client)
    for group, settings in groups.items():
        parent = _latest_parent(client, experiment_id, group)
        if parent is None or parent.data.tags.get(HASH_TAG) != config_hash(settings):
            _create_parent(client, experiment_id, group, settings, "model" if group in models else "shared")
    return experiment_id


VIEW_TAG = "mlflow.sharedViewState."  # + key: a stored view of the runs page (MLflow's shared views)


def set_views(client, experiment_id: str, views: dict[str, dict[str, Any]]) -> None:
    """Store each view (name, the runs page's state) as the experiment tag MLflow's UI opens
    with ``viewStateShareKey=<key>``."""
    now = int(time.time() * 1000)
    for key, view in views.items():
        client.set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(
            {"name": view["name"], "createdAt": now, "updatedAt": now, "state": json.dumps(view["state"])}))


class StageRun:
    """A child run for one stage. Every MLflow call is best-effort: on the first failure the
    run warns once and continues without MLflow (the stage's files still hold everything)."""

    def __init__(self, stage: str, group: str, rule: str | None = None, params: dict[str, Any] | None = None,
                 resume_run_id: str | None = None, job: str | None = None):
        self.stage, self.group, self.rule = stage, group, rule or stage
        self.job = job or f"{group}/{stage}"  # its reruns share it: the newest is the current one
        self.params = params or {}
        self.resume_run_id = resume_run_id
        self.client = None
        self.run_id: str | None = None
        self.logged_through: int | None = None  # a resumed run: the last step it already holds

    def _disable(self, err: Exception) -> None:
        log.warning("MLflow logging disabled for stage %s (%s: %s); metrics are kept next to the outputs",
                    self.stage, type(err).__name__, err)
        self.client = None

    def __enter__(self) -> "StageRun":
        try:
            with _store_lock():
                self.client = _client()
                if self.resume_run_id:
                    self.client.update_run(self.resume_run_id, status="RUNNING")
                    self.run_id = self.resume_run_id
                    self.logged_through = logged_through(self.run_id)
                    return self
                experiment_id = _experiment_id(self.client)
                parent = _latest_parent(self.client, experiment_id, self.group)
                parent_id = parent.info.run_id if parent else _create_parent(self.client, experiment_id, self.group,
                                                                             {})
                run = self.client.create_run(experiment_id, run_name=f"{self.group}/{self.stage}", tags={
                    "mlflow.parentRunId": parent_id, GROUP_TAG: self.group, ROLE_TAG: "stage",
                    STAGE_TAG: self.stage, RULE_TAG: self.rule, JOB_TAG: self.job, CURRENT_TAG: "true"})
                self.run_id = run.info.run_id
                _supersede(self.client, experiment_id, f"tags.`{JOB_TAG}` = '{self.job}'", self.run_id)
            _log_params(self.client, self.run_id, flatten(self.params))
        except Exception as err:  # noqa: BLE001
            self._disable(err)
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics at ``step`` (None: 0); a resumed run passes over the steps it already holds,
        so each step is logged once."""
        if self.client is None or (self.logged_through is not None and (step or 0) <= self.logged_through):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        try:
            self.client.log_batch(self.run_id, metrics=items)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def log_to_parent(self, metrics: dict[str, float]) -> None:
        """Headline figures on the group's parent run, where the MLflow UI's runs table and
        charts compare experiments without opening their child runs."""
        if self.client is None or self.run_id is None:
            return
        try:
            parent = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
            if parent is None:
                return
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(parent, metrics=[Metric(_metric_key(k), float(v), now, 0)
                                                   for k, v in metrics.items() if v is not None])
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def log_artifacts(self, paths: Iterable[str], artifact_path: str | None = None) -> None:
        if self.client is None:
            return
        try:
            for path in paths:
                if os.path.isdir(path):
                    self.client.log_artifacts(self.run_id, path, artifact_path)
                elif os.path.exists(path):
                    self.client.log_artifact(self.run_id, path, artifact_path)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.client is None or self.run_id is None:
            return
        try:
            status = "FINISHED" if exc_type is None else "FAILED"
            if exc_type is not None and issubclass(exc_type, (Cancelled, KeyboardInterrupt)):
                status = "KILLED"  # stopped by a signal (kill, scancel, Ctrl-C), not failed
            self.client.set_terminated(self.run_id, status)
        except Exception as err:  # noqa: BLE001
            self._disable(err)
