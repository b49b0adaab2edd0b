"""Several nodes for real: the CI's two-node SLURM on one machine (``.ci/slurm_setup.sh``: nodes
<host> and <host>-n2 in partition ``multi``, each with one logical GPU as a GRES) runs a LUFFY
experiment on verl over both nodes, on the CPU (``tests/multinode.yaml``), through ``snakemake
--profile slurm`` as a user types it: the profile's partition set to ``multi`` (the one site
setting), ``LUFFY_COMMAND`` naming the jobs' luffy, the jobs' environment not on ``PATH``.

What ran where is read from the processes themselves (each carries its job's id and its node's
name: tests/helpers/slurm_records.py); job states come from ``scontrol`` (CI's SLURM has no
accounting). On the way the study meets three faults: Ctrl-C to Snakemake, a worker node's Ray
killed, and the rerun that resumes and completes it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_records import SUBMITTER, Census, job_processes, job_records, kind_of, profile_for, snakemake_command

MULTINODE = Path(__file__).with_name("multinode.yaml")
PARTITION = "multi"


def nodes_up() -> list[str]:
    """The nodes of the CI's two-node partition that can take a job."""
    if shutil.which("sinfo") is None:
        return []
    out = subprocess.run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], capture_output=True, text=True)
    return sorted(line.split()[0] for line in out.stdout.splitlines()
                  if out.returncode == 0 and line.split()[1].rstrip("*") in ("idle", "mixed", "allocated"))


pytestmark = [pytest.mark.slurm_multinode, pytest.mark.solo,
              pytest.mark.skipif(len(nodes_up()) < 2 or not SUBMITTER.exists(),
                                 reason=f"needs the CI's two-node SLURM (partition {PARTITION}) and .venv-slurm: run "
                                        "`.ci/slurm_setup.sh start` (as root) and `make setup`, as .ci/run does")]


def wait_for(what: str, condition, process: subprocess.Popen, timeout: float = 900.0):
    """Poll ``condition()`` until it returns something true (returned); fails if the Snakemake run
    ``process`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"snakemake ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def running_train_job(workdir: Path, not_in: set[int]) -> int | None:
    for job, fields in job_records(workdir).items():
        if job not in not_in and fields.get("JobState") == "RUNNING" and "rule_train" in fields.get("Comment", ""):
            return job
    return None


def newest_checkpoint(work: Path) -> int:
    """The step of the newest checkpoint verl recorded in the job's work directory (0: none)."""
    for tracker in work.glob("*/checkpoints/latest_checkpointed_iteration.txt"):  # work/<settings key>/
        if tracker.read_text().strip():
            return int(tracker.read_text())
    return 0


def left_on_each_node(job: int, within_s: float) -> dict[str, list[str]]:
    """What of ``job`` still runs, per node, once ``within_s`` has passed (polled: empty as soon as
    nothing is left)."""
    deadline = time.monotonic() + within_s
    while True:
        left = job_processes(job)
        if not left or time.monotonic() > deadline:
            return {node: [kind_of(command) for n, _, command in left if n == node] for node, _, _ in left}
        time.sleep(0.5)


def start_snakemake(workdir: Path, log: Path) -> subprocess.Popen:
    """``snakemake`` as typed in a terminal: its own process group (the terminal's foreground
    group, which Ctrl-C signals) with SIGINT at its default."""
    command, env = snakemake_command("--configfile", "multinode.yaml")
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def two_node_study(tmp_path_factory):
    """The two-node study, through three faults on the way: Ctrl-C to Snakemake once the train job
    has kept a checkpoint (the executor cancels the job: scancel), the rerun's worker node's Ray
    killed mid-run, and the third run, which resumes and completes the study."""
    workdir = tmp_path_factory.mktemp("multinode")
    profile_for(workdir, PARTITION)
    shutil.copy(MULTINODE, workdir / "multinode.yaml")
    work = workdir / "results" / "train" / "luffy" / "work"
    census = Census(workdir)
    census.start()
    faults, jobs_before = {}, set()
    try:
        # 1. Ctrl-C to Snakemake (SIGINT to its process group, as a terminal sends it) once the
        # training job has kept a checkpoint
        began = time.monotonic()
        first = start_snakemake(workdir, workdir / "snakemake-1.log")
        job = wait_for("the train job", lambda: running_train_job(workdir, jobs_before), first)
        wait_for("a checkpoint", lambda: newest_checkpoint(work) >= 1, first)
        faults["to_first_checkpoint_s"] = time.monotonic() - began
        interrupted = time.monotonic()
        os.killpg(first.pid, signal.SIGINT)
        left = left_on_each_node(job, within_s=90.0)
        faults["interrupted"] = {"job": job, "left": left, "ended_s": time.monotonic() - interrupted,
                                 "status": first.wait(timeout=300),
                                 "checkpoint": newest_checkpoint(work),
                                 "state": job_records(workdir)[job]["JobState"]}
        jobs_before |= set(job_records(workdir))

        # 2. the rerun's worker node's Ray killed once an FSDP rank runs there
        second = start_snakemake(workdir, workdir / "snakemake-2.log")
        job = wait_for("the rerun's train job", lambda: running_train_job(workdir, jobs_before), second)
        other = [node for node in nodes_up() if node != job_records(workdir)[job]["BatchHost"]][0]
        wait_for(f"an FSDP rank on {other}", lambda: [1 for n, _, c in job_processes(job)
                                                      if n == other and kind_of(c) == "fsdp worker"], second)
        raylet = next(pid for n, pid, c in job_processes(job) if n == other and c.split(" ")[0].endswith("/raylet"))
        killed = time.time()
        os.kill(raylet, signal.SIGKILL)
        status = second.wait(timeout=900)
        ended = datetime.datetime.fromisoformat(job_records(workdir)[job]["EndTime"]).timestamp()
        faults["ray_killed"] = {"job": job, "node": other, "status": status, "ended_s": ended - killed,
                                "left": left_on_each_node(job, within_s=90.0), "checkpoint": newest_checkpoint(work),
                                "state": job_records(workdir)[job]["JobState"],
                                "log": (workdir / "results" / "logs" / "train" / "luffy.log").read_text()}
        jobs_before |= set(job_records(workdir))

        # 3. the rerun that completes the study
        began = time.monotonic()
        command, env = snakemake_command("--configfile", "multinode.yaml")
        run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=2400)
        wall_s = time.monotonic() - began
    finally:
        census.done.set()
        census.join()
    return {"workdir": workdir, "run": run, "wall_s": wall_s, "seen": census.seen, "peak_bytes": census.peak_bytes,
            "faults": faults, "jobs": {job: fields for job, fields in job_records(workdir).items()
                                       if job not in jobs_before}}


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
    assert [line["step"] for line in lines] == [0, 1, 2, 3]  # each once, over the three runs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("luffy-multinode")
    (train_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`luffy.stage` = 'train'")
    assert sorted(m.step for m in client.get_metric_history(train_run.info.run_id, "reward/mean")) == [0, 1, 2, 3]

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

    # it resumed from the newest checkpoint the faults left
    kept = two_node_study["faults"]["ray_killed"]["checkpoint"]
    job_log = (results / "logs" / "train" / "luffy.log").read_text()
    assert "Resuming from" in job_log and f"global_step_{kept}" in job_log, job_log[-3000:]

    # nothing of the job is left on either node
    assert all(fields["JobState"] == "COMPLETED" for fields in jobs.values())
    assert job_processes(train_id) == []
    peaks = {node: f"{peak / 2**30:.1f} GiB" for node, peak in sorted(two_node_study["peak_bytes"].items())}
    print(f"\ntwo-node study (its last run): {two_node_study['wall_s']:.0f} s; peak memory per node: {peaks}; "
          f"processes per node: {seen}")


def test_ctrl_c_to_snakemake_cancels_the_two_node_job_and_leaves_nothing_on_either_node(two_node_study):
    """SIGINT to Snakemake's process group (Ctrl-C in its terminal): the SLURM executor cancels
    the running job (scancel: SIGTERM to the job's step); luffy train ends verl and each node's
    Ray; the checkpoints stay."""
    interrupted = two_node_study["faults"]["interrupted"]
    assert interrupted["status"] != 0
    assert interrupted["state"] == "CANCELLED", interrupted
    assert interrupted["left"] == {}, interrupted["left"]  # per node: nothing
    assert interrupted["checkpoint"] >= 1


def test_a_worker_nodes_ray_killed_mid_run_fails_the_job_at_once_in_one_line_naming_the_node(two_node_study):
    killed = two_node_study["faults"]["ray_killed"]
    assert killed["status"] != 0 and killed["state"] == "FAILED", killed["state"]
    assert killed["left"] == {}, killed["left"]
    # the job ended (SLURM's record) within a minute of the kill, not at the stall limit (an hour by default)
    assert killed["ended_s"] < 60, killed["ended_s"]
    errors = [line for line in killed["log"].splitlines() if line.startswith("luffy train: error:")]
    assert len(errors) == 1 and f"Ray on node {killed['node']} ended" in errors[0], errors
    shown = {name: {key: value for key, value in fault.items() if key != "log"} if isinstance(fault, dict) else fault
             for name, fault in two_node_study["faults"].items()}
    print(f"\nfaults: {json.dumps(shown)}")
