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
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Mapping, Sequence

log = logging.getLogger(__name__)
from luffy.engines.base import EngineError

RAY_PORT = 6379
JOIN_TIMEOUT_S = 600.0
POLL_S = 1.0


class LaunchError(EngineError):
    """The Ray cluster could not be set up on the allocation; the message says why."""


class Cancelled(BaseException):
    """SIGTERM (SLURM cancelling the job): unwinds through the cleanup."""


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

    def start(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        head, *workers = self.start_commands()
        self.processes.append(subprocess.Popen(head))
        deadline = time.monotonic() + timeout_s
        while self.joined() < 1:
            self._check(deadline, "the Ray head")
        for command in workers:
            self.processes.append(subprocess.Popen(command))
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


def run_on_ray(command: Sequence[str], env: Mapping[str, str], nodes: int, gpus: int) -> int:
    """Run ``command`` (a verl entry point) on ``nodes`` nodes with ``gpus`` GPUs in all; returns
    its exit status (143 when the job was cancelled)."""
    if nodes <= 1:
        return subprocess.run(list(command), env=dict(env)).returncode
    cluster = RayCluster(allocation_nodes(env), gpus_per_node(env, nodes, gpus))
    if len(cluster.nodes) != nodes:
        raise LaunchError(f"the allocation has {len(cluster.nodes)} nodes, the job asked for {nodes}")

    def cancelled(signum, frame):
        raise Cancelled()

    previous = signal.signal(signal.SIGTERM, cancelled)
    trainer = None
    try:
        cluster.start()
        trainer = subprocess.Popen(list(command), env={**env, "RAY_ADDRESS": cluster.address})
        return trainer.wait()
    except Cancelled:
        log.warning("cancelled (SIGTERM): stopping the trainer and Ray")
        if trainer is not None and trainer.poll() is None:
            trainer.terminate()
            trainer.wait()
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
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


if __name__ == "__main__":
    sys.exit(main())
