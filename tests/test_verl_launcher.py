"""Ray on a SLURM allocation for a multi-node verl run.

Stand-ins (for what the two-node SLURM of tests/test_slurm_multinode.py runs for real):
``scontrol``, ``srun`` and ``ray`` are small recording scripts. ``scontrol show job`` prints a
job record with the nodes and GPUs of ``FAKE_*``; ``srun`` logs its options and runs its
command as if on that node; ``ray start --block`` holds until it is ended; ``ray status``
lists the nodes whose ``ray start`` still runs. The launcher (each node's too), its signal
handling and the trainer process are real.
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
        import os, sys
        args = sys.argv[1:]
        if args[:2] == ["show", "job"]:
            print(f"JobId={args[-1]} JobName=train JobState=RUNNING ReqNodeList=(null) NodeList="
                  f"{os.environ['FAKE_NODELIST']} BatchHost=gpu-a TRES={os.environ['FAKE_TRES']} MinCPUsNode=1")
        elif args[:2] == ["show", "hostnames"]:
            print("\\n".join(os.environ["FAKE_NODES"].split()))
        else:
            sys.exit(f"scontrol: unexpected {args}")
    """,
    "srun": """
        import json, os, sys
        args = sys.argv[1:]
        node = next(a.split("=", 1)[1] for a in args if a.startswith("--nodelist="))
        with open(os.environ["FAKE_LOG"], "a") as fh:
            fh.write(json.dumps(["srun", *args]) + "\\n")
        command = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
        os.execvpe(command[0], command, {**os.environ, "FAKE_NODE": node})
    """,
    "ray": """
        import json, os, sys, time
        args, state = sys.argv[1:], os.environ["FAKE_STATE"]
        node = os.environ.get("FAKE_NODE", "-")
        with open(os.environ["FAKE_LOG"], "a") as fh:
            fh.write(json.dumps(["ray", node, *args]) + "\\n")
        token = os.environ.get("RAY_AUTH_TOKEN", "") if os.environ.get("RAY_AUTH_MODE") == "token" else ""
        if args[0] == "start":  # a worker joins only with the head's token (Ray's token authentication)
            head = [n for n in os.listdir(state) if n.startswith("token.")]
            assert token and (not head or open(os.path.join(state, head[0])).read() == token), "no or wrong token"
            open(os.path.join(state, "token." + node), "w").write(token)
            open(os.path.join(state, "up." + node), "w").write(str(os.getpid()))
            time.sleep(600)
        elif args[0] == "status":  # Ray refuses a client without the cluster's token
            tokens = {open(os.path.join(state, n)).read() for n in os.listdir(state) if n.startswith("token.")}
            if not token or tokens != {token}:
                sys.exit("AuthenticationError: InvalidAuthToken")
            print("Active:")
            for name in os.listdir(state):
                if name.startswith("up."):
                    try:
                        os.kill(int(open(os.path.join(state, name)).read()), 0)
                    except ProcessLookupError:
                        continue
                    print(f" 1 node_{name[3:]}")
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
           "FAKE_NODES": "gpu-a gpu-b gpu-c", "FAKE_NODELIST": "gpu-[a-c]",
           "FAKE_TRES": "cpu=6,mem=3G,node=3,billing=6,gres/gpu=12", "SLURM_JOB_ID": "42",
           # what the SLURM executor's job step leaves: its own node only
           "SLURM_JOB_NODELIST": "gpu-a"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    monkeypatch.setattr(launcher, "POLL_S", 0.05)
    monkeypatch.setattr(launcher, "RAY", str(bin_dir / "ray"))
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def ray_running(log: Path) -> list[str]:
    """The nodes whose stand-in ``ray start`` still runs."""
    state = Path(os.environ["FAKE_STATE"])
    return sorted(f.name[3:] for f in state.glob("up.*") if alive(int(f.read_text())))


def trainer(log: Path, code: str) -> list[str]:
    """A stand-in trainer command that records the Ray address it was given."""
    return [sys.executable, "-c", f"import os, sys; open({str(log)!r}, 'a').write("
            f"'[\"trainer\", \"' + os.environ.get('RAY_ADDRESS', '') + '\"]\\n'); {code}"]


def test_gpus_per_node_from_the_jobs_record():
    assert gpus_per_node("JobId=1 NodeList=a,b TRES=cpu=4,node=2,gres/gpu=2 TresPerNode=gres:gpu:1", 2, 0) == 1
    assert gpus_per_node("JobId=1 TresPerNode=gres:gpu:a100:4 TRES=cpu=4,node=3", 3, 0) == 4
    assert gpus_per_node("JobId=1 TRES=cpu=8,mem=1G,node=3,billing=8,gres/gpu=12", 3, 0) == 4  # --gpus=<total>
    assert gpus_per_node("JobId=1 TRES=cpu=8,node=3", 3, 24) == 8  # no GPUs in the record: the job's request
    with pytest.raises(LaunchError, match="10 GPUs do not split evenly over 3 nodes"):
        gpus_per_node("JobId=1 TRES=cpu=8,node=3,gres/gpu=10", 3, 0)


def test_one_node_runs_the_trainer_alone(fake_slurm):
    assert run_on_ray(trainer(fake_slurm, "sys.exit(0)"), os.environ, nodes=1, gpus=8) == 0
    # verl's ray.init starts a Ray of its own (not the one a `ray start` last recorded on the machine)
    assert calls(fake_slurm) == [["trainer", "local"]]


def ray_starts(recorded: list[list[str]]) -> list[list[str]]:
    return [c for c in recorded if c[0] == "ray" and c[2] == "start"]


@pytest.mark.parametrize("exit_code", [0, 3])
def test_three_nodes_start_ray_run_the_trainer_and_end_ray(fake_slurm, exit_code, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-b")  # the launcher's own node: the head goes there
    status = run_on_ray(trainer(fake_slurm, f"sys.exit({exit_code})"), os.environ, nodes=3, gpus=3)
    assert status == exit_code
    recorded = calls(fake_slurm)
    starts = ray_starts(recorded)
    port = starts[0][5].removeprefix("--port=")
    assert starts[0][1:] == ["gpu-b", "start", "--head", "--node-ip-address=gpu-b", f"--port={port}",
                             "--num-gpus=4", "--block"]  # 12 GPUs in the job's record over 3 nodes
    assert sorted(c[1] for c in starts[1:]) == ["gpu-a", "gpu-c"]
    assert all(f"--address=gpu-b:{port}" in c and f"--node-ip-address={c[1]}" in c and "--num-gpus=4" in c
               for c in starts[1:])
    trainer_at = recorded.index(["trainer", f"gpu-b:{port}"])
    assert len(ray_starts(recorded[:trainer_at])) == 3  # all joined first
    assert ray_running(fake_slurm) == []  # ended on every node, by the node's own launcher
    assert not [c for c in recorded if c[0] == "ray" and c[2] == "stop"]  # never `ray stop`: it ends every Ray there
    sruns = [c for c in recorded if c[0] == "srun"]
    assert len(sruns) == 3 and all("--overlap" in c and c[c.index("--") + 1] == launcher.RAY for c in sruns)


def test_sigterm_stops_the_trainer_and_ray_on_every_node(fake_slurm):
    script = (f"import sys, luffy.engines.verl.launcher as launcher; launcher.RAY = {launcher.RAY!r}; "
              f"sys.exit(launcher.main(sys.argv[1:]))")
    command = [sys.executable, "-c", script, "--nodes", "3", "--gpus", "12", "--",
               *trainer(fake_slurm, "import time; time.sleep(60)")]
    process = subprocess.Popen(command, env=os.environ, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(c[0] == "trainer" for c in calls(fake_slurm)):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        assert ray_running(fake_slurm) == ["gpu-a", "gpu-b", "gpu-c"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        assert "luffy launcher: cancelled by SIGTERM" in process.stderr.read()
        assert ray_running(fake_slurm) == []
    finally:
        process.kill()
        process.wait()


def test_a_stalled_trainer_on_three_nodes_is_stopped_and_ray_ended_on_every_node(fake_slurm, tmp_path):
    steps = tmp_path / "steps.jsonl"
    logs_a_step_then_hangs = trainer(fake_slurm, f"open({str(steps)!r}, 'a').write('{{\"step\": 0}}\\n'); "
                                                 "import time; time.sleep(60)")
    watch = launcher.Watch(progress=lambda: 0 if steps.exists() and steps.read_text() else None, stall_s=1.0,
                           startup_s=30.0, poll_s=0.1, grace_s=2.0)
    began = time.monotonic()
    with pytest.raises(launcher.Stalled, match="after step 0"):
        run_on_ray(logs_a_step_then_hangs, os.environ, nodes=3, gpus=12, watch=watch)
    assert time.monotonic() - began < 30
    assert any(c[0] == "trainer" and c[1].startswith("gpu-a:") for c in calls(fake_slurm))
    assert ray_running(fake_slurm) == []


def test_a_worker_nodes_ray_killed_mid_run_stops_the_run_at_once_naming_the_node(fake_slurm, tmp_path):
    """Not a hang until the stall limit: the node's Ray gone (its `ray start --block` ends, and the
    node's srun with it) stops the run within a poll, in one line naming the node."""
    watch = launcher.Watch(progress=lambda: None, stall_s=600.0, startup_s=600.0, poll_s=0.1, grace_s=2.0)
    state = Path(os.environ["FAKE_STATE"])

    def kill_gpu_c_once_the_trainer_runs():
        deadline = time.monotonic() + 60
        while not any(c[0] == "trainer" for c in calls(fake_slurm)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int((state / "up.gpu-c").read_text()), signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_gpu_c_once_the_trainer_runs, daemon=True)
    killer.start()
    began = time.monotonic()
    with pytest.raises(launcher.Stalled) as stopped:
        run_on_ray(trainer(fake_slurm, "import time; time.sleep(120)"), os.environ, nodes=3, gpus=12, watch=watch)
    killer.join()
    assert time.monotonic() - began < 60
    message = str(stopped.value)
    assert "Ray on node gpu-c ended" in message and "\n" not in message, message
    assert ray_running(fake_slurm) == []


def test_a_node_count_other_than_the_jobs_is_refused(fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_NODES", "gpu-a gpu-b")
    with pytest.raises(LaunchError, match="has 2 nodes, the job asked for 3"):
        run_on_ray(trainer(fake_slurm, "sys.exit(0)"), os.environ, nodes=3, gpus=12)
    monkeypatch.delenv("SLURM_JOB_ID")
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


@pytest.mark.parametrize("signum, node_ray", [(signal.SIGTERM, False), (signal.SIGINT, False),
                                             (signal.SIGINT, True), (signal.SIGTERM, True)])
def test_a_signal_to_a_one_node_run_ends_every_process_the_run_started(tmp_path, signum, node_ray):
    """verl runs in its own session (so that it can be ended as a whole), which keeps a job
    manager's SIGTERM and the terminal's Ctrl-C from reaching it: the supervising process ends
    it, and what it started (adopted orphans too), before it exits 128 + the signal. Started
    ignoring SIGINT (as a job started in the background is): SIGINT is how a multi-node run
    stops each node's launcher, so the launcher takes it all the same; a node's Ray so stopped
    (``--node-ray``) ends with status 0 (srun reported every multi-node job's nodes as failed:
    "srun: error: vm: task 0: Exited with exit code 130")."""
    script, pids = tmp_path / "run.py", tmp_path / "pids"
    script.write_text(RUN_TREE)
    supervisor = subprocess.Popen([sys.executable, "-m", "luffy.engines.verl.launcher", "--nodes", "1", "--gpus", "0",
                                   *(["--node-ray"] if node_ray else []), "--", sys.executable, str(script), str(pids)],
                                  stderr=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run = []
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == 2):
            assert supervisor.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        run = [int(pid) for pid in pids.read_text().split()]
        assert all(alive(pid) for pid in run)
        supervisor.send_signal(signum)
        stopped_by_its_run = node_ray and signum == signal.SIGINT
        assert supervisor.wait(timeout=60) == (0 if stopped_by_its_run else 128 + signum)
        said = supervisor.stderr.read()
        assert (f"luffy launcher: cancelled by {signal.Signals(signum).name}" in said) != stopped_by_its_run, said
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


def test_the_rocr_variable_slurm_sets_beside_cuda_is_dropped_for_verls_workers():
    """SLURM 22.05 sets ROCR_VISIBLE_DEVICES (and CUDA_VISIBLE_DEVICES, ...) for any GPU it gives
    as a GRES; verl's workers refuse to start with both set (seen on the CI's two nodes)."""
    from luffy.engines.verl.launcher import without_slurms_rocr

    slurm = {"CUDA_VISIBLE_DEVICES": "0,1", "ROCR_VISIBLE_DEVICES": "0,1", "GPU_DEVICE_ORDINAL": "0,1", "X": "1"}
    assert without_slurms_rocr(slurm) == {"CUDA_VISIBLE_DEVICES": "0,1", "GPU_DEVICE_ORDINAL": "0,1", "X": "1"}
    amd = {"ROCR_VISIBLE_DEVICES": "2"}
    assert without_slurms_rocr(amd) == amd  # set alone, or to other devices: the site's own, kept
    assert without_slurms_rocr({"CUDA_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "1"})["ROCR_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("recorded, kept", [("vm:40001", False), ("other:40002", True)])
def test_an_ended_cluster_leaves_no_address_for_a_later_ray_init(tmp_path, monkeypatch, recorded, kept):
    # Ray's `ray start --head` records its address for ray.init() on the node; a later ray.init()
    # there without an address tried to attach to a finished two-node job's head (CI: the verl
    # rollout tests' Ray setup failed so). The record goes with this cluster, another head's stays.
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    record = tmp_path / "ray" / "ray_current_cluster"
    record.write_text(recorded)
    launcher.RayCluster(["vm", "vm-n2"], gpus_per_node=1, port=40001).stop(grace_s=0.1)
    assert record.exists() == kept
