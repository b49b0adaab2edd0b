"""The verl engine behind the engine interface.

train: the experiment's overrides (``overrides``) -> ``python -m verl.trainer.main_ppo`` (luffy,
grpo, rl_sft) or ``python -m verl.trainer.sft_trainer_ray`` (sft), stock entry points of the
released package, with our plug-ins imported on every Ray process. State lives in the job's work
directory (not a workflow output, so Snakemake never deletes it):

    work/checkpoints/global_step_N/...   verl's checkpoints; a rerun resumes (trainer.resume_mode=auto) from
                                         the newest that reads (``resume_check``)
    work/metrics.jsonl                   our per-step metrics (written by the trainer plug-in)
    work/verl_log/current.jsonl          verl's own metric log of the running attempt (one path for all
                                         attempts: verl's MLflow logger records it as a parameter, and
                                         a resumed run may not change its parameters) ...
    work/verl_log/attempt-*.jsonl        ... kept per attempt once it ends (and *.figures.json: its
                                         start-up, step times and peak memory)
    work/verl_log/hydra/attempt-*/       Hydra's log of the attempt and its composed config
    work/run.json                        the MLflow run a resumed job continues

MLflow: verl's logger attaches to the stage's ``train`` child run (``MLFLOW_RUN_ID``), so
every step's metrics land there, under verl's names and ours.

export: ``python -m verl.model_merger merge --backend fsdp`` on the checkpoint's shards, then
the merged weights go through our verified export (logits of a reload compared in the merged
weights' own dtype).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from luffy import io
from luffy.config import VerlConfig, from_json, to_dict
from luffy.engines.base import (EngineError, MetricsSink, TrainJob, resume_candidates, torch_file_problem,
                                write_manifest)
from luffy.engines.verl import cpu
from luffy.engines.verl.launcher import Stalled, Watch, run_on_ray, without_slurms_rocr
from luffy.engines.verl.overrides import PLUGIN_MODULE, TIME_UP_FILE, VerlJob, ppo_overrides, sft_overrides

log = logging.getLogger(__name__)
PPO_ENTRY, SFT_ENTRY = "verl.trainer.main_ppo", "verl.trainer.sft_trainer_ray"
TRACKER = "latest_checkpointed_iteration.txt"
WEIGHTS = "actor"  # the checkpoint directory's model shards, in verl's FSDP layout
SHARD_FILES = ("model_world_size_", "fsdp_config.json", "huggingface")
MODEL_SHARD = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")
STEP_FOLDER, TRACKED_STEP = re.compile(r"global_step_(\d+)"), re.compile(r"(\d+)")  # a folder; the tracker's text
CURRENT_LOG = "current.jsonl"
# verl saves a checkpoint when this epoch time nears (verl.utils.checkpoint.checkpoint_manager.
# should_save_ckpt_esi: within 60 s + its longest step + trainer.esi_redundant_time)
ESI_EXPIRATION = "MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP"
TIME_UP = "time_up.json"
SFT_METRICS = {"train/loss": "loss/sft", "train/grad_norm": "grad_norm", "train/lr": "lr"}


class VerlRunFailed(EngineError):
    """verl's process ended with an error; its output is in the stage's log."""


def runtime_of(job: TrainJob) -> VerlConfig:
    return from_json(VerlConfig, json.dumps(job.runtime or {}))


def on_the_cpu(job: TrainJob) -> bool:
    """verl's own loop on the CPU (``device: cpu``, ``luffy.engines.verl.cpu``)."""
    return job.settings.device == "cpu"


def run_figures(watch: Watch) -> dict[str, float | None]:
    """Start-up (to the first logged step, which includes that step), the mean time of the later
    steps (seen at the watch's polling resolution) and the peak memory of the run's processes."""
    times = [watch.step_times[s] for s in sorted(watch.step_times)]
    later = [b - a for a, b in zip(times, times[1:])]
    return {"to_first_step_s": times[0], "later_step_s": sum(later) / len(later) if later else None,
            "steps_seen": float(len(times)), "peak_memory_gb": watch.peak_memory_bytes / 2**30,
            "peak_processes": float(watch.peak_processes)}


def checkpointed_step(root: Path) -> int | None:
    """The step of verl's newest checkpoint under ``root`` (its tracker file), or None."""
    try:
        return int((root / TRACKER).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def resume_check(root: Path, sft: bool) -> int | None:
    """Check the checkpoint verl would resume from (the step its tracker under ``root`` names):
    its model shards present for every rank, and each torch file in it and in the step's folder
    (optimizer, extra state, data loader) a whole archive (``torch_file_problem``; no tensor is
    read). When it is unreadable, the tracker is pointed at the newest older checkpoint that reads
    (trainer.resume_mode=auto then resumes from it) or, with none, removed (verl starts over),
    and one warning line says which files and what follows. The tracker is rewritten rather than
    verl pointed elsewhere by trainer.resume_mode / resume_from_path: verl logs its config as the
    MLflow run's parameters, which a resumed run may not change. Returns the step verl resumes
    from (None: a fresh start). ``sft``: verl's SFT trainer, whose shards lie in the step folder
    itself (the PPO trainer's in its ``actor`` folder)."""
    tracker = root / TRACKER
    steps, problems = resume_candidates(root, tracker, STEP_FOLDER, TRACKED_STEP, lambda step: f"global_step_{step}")
    found = None
    for step, folder in steps:
        problem = _verl_checkpoint_problem(folder, sft)
        if problem is None:
            found = step
            break
        problems.append(problem)
    if not problems:
        return found
    if found is None:
        tracker.unlink()
        log.warning("%s; no readable checkpoint left: verl starts over from step 0 (its tracker %s removed)",
                    "; ".join(problems), tracker)
    else:
        io.write_text(tracker, str(found))
        log.warning("%s; verl resumes from %s (its tracker %s now names step %d)", "; ".join(problems),
                    root / f"global_step_{found}", tracker, found)
    return found


def _verl_checkpoint_problem(folder: Path, sft: bool) -> str | None:
    """What makes verl's checkpoint ``folder`` unreadable, in a few words (None: it looks whole)."""
    shards = folder if sft else folder / "actor"
    if not shards.is_dir():
        return f"checkpoint {shards} does not exist"
    ranks: dict[int, set[int]] = {}
    for path in shards.glob("model_world_size_*_rank_*.pt"):
        if match := MODEL_SHARD.fullmatch(path.name):
            ranks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not ranks:
        return f"checkpoint {shards} has no model shards (model_world_size_*_rank_*.pt)"
    missing = [f"model_world_size_{world}_rank_{rank}.pt" for world, present in sorted(ranks.items())
               for rank in range(world) if rank not in present]
    if missing:
        return f"checkpoint file {shards / missing[0]} is unreadable (missing)"
    for path in sorted({*shards.glob("*.pt"), *folder.glob("*.pt")}):
        reason = torch_file_problem(path)
        if reason:
            return f"checkpoint file {path} is unreadable ({reason})"
    return None


def saved_for_time(path: Path) -> int | None:
    """The step the trainer saved at because the job's time runs short (``TIME_UP_FILE``), or None."""
    try:
        return int(json.loads(path.read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def last_logged_step(path: Path) -> int | None:
    """The step of the last complete line of verl's file log (None: no step yet)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 65536))
            lines = fh.read().split(b"\n")[:-1]  # the part after the last newline may be half written
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _absolute_tracking_uri() -> str:
    """The MLflow URI as the Ray workers must see it (a relative SQLite path made absolute)."""
    from luffy.tracking import tracking_uri

    uri = tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


class VerlEngine:
    name = "verl"

    # ---- the job's files ----
    @staticmethod
    def _paths(work_dir: Path) -> dict[str, Path]:
        work = work_dir.resolve()
        return {"checkpoints": work / "checkpoints", "metrics": work / "metrics.jsonl", "logs": work / "verl_log",
                "run": work / "run.json", "data": work / "data", "cpu": work / "verl_cpu"}

    def resume_run_id(self, work_dir: Path) -> str | None:
        run = self._paths(work_dir)["run"]
        return json.loads(run.read_text()).get("run_id") if run.exists() else None

    def _train_files(self, job: TrainJob, paths: dict[str, Path]) -> str:
        """The training parquet verl reads: the job's, cut to [data_start, data_end), and for SFT
        as chat conversations (prompt messages + the trace as the assistant turn)."""
        import math

        import pandas as pd

        cfg = job.settings
        if cfg.algorithm != "sft" and (cfg.data_start, cfg.data_end) == (0.0, 1.0):
            return str(Path(job.data).resolve())
        frame = pd.read_parquet(job.data)
        frame = frame.iloc[math.floor(cfg.data_start * len(frame)): math.floor(cfg.data_end * len(frame))]
        if cfg.algorithm == "sft":
            frame = frame.assign(messages=[list(p) + list(t) for p, t in zip(frame["prompt"], frame["target"])])
        out = paths["data"] / ("sft.parquet" if cfg.algorithm == "sft" else "train.parquet")
        io.write_parquet(out, frame.reset_index(drop=True))
        return str(out)

    def overrides(self, job: TrainJob, train_files: str | None = None) -> tuple[str, list[str]]:
        """(entry module, Hydra overrides) of the job's verl run."""
        from luffy.tracking import experiment_name

        on_cpu = on_the_cpu(job)
        if not on_cpu and (job.gpus < 1 or job.gpus % job.nodes):
            raise VerlRunFailed(f"verl needs GPUs, the same number on every node: this job has {job.gpus} on "
                                f"{job.nodes} node(s) (resources of its train job)")
        paths = self._paths(job.work_dir)
        verl_job = VerlJob(experiment=job.experiment, train_files=train_files or str(Path(job.data).resolve()),
                           model=job.base_model if not os.path.exists(job.base_model)
                           else str(Path(job.base_model).resolve()),
                           checkpoint_dir=str(paths["checkpoints"]), project=experiment_name(), nnodes=job.nodes,
                           gpus_per_node=1 if on_cpu else job.gpus // job.nodes, device="cpu" if on_cpu else "cuda")
        runtime = runtime_of(job)
        if job.settings.algorithm == "sft":
            return SFT_ENTRY, sft_overrides(job.settings, runtime, verl_job)
        return PPO_ENTRY, ppo_overrides(job.settings, runtime, verl_job, str(paths["metrics"]))

    def check(self, job: TrainJob, figures: dict[str, float]) -> dict[str, float]:
        """The preflight's verl part: prompts fit ``verl.max_prompt_tokens``, and verl's own
        config composes and validates with the run's overrides."""
        from luffy.engines.verl.compose import validated_ppo, validated_sft
        from luffy.preflight import PreflightError

        runtime = runtime_of(job)
        longest = figures.get("longest_prompt_tokens", 0)
        if job.settings.algorithm != "sft" and longest > runtime.max_prompt_tokens:
            raise PreflightError(f"training data {job.data}: the longest prompt has {longest:.0f} tokens, over "
                                 f"verl.max_prompt_tokens={runtime.max_prompt_tokens} (verl would refuse it)")
        began = time.perf_counter()
        entry, overrides = self.overrides(job)
        (validated_sft if entry == SFT_ENTRY else validated_ppo)(overrides)
        return {"verl_config_s": time.perf_counter() - began}

    # ---- training ----
    def _environment(self, job: TrainJob, run_id: str | None, log_file: Path) -> dict[str, str]:
        """Environment of verl's driver and of every Ray process: Ray's processes inherit it from
        the process that starts them (the driver's ``ray.init()`` on one node; the launcher's
        ``ray start`` on each node of several). Not passed as Hydra overrides: verl's MLflow
        logger records the config as the run's parameters, and a resumed run cannot change
        them (a path or module list that differs between attempts would cost it its logging).
        Modules the user's environment names in ``VERL_USE_EXTERNAL_MODULES`` are kept, after ours."""
        modules = ([cpu.MODULE] if on_the_cpu(job) else []) + [PLUGIN_MODULE]
        modules += [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m and m not in modules]
        shared = {"VERL_USE_EXTERNAL_MODULES": ",".join(modules), "MLFLOW_TRACKING_URI": _absolute_tracking_uri(),
                  "VERL_FILE_LOGGER_PATH": str(log_file)}
        if on_the_cpu(job):
            shared.update(cpu.environment(self._paths(job.work_dir)["cpu"]))
        if run_id:
            shared["MLFLOW_RUN_ID"] = run_id
        return {**without_slurms_rocr(os.environ), **shared}

    def train(self, job: TrainJob, sink: MetricsSink, run_id: Callable[[], str | None]) -> None:
        paths = self._paths(job.work_dir)
        for key in ("checkpoints", "logs", "data"):
            paths[key].mkdir(parents=True, exist_ok=True)
        current_run = run_id()
        io.write_json(paths["run"], {"run_id": current_run})
        resume_check(paths["checkpoints"], sft=job.settings.algorithm == "sft")
        entry, overrides = self.overrides(job, self._train_files(job, paths))
        current = paths["logs"] / CURRENT_LOG
        self._keep_attempt(current)  # an attempt killed with its job
        attempt = f"attempt-{time.strftime('%Y%m%d-%H%M%S')}"
        env = self._environment(job, current_run, current)
        time_up = paths["logs"] / TIME_UP
        time_up.unlink(missing_ok=True)
        if job.deadline is not None:  # verl saves a checkpoint when its "capacity block" nears its end
            env.update({ESI_EXPIRATION: str(job.deadline.end - job.deadline.floor_s), TIME_UP_FILE: str(time_up)})
        runtime = runtime_of(job)
        watch = Watch(progress=lambda: last_logged_step(current), stall_s=runtime.stall_timeout_s,
                      startup_s=runtime.startup_timeout_s, limit_s=job.time_limit_s if on_the_cpu(job) else None,
                      deadline=job.deadline, checkpointed=lambda: checkpointed_step(paths["checkpoints"]),
                      saved_for_time=lambda: saved_for_time(time_up), total_steps=job.settings.steps)
        try:
            # Hydra's own files (its log of the run, the composed config) go with the attempt, not into the
            # directory the job was started in
            hydra_dir = f"hydra.run.dir={paths['logs'] / 'hydra' / attempt}"
            gpus = job.nodes if on_the_cpu(job) else job.gpus  # on the CPU: one logical GPU per node
            status = self._launch([sys.executable, "-m", entry, *overrides, hydra_dir], env, job.nodes, gpus, watch)
        finally:
            self._keep_attempt(current, attempt)
            if watch.step_times:
                figures = run_figures(watch)
                log.info("verl run: %s", ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if v is not None))
                io.write_json(paths["logs"] / f"{attempt}.figures.json", figures)
        if status != 0:
            raise VerlRunFailed(f"{entry} exited with status {status} (its output is above in this log); "
                                "rerun the job to resume from its last checkpoint")
        step, actor = self._latest_checkpoint(job, paths["checkpoints"])
        if job.settings.algorithm == "sft":
            self._sft_metrics(paths, sink)
        with io.atomic_dir(job.out_dir) as tmp:
            self._link_shards(actor, tmp / WEIGHTS)
            write_manifest(tmp, engine=self.name, base_model=job.base_model, steps=job.settings.steps,
                           selected={"step": job.settings.steps, "rule": "last", "verl_global_step": step},
                           settings=to_dict(job.settings), weights=WEIGHTS)
        job.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(job.metrics_out) as tmp:
            shutil.copyfile(paths["metrics"], tmp)

    @staticmethod
    def _launch(command: list[str], env: dict[str, str], nodes: int, gpus: int, watch: Watch) -> int:
        """Run verl's entry point (its output goes to this job's log), over a Ray cluster on the
        allocation's nodes when there are several (``launcher``); returns its exit status."""
        log.info("verl run on %d node(s), %d GPU(s): %s", nodes, gpus, " ".join(command))
        try:
            return run_on_ray(command, env, nodes, gpus, watch)
        except Stalled as err:
            raise VerlRunFailed(f"verl's run {err}") from None

    def _latest_checkpoint(self, job: TrainJob, root: Path) -> tuple[int, Path]:
        tracker = root / TRACKER
        if not tracker.exists():
            raise VerlRunFailed(f"verl finished without a checkpoint in {root} ({TRACKER} missing)")
        step = int(tracker.read_text().strip())
        folder = root / f"global_step_{step}"
        actor = folder if job.settings.algorithm == "sft" else folder / "actor"
        expected = job.settings.steps * (job.settings.mini_batches if job.settings.algorithm == "sft" else 1)
        if step != expected or not actor.is_dir():
            raise VerlRunFailed(f"verl's last checkpoint is {folder} (step {step}); expected step {expected}")
        return step, actor

    @staticmethod
    def _link_shards(actor: Path, target: Path) -> None:
        """The model shards, config and tokenizer of a checkpoint (not its optimizer state),
        hard-linked where the file system allows (the work directory keeps the originals)."""
        target.mkdir(parents=True)
        for item in actor.iterdir():
            if not item.name.startswith(SHARD_FILES):
                continue
            if item.is_dir():
                shutil.copytree(item, target / item.name, copy_function=io.link_or_copy)
            else:
                io.link_or_copy(item, target / item.name)

    @staticmethod
    def _keep_attempt(current: Path, name: str | None = None) -> None:
        """verl's log of an attempt, kept as ``attempt-<start>.jsonl`` (an attempt that a killed job
        left: named by its last write)."""
        if current.exists():
            name = name or f"attempt-{time.strftime('%Y%m%d-%H%M%S', time.localtime(current.stat().st_mtime))}"
            current.replace(current.with_name(f"{name}.jsonl"))

    def _sft_metrics(self, paths: dict[str, Path], sink: MetricsSink) -> None:
        """verl's SFT trainer logs ``train/loss`` etc.: our names, one line per step of ours
        (``mini_batches`` of verl's steps), merged over attempts (a later attempt's lines win)."""
        by_step: dict[int, dict[str, float]] = {}
        for attempt in sorted(paths["logs"].glob("attempt-*.jsonl")):
            for record in io.read_jsonl(attempt):
                values = {ours: float(record["data"][theirs]) for theirs, ours in SFT_METRICS.items()
                          if theirs in record["data"]}
                by_step[int(record["step"])] = values
        lines = []
        for step in sorted(by_step):
            lines.append({"step": step - 1, **by_step[step]})
            sink(by_step[step], step - 1)
        io.write_text(paths["metrics"], "".join(json.dumps(line) + "\n" for line in lines))

    # ---- export ----
    def export(self, checkpoint_dir: Path, manifest: dict[str, Any], out_dir: Path) -> float:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from luffy.models.export import export_verified

        shards = checkpoint_dir / manifest["weights"]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.merge.") as merged:
            command = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                       str(shards), "--target_dir", merged]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise VerlRunFailed(f"verl's model merger failed on {shards}:\n{result.stdout[-2000:]}\n"
                                    f"{result.stderr[-4000:]}")
            model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(merged)
            return export_verified(model, tokenizer, out_dir, metadata={"stage": "convert", **manifest})

