"""Several nodes for real: the CI's two-node SLURM on one machine (``.ci/slurm_setup.sh``: nodes
<host> and <host>-n2 in partition ``multi``, each with one logical GPU as a GRES) runs a LUFFY
experiment on verl over both nodes, on the CPU (``tests/multinode.yaml``), through ``snakemake
--profile slurm`` as a user types it: the profile's partition set to ``multi`` (the one site
setting), ``LUFFY_COMMAND`` naming the jobs' luffy, the jobs' environment not on ``PATH``.

What ran where is read from the processes themselves: a process SLURM started for a job carries
that job's ``SLURM_JOB_ID`` and its node's ``SLURMD_NODENAME`` in its environment, and so does
every process it starts (Ray's raylet, the FSDP workers and vLLM servers Ray starts there).
Job states come from ``scontrol`` (CI's SLURM has no accounting).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from slurm_records import job_records

REPO = Path(__file__).resolve().parents[1]
SUBMITTER = REPO / ".venv-slurm" / "bin" / "snakemake"
JOBS_LUFFY = Path(sys.executable).parent / "luffy"
MULTINODE = Path(__file__).with_name("multinode.yaml")
PARTITION = "multi"


def nodes_up() -> list[str]:
    """The nodes of the CI's two-node partition that can take a job."""
    if shutil.which("sinfo") is None:
        return []
    out = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True)
    return sorted(line.split()[0] for line in out.stdout.splitlines()
                  if out.returncode == 0 and line.split()[1].rstrip("*") in ("idle", "mixed", "allocated"))


pytestmark = [pytest.mark.slurm_multinode,
              pytest.mark.skipif(len(nodes_up()) < 2 or not SUBMITTER.exists(),
                                 reason=f"needs the CI's two-node SLURM (partition {PARTITION}) and .venv-slurm: run "
                                        "`.ci/slurm_setup.sh start` (as root) and `make setup`, as .ci/run does")]


def snakemake(workdir: Path, *args: str, timeout: float = 2400) -> subprocess.CompletedProcess:
    """``snakemake --profile slurm ...`` from the submitting environment, as docs/slurm.md has it
    typed, with the jobs' environment named by LUFFY_COMMAND and not on PATH (but a first status
    check after 1 s instead of 40, for speed)."""
    venv = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LUFFY_", "SLURM_"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv)
    env["LUFFY_COMMAND"] = str(JOBS_LUFFY)
    return subprocess.run([str(SUBMITTER), "-s", str(REPO / "Snakefile"), "--profile", "slurm",
                           "--slurm-init-seconds-before-status-checks", "1", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)


def profile_for(workdir: Path) -> None:
    """The repository's profile with its one site setting made: the partition."""
    shutil.copytree(REPO / "slurm", workdir / "slurm")
    profile = workdir / "slurm" / "config.yaml"
    text = profile.read_text()
    assert '  slurm_partition: ""' in text
    profile.write_text(text.replace('  slurm_partition: ""', f'  slurm_partition: "{PARTITION}"'))


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
    """Samples, every two seconds, which processes each running train job has on each node."""

    def __init__(self, workdir: Path):
        super().__init__(daemon=True)
        self.workdir, self.seen, self.done = workdir, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(2.0):
            for job, fields in job_records(self.workdir).items():
                if fields.get("JobState") == "RUNNING" and "rule_train" in fields.get("Comment", ""):
                    for node, _, command in job_processes(job):
                        self.seen.setdefault(node, set()).add(kind_of(command))


def kind_of(command: str) -> str:
    """What a process of a verl run is, by its command line."""
    for kind, marker in (("raylet", "raylet"), ("gcs", "gcs_server"), ("ray start", " start "),
                         ("vllm", "vllm"), ("vllm", "EngineCore"), ("fsdp worker", "WorkerDict"),
                         ("trainer", "main_ppo"), ("luffy train", "luffy train")):
        if marker in command:
            return kind
    return command.split(" ")[0].rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def two_node_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multinode")
    profile_for(workdir)
    shutil.copy(MULTINODE, workdir / "multinode.yaml")
    census = Census(workdir)
    census.start()
    began = time.monotonic()
    run = snakemake(workdir, "--configfile", "multinode.yaml")
    census.done.set()
    census.join()
    return {"workdir": workdir, "run": run, "wall_s": time.monotonic() - began, "seen": census.seen,
            "jobs": job_records(workdir)}


def test_a_luffy_run_on_two_nodes_trains_converts_evaluates_and_leaves_nothing(two_node_study):
    workdir, run, jobs = two_node_study["workdir"], two_node_study["run"], two_node_study["jobs"]
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    results = workdir / "results"
    assert "| luffy |" in (results / "report" / "results.md").read_text()

    (train_id,) = [job for job, fields in jobs.items() if "rule_train" in fields.get("Comment", "")]
    train = jobs[train_id]
    assert train["JobState"] == "COMPLETED" and train["NumNodes"] == "2", train
    hosts = subprocess.run(["scontrol", "show", "hostnames", train["NodeList"]], capture_output=True,
                           text=True).stdout.split()
    assert sorted(hosts) == nodes_up()
    # a Ray node, an FSDP rank and a vLLM rollout server on each node
    seen = two_node_study["seen"]
    for host in hosts:
        assert {"raylet", "fsdp worker", "vllm"} <= seen.get(host, set()), (host, seen)

    lines = [json.loads(line) for line in (results / "train" / "luffy" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("luffy-multinode")
    (train_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`luffy.stage` = 'train'")
    assert sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "reward/mean")) == [0, 1, 2]

    # two FSDP ranks, one per node: two shards in the checkpoint, which convert merged (verl's model
    # merger) into the model that was evaluated: its weights are the shards put together
    import torch
    from transformers import AutoModelForCausalLM

    actor = results / "train" / "luffy" / "final" / "actor"
    shards = [torch.load(actor / f"model_world_size_2_rank_{rank}.pt", weights_only=False) for rank in (0, 1)]
    merged = AutoModelForCausalLM.from_pretrained(results / "models" / "luffy", dtype="auto").state_dict()
    for name, part in shards[0].items():
        assert 0 < part.to_local().shape[0] < part.shape[0], name  # a shard, not the whole tensor
        whole = torch.cat([part.to_local(), shards[1][name].to_local()])
        assert torch.equal(whole.to(merged[name].dtype), merged[name]), name
    assert json.loads((results / "eval" / "luffy" / "toy_id.json").read_text())["problems"] == 6

    # nothing of the job is left on either node
    assert all(fields["JobState"] == "COMPLETED" for fields in jobs.values())
    assert job_processes(train_id) == []
    print(f"\ntwo-node study: {two_node_study['wall_s']:.0f} s; processes per node: {seen}")
