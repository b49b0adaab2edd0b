"""Ray across the nodes of a SLURM allocation, for one verl run.

verl drives its workers through Ray. On one node, ``ray.init()`` inside verl starts a local
Ray and nothing is needed here. On N > 1 nodes (one SLURM job with ``--nodes=N``) this
launcher:

1. lists the job's nodes (``scontrol show hostnames $SLURM_JOB_NODELIST``);
2. derives the GPUs per node: SLURM sets ``SLURM_GPUS_PER_NODE`` only when the job asked
   ``--gpus-per-node``; Snakemake's SLURM executor asks ``--gpus=<total>`` instead, so the
   count is ``SLURM_GPUS`` (or the requested total) divided by the nodes;
3. starts a Ray head on the first node and a worker on each other one (``srun --overlap``,
   one task per node, ``ray start --block``) and waits until all N have joined;
4. runs the trainer with ``RAY_ADDRESS`` pointing at the head (verl attaches to it);
5. stops Ray on every node (``ray stop``) when the trainer ends, fails, or the job is
   cancelled (SLURM sends SIGTERM first), so no Ray process outlives the job.

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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from luffy.chain import Deadline, TimeLimitReached
from luffy.engines.base import EngineError
from luffy.errors import Cancelled, cancellable

log = logging.getLogger(__name__)

RAY_PORT = 6379
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


def _count(value: str) -> int:
    """A SLURM GPU count: '8', 'a100:8' or '8(x2)' (per-node lists) -> 8."""
    match = re.match(r"^(?:[A-Za-z0-9_.]+:)?(\d+)", value.strip())
    if not match:
        raise LaunchError(f"cannot read a GPU count from '{value}'")
    return int(match.group(1))


def gpus_per_node(env: Mapping[str, str], nodes: int, requested_total: int) -> int:
    """GPUs on each node of the allocation (the same on every node, or a LaunchError)."""
    if env.get("SLURM_GPUS_PER_NODE"):
        return _count(env["SLURM_GPUS_PER_NODE"])
    total = _count(env["SLURM_GPUS"]) if env.get("SLURM_GPUS") else requested_total
    if total < nodes or total % nodes:
        raise LaunchError(f"{total} GPUs do not split evenly over {nodes} nodes")
    return total // nodes


def allocation_nodes(env: Mapping[str, str]) -> list[str]:
    """Host names of the SLURM job's nodes, in SLURM's order."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("not inside a SLURM job (SLURM_JOB_NODELIST is unset): a multi-node run needs one")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


class RayCluster:
    """A Ray head and workers started on the allocation's nodes with srun."""

    def __init__(self, nodes: Sequence[str], gpus_per_node: int, port: int = RAY_PORT):
        self.nodes, self.gpus, self.port = list(nodes), gpus_per_node, port
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"{self.nodes[0]}:{self.port}"

    def _on(self, node: str, *ray_args: str) -> list[str]:
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--overlap", "ray", *ray_args]

    def start_commands(self) -> list[list[str]]:
        head = self._on(self.nodes[0], "start", "--head", f"--node-ip-address={self.nodes[0]}", f"--port={self.port}",
                        f"--num-gpus={self.gpus}", "--block")
        workers = [self._on(node, "start", f"--address={self.address}", f"--num-gpus={self.gpus}", "--block")
                   for node in self.nodes[1:]]
        return [head, *workers]

    def stop_commands(self) -> list[list[str]]:
        return [self._on(node, "stop", "--force") for node in self.nodes]

    def joined(self) -> int:
        """Nodes the head reports alive (0 while it does not answer)."""
        out = subprocess.run(["ray", "status", f"--address={self.address}"], capture_output=True, text=True)
        return len(re.findall(r"^\s*\d+\s+node_", out.stdout, flags=re.M)) if out.returncode == 0 else 0

    def start(self, timeout_s: float = JOIN_TIMEOUT_S, env: Mapping[str, str] | None = None) -> None:
        """Start the head and the workers, in ``env`` (srun hands it to each node; the workers
        verl's driver places there inherit it)."""
        env = dict(env) if env is not None else None
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

    def _check(self, deadline: float, what: str) -> None:
        if any(p.poll() is not None for p in self.processes):
            raise LaunchError(f"a `ray start` ended while waiting for {what} (see this job's log)")
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out waiting for {what}")
        time.sleep(POLL_S)

    def stop(self) -> None:
        """Ray stopped on every node, and the srun steps that held it ended."""
        for command in self.stop_commands():
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def run_on_ray(command: Sequence[str], env: Mapping[str, str], nodes: int, gpus: int,
               watch: Watch | None = None) -> int:
    """Run ``command`` (a verl entry point) on ``nodes`` nodes with ``gpus`` GPUs in all; returns
    its exit status. ``watch`` stops a run that stalls (``supervise``), on one node or several;
    SIGTERM or SIGINT (SLURM cancelling the job, Ctrl-C) ends the trainer and Ray, then raises
    ``Cancelled``."""
    if nodes <= 1:  # without a watch, one that never stops the run (but still ends what it leaves running)
        return supervise(command, env, watch or Watch(progress=lambda: None, stall_s=math.inf, startup_s=math.inf))
    cluster = RayCluster(allocation_nodes(env), gpus_per_node(env, nodes, gpus))
    if len(cluster.nodes) != nodes:
        raise LaunchError(f"the allocation has {len(cluster.nodes)} nodes, the job asked for {nodes}")

    trainer = None
    with cancellable():
        try:
            cluster.start(env=env)
            trainer_env = {**env, "RAY_ADDRESS": cluster.address}
            if watch is not None:  # a stalled or cancelled trainer is ended by supervise, Ray below
                return supervise(command, trainer_env, watch)
            trainer = subprocess.Popen(list(command), env=trainer_env)
            return trainer.wait()
        except Cancelled as err:
            log.warning("%s: stopping the trainer and Ray", err)
            if trainer is not None and trainer.poll() is None:
                trainer.terminate()
                trainer.wait()
            raise
        finally:
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job, all nodes together")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_on_ray(command, os.environ, args.nodes, args.gpus)
    except LaunchError as err:
        print(f"luffy launcher: error: {err}", file=sys.stderr)
        return 2
    except Cancelled as err:
        print(f"luffy launcher: {err}", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
