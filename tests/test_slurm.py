"""The workflow on a real SLURM, as users type it: ``snakemake --profile slurm``.

Needs a running SLURM on this machine and the submitting environment .venv-slurm (Snakemake +
its SLURM executor, which cannot share an environment with vLLM): CI makes both (.ci/run:
``.ci/slurm_setup.sh start`` as root, then ``make test-all``). Without them the test is skipped.
Every job's passage through sbatch is read from SLURM's own records (``scontrol show job``),
not from Snakemake's log.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from slurm_records import job_records
from tracking_server import authenticated_study

REPO = Path(__file__).resolve().parents[1]
SUBMITTER = REPO / ".venv-slurm" / "bin" / "snakemake"
MICRO = Path(__file__).with_name("micro.yaml")


def slurm_running() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


needs_submitter = pytest.mark.skipif(not SUBMITTER.exists(), reason="needs .venv-slurm: run `make setup`")
needs_slurm = pytest.mark.skipif(not (slurm_running() and SUBMITTER.exists()),
                                 reason="needs a running SLURM and .venv-slurm: run `.ci/slurm_setup.sh start` (as "
                                        "root) and `make setup`, as .ci/run does")


def jobs_in(workdir: Path) -> dict[int, dict[str, str]]:
    """SLURM's record of every job that ran in ``workdir``: id -> {rule comment, state}."""
    return {job: {"comment": fields.get("Comment", ""), "state": fields.get("JobState", "")}
            for job, fields in job_records(workdir).items()}


def snakemake(workdir: Path, *args: str, luffy: str | None = str(Path(sys.executable).parent / "luffy"),
              timeout: float = 1800) -> subprocess.CompletedProcess:
    """``snakemake --profile slurm ...`` as docs/slurm.md has it typed: no status command although
    CI's SLURM has no accounting (the workflow finds that out). The one addition, for speed: the
    first status check after 1 s instead of the executor's 40."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_"))}
    if luffy is not None:
        env["LUFFY_COMMAND"] = luffy  # the jobs' environment
    return subprocess.run([str(SUBMITTER), "-s", str(REPO / "Snakefile"), "--profile", "slurm",
                           "--slurm-init-seconds-before-status-checks", "1", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)


def first_error(run: subprocess.CompletedProcess) -> str:
    """The line after Snakemake's 'WorkflowError in file ...' header: the workflow's message."""
    lines = (run.stdout + run.stderr).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("WorkflowError"))
    return lines[at + 1]


@needs_submitter
def test_the_paper_runs_plan_shows_each_train_jobs_gpus_nodes_and_time(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    dry = snakemake(tmp_path, "-n", "--configfile", "config/experiments/paper_qwen2.5_math_7b.yaml", timeout=600)
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    jobs = re.findall(r"rule train:.*?wildcards: experiment=(\S+).*?resources: ([^\n]+)", out, flags=re.S)
    requests = {name: dict(re.findall(r"(\w+)=([^,]+)", line)) for name, line in jobs}
    assert sorted(requests) == ["grpo", "luffy", "rl_sft", "sft", "sft_half", "sft_rl"]
    for name, request in requests.items():
        assert (request["gpu"], request["nodes"], request["cpus_per_task"]) == ("8", "1", "64"), name
    assert requests["luffy"]["runtime"] == "4320" and requests["sft"]["runtime"] == "1440"
    # the threads the jobs get, not a local profile's cap
    assert set(re.findall(r"rule train:.*?threads: (\d+)", out, flags=re.S)) == {"64"}
    assert "gpu=4" in re.search(r"rule evaluate:.*?resources: ([^\n]+)", out, flags=re.S).group(1)


@pytest.mark.slurm
@needs_slurm
def test_micro_pipeline_through_slurm_then_one_stage_by_its_target(tmp_path):
    """The micro config through `--profile slurm`, logging to the study's authenticated tracking
    server (``luffy tracking-server``, its credentials file named in the config): every job logs
    its stage as the study user."""
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")  # `--profile slurm` as typed in the repository root
    with authenticated_study(tmp_path, MICRO, experiment="luffy-micro") as study:
        run = snakemake(tmp_path, "--configfile", "study.yaml")
        assert run.returncode == 0, run.stderr[-3000:]
        assert "| luffy |" in (tmp_path / "results" / "report" / "results.md").read_text()

        jobs = jobs_in(tmp_path)
        rules = Counter(re.sub(r"_wildcards_.*", "", job["comment"]).removeprefix("rule_") for job in jobs.values())
        assert rules == {"make_toy_traces": 1, "prepare_traces": 1, "make_base_model": 1, "train": 3, "convert": 3,
                         "evaluate": 4, "report": 1}
        assert {job["state"] for job in jobs.values()} == {"COMPLETED"}
        # each job's stage run on the server, logged with the study user's credentials, finished
        found = requests.post(f"{study.uri}/api/2.0/mlflow/runs/search", auth=study.user(), timeout=60, json={
            "experiment_ids": [experiment_id(study)], "filter": "tags.`luffy.role` = 'stage'", "max_results": 1000})
        assert found.status_code == 200, found.text
        stages = [{t["key"]: t["value"] for t in r["data"]["tags"]} | {"status": r["info"]["status"]}
                  for r in found.json()["runs"]]
        assert Counter(s["luffy.stage"] for s in stages) == rules
        assert {s["status"] for s in stages} == {"FINISHED"}
        assert requests.get(f"{study.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30
                            ).status_code == 401  # and nothing without them

        rerun = snakemake(tmp_path, "-f", "results/eval/base/toy_id.json", "--configfile", "study.yaml")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        new = {k: v for k, v in jobs_in(tmp_path).items() if k not in jobs}
        assert [job["comment"] for job in new.values()] == ["rule_evaluate_wildcards_base"]
        assert "SLURM accounting is off here (sacct: Slurm accounting storage is disabled): job states are read " \
               "with squeue" in rerun.stdout + rerun.stderr

        # the HTML report, in the submitting environment: current results inline, the re-evaluated one named
        report = snakemake(tmp_path, "--configfile", "study.yaml", "--report", "report.html")
        assert report.returncode == 0, report.stderr[-3000:]
        assert (tmp_path / "report.html").stat().st_size > 100_000
        page = (tmp_path / ".snakemake" / "luffy-report-page.rst").read_text()
        assert "<td>luffy</td>" in page and "- ``results/eval/base/toy_id.json``" in page

    # the demo config typed without --configfile into these results: refused, nothing submitted
    shutil.copytree(REPO / "config", tmp_path / "config")
    other = snakemake(tmp_path, "-n")
    assert other.returncode != 0
    assert first_error(other).startswith("results/ holds the study of study.yaml (MLflow experiment 'luffy-micro'), "
                                         "not of this run's config/config.yaml: add --configfile study.yaml")


def experiment_id(study) -> str:
    found = requests.get(f"{study.uri}/api/2.0/mlflow/experiments/get-by-name", auth=study.user(), timeout=30,
                         params={"experiment_name": "luffy-micro"})
    assert found.status_code == 200, found.text
    return found.json()["experiment"]["experiment_id"]


@needs_submitter
def test_a_submitting_environment_taken_for_the_jobs_stops_the_plan_in_one_line(tmp_path):
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    shutil.copy(MICRO, tmp_path / "micro.yaml")
    unset = snakemake(tmp_path, "-n", "--configfile", "micro.yaml", luffy=None)
    assert unset.returncode != 0
    assert first_error(unset) == (
        f"the jobs' command {SUBMITTER.parent / 'luffy'} (LUFFY_COMMAND is not set) cannot run the jobs: its "
        "environment lacks torch, transformers, pyarrow, mlflow, math_verify, tqdm (needed by the workflow's jobs); "
        "set LUFFY_COMMAND to the luffy of the job environment (docs/slurm.md: Running on a SLURM cluster)")
    wrong = snakemake(tmp_path, "-n", "--configfile", "micro.yaml", luffy=str(tmp_path / "venv" / "bin" / "luffy"))
    assert first_error(wrong).startswith(f"LUFFY_COMMAND={tmp_path}/venv/bin/luffy: no such executable")


@pytest.mark.slurm
@needs_slurm
def test_a_failed_job_is_reported_within_two_minutes_without_accounting(tmp_path):
    """A job that fails on a SLURM without accounting, and no status command typed: Snakemake
    reports it and exits (the executor's default, sacct, would wait forever)."""
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    shutil.copy(MICRO, tmp_path / "micro.yaml")
    failing = tmp_path / "luffy"  # answers the start-up check, then every stage fails
    failing.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && exec {Path(sys.executable).parent / 'luffy'} --version\n"
                       "echo 'a stage failed' >&2\nexit 3\n")
    failing.chmod(0o755)
    began = time.monotonic()
    run = snakemake(tmp_path, "results/data/toy/raw_traces.parquet", "--configfile", "micro.yaml",
                    luffy=str(failing), timeout=600)
    took = time.monotonic() - began
    assert run.returncode != 0
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", run.stdout + run.stderr)
    assert took < 120, took
    assert {job["state"] for job in jobs_in(tmp_path).values()} == {"FAILED"}


@pytest.mark.slurm
@pytest.mark.solo  # a part has seconds for its steps in a 1-minute job: a loaded machine's start-ups eat them
@needs_slurm
def test_training_longer_than_the_job_time_limit_runs_as_a_chain_of_one_slurm_job(tmp_path):
    """resources.job_time_limit of 1 minute, a train runtime of 10: the train job stops at a
    checkpoint before its minute is up, requeues itself and resumes, until done; Snakemake sees
    one job. The weights equal an uninterrupted run's; each step is logged once."""
    import torch
    import yaml
    from mlflow.tracking import MlflowClient

    config = yaml.safe_load(MICRO.read_text())
    config["experiments"] = {"luffy": {"algorithm": "luffy"}}
    chained, alone = tmp_path / "chained", tmp_path / "alone"
    chain_resources = {"job_time_limit": 1, "stages": {"train": {"runtime": 10}},
                       "default": {"cpus": 2, "mem_mb": 4000, "runtime": 1, "gpus": 0, "nodes": 1}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_"))}

    def uninterrupted(steps: int) -> float:
        """The same training run locally, in one go; its mean step time in seconds. A second call
        reruns only the training (the data and the base model stay)."""
        alone.mkdir(exist_ok=True)
        shutil.rmtree(alone / "results" / "train", ignore_errors=True)
        config["train_defaults"].update(steps=steps, checkpoint_every=100000)
        (alone / "chain.yaml").write_text(yaml.safe_dump({**config, "resources": {}}))
        local = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"),
                                "--cores", "2", "results/train/luffy/final", "--configfile", "chain.yaml"],
                               cwd=alone, env=env, capture_output=True, text=True, timeout=900)
        assert local.returncode == 0, local.stderr[-3000:]
        lines = (alone / "results" / "train" / "luffy" / "metrics.jsonl").read_text().splitlines()
        return sum(json.loads(line)["step_time_s"] for line in lines) / len(lines)

    # A part of a 1-minute job has under 28 s for its steps (the stop margin alone is 30 s, and the
    # job's start-up takes seconds), so 28 s of steps make a chain of at least two parts on any
    # machine: the step count is measured here, not assumed (a fast CPU ran 300 steps in one part;
    # a slow one took 5 parts for 300, 4 minutes of it spent waiting for SLURM's restarts).
    steps = 150
    step_s = uninterrupted(steps)
    if steps * step_s < 28:
        steps = math.ceil(28 / step_s)
        uninterrupted(steps)
    # the chain's SLURM run starts from the same data and base model (their jobs through SLURM:
    # test_micro_pipeline_through_slurm_then_one_stage_by_its_target): SLURM runs the train job alone
    for made in ("data", "models"):
        shutil.copytree(alone / "results" / made, chained / "results" / made)
    (chained / "chain.yaml").write_text(yaml.safe_dump({**config, "resources": chain_resources}))
    shutil.copytree(REPO / "slurm", chained / "slurm")

    run = snakemake(chained, "results/train/luffy/final", "--configfile", "chain.yaml", timeout=1500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    train = [(job_id, job) for job_id, job in jobs_in(chained).items() if job["comment"].startswith("rule_train")]
    assert len(train) == 1 and train[0][1]["state"] == "COMPLETED"
    restarts = int(re.search(r"Restarts=(\d+)", subprocess.run(
        ["scontrol", "show", "job", "--oneliner", str(train[0][0])], capture_output=True, text=True).stdout).group(1))
    assert restarts >= 1, f"{steps} steps of {step_s:.3f} s fitted one part"  # parts of the chain: restarts + 1
    log = (chained / "results" / "train" / "luffy" / "work" / "train.log").read_text()  # every part's
    assert log.count("requeueing SLURM job") == restarts and "part 2 of its chain" in log

    weights = [torch.load(w / "results" / "train" / "luffy" / "final" / "model.pt") for w in (chained, alone)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    logged = [line["step"] for line in map(json.loads, (chained / "results" / "train" / "luffy" / "metrics.jsonl")
                                           .read_text().splitlines())]
    assert logged == list(range(steps))
    client = MlflowClient(tracking_uri=f"sqlite:///{chained}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("luffy-micro").experiment_id],
                              filter_string="tags.`luffy.stage` = 'train'")
    assert len(runs) == 1
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/total")) == list(range(steps))
