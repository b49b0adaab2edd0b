"""The study's authenticated tracking server for tests, started as a user types it
(``luffy tracking-server CONFIG``) and stopped as a user does (SIGTERM, or Ctrl-C).

``authenticated_study(workdir, base_config)`` writes ``study.yaml`` (the base config with a
tracking section for a server on a free port, one worker) and yields a ``Study``: its config,
URI, credentials file, the server's printed lines and process. On exit the server gets SIGTERM
and must end, with its MLflow workers, within 60 s."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from luffy.tracking import read_credentials

LUFFY = str(Path(sys.executable).parent / "luffy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Study:
    workdir: Path
    config: Path
    uri: str
    credentials: Path
    server_dir: Path
    process: subprocess.Popen
    printed: str

    def user(self, path: Path | None = None) -> tuple[str, str]:
        """(user, password) from a credentials file (default: the study user's), read as the stages read it."""
        return read_credentials(str(path or self.credentials))


def start(workdir: Path, config: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``luffy tracking-server CONFIG`` in ``workdir``, until it printed that it is ready."""
    out = workdir / "tracking-server.out"
    with open(out, "w") as sink:
        process = subprocess.Popen([LUFFY, "tracking-server", str(config)], cwd=workdir, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        text = out.read_text()
        if "Ctrl-C stops the server" in text:
            return process, text
        if process.poll() is not None:
            raise AssertionError(f"luffy tracking-server ended (exit status {process.returncode}):\n{text}")
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"luffy tracking-server printed no ready line within {timeout} s:\n{out.read_text()}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to ``luffy tracking-server``, which must end its MLflow server and itself."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError("luffy tracking-server did not end within 60 s of SIGTERM")


@contextlib.contextmanager
def authenticated_study(workdir: Path, base_config: Path, experiment: str = "luffy-auth") -> Iterator[Study]:
    port = free_port()
    config = yaml.safe_load(base_config.read_text())
    config["tracking"] = {"uri": f"http://127.0.0.1:{port}", "experiment": experiment,
                          "credentials": "secrets/study.credentials",
                          "server": {"port": port, "dir": "tracking", "workers": 1}}
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    process, printed = start(workdir, path)
    try:
        yield Study(workdir, path, f"http://127.0.0.1:{port}", workdir / "secrets" / "study.credentials",
                    workdir / "tracking", process, printed)
    finally:
        stop(process)
