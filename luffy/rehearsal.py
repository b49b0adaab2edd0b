"""A rehearsal of a config: its whole DAG on the CPU, in minutes, before its GPU run.

``luffy rehearse <config>`` derives a config from the given one and runs it through the same
Snakemake rules: preflight, data pipeline, chat template, tokenizer, reward, engine (verl's own
loop on the CPU for ``engine: verl``), conversion (verl's model merger), vLLM evaluation and
report. Only what costs GPUs is shrunk (``Scale``):

- the base model: a random stand-in of the same architecture, built from the base model's
  config (with its ``config_overrides``), saved with its tokenizer and chat template
  (``base_model.stand_in``; a hub model's weights are never fetched); the tiny demo model is
  pre-trained for a few steps only;
- the data: the first ``raw_rows`` raw trace rows (``data.max_rows``), traces and responses
  capped at ``response_tokens``;
- training: ``steps`` steps of ``prompts_per_step`` prompts, a checkpoint every step, on the
  CPU (``device: cpu``; verl: sdpa attention, one rollout replica, a small KV cache, FSDP2 as
  on GPUs by default);
- evaluation: the first ``suite_problems`` problems of each suite, ``suite_samples`` samples
  of at most ``eval_tokens`` tokens; published models (``evaluation.models``) left out;
- one seed; into ``<results_dir>-rehearsal`` and the MLflow experiment ``<experiment>-rehearsal``.

Everything else is the config's own: group sizes, algorithms, losses, templates, prompt
lengths, data columns, verl overrides, graders and suites. So whatever would fail in the real
run for a reason other than scale fails here, with the same message.

On several nodes (``--nodes N``, through a SLURM profile: ``luffy rehearse CONFIG --nodes 2 --
--profile slurm``) each training job runs on N nodes of the cluster, one FSDP rank, one Ray node
and one vLLM rollout server per node, as a multi-node GPU run lays them out: Ray across the
nodes, FSDP's sharding over several ranks, the weight sync of each node's rollout server and the
model merger of several shards are rehearsed too.

What a rehearsal cannot show: GPU kernels, CUDA IPC / NCCL weight sync (on the CPU it goes
through gloo), vLLM sleep and wake, tensor parallelism above 1, more than one rank per node,
flash-attn sequence packing, memory and time at full scale.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from luffy.config import TrainConfig, load_config, resolve_train_config, to_dict
from luffy.config.rules import sequences_per_prompt
from luffy.errors import RehearsalFailed

log = logging.getLogger(__name__)
SUFFIX = "-rehearsal"


@dataclass(frozen=True)
class Scale:
    """How far a rehearsal shrinks what costs GPUs."""

    raw_rows: int = 256          # raw trace rows read (toy: training problems generated)
    steps: int = 2               # training steps per job
    prompts: int = 2             # prompts per step (at least one per mini-batch)
    response_tokens: int = 1024  # cap of max_response_tokens and data.max_trace_tokens
    pretrain_steps: int = 20     # the tiny demo model's pre-training
    suite_problems: int = 8      # problems per suite
    suite_samples: int = 2       # samples per problem (at most)
    eval_tokens: int = 64        # new tokens per evaluation sample (at most)
    teacher_traces: int = 8      # report.teacher_traces (at most)
    kv_cache_share: float = 0.05  # vLLM's KV cache, as a share of host memory
    runtime_minutes: int = 30    # hard limit of each job (verl on the CPU enforces it)
    job_mem_mb: int = 3000       # what a job reserves of --resources mem_mb ...
    verl_mem_mb: int = 9000      # ... and a verl training job (verl's own loop: about 8 GB)


def _shrunk_experiment(cfg: TrainConfig, scale: Scale, max_prompt_tokens: int, nodes: int) -> dict[str, Any]:
    out = to_dict(cfg)
    per_minibatch = math.ceil(scale.prompts / cfg.mini_batches)
    while cfg.engine == "verl" and per_minibatch * sequences_per_prompt(cfg) % nodes:
        per_minibatch += 1  # verl splits each mini-batch evenly over its ranks, one per node here
    response = min(cfg.max_response_tokens, scale.response_tokens)
    out.update(steps=min(cfg.steps, scale.steps), prompts_per_step=per_minibatch * cfg.mini_batches,
               max_response_tokens=response, checkpoint_every=1, device="cpu")
    if cfg.engine == "verl" and cfg.algorithm != "sft":  # one whole sequence per micro-batch, as the real run
        out["micro_batch_tokens"] = max_prompt_tokens + response
    elif cfg.engine == "verl":
        out["micro_batch_tokens"] = min(cfg.micro_batch_tokens, max_prompt_tokens + response)
    return out


def rehearsal_config(raw: dict[str, Any], scale: Scale = Scale(), nodes: int = 1) -> dict[str, Any]:
    """The rehearsal of the (raw, as in its YAML file) config ``raw``, its training jobs on
    ``nodes`` nodes (one logical GPU each, on the CPU: SLURM is asked for none); validated first,
    so a config the real run would refuse is refused here with the same message."""
    resolved = load_config(raw)
    root = resolved.root
    out = copy.deepcopy(raw)
    out["results_dir"] = root.results_dir.rstrip("/") + SUFFIX
    out["tracking"] = {**(raw.get("tracking") or {}), "experiment": root.tracking.experiment + SUFFIX}

    data = out.setdefault("data", {})
    data["max_trace_tokens"] = min(root.data.max_trace_tokens, scale.response_tokens)
    if root.data.traces == "toy":
        toy = data.setdefault("toy", {})
        toy["n_train"] = min(root.data.toy.n_train, scale.raw_rows)
        toy["n_pretrain"] = min(root.data.toy.n_pretrain, scale.raw_rows)
    else:
        data["max_rows"] = min(root.data.max_rows or scale.raw_rows, scale.raw_rows)

    base = out.setdefault("base_model", {})
    if root.base_model.path is None:
        base.setdefault("tiny", {})["pretrain_steps"] = min(root.base_model.tiny.pretrain_steps, scale.pretrain_steps)
    else:
        base["stand_in"] = {**(base.get("stand_in") or {}), "enabled": True}

    verl = out.setdefault("verl", {})
    verl.update(attn_implementation="sdpa", rollout_tensor_parallel=1, strategy="fsdp2",
                rollout_gpu_memory_utilization=scale.kv_cache_share, agent_workers=1, reward_workers=1,
                grader_processes=1, param_offload=False, optimizer_offload=False)
    max_prompt = root.verl.max_prompt_tokens
    out["train_defaults"] = {}
    out["experiments"] = {name: _shrunk_experiment(resolve_train_config(name, raw.get("train_defaults") or {},
                                                                        settings or {}), scale, max_prompt, nodes)
                          for name, settings in (raw.get("experiments") or {}).items()}
    if root.seeds:
        out["seeds"] = root.seeds[:1]
    if root.validation.every > 0:
        out.setdefault("validation", {})["max_problems"] = min(root.validation.max_problems or scale.suite_problems,
                                                               scale.suite_problems)

    evaluation = out.setdefault("evaluation", {})
    evaluation.pop("models", None)
    evaluation["vllm"] = {**(evaluation.get("vllm") or {}), "gpu_memory_utilization": scale.kv_cache_share,
                          "enforce_eager": True}
    for name, suite in root.evaluation.suites.items():
        n = suite.n if suite.n is not None else (resolved.benchmarks[name].n if name in resolved.benchmarks else 1)
        evaluation["suites"][name] = {**evaluation["suites"][name], "max_problems": scale.suite_problems,
                                      "n": min(n, scale.suite_samples),
                                      "max_tokens": min(suite.max_tokens, scale.eval_tokens)}

    report = out.setdefault("report", {})
    report["publish"] = None
    report["teacher_traces"] = min(root.report.teacher_traces, scale.teacher_traces)

    verl_jobs = any(cfg.engine == "verl" for cfg in resolved.experiments.values())
    if nodes > 1 and not verl_jobs:
        raise RehearsalFailed(f"--nodes {nodes}: only verl's training runs on several nodes, and no experiment of "
                              "this config uses engine: verl")
    out["resources"] = {"default": {"cpus": 1, "mem_mb": scale.job_mem_mb, "runtime": scale.runtime_minutes,
                                    "gpus": 0, "nodes": 1},
                        "stages": {"train": {"mem_mb": scale.verl_mem_mb, "nodes": nodes}} if verl_jobs else {}}
    load_config(out)  # the rehearsal's own config is valid too
    return out


def describe(raw: dict[str, Any], rehearsal: dict[str, Any], scale: Scale) -> str:
    """What the rehearsal runs, and what it shrank, in a few lines."""
    experiments = rehearsal["experiments"]
    nodes = rehearsal["resources"].get("stages", {}).get("train", {}).get("nodes", 1)
    lines = [f"rehearsal of {len(experiments)} experiment(s) into {rehearsal['results_dir']} "
             f"(MLflow experiment {rehearsal['tracking']['experiment']}):",
             f"  training: {scale.steps} steps x {scale.prompts}+ prompts, responses <= "
             f"{min([e['max_response_tokens'] for e in experiments.values()] or [0])} tokens, on the CPU"
             + (f", each verl job on {nodes} nodes" if nodes > 1 else ""),
             f"  evaluation: first {scale.suite_problems} problems per suite, <= {scale.suite_samples} samples of "
             f"<= {scale.eval_tokens} tokens"]
    if (raw.get("verl") or {}).get("strategy") == "fsdp":
        lines.append("  verl: FSDP2 here; the GPU run's FSDP1 (verl.strategy: fsdp) is not rehearsed (FSDP1 asks for "
                     "an accelerator): leave verl.strategy at fsdp2 to run what was rehearsed")
    if (raw.get("base_model") or {}).get("path"):
        lines.append(f"  base model: a random stand-in of {raw['base_model']['path']}'s architecture, with its "
                     "tokenizer and chat template")
    if (raw.get("evaluation") or {}).get("models"):
        lines.append(f"  left out: the external models {sorted(raw['evaluation']['models'])}")
    return "\n".join(lines)


def memory_mb() -> int:
    import psutil

    return int(psutil.virtual_memory().total / 2**20)


CLUSTER_OPTIONS = ("--profile", "--executor", "-e")


def on_a_cluster(snakemake_args: list[str]) -> bool:
    """Whether Snakemake's arguments send the jobs elsewhere (a profile or an executor)."""
    return any(arg == option or arg.startswith(option + "=") for arg in snakemake_args for option in CLUSTER_OPTIONS)


def rehearse(configfile: str, cores: int | None = None, scale: Scale = Scale(),
             snakemake_args: list[str] | None = None, nodes: int = 1, snakemake: str | None = None) -> Path:
    """Write the rehearsal config of ``configfile`` and run its DAG with Snakemake in the working
    directory (with its Snakefile, else this package's repository's); returns the report's
    results table. ``nodes`` > 1: its training jobs on that many nodes, which needs Snakemake
    arguments that send the jobs to a cluster (``--profile slurm``) and a ``snakemake`` that
    has its executor (default: the one beside this luffy, else on PATH)."""
    from luffy.config import read_config_file

    snakemake_args = list(snakemake_args or [])
    cluster = on_a_cluster(snakemake_args)
    if nodes > 1 and not cluster:
        raise RehearsalFailed(f"--nodes {nodes}: a rehearsal on several nodes runs its training jobs on a SLURM "
                              f"allocation of {nodes} nodes; pass the cluster's profile after `--` (luffy rehearse "
                              f"{configfile} --nodes {nodes} -- --profile slurm)")

    snakefile = Path("Snakefile") if Path("Snakefile").exists() else Path(__file__).resolve().parents[1] / "Snakefile"
    if not snakefile.exists():
        raise FileNotFoundError(f"luffy rehearse runs the workflow: no Snakefile in {os.getcwd()} or {snakefile.parent}")

    raw = read_config_file(configfile) or {}
    cores = cores or os.cpu_count() or 1
    rehearsal = rehearsal_config(raw, scale, nodes)
    results = Path(rehearsal["results_dir"])
    results.mkdir(parents=True, exist_ok=True)
    derived = results / "rehearsal.yaml"
    from luffy import io

    io.write_text(derived, f"# the rehearsal of {configfile} (luffy rehearse); do not edit\n"
                           + yaml.safe_dump(rehearsal, sort_keys=False))
    print(describe(raw, rehearsal, scale), flush=True)
    beside = Path(sys.executable).with_name("snakemake")
    snakemake = snakemake or (str(beside) if beside.exists() else "snakemake")
    # on this machine: its cores and memory; on a cluster, the scheduler's (the profile's settings)
    here = [] if cluster else ["--cores", str(cores), "--resources", f"mem_mb={int(memory_mb() * 0.85)}"]
    command = [snakemake, "-s", str(snakefile), "--configfile", str(derived), *here,
               "--keep-going",  # every independent failure in one rehearsal
               "--rerun-incomplete", "--show-failed-logs", *snakemake_args]
    # the cluster's jobs run this luffy (the profile's jobs take LUFFY_COMMAND), unless told otherwise
    from luffy.workflow import LUFFY_COMMAND, luffy_command

    env = {**os.environ, LUFFY_COMMAND: luffy_command()}
    log.info("running %s", " ".join(command))
    try:
        status = subprocess.run(command, env=env).returncode
    except FileNotFoundError:
        raise RehearsalFailed(f"no Snakemake at {snakemake} (--snakemake names the one to run)") from None
    if status != 0:
        raise RehearsalFailed(f"the rehearsal of {configfile} failed (Snakemake exit status {status}); the failing "
                              f"job's log is named above (logs under {results}/logs)")
    return results / "report" / "results.md"
