"""The study's MLflow tracking server with authentication (``luffy tracking-server CONFIG``).

MLflow's own server with its basic-auth app (``mlflow server --app-name basic-auth``): every
request needs a user and password (anonymous ones get 401), and users hold permissions per
experiment (READ, EDIT, MANAGE). In ``tracking.server.dir`` (made 0700) the first start creates:

- ``secrets.json`` (0600): the admin's password and the server's session key, generated;
- ``basic_auth.ini``: the auth app's settings: its user store (``users.db``), the admin's name,
  and no permission by default (a user sees the experiments it created or was granted);
- ``runs.db`` and ``artifacts/``: the runs store and the artifacts, served by the server;
- ``server.log``: the server's log;

then the study user (``tracking.server.user``) with a generated password, written to
``tracking.credentials`` (0600, MLflow's own credentials layout), and the study's experiment,
created as that user, who therefore manages it. Later starts reuse all of it (a lost
credentials file gets a new password). ``--add-reader NAME`` gives another user read-only
access. Nothing printed or logged holds a password; the admin's and the session key reach the
server through its environment, readable by its owner only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

from luffy.config import TrackingConfig
from luffy.errors import EngineError
from luffy.tracking import (CREDENTIALS_SECTION, PASSWORD_KEY, USERNAME_KEY, TrackingAccessError, is_server,
                            read_credentials)

log = logging.getLogger(__name__)
ADMIN = "admin"
START_TIMEOUT_S = 180.0
API = "/api/2.0/mlflow"


@dataclass(frozen=True)
class ServerFiles:
    root: Path

    @property
    def secrets(self) -> Path:
        return self.root / "secrets.json"

    @property
    def auth_ini(self) -> Path:
        return self.root / "basic_auth.ini"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def reader(self, name: str) -> Path:
        return self.root / f"{name}.credentials"


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable and writable by its owner only (0600) from its first byte, whole
    or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def credentials_text(user: str, password: str) -> str:
    return f"[{CREDENTIALS_SECTION}]\n{USERNAME_KEY} = {user}\n{PASSWORD_KEY} = {password}\n"


def _secrets(files: ServerFiles) -> dict[str, str]:
    """The admin's password and the session key: read, or made on the first start."""
    if files.secrets.exists():
        try:
            found = json.loads(files.secrets.read_text())
            return {"admin_password": found["admin_password"], "session_key": found["session_key"]}
        except (ValueError, KeyError, TypeError):
            raise EngineError(f"{files.secrets}: not this server's secrets file (expected JSON with admin_password "
                              "and session_key); restore it, or move the server's folder away to start a new "
                              "one") from None
    made = {"admin_password": secrets.token_urlsafe(24), "session_key": secrets.token_urlsafe(32)}
    write_private(files.secrets, json.dumps(made))
    return made


def _public_uri(tracking: TrackingConfig) -> str:
    """The URI jobs reach the server at: ``tracking.uri`` when it names the server's port, else
    http://<host>:<port> (this machine's name when it listens on every interface)."""
    server = tracking.server
    if is_server(tracking.uri) and urlparse(tracking.uri).port == server.port:
        return tracking.uri.rstrip("/")
    host = socket.getfqdn() if server.host in ("0.0.0.0", "::") else server.host
    return f"http://{host}:{server.port}"


def _allowed_hosts(uri: str, port: int) -> str:
    """The Host headers the server answers (MLflow refuses others against DNS rebinding): the
    public URI's host and the loopback names, each with and without the port."""
    names = {urlparse(uri).hostname or "localhost", "localhost", "127.0.0.1"}
    return ",".join(sorted({*names, *(f"{n}:{port}" for n in names)}))


def _request(method: str, uri: str, path: str, auth: tuple[str, str], **kwargs) -> requests.Response:
    return requests.request(method, f"{uri}{path}", auth=auth, timeout=30, **kwargs)


def _ensure_user(uri: str, admin: tuple[str, str], user: str, credentials: Path) -> str:
    """The study user exists and ``credentials`` holds its working password; returns what was done."""
    found = _request("GET", uri, f"{API}/users/get", admin, params={"username": user})
    if found.status_code == 404:
        password = secrets.token_urlsafe(24)
        _expect(_request("POST", uri, f"{API}/users/create", admin, json={"username": user, "password": password}),
                f"create user {user}")
        write_private(credentials, credentials_text(user, password))
        return "created"
    _expect(found, f"look up user {user}")
    try:
        creds = read_credentials(str(credentials))
        if creds[0] == user and _works(uri, creds):
            return "kept"
    except TrackingAccessError:
        pass
    password = secrets.token_urlsafe(24)  # the file is lost, unreadable or stale: a new password
    _expect(_request("PATCH", uri, f"{API}/users/update-password", admin, json={"username": user,
                                                                                "password": password}),
            f"set user {user}'s password")
    write_private(credentials, credentials_text(user, password))
    return "given a new password"


def _works(uri: str, creds: tuple[str, str]) -> bool:
    return _request("GET", uri, f"{API}/experiments/search", creds, params={"max_results": 1}).status_code == 200


def _expect(answer: requests.Response, what: str) -> requests.Response:
    if answer.status_code != 200:
        raise EngineError(f"the tracking server refused to {what}: {answer.status_code} {answer.text[:300]}")
    return answer


def _experiment_id(uri: str, creds: tuple[str, str], name: str) -> str:
    """The study's experiment, created by ``creds``' user when missing (its creator manages it)."""
    found = _request("GET", uri, f"{API}/experiments/get-by-name", creds, params={"experiment_name": name})
    if found.status_code == 200:
        return found.json()["experiment"]["experiment_id"]
    return _expect(_request("POST", uri, f"{API}/experiments/create", creds, json={"name": name}),
                   f"create experiment {name}").json()["experiment_id"]


def _start(tracking: TrackingConfig, files: ServerFiles, uri: str) -> subprocess.Popen:
    server = tracking.server
    made = _secrets(files)
    files.auth_ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                              f"database_uri = sqlite:///{(files.root / 'users.db').resolve()}\n"
                              f"admin_username = {ADMIN}\n"
                              "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"sqlite:///{(files.root / 'runs.db').resolve()}",
               "--artifacts-destination", str((files.root / "artifacts").resolve()),
               "--host", server.host, "--port", str(server.port), "--workers", str(server.workers),
               "--allowed-hosts", _allowed_hosts(uri, server.port)]
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(files.auth_ini.resolve()),
           "MLFLOW_AUTH_ADMIN_PASSWORD": made["admin_password"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": made["session_key"]}
    with open(files.log, "a") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    began = time.monotonic()
    while time.monotonic() - began < START_TIMEOUT_S:
        if process.poll() is not None:
            tail = files.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty)"]
            raise EngineError(f"the MLflow server stopped at its start (exit status {process.returncode}); the "
                              f"last line of {files.log}: {tail[0]}")
        try:
            if requests.get(f"http://127.0.0.1:{server.port}/health", timeout=2).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.5)
    _stop(process)
    raise EngineError(f"the MLflow server did not answer within {START_TIMEOUT_S:.0f} s; see {files.log}")


def _stop(process: subprocess.Popen) -> None:
    """End the server and its workers (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def serve(tracking: TrackingConfig) -> None:
    """Start the study's server, set up its users on the first start, print where jobs reach it,
    and run until stopped (Ctrl-C or SIGTERM end it and its workers)."""
    if tracking.credentials is None:
        raise TrackingAccessError("config key 'tracking.credentials': name the file the study user's credentials go "
                                  "to (every stage reads it), e.g. ~/.luffy/<study>.credentials")
    files = ServerFiles(Path(tracking.server.dir))
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    uri = _public_uri(tracking)
    local = f"http://127.0.0.1:{tracking.server.port}"  # set-up calls from here, whatever the public name
    process = _start(tracking, files, uri)
    try:
        admin = (ADMIN, _secrets(files)["admin_password"])
        credentials = Path(tracking.credentials).expanduser().resolve()
        done = _ensure_user(local, admin, tracking.server.user, credentials)
        experiment = _experiment_id(local, read_credentials(str(credentials)), tracking.experiment)
        print(f"MLflow tracking server for experiment {tracking.experiment!r} (id {experiment}) at {uri}, "
              "authentication on", flush=True)
        print(f"  config: tracking: {{uri: {uri}, credentials: {credentials}}}", flush=True)
        print(f"  study user {tracking.server.user!r} ({done}); its credentials: {credentials} (0600)", flush=True)
        print(f"  admin and session secrets: {files.secrets.resolve()} (0600); server log: {files.log.resolve()}",
              flush=True)
        print("  read-only users: luffy tracking-server CONFIG --add-reader NAME; Ctrl-C stops the server", flush=True)
        if is_server(tracking.uri) and tracking.uri.rstrip("/") != uri:
            print(f"  note: tracking.uri is {tracking.uri}, not this server", flush=True)
        process.wait()
        raise EngineError(f"the MLflow server stopped (exit status {process.returncode}); see {files.log}")
    finally:
        _stop(process)


def add_reader(tracking: TrackingConfig, name: str) -> str:
    """On the running server: user ``name`` with READ on the study's experiment (a new password
    when it exists), its credentials in the server's folder (0600); returns what to tell."""
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise TrackingAccessError(f"--add-reader: {name!r} is not a user name (letters, digits, _ . -)")
    files = ServerFiles(Path(tracking.server.dir))
    if not files.secrets.exists():
        raise TrackingAccessError(f"{files.secrets}: not found; start the server first (luffy tracking-server CONFIG)")
    local = f"http://127.0.0.1:{tracking.server.port}"
    admin = (ADMIN, _secrets(files)["admin_password"])
    try:
        _expect(_request("GET", local, f"{API}/experiments/search", admin, params={"max_results": 1}), "answer")
    except requests.RequestException:
        raise EngineError(f"no tracking server answers at {local}; start it first (luffy tracking-server CONFIG)") \
            from None
    experiment = _experiment_id(local, admin, tracking.experiment)
    path = files.reader(name)
    _ensure_user(local, admin, name, path)
    _expect(_request("POST", local, "/api/3.0/mlflow/users/permissions/grant", admin,
                     json={"username": name, "resource_type": "experiment", "resource_id": experiment,
                           "permission": "READ"}), f"grant {name} READ")
    return (f"user {name!r} can read experiment {tracking.experiment!r} (id {experiment}) on {_public_uri(tracking)}; "
            f"its credentials: {path.resolve()} (0600)")

