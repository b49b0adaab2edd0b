"""The study's authenticated tracking server (``luffy tracking-server``) against MLflow's real
server with its basic-auth app on 127.0.0.1: refused without credentials, the study user's
stages logging, a read-only user reading and refused a write, a wrong credential refusing a
stage before its work, the secrets kept to their owner and out of every log and parameter,
and a restart that keeps the users."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from luffy.config import ConfigError, load_config, to_dict
from luffy.tracking import TrackingAccessError, read_credentials
from luffy.tracking_server import credentials_text, write_private
from tracking_server import LUFFY, authenticated_study, start, stop

MICRO = Path(__file__).with_name("micro.yaml")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- the credentials file and the config (no server) ----

def test_a_credentials_file_must_be_its_owners_alone_and_whole(tmp_path):
    path = tmp_path / "study.credentials"
    write_private(path, credentials_text("luffy", "s3cret"))
    assert mode(path) == 0o600 and read_credentials(str(path)) == ("luffy", "s3cret")
    os.chmod(path, 0o644)
    with pytest.raises(TrackingAccessError, match=r"readable by others \(mode 0644\); make it the owner's only: "
                                                  r"chmod 600"):
        read_credentials(str(path))
    with pytest.raises(TrackingAccessError, match="file not found"):
        read_credentials(str(tmp_path / "none"))
    write_private(path, "user = luffy\n")
    with pytest.raises(TrackingAccessError, match=r"not a credentials file \(expected \[mlflow\]"):
        read_credentials(str(path))


def test_credentials_belong_to_a_tracking_server():
    suites = {"s": {"source": "toy:id"}}
    with pytest.raises(ConfigError, match="'tracking.credentials': credentials are for a tracking server"):
        load_config({"tracking": {"credentials": "c"}, "evaluation": {"suites": suites}})
    with pytest.raises(ConfigError, match="'tracking.server.user'"):
        load_config({"tracking": {"server": {"user": "a b"}}, "evaluation": {"suites": suites}})
    with pytest.raises(ConfigError, match="'tracking.server.port'"):
        load_config({"tracking": {"server": {"port": 70000}}, "evaluation": {"suites": suites}})


# ---- against the real server ----

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    with authenticated_study(tmp_path_factory.mktemp("study"), MICRO) as found:
        yield found


def stage_env(study, credentials: Path | None) -> dict[str, str]:
    """A job's environment as the workflow gives it (common.smk): the server, the experiment and
    the credentials file from the config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_"))}
    env.update({"MLFLOW_TRACKING_URI": study.uri, "MLFLOW_EXPERIMENT_NAME": "luffy-auth"})
    if credentials is not None:
        env["LUFFY_TRACKING_CREDENTIALS"] = str(credentials)
    return env


def toy_stage(study, out: str, credentials: Path | None, log: Path | None = None) -> subprocess.CompletedProcess:
    settings = json.dumps(to_dict(load_config(yaml.safe_load(study.config.read_text())).root.data))
    return subprocess.run([LUFFY, "make-toy-traces", "--settings", settings, "--out-dir", out, "--group", "data",
                           *(["--log", str(log)] if log else [])], cwd=study.workdir,
                          env=stage_env(study, credentials), capture_output=True, text=True, timeout=300)


def client(study, creds: tuple[str, str]):
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = creds
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=study.uri)


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    yield
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)


@pytest.mark.slow
def test_the_server_keeps_its_secrets_to_its_owner_and_refuses_anonymous_requests(study):
    user, password = study.user()
    admin = json.loads((study.server_dir / "secrets.json").read_text())["admin_password"]
    assert mode(study.server_dir) == 0o700
    assert mode(study.server_dir / "secrets.json") == 0o600 and mode(study.credentials) == 0o600
    assert user == "luffy" and f"tracking: {{uri: {study.uri}, credentials: {study.credentials}}}" in study.printed
    assert "study user 'luffy' (created)" in study.printed
    assert password not in study.printed and admin not in study.printed
    api = f"{study.uri}/api/2.0/mlflow"
    for method, path, body in (("GET", "/experiments/search?max_results=5", None),
                               ("POST", "/runs/create", {"experiment_id": "1"}),
                               ("POST", "/runs/delete", {"run_id": "0" * 32}),
                               ("POST", "/experiments/delete", {"experiment_id": "1"})):
        answer = requests.request(method, api + path, json=body, timeout=30)
        assert answer.status_code == 401, (method, path, answer.status_code)
    # the study user, authenticated, is served
    assert requests.get(api + "/experiments/get-by-name", params={"experiment_name": "luffy-auth"},
                        auth=(user, password), timeout=30).status_code == 200


@pytest.mark.slow
def test_a_stage_logs_as_the_study_user_and_a_reader_reads_but_cannot_write(study, clean_mlflow_env):
    log = study.workdir / "stage.log"
    done = toy_stage(study, "toy", study.credentials, log)
    assert done.returncode == 0, done.stderr[-2000:]
    owner = client(study, study.user())
    experiment = owner.get_experiment_by_name("luffy-auth")
    runs = owner.search_runs([experiment.experiment_id], "tags.`luffy.stage` = 'make_toy_traces'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params

    added = subprocess.run([LUFFY, "tracking-server", str(study.config), "--add-reader", "viewer"],
                           cwd=study.workdir, capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr[-2000:]
    reader_file = study.server_dir / "viewer.credentials"
    assert f"its credentials: {reader_file} (0600)" in added.stdout and mode(reader_file) == 0o600
    reader = study.user(reader_file)
    assert reader[0] == "viewer" and reader[1] not in added.stdout + added.stderr

    api, run_id = f"{study.uri}/api/2.0/mlflow", runs[0].info.run_id
    assert requests.get(api + "/runs/get", params={"run_id": run_id}, auth=reader, timeout=30).status_code == 200
    for path, body in (("/runs/create", {"experiment_id": experiment.experiment_id}),
                       ("/runs/delete", {"run_id": run_id}),
                       ("/runs/set-tag", {"run_id": run_id, "key": "k", "value": "v"}),
                       ("/experiments/delete", {"experiment_id": experiment.experiment_id})):
        answer = requests.post(api + path, json=body, auth=reader, timeout=30)
        assert answer.status_code == 403, (path, answer.status_code)
    assert owner.get_run(run_id).info.lifecycle_stage == "active"

    # no password in any log, output or MLflow parameter
    admin = json.loads((study.server_dir / "secrets.json").read_text())["admin_password"]
    secrets = [study.user()[1], reader[1], admin]
    texts = [log.read_text(), done.stdout, done.stderr, (study.server_dir / "server.log").read_text(),
             (study.workdir / "tracking-server.out").read_text(),
             json.dumps([r.data.params for r in owner.search_runs([experiment.experiment_id])])]
    for secret in secrets:
        assert not any(secret in text for text in texts)


@pytest.mark.slow
def test_a_stage_with_a_wrong_or_missing_credential_fails_in_one_line_before_its_work(study, tmp_path):
    wrong = tmp_path / "wrong.credentials"
    write_private(wrong, credentials_text("luffy", "not-the-password"))
    cases = {wrong: f"refused the credentials in {wrong} (401 Unauthorized)",
             tmp_path / "missing.credentials": f"tracking credentials {tmp_path / 'missing.credentials'}: file not "
                                               "found",
             None: "needs credentials (401 Unauthorized): set tracking.credentials"}
    for n, (credentials, message) in enumerate(cases.items()):
        done = toy_stage(study, f"refused{n}", credentials)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("luffy make-toy-traces: error: ") and message in lines[0], \
            done.stderr
        assert not (study.workdir / f"refused{n}").exists()  # refused before any output


@pytest.mark.slow
def test_a_restarted_server_keeps_its_users_and_renews_a_lost_credentials_file(tmp_path):
    with authenticated_study(tmp_path, MICRO) as first:
        old = first.user()
    process, printed = start(tmp_path, first.config)
    try:
        assert "study user 'luffy' (kept)" in printed
        assert first.user() == old
    finally:
        stop(process)
    first.credentials.unlink()
    process, printed = start(tmp_path, first.config)
    try:
        assert "study user 'luffy' (given a new password)" in printed
        new = first.user()
        api = f"{first.uri}/api/2.0/mlflow/experiments/search"
        assert requests.get(api, params={"max_results": 1}, auth=new, timeout=30).status_code == 200
        assert requests.get(api, params={"max_results": 1}, auth=old, timeout=30).status_code == 401
    finally:
        stop(process)
    assert process.returncode is not None
    port = int(first.uri.rsplit(":", 1)[1])
    with pytest.raises(requests.ConnectionError):  # the server and its workers ended with it
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
