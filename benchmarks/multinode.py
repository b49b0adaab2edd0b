"""A verl training job on two SLURM nodes vs the same job on one, on the CPU.

Runs the training of ``tests/multinode.yaml`` (LUFFY on verl, ``device: cpu``, one logical GPU
per node) through ``snakemake --profile slurm`` once per layout, as a user types it, and prints
for each: start-up (the job's allocation to its first logged step), the time of each step after
the first, the job's wall time, and the peak memory of the job's processes on each node (summed
PSS, sampled every 2 s). Needs a SLURM partition with two nodes (CI's: ``.ci/slurm_setup.sh
start``, partition ``multi``) and the submitting environment ``.venv-slurm``.

    .venv/bin/python benchmarks/multinode.py [--steps 6] [--partition multi] [--layouts 2 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from slurm_records import Census, job_records, profile_for, snakemake_command  # noqa: E402


def study(workdir: Path, nodes: int, steps: int, partition: str) -> dict:
    """The training job of tests/multinode.yaml on ``nodes`` nodes: its figures."""
    profile_for(workdir, partition)
    config = yaml.safe_load((REPO / "tests" / "multinode.yaml").read_text())
    config["train_defaults"].update(steps=steps, checkpoint_every=steps)
    config["resources"]["stages"]["train"]["nodes"] = nodes
    (workdir / "bench.yaml").write_text(yaml.safe_dump(config))

    # the target first: --configfile takes every name after it
    command, env = snakemake_command("results/train/luffy/final", "--configfile", "bench.yaml")
    work = workdir / "results" / "train" / "luffy" / "work"  # work/<settings key>/
    census = Census(workdir)
    census.start()
    began = time.time()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=(workdir / "snakemake.log").open("w"),
                               stderr=subprocess.STDOUT)
    first_step_at = None
    while process.poll() is None:
        if first_step_at is None and any(m.read_text().strip() for m in work.glob("*/metrics.jsonl")):
            first_step_at = time.time()
        time.sleep(0.5)
    census.done.set()
    census.join()
    if process.returncode != 0:
        sys.exit(f"the {nodes}-node study failed; see {workdir / 'snakemake.log'}")
    trains = {job: fields for job, fields in job_records(workdir).items() if "rule_train" in fields.get("Comment", "")}
    train = trains[max(trains)]  # this run's (SLURM keeps an earlier run's record in the same folder for a while)
    start = datetime.datetime.fromisoformat(train["StartTime"]).timestamp()
    end = datetime.datetime.fromisoformat(train["EndTime"]).timestamp()
    (figures,) = [json.loads(f.read_text()) for f in work.glob("*/verl_log/attempt-*.figures.json")]
    (step_log,) = work.glob("*/verl_log/attempt-*.jsonl")
    step_s = [json.loads(line)["data"]["timing_s/step"] for line in step_log.read_text().splitlines()][1:]
    return {"nodes": nodes, "hosts": train["NodeList"], "startup_s": first_step_at - start,
            "step_s": statistics.median(step_s), "steps_s": step_s, "job_s": end - start,
            "submitted_to_end_s": end - began, "engine_figures": figures,
            "peak_gib_per_node": {node: round(peak / 2**30, 2) for node, peak in sorted(census.peak_bytes.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--partition", default="multi")
    parser.add_argument("--layouts", type=int, nargs="+", default=[2, 1], help="node counts, run in this order")
    parser.add_argument("--out", default=None, help="keep the studies here (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="multinode-bench-"))
    results = []
    for nodes in args.layouts:
        workdir = root / f"nodes-{nodes}"
        workdir.mkdir(parents=True)
        results.append(study(workdir, nodes, args.steps, args.partition))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.steps} steps of tests/multinode.yaml's LUFFY job (verl on the CPU) through SLURM:")
    print("| nodes | start-up (allocation to first step) | median step after the first | job wall time | "
          "peak memory per node |")
    print("|---:|---:|---:|---:|---|")
    for r in results:
        peaks = ", ".join(f"{node} {gib:.2f} GiB" for node, gib in r["peak_gib_per_node"].items())
        print(f"| {r['nodes']} | {r['startup_s']:.0f} s | {r['step_s']:.1f} s | {r['job_s']:.0f} s | {peaks} |")
    if len(results) > 1:
        base = results[-1]
        for r in results[:-1]:
            print(f"{r['nodes']} nodes / {base['nodes']}: start-up x{r['startup_s'] / base['startup_s']:.2f}, "
                  f"step x{r['step_s'] / base['step_s']:.2f}, job x{r['job_s'] / base['job_s']:.2f}")


if __name__ == "__main__":
    main()
