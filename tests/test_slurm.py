"""The workflow on a real SLURM, as users type it: ``snakemake --profile slurm``.

Needs a running SLURM on this machine and the submitting environment .venv-slurm (Snakemake +
its SLURM executor, which cannot share an environment with vLLM): CI makes both (.ci/run:
``.ci/slurm_setup.sh start`` as root, then ``make test``). Without them the test is skipped.
Every job's passage through sbatch is read from SLURM's own records (``scontrol show job``),
not from Snakemake's log.
"""

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

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
    out = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir):
            jobs[int(fields["JobId"])] = {"comment": fields.get("Comment", ""), "state": fields.get("JobState", "")}
    return jobs


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["LUFFY_COMMAND"] = str(Path(sys.executable).parent / "luffy")  # the jobs' environment
    # no accounting database on CI's SLURM: poll squeue, from the first second
    return subprocess.run([str(SUBMITTER), "-s", str(REPO / "Snakefile"), "--profile", "slurm",
                           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
                           *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)


@needs_submitter
def test_the_paper_runs_plan_shows_each_train_jobs_gpus_nodes_and_time(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    dry = subprocess.run([str(SUBMITTER), "-s", str(REPO / "Snakefile"), "--profile", "slurm", "-n", "--configfile",
                          "config/experiments/paper_qwen2.5_math_7b.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    jobs = re.findall(r"rule train:.*?wildcards: experiment=(\S+).*?resources: ([^\n]+)", out, flags=re.S)
    requests = {name: dict(re.findall(r"(\w+)=([^,]+)", line)) for name, line in jobs}
    assert sorted(requests) == ["grpo", "luffy", "rl_sft", "sft", "sft_half", "sft_rl"]
    for name, request in requests.items():
        assert (request["gpu"], request["nodes"], request["cpus_per_task"]) == ("8", "1", "64"), name
    assert requests["luffy"]["runtime"] == "4320" and requests["sft"]["runtime"] == "1440"
    assert "gpu=4" in re.search(r"rule evaluate:.*?resources: ([^\n]+)", out, flags=re.S).group(1)


@pytest.mark.slow
@needs_slurm
def test_micro_pipeline_through_slurm_then_one_stage_by_its_target(tmp_path):
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")  # `--profile slurm` as typed in the repository root
    shutil.copy(MICRO, tmp_path / "micro.yaml")
    run = snakemake(tmp_path, "--configfile", "micro.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| luffy |" in (tmp_path / "results" / "report" / "results.md").read_text()

    jobs = jobs_in(tmp_path)
    rules = Counter(re.sub(r"_wildcards_.*", "", job["comment"]).removeprefix("rule_") for job in jobs.values())
    assert rules == {"make_toy_traces": 1, "prepare_traces": 1, "make_base_model": 1, "train": 3, "convert": 3,
                     "evaluate": 4, "report": 1}
    assert {job["state"] for job in jobs.values()} == {"COMPLETED"}

    rerun = snakemake(tmp_path, "--configfile", "micro.yaml", "-f", "results/eval/base/toy_id.json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    new = {k: v for k, v in jobs_in(tmp_path).items() if k not in jobs}
    assert [job["comment"] for job in new.values()] == ["rule_evaluate_wildcards_base"]
