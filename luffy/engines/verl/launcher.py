"""Ray across the nodes of a SLURM allocation, for one verl run.

verl drives its workers through Ray. On one node, ``ray.init()`` inside verl starts a local
Ray and nothing is needed here. On N > 1 nodes (one SLURM job with ``--nodes=N``) this
launcher:

1. reads the job's nodes and GPUs per node from SLURM's record of the job (``scontrol show
   job $SLURM_JOB_ID``): Snakemake's SLURM executor runs the rule as a one-task job step on
   the first node, whose ``SLURM_JOB_NODELIST`` names that node only, and removes the other
   ``SLURM_*`` variables;
2. starts a Ray head on its own node (at a free port) and a worker on each other one (``srun
   --overlap``, one task per node, the job environment's ``ray start --block`` under a
   launcher of its own) and waits until all N have joined;
3. runs the trainer with ``RAY_ADDRESS`` pointing at the head (verl attaches to it);
4. ends Ray on every node when the trainer ends, fails, or the job is cancelled (SIGTERM or
   SIGINT): each node's launcher ends its Ray's session, so no Ray process of the job
   outlives it, and no other job's Ray on the same node is touched.

``python -m luffy.engines.verl.launcher --nodes N --gpus G -- COMMAND...`` runs COMMAND this
way; the verl engine calls ``run_on_ray``.

The trainer runs under a ``Watch`` (``supervise``): a run that logs no new step for
``stall_s`` (or no first step within ``startup_s``), or that outlives its hard time limit, is
stopped, and so is every process it started (Ray's GCS, raylet and workers, the vLLM engine
processes): a failure inside a vLLM worker otherwise leaves verl's driver waiting forever.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from luffy.chain import Deadline, TimeLimitReached
from luffy.engines.base import EngineError
from luffy.errors import Cancelled, cancellable

log = logging.getLogger(__name__)

MODULE = "luffy.engines.verl.launcher"
JOIN_TIMEOUT_S = 600.0
POLL_S = 1.0


class LaunchError(EngineError):
    """The Ray cluster could not be set up on the allocation; the message says why."""


ESI_SAVE_S = 60.0  # what verl's ESI check allows for saving a checkpoint (should_save_ckpt_esi's default)


class Stalled(EngineError):
    """The trainer stopped making progress (or ran out of time) and was stopped."""


@dataclass
class Watch:
    """What ``supervise`` holds a trainer to. ``progress()`` is the last step it logged (None:
    none yet)."""

    progress: Callable[[], int | None]
    stall_s: float                   # most seconds between two logged steps
    startup_s: float                 # most seconds from the start to the first logged step
    limit_s: float | None = None     # hard wall-clock limit of the whole run (None: none)
    # a chained SLURM job's end (luffy.chain): verl saves a checkpoint when it nears (its ESI
    # variable, set by the engine); the run is then ended and TimeLimitReached raised
    deadline: Deadline | None = None
    checkpointed: Callable[[], int | None] = lambda: None  # the newest checkpoint's step
    saved_for_time: Callable[[], int | None] = lambda: None  # the step the trainer saved at for the time limit
    total_steps: int = 0
    # a fault outside the trainer that ends the run at once (a node's Ray gone: None while all is well)
    lost: Callable[[], str | None] = lambda: None
    poll_s: float = 2.0
    grace_s: float = 10.0            # SIGTERM, then this long, then SIGKILL
    # measured while it runs: seconds from the start to each newly logged step, and the largest
    # memory of the whole process tree (summed PSS: shared pages counted once) and its process count
    step_times: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    peak_processes: int = 0


def _remember(process, seen: dict) -> tuple[int, int]:
    """Add ``process`` and its live descendants to ``seen`` (psutil objects keyed by PID and
    start time, so a reused PID is never mistaken for one of them); returns the tree's memory
    (summed PSS, RSS where PSS cannot be read) and its process count."""
    import psutil

    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    memory = 0
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            seen.setdefault((p.pid, p.create_time()), p)
            try:
                memory += p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                memory += p.memory_info().rss
    return memory, len(tree)


def end_processes(processes: list, grace_s: float) -> int:
    """SIGTERM to each still running, SIGKILL to those left after ``grace_s``; returns how many
    were running."""
    import psutil

    gone = (psutil.NoSuchProcess, psutil.AccessDenied)
    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(*gone):
            p.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        with contextlib.suppress(*gone):
            p.kill()
    psutil.wait_procs(left, timeout=grace_s)
    return len(alive)


def supervise(command: Sequence[str], env: Mapping[str, str], watch: Watch) -> int:
    """Run ``command`` in its own session under ``watch``; returns its exit status, or raises
    ``Stalled`` (after ending it and everything it started). Whatever it leaves running when it
    exits (Ray processes orphaned by a crash) is ended too, and so is everything when SIGTERM or
    SIGINT reaches this process (``Cancelled``, raised on after the cleanup): the run's own
    session keeps the terminal's Ctrl-C and a job manager's signal from reaching it, so nothing
    else would end it."""
    with cancellable():
        process, seen = None, {}
        problem, time_up, cancelled = None, None, None
        try:
            process = subprocess.Popen(list(command), env=dict(env), start_new_session=True)
            began = last_change = time.monotonic()
            last_step = None
            saved_before = watch.checkpointed() if watch.deadline is not None else None
            while process.poll() is None:
                time.sleep(watch.poll_s)
                memory, count = _remember(process, seen)
                if memory > watch.peak_memory_bytes:
                    watch.peak_memory_bytes, watch.peak_processes = memory, count
                problem = watch.lost()
                if problem:
                    log.error("stopping the run: %s", problem)
                    break
                now, step = time.monotonic(), watch.progress()
                if step != last_step:
                    last_step, last_change = step, now
                    if step is not None:
                        watch.step_times.setdefault(step, now - began)
                if watch.limit_s is not None and now - began > watch.limit_s:
                    problem = (f"the run reached its time limit of {watch.limit_s:.0f} s "
                               f"({_last(last_step)})")
                elif last_step is None and now - began > watch.startup_s:
                    problem = (f"no step logged within {watch.startup_s:.0f} s of the start (the start-up limit; "
                               "the run may be hanging in its start-up)")
                elif last_step is not None and now - last_change > watch.stall_s:
                    problem = (f"no new step for {now - last_change:.0f} s after step {last_step} (stall limit "
                               f"{watch.stall_s:.0f} s): the run hangs")
                if problem:
                    log.error("stopping the run: %s", problem)
                    break
                time_up = _time_up(watch, saved_before)
                if time_up is not None:
                    log.warning("stopping the run at the checkpoint of step %s: the job's time limit is near", time_up)
                    break
        except Cancelled as err:
            cancelled = err
            log.warning("%s: ending the run and every process it started (its checkpoints are kept)", err)
        finally:
            if process is not None and not problem and process.poll() not in (None, 0):
                problem = watch.lost()  # the trainer failed because of it before it was seen
            if process is not None:
                _remember(process, seen)
                _remember_session(process.pid, seen)
                left = end_processes(list(seen.values()), watch.grace_s)
                if cancelled is not None:
                    log.warning("ended %d process(es) of the run", left)
                elif left and not problem and process.poll() is not None:
                    log.warning("ended %d process(es) the run left behind", left)
    if cancelled is not None:
        raise cancelled
    if problem:
        raise Stalled(f"stopped: {problem}; its processes were ended, its checkpoints kept (rerun the job to "
                      "resume from the last one)")
    if time_up is not None:
        raise TimeLimitReached(time_up, watch.total_steps, watch.deadline.end)
    return process.returncode


def _remember_session(session: int, seen: dict) -> None:
    """Add to ``seen`` every process of the session ``session`` leads: what the run started and
    then lost track of (an orphan re-parented to init stays in its session)."""
    import psutil

    for p in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if os.getsid(p.pid) == session:
                seen.setdefault((p.pid, p.create_time()), p)


def _time_up(watch: Watch, saved_before: int | None) -> int | None:
    """Near a chained job's end: the step the trainer saved at because the time runs short (it
    says so: ``saved_for_time``); a trainer that cannot say (verl's SFT trainer): a checkpoint
    written since this part started, once the next step and checkpoint may no longer fit; at the
    last moment (half of the deadline's floor left), the newest checkpoint, whatever it is."""
    if watch.deadline is None:
        return None
    marked = watch.saved_for_time()
    if marked is not None:
        return marked
    saved = watch.checkpointed()
    times = sorted(watch.step_times.values())
    longest = max((b - a for a, b in zip(times, times[1:])), default=times[0] if times else 0.0)
    closing = watch.deadline.stop_before_next(longest, ESI_SAVE_S)
    if closing and saved is not None and saved != saved_before:
        return saved
    if watch.deadline.left() < watch.deadline.floor_s / 2:
        return saved if saved is not None else 0
    return None


def _last(step: int | None) -> str:
    return "no step logged yet" if step is None else f"last step logged: {step}"


def without_slurms_rocr(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the ``ROCR_VISIBLE_DEVICES`` SLURM sets beside ``CUDA_VISIBLE_DEVICES``
    (SLURM 22.05 sets both, and more, for any GPU it allocates as a GRES): verl's workers refuse
    to start with both set ("Please don't set ROCR_VISIBLE_DEVICES when HIP/CUDA_VISIBLE_DEVICES
    is set", ``single_controller/base/worker.py:266``). Kept where it differs (an AMD site that
    sets it alone, or to other devices)."""
    out = dict(env)
    rocr = out.get("ROCR_VISIBLE_DEVICES")
    if rocr is not None and rocr == out.get("CUDA_VISIBLE_DEVICES"):
        del out["ROCR_VISIBLE_DEVICES"]
    return out


def job_record(env: Mapping[str, str]) -> str:
    """SLURM's record of the job the process runs in (``scontrol show job --oneliner``). The
    launcher reads the job's nodes and GPUs from it, not from ``SLURM_*`` variables: the SLURM
    executor runs a rule as a one-task job step (``srun -n1``, whose ``SLURM_JOB_NODELIST`` names
    its one node) and removes every ``SLURM_*`` variable but the job id and a few others."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise LaunchError("not inside a SLURM job (SLURM_JOB_ID is unset): a multi-node run needs one")
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchError(f"scontrol show job {job}: {' '.join(out.stderr.split()) or f'exit status {out.returncode}'}")
    return out.stdout


def _field(record: str, name: str) -> str | None:
    match = re.search(rf"(?:^|\s){name}=(\S+)", record)
    return match.group(1) if match else None


def allocation_nodes(record: str) -> list[str]:
    """Host names of the job's nodes, in SLURM's order (its record's ``NodeList``)."""
    nodelist = _field(record, "NodeList")
    if not nodelist or nodelist == "(null)":
        raise LaunchError("SLURM's record of this job names no nodes (NodeList); is it running?")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def gpus_per_node(record: str, nodes: int, requested_total: int) -> int:
    """GPUs on each node of the job (the same on every node, or a LaunchError): its GRES per
    node (``TresPerNode=gres:gpu[:type]:N``, what ``--gres``/``--gpus-per-node`` ask), else its
    allocated total (``TRES=...,gres/gpu=N``) split over the nodes, else the job's request."""
    per_node = re.search(r"gres[:/]gpu(?::[^:,\s]+)?[:=](\d+)", _field(record, "TresPerNode") or "")
    if per_node:
        return int(per_node.group(1))
    allocated = re.search(r"gres/gpu=(\d+)", _field(record, "TRES") or "")
    total = int(allocated.group(1)) if allocated else requested_total
    if total < nodes or total % nodes:
        raise LaunchError(f"{total} GPUs do not split evenly over {nodes} nodes")
    return total // nodes


RAY = str(Path(sys.executable).with_name("ray"))  # the job environment's Ray: a job's PATH need not have it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RayCluster:
    """A Ray head and workers started on the allocation's nodes with srun, this job's own: each
    node's Ray runs under a launcher of its own (``--nodes 1``: its own session, ended as a
    whole on SIGINT or SIGTERM), so stopping it ends exactly what it started, never another job's Ray on
    the same node (``ray stop`` would end every Ray process of the user there)."""

    def __init__(self, nodes: Sequence[str], gpus_per_node: int, port: int | None = None, cpus: int | None = None):
        self.nodes, self.gpus, self.cpus = list(nodes), gpus_per_node, cpus
        self.port = port if port is not None else _free_port()  # the head runs on this node (nodes[0])
        self.processes: list[subprocess.Popen] = []
        # Ray's token authentication with a token of this job's own: Ray 2.60 turns it on for a new
        # head by default, with the user's ~/.ray/auth_token, and refuses a client without it
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    @property
    def address(self) -> str:
        return f"{self.nodes[0]}:{self.port}"

    def _on(self, node: str, *ray_args: str) -> list[str]:
        cpus = [f"--cpus-per-task={self.cpus}"] if self.cpus else []  # else srun gives the step one CPU
        # --disable-status: one SIGINT to srun reaches the node's launcher (SIGTERM to srun would
        # SIGKILL it, SLURM 22.05's srun_job.c:2325, and its Ray would not be ended as a whole)
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--overlap", "--disable-status", *cpus,
                sys.executable, "-m",
                MODULE, "--nodes", "1", "--gpus", str(self.gpus), "--node-ray", "--", RAY, *ray_args]

    def start_commands(self) -> list[list[str]]:
        head = self._on(self.nodes[0], "start", "--head", f"--node-ip-address={self.nodes[0]}", f"--port={self.port}",
                        f"--num-gpus={self.gpus}", "--block")
        workers = [self._on(node, "start", f"--address={self.address}", f"--node-ip-address={node}",
                            f"--num-gpus={self.gpus}", "--block") for node in self.nodes[1:]]
        return [head, *workers]

    def joined(self) -> int:
        """Nodes the head reports alive (0 while it does not answer)."""
        out = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True,
                             env={**os.environ, **self.auth})
        return len(re.findall(r"^\s*\d+\s+node_", out.stdout, flags=re.M)) if out.returncode == 0 else 0

    def start(self, timeout_s: float = JOIN_TIMEOUT_S, env: Mapping[str, str] | None = None) -> None:
        """Start the head and the workers, in ``env`` (srun hands it to each node; the workers
        verl's driver places there inherit it)."""
        env = {**(os.environ if env is None else env), **self.auth}
        head, *workers = self.start_commands()
        self.processes.append(subprocess.Popen(head, env=env))
        deadline = time.monotonic() + timeout_s
        while self.joined() < 1:
            self._check(deadline, "the Ray head")
        for command in workers:
            self.processes.append(subprocess.Popen(command, env=env))
        while self.joined() < len(self.nodes):
            self._check(deadline, f"{len(self.nodes)} Ray nodes")
        log.info("Ray cluster of %d nodes x %d GPUs at %s", len(self.nodes), self.gpus, self.address)

    def lost(self) -> str | None:
        """Which node's Ray has ended (its ``ray start --block`` returns when a Ray process of the
        node dies, and its srun with it), or None while every node's runs."""
        for node, process in zip(self.nodes, self.processes):
            if process.poll() is not None:
                return f"Ray on node {node} ended (exit status {process.returncode})"
        return None

    def _check(self, deadline: float, what: str) -> None:
        ended = self.lost()
        if ended:
            raise LaunchError(f"{ended} while waiting for {what} (see this job's log)")
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out waiting for {what}")
        time.sleep(POLL_S)

    def stop(self, grace_s: float = 20.0) -> None:
        """Ray ended on every node: SIGINT to each node's srun, which hands it to that node's
        launcher (it ends its Ray's session); SIGTERM (srun then kills the step) and SIGKILL to
        an srun still there after ``grace_s`` each."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            running = [p for p in self.processes if p.poll() is None]
            for process in running:
                process.send_signal(signum)
            deadline = time.monotonic() + grace_s
            for process in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.forget()

    def forget(self) -> None:
        """The head's ``ray start`` recorded its address on this node (Ray's temp dir,
        ``ray_current_cluster``); a later ``ray.init()`` without an address on the node would try to
        attach to this ended cluster and hang. ``ray stop`` removes the record; without it, this
        does, only while it still names this cluster (a later job's head may have written its own)."""
        from ray._common.utils import get_ray_address_file

        record = Path(get_ray_address_file(None))
        with contextlib.suppress(OSError):
            if record.read_text().strip() == self.address:
                record.unlink()


def run_on_ray(command: Sequence[str], env: Mapping[str, str], nodes: int, gpus: int,
               watch: Watch | None = None) -> int:
    """Run ``command`` (a verl entry point) on ``nodes`` nodes with ``gpus`` GPUs in all; returns
    its exit status. ``watch`` stops a run that stalls (``supervise``), on one node or several;
    SIGTERM or SIGINT (SLURM cancelling the job, Ctrl-C) ends the trainer and Ray, then raises
    ``Cancelled``."""
    # without a watch, one that never stops the run (but still ends what it leaves running)
    watch = watch or Watch(progress=lambda: None, stall_s=math.inf, startup_s=math.inf)
    if nodes <= 1:
        # a Ray of its own: Ray's ray.init() without an address attaches to the cluster a `ray start`
        # last recorded on this machine (/tmp/ray/ray_current_cluster), another job's or a dead one
        if not env.get("RAY_ADDRESS"):
            env = {**env, "RAY_ADDRESS": "local"}
        return supervise(command, env, watch)
    record = job_record(env)
    hosts = allocation_nodes(record)
    if len(hosts) != nodes:
        raise LaunchError(f"the allocation has {len(hosts)} nodes, the job asked for {nodes}")
    here = env.get("SLURMD_NODENAME")  # the head runs where this launcher runs (its port is free here)
    hosts.sort(key=lambda host: host != here)
    cpus = env.get("SLURM_CPUS_PER_TASK")
    cluster = RayCluster(hosts, gpus_per_node(record, nodes, gpus), cpus=int(cpus) if cpus and cpus.isdigit() else None)

    with cancellable():
        try:
            cluster.start(env=env)
            watch.lost = cluster.lost  # a node's Ray gone ends the run at once, naming the node
            # a stalled or cancelled trainer is ended by supervise, Ray below
            return supervise(command, {**env, **cluster.auth, "RAY_ADDRESS": cluster.address}, watch)
        finally:
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job, all nodes together")
    parser.add_argument("--node-ray", action="store_true",
                        help="COMMAND is one node's Ray of a multi-node run: SIGINT, how the run stops it, ends it "
                             "with status 0 (else srun reports the node's task as failed in every job's log)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGINT is how a multi-node run stops each node's launcher (through srun): taken even where
    # the launcher was started ignoring it (a job started in the background)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # a node's Ray (--nodes 1) runs in its srun step, where SLURM set the GPU variables again
        return run_on_ray(command, without_slurms_rocr(os.environ), args.nodes, args.gpus)
    except LaunchError as err:
        print(f"luffy launcher: error: {err}", file=sys.stderr)
        return 2
    except Cancelled as err:
        if args.node_ray and err.signum == signal.SIGINT:
            log.info("this node's Ray ended: the run stopped it")
            return 0
        print(f"luffy launcher: {err}", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
