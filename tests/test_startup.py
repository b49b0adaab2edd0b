"""The workflow's checks at start: the jobs' command, the SLURM status command, one study per
results folder. Through the real commands where they exist here (luffy --version, a missing
executable); SLURM's answers are given as recorded text (the real SLURM is exercised by
tests/test_slurm.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from luffy import startup
from luffy.config import ConfigError

LUFFY = str(Path(sys.executable).parent / "luffy")


def test_luffy_version_names_the_libraries_and_fails_without_them():
    done = subprocess.run([LUFFY, "--version"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("luffy 0.1.0 (python 3.") and "torch 2.13.0" in done.stdout

    # the same command where a job library is missing (the submitting environment's case)
    code = ("import sys, importlib.util as u; real = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'pyarrow' else real(n, *a); "
            "from luffy.cli import main; sys.exit(main(['--version']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "luffy: error: its environment lacks pyarrow (needed by the workflow's jobs)"


def test_job_command_problem_names_luffy_command(tmp_path):
    assert startup.job_command_problem(LUFFY, from_env=False) is None
    missing = startup.job_command_problem(str(tmp_path / "nope" / "luffy"), from_env=True)
    assert missing == (f"LUFFY_COMMAND={tmp_path}/nope/luffy: no such executable; set LUFFY_COMMAND to the luffy of "
                       f"the job environment (docs/slurm.md: Running on a SLURM cluster)")
    failing = tmp_path / "luffy"
    failing.write_text("#!/bin/sh\necho 'Traceback ...' >&2\necho \"ModuleNotFoundError: No module named 'pyarrow'\" >&2\n"
                       "exit 1\n")
    failing.chmod(0o755)
    problem = startup.job_command_problem(str(failing), from_env=False)
    assert problem.startswith(f"the jobs' command {failing} (LUFFY_COMMAND is not set) cannot run the jobs: "
                              "ModuleNotFoundError: No module named 'pyarrow'; set LUFFY_COMMAND")


def answers(sacct_rc: int, min_job_age: str | None):
    def run(command):
        if command[0] == "sacct":
            err = "" if sacct_rc == 0 else "sacct: error: Slurm accounting storage is disabled\n"
            return subprocess.CompletedProcess(command, sacct_rc, "", err)
        text = f"MaxJobCount             = 10000\nMinJobAge               = {min_job_age} sec\n" if min_job_age else ""
        return subprocess.CompletedProcess(command, 0, text, "")
    return run


def test_status_command_follows_what_the_cluster_answers():
    assert startup.slurm_status_command("sacct", 40, answers(0, "300")) == ("sacct", None)
    assert startup.slurm_status_command("squeue", 40, answers(0, "300")) == ("squeue", None)
    command, notice = startup.slurm_status_command("sacct", 40, answers(1, "300"))
    assert command == "squeue"
    assert notice == "SLURM accounting is off here (sacct: Slurm accounting storage is disabled): job states are read " \
                     "with squeue"
    assert startup.slurm_status_command("squeue", 40, answers(1, "3600")) == ("squeue", None)
    with pytest.raises(ConfigError, match=r"MinJobAge=60 s, under the 120 s the SLURM executor needs \(3 x "
                                          r"--slurm-init-seconds-before-status-checks=40\): lower that setting to 20"):
        startup.slurm_status_command("squeue", 40, answers(1, "60"))


def test_the_slurm_executor_is_set_to_the_command_that_works():
    from types import SimpleNamespace

    settings = SimpleNamespace(status_command="sacct", init_seconds_before_status_checks=40)
    assert startup.fit_executor("slurm", settings, answers(1, "3600")).startswith("SLURM accounting is off here")
    assert settings.status_command == "squeue"
    settings = SimpleNamespace(status_command="sacct", init_seconds_before_status_checks=40)
    assert startup.fit_executor("slurm", settings, answers(0, "300")) is None and settings.status_command == "sacct"
    assert startup.fit_executor("local", None) is None


def test_a_results_folder_holds_one_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("{}\n")
    assert startup.study_problem("results", ["a.yaml"], "exp-a") is None
    startup.claim_results_dir("results", ["a.yaml"], "exp-a")
    assert json.loads((tmp_path / "results" / startup.STUDY_FILE).read_text()) == {
        "config": [str(tmp_path / "a.yaml")], "experiment": "exp-a"}
    startup.claim_results_dir("results", [str(tmp_path / "a.yaml")], "exp-a")  # the same file, named otherwise
    with pytest.raises(ConfigError) as err:
        startup.claim_results_dir("results", ["b.yaml"], "exp-b")
    assert str(err.value) == ("results/ holds the study of a.yaml (MLflow experiment 'exp-a'), not of this run's "
                              "b.yaml: add --configfile a.yaml to work on that study, or give this config its own "
                              "results_dir (or delete results/.luffy-study.json to hand the folder over)")
