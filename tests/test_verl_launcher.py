"""Ray on a SLURM allocation for a multi-node verl run.

Stand-ins (this machine has no SLURM allocation of several nodes and no Ray cluster to join):
``scontrol``, ``srun`` and ``ray`` are small recording scripts on PATH. ``srun`` logs its
options and runs the ``ray`` command it was given as if on that node; ``ray start --block``
holds until ``ray stop`` on its node; ``ray status`` lists the nodes started and not stopped.
The launcher, its signal handling and the trainer process are real.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from luffy.engines.verl import launcher
from luffy.engines.verl.launcher import LaunchError, gpus_per_node, run_on_ray

FAKES = {
    "scontrol": """
        import os
        print("\\n".join(os.environ["FAKE_NODES"].split()))
    """,
    "srun": """
        import json, os, sys
        args = sys.argv[1:]
        node = next(a.split("=", 1)[1] for a in args if a.startswith("--nodelist="))
        with open(os.environ["FAKE_LOG"], "a") as fh:
            fh.write(json.dumps(["srun", *args]) + "\\n")
        command = args[args.index("ray"):]
        os.execvpe(command[0], command, {**os.environ, "FAKE_NODE": node})
    """,
    "ray": """
        import json, os, sys, time
        args, state = sys.argv[1:], os.environ["FAKE_STATE"]
        node = os.environ.get("FAKE_NODE", "-")
        with open(os.environ["FAKE_LOG"], "a") as fh:
            fh.write(json.dumps(["ray", node, *args]) + "\\n")
        if args[0] == "start":
            open(os.path.join(state, "up." + node), "w").close()
            while not os.path.exists(os.path.join(state, "down." + node)):
                time.sleep(0.05)
        elif args[0] == "stop":
            open(os.path.join(state, "down." + node), "w").close()
        elif args[0] == "status":
            up = [f[3:] for f in os.listdir(state) if f.startswith("up.")]
            print("Active:")
            for n in up:
                if not os.path.exists(os.path.join(state, "down." + n)):
                    print(f" 1 node_{n}")
    """,
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_STATE": str(state), "FAKE_LOG": str(log),
           "FAKE_NODES": "gpu-a gpu-b gpu-c", "SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_GPUS": "12"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launcher, "POLL_S", 0.05)
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def trainer(log: Path, code: str) -> list[str]:
    """A stand-in trainer command that records the Ray address it was given."""
    return [sys.executable, "-c", f"import os, sys; open({str(log)!r}, 'a').write("
            f"'[\"trainer\", \"' + os.environ.get('RAY_ADDRESS', '') + '\"]\\n'); {code}"]


def test_gpus_per_node_from_slurm():
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:4"}, 3, 0) == 4
    assert gpus_per_node({"SLURM_GPUS": "12"}, 3, 0) == 4  # the executor asks --gpus=<total>
    assert gpus_per_node({"SLURM_GPUS": "h100:16"}, 2, 0) == 8
    assert gpus_per_node({}, 3, 24) == 8  # outside SLURM's variables: the job's request
    with pytest.raises(LaunchError, match="10 GPUs do not split evenly over 3 nodes"):
        gpus_per_node({"SLURM_GPUS": "10"}, 3, 0)


def test_one_node_runs_the_trainer_alone(fake_slurm):
    assert run_on_ray(trainer(fake_slurm, "sys.exit(0)"), os.environ, nodes=1, gpus=8) == 0
    assert calls(fake_slurm) == [["trainer", ""]]  # verl's ray.init starts its own local Ray


@pytest.mark.parametrize("exit_code", [0, 3])
def test_three_nodes_start_ray_run_the_trainer_and_stop_ray(fake_slurm, exit_code):
    status = run_on_ray(trainer(fake_slurm, f"sys.exit({exit_code})"), os.environ, nodes=3, gpus=12)
    assert status == exit_code
    recorded = calls(fake_slurm)
    starts = [c for c in recorded if c[0] == "ray" and c[2] == "start"]
    assert starts[0][1:] == ["gpu-a", "start", "--head", "--node-ip-address=gpu-a", "--port=6379", "--num-gpus=4",
                             "--block"]
    assert sorted(c[1] for c in starts[1:]) == ["gpu-b", "gpu-c"]
    assert all("--address=gpu-a:6379" in c and "--num-gpus=4" in c for c in starts[1:])
    assert ["trainer", "gpu-a:6379"] in recorded
    trainer_at = recorded.index(["trainer", "gpu-a:6379"])
    assert len([c for c in recorded[:trainer_at] if c[0] == "ray" and c[2] == "start"]) == 3  # all joined first
    stops = [c[1] for c in recorded[trainer_at:] if c[0] == "ray" and c[2] == "stop"]
    assert sorted(stops) == ["gpu-a", "gpu-b", "gpu-c"]
    assert all("--overlap" in c for c in recorded if c[0] == "srun")


def test_sigterm_stops_the_trainer_and_ray_on_every_node(fake_slurm):
    command = [sys.executable, "-m", "luffy.engines.verl.launcher", "--nodes", "3", "--gpus", "12", "--",
               *trainer(fake_slurm, "import time; time.sleep(60)")]
    process = subprocess.Popen(command, env=os.environ)
    deadline = time.monotonic() + 60
    while not any(c[0] == "trainer" for c in calls(fake_slurm)):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    stops = [c[1] for c in calls(fake_slurm) if c[0] == "ray" and c[2] == "stop"]
    assert sorted(stops) == ["gpu-a", "gpu-b", "gpu-c"]


def test_a_stalled_trainer_on_three_nodes_is_stopped_and_ray_stopped_on_every_node(fake_slurm, tmp_path):
    steps = tmp_path / "steps.jsonl"
    logs_a_step_then_hangs = trainer(fake_slurm, f"open({str(steps)!r}, 'a').write('{{\"step\": 0}}\\n'); "
                                                 "import time; time.sleep(60)")
    watch = launcher.Watch(progress=lambda: 0 if steps.exists() and steps.read_text() else None, stall_s=1.0,
                           startup_s=30.0, poll_s=0.1, grace_s=2.0)
    began = time.monotonic()
    with pytest.raises(launcher.Stalled, match="after step 0"):
        run_on_ray(logs_a_step_then_hangs, os.environ, nodes=3, gpus=12, watch=watch)
    assert time.monotonic() - began < 30
    assert ["trainer", "gpu-a:6379"] in calls(fake_slurm)
    stops = [c[1] for c in calls(fake_slurm) if c[0] == "ray" and c[2] == "stop"]
    assert sorted(stops) == ["gpu-a", "gpu-b", "gpu-c"]


def test_a_node_count_other_than_the_jobs_is_refused(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_NODES", "gpu-a gpu-b")
    with pytest.raises(LaunchError, match="has 2 nodes, the job asked for 3"):
        run_on_ray(trainer(fake_slurm, "sys.exit(0)"), os.environ, nodes=3, gpus=12)
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(LaunchError, match="not inside a SLURM job"):
        run_on_ray(trainer(fake_slurm, "sys.exit(0)"), os.environ, nodes=3, gpus=12)


# ---- one node: SIGTERM or Ctrl-C to the supervising process ends everything the run started ----

RUN_TREE = textwrap.dedent("""
    import subprocess, sys, time
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    child = subprocess.Popen(sleeper)
    # an orphan: its parent exits at once, so init adopts it (it stays in the run's session)
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               "print(subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL).pid)", *sleeper],
                              stdout=subprocess.PIPE, text=True)
    orphan = int(parent.communicate()[0])
    open(sys.argv[1], "w").write(f"{child.pid} {orphan}")
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_one_node_run_ends_every_process_the_run_started(tmp_path, signum):
    """verl runs in its own session (so that it can be ended as a whole), which keeps a job
    manager's SIGTERM and the terminal's Ctrl-C from reaching it: the supervising process ends
    it, and what it started (adopted orphans too), before it exits 128 + the signal."""
    script, pids = tmp_path / "run.py", tmp_path / "pids"
    script.write_text(RUN_TREE)
    supervisor = subprocess.Popen([sys.executable, "-m", "luffy.engines.verl.launcher", "--nodes", "1", "--gpus", "0",
                                   "--", sys.executable, str(script), str(pids)], stderr=subprocess.PIPE, text=True)
    run = []
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 2):
            assert supervisor.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        run = [int(pid) for pid in pids.read_text().split()]
        assert all(alive(pid) for pid in run)
        supervisor.send_signal(signum)
        assert supervisor.wait(timeout=60) == 128 + signum
        assert f"cancelled by {signal.Signals(signum).name}" in supervisor.stderr.read()
        assert not [pid for pid in run if alive(pid)], "processes of the run outlived it"
    finally:  # a failed test leaves nothing behind either
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            run += [p.pid for p in psutil.Process(supervisor.pid).children(recursive=True)]
        supervisor.kill()
        supervisor.wait()
        for pid in run:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
