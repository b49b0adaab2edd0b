"""SLURM's own record of the jobs a test ran (CI's SLURM has no accounting: ``scontrol``, which
keeps finished jobs for MinJobAge, an hour there), and what ran where: a process SLURM started
for a job carries that job's ``SLURM_JOB_ID`` and its node's ``SLURMD_NODENAME`` in its
environment, and so does every process it starts (Ray's raylet, the FSDP workers and vLLM
servers Ray starts there); and Snakemake submitting to it as docs/slurm.md has it typed. Used by
tests/test_slurm*.py and benchmarks/multinode.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUBMITTER = REPO / ".venv-slurm" / "bin" / "snakemake"  # the submitting environment's
JOBS_LUFFY = Path(sys.executable).parent / "luffy"  # the jobs' environment's


def job_records(workdir: Path) -> dict[int, dict[str, str]]:
    """Every job that ran in ``workdir``: its id -> the fields of ``scontrol show job``."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir):
            jobs[int(fields["JobId"])] = fields
    return jobs


def job_processes(job: int) -> list[tuple[str, int, str]]:
    """(node, pid, command line) of every live process of SLURM job ``job``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("SLURM_JOB_ID") == str(job):
                found.append((env.get("SLURMD_NODENAME", "?"), p.pid, " ".join(p.cmdline())[:300]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Census(threading.Thread):
    """Samples, every two seconds, which processes each running train job has on each node, and
    the largest memory they held together on each node (summed PSS: shared pages counted once)."""

    def __init__(self, workdir: Path):
        super().__init__(daemon=True)
        self.workdir, self.seen, self.peak_bytes, self.done = workdir, {}, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(2.0):
            for job, fields in job_records(self.workdir).items():
                if fields.get("JobState") == "RUNNING" and "rule_train" in fields.get("Comment", ""):
                    memory = {}
                    for node, pid, command in job_processes(job):
                        self.seen.setdefault(node, set()).add(kind_of(command))
                        memory[node] = memory.get(node, 0) + pss(pid)
                    for node, total in memory.items():
                        self.peak_bytes[node] = max(self.peak_bytes.get(node, 0), total)


def pss(pid: int) -> int:
    import psutil

    try:
        return psutil.Process(pid).memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def kind_of(command: str) -> str:
    """What a process of a verl run is, by its command line."""
    for kind, marker in (("raylet", "raylet"), ("gcs", "gcs_server"), ("ray start", " start "),
                         ("vllm", "vllm"), ("vllm", "EngineCore"), ("fsdp worker", "WorkerDict"),
                         ("trainer", "main_ppo"), ("luffy train", "luffy train")):
        if marker in command:
            return kind
    return command.split(" ")[0].rsplit("/", 1)[-1]


def snakemake_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """``snakemake --profile slurm ...`` from the submitting environment, as docs/slurm.md has it
    typed, with the jobs' environment named by LUFFY_COMMAND and not on PATH (but a first status
    check after 1 s instead of 40, for speed): the command and its environment."""
    venv = str(JOBS_LUFFY.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_", "SLURM_"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv)
    env["LUFFY_COMMAND"] = str(JOBS_LUFFY)
    return [str(SUBMITTER), "-s", str(REPO / "Snakefile"), "--profile", "slurm",
            "--slurm-init-seconds-before-status-checks", "1", *args], env


def profile_for(workdir: Path, partition: str) -> None:
    """The repository's profile in ``workdir`` with its one site setting made: the partition."""
    shutil.copytree(REPO / "slurm", workdir / "slurm")
    profile = workdir / "slurm" / "config.yaml"
    text = profile.read_text()
    assert '  slurm_partition: ""' in text
    profile.write_text(text.replace('  slurm_partition: ""', f'  slurm_partition: "{partition}"'))
