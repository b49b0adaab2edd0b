"""Paths and per-rule settings for the Snakemake workflow (``workflow/rules/common.smk``).

Each ``*_settings`` function returns the canonical JSON of exactly the settings that should
make its rule rerun when they change; the rule passes it to ``luffy <stage> --settings``.
This module imports only the config (no torch, no MLflow) so that building the DAG is fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from luffy.config import (BENCHMARK_SOURCE_PREFIX, HUB_PREFIX, TOY_SOURCE_PREFIX, JobResources, ResolvedConfig,
                          is_glob, job_resources, seed_of, to_dict, to_json, train_settings_dict)

SHIPPED_TOKENIZER = "shipped"


LUFFY_COMMAND = "LUFFY_COMMAND"  # environment variable: the jobs' `luffy` executable


def luffy_command(env: dict[str, str] | None = None) -> str:
    """The jobs' ``luffy`` executable: ``$LUFFY_COMMAND`` (on a cluster, the job environment's,
    when Snakemake runs from another environment), else the one beside the Python that runs
    Snakemake (found also when it was started as ``.venv/bin/snakemake`` without the venv on
    PATH), else ``luffy`` on PATH."""
    import os
    import shutil

    env = os.environ if env is None else env
    if env.get(LUFFY_COMMAND):
        return env[LUFFY_COMMAND]
    beside = Path(sys.executable).parent / "luffy"
    return str(beside) if beside.exists() else (shutil.which("luffy") or "luffy")


def _snakemake_resources(job: JobResources) -> dict[str, int | str | None]:
    """A job's resources under the names Snakemake and its SLURM executor (2.8, job step 0.6)
    use: ``nodes``, ``cpus_per_task`` (``--cpus-per-task``), ``mem_mb``, ``runtime``, and
    ``job_gpus``, the job's GPUs on all its nodes together (the command's ``--gpus``). On one
    node ``gpu`` asks for them (``--gpus=<n>``). On several, ``gres`` asks for the GPUs of each
    node (``--gres=gpu:<n>``) and ``gpu`` is 0: the executor runs the rule as a one-task job step
    on the first node and would ask that step for ``--gpus=<all of them>``, which SLURM refuses
    when they are spread over the nodes. A job of several nodes without GPUs asks one task per
    node (``tasks``): the executor's default ``--ntasks=1`` makes sbatch cut it to one node."""
    several = job.nodes > 1
    return {"mem_mb": job.mem_mb, "runtime": job.runtime, "nodes": job.nodes, "cpus_per_task": job.cpus,
            "gpu": 0 if several else job.gpus, "gres": f"gpu:{job.gpus}" if several and job.gpus else "",
            "tasks": job.nodes if several and not job.gpus else None, "job_gpus": job.gpus * job.nodes}


def stage_resources(cfg: ResolvedConfig, stage: str) -> dict[str, int | str | None]:
    return _snakemake_resources(job_resources(cfg.root, stage))


def stage_threads(cfg: ResolvedConfig, stage: str) -> int:
    return job_resources(cfg.root, stage).cpus


CHAIN_SBATCH = "--requeue --open-mode=append"  # a chained job requeues itself; its SLURM log keeps every part


def train_job_resources(cfg: ResolvedConfig, experiment: str) -> dict[str, int | str | None]:
    """An experiment's train job resources, with ``chain`` 1 when its runtime exceeds
    ``resources.job_time_limit``: then each SLURM job of the chain asks for the limit, may be
    requeued (``slurm_extra``), and ``luffy train --chain 1`` stops it at a checkpoint before
    its end (luffy.chain)."""
    job = job_resources(cfg.root, "train", experiment)
    limit = cfg.root.resources.job_time_limit
    chained = limit is not None and job.runtime > limit
    out = _snakemake_resources(job)
    if chained:
        out["runtime"] = limit
    out.update(chain=int(chained), slurm_extra=CHAIN_SBATCH if chained else "")
    return out


def train_resources(cfg: ResolvedConfig) -> dict[str, Callable[[Any], int | str]]:
    """Per experiment (the ``experiment`` wildcard): its train job's resources."""
    def one(key: str) -> Callable[[Any], int | str]:
        return lambda w: train_job_resources(cfg, w.experiment)[key]

    return {key: one(key) for key in ("mem_mb", "runtime", "nodes", "cpus_per_task", "gpu", "gres", "tasks", "job_gpus",
                                      "chain", "slurm_extra")}


def train_threads(cfg: ResolvedConfig) -> Callable[[Any], int]:
    return lambda w: job_resources(cfg.root, "train", w.experiment).cpus


def _results(cfg: ResolvedConfig) -> str:
    return cfg.root.results_dir


def builds_base_model(cfg: ResolvedConfig) -> bool:
    """The tiny demo model is built and pre-trained by the workflow (base_model.path null)."""
    return cfg.root.base_model.path is None


def prepares_base_model(cfg: ResolvedConfig) -> bool:
    """base_model.path is copied with config overrides or another chat template, or replaced by
    a random stand-in of its architecture."""
    base = cfg.root.base_model
    return base.path is not None and bool(base.config_overrides or base.chat_template or base.stand_in.enabled)


def model_path(cfg: ResolvedConfig, model: str) -> str:
    """Where a model is read: the workflow's model directory, the given base model, or an
    external model's hub id or directory."""
    external = cfg.external_models.get(model)
    if external is not None:
        return external.hub or str(external.path)
    if model in cfg.base_models:
        made = builds_base_model(cfg) or prepares_base_model(cfg)
        return f"{_results(cfg)}/models/{model}" if made else str(cfg.root.base_model.path)
    return f"{_results(cfg)}/models/{model}"


def model_inputs(cfg: ResolvedConfig, model: str) -> list[str]:
    """File inputs of an evaluation: the model directory when the workflow produces it; for an
    external model its chat template file (its directory is read where it is and checked when
    its job starts, so that a missing one fails that job, not the whole workflow)."""
    external = cfg.external_models.get(model)
    if external is not None:
        return [external.chat_template] if external.chat_template else []
    return base_model_inputs(cfg, model) if model in cfg.base_models else [model_path(cfg, model)]


def base_model_inputs(cfg: ResolvedConfig, base: str = "base") -> list[str]:
    return [model_path(cfg, base)] if builds_base_model(cfg) or prepares_base_model(cfg) else []


def prepare_settings(cfg: ResolvedConfig) -> str:
    base = cfg.root.base_model
    return to_json({"path": base.path, "config_overrides": base.config_overrides, "chat_template": base.chat_template})


def prepare_inputs(cfg: ResolvedConfig) -> list[str]:
    """The chat template file (a local base_model.path is read where it is, not tracked)."""
    template = cfg.root.base_model.chat_template
    return [template] if template else []


def start_model(cfg: ResolvedConfig, experiment: str) -> str:
    """Where an experiment's training starts: the base model, or another experiment's model."""
    init = cfg.experiments[experiment].init_from
    return model_path(cfg, init) if init else model_path(cfg, cfg.base_of(experiment))


def start_model_inputs(cfg: ResolvedConfig, experiment: str) -> list[str]:
    init = cfg.experiments[experiment].init_from
    return [model_path(cfg, init)] if init else base_model_inputs(cfg, cfg.base_of(experiment))


def tokenizer(cfg: ResolvedConfig) -> str:
    """The policy's tokenizer for the trace-length filter (the shipped one for the tiny model)."""
    return SHIPPED_TOKENIZER if builds_base_model(cfg) else str(cfg.root.base_model.path)


def trace_file(cfg: ResolvedConfig) -> str:
    """The trace input as ``luffy prepare-traces --traces`` takes it."""
    data = cfg.root.data
    return f"{_results(cfg)}/data/toy/raw_traces.parquet" if data.traces == "toy" else data.traces


def trace_inputs(cfg: ResolvedConfig) -> list[str]:
    """The trace input's local files (none for a hub input), so edits to them rerun the filter."""
    import glob

    source = trace_file(cfg)
    if source.startswith(HUB_PREFIX):
        return []
    if is_glob(source):
        return sorted(glob.glob(source))
    return [source]


def suite_files(cfg: ResolvedConfig) -> dict[str, str]:
    out = {}
    for name, suite in cfg.root.evaluation.suites.items():
        if suite.source.startswith(TOY_SOURCE_PREFIX):
            out[name] = f"{_results(cfg)}/data/toy/suite_{suite.source[len(TOY_SOURCE_PREFIX):]}.parquet"
        elif suite.source.startswith(BENCHMARK_SOURCE_PREFIX):
            out[name] = f"{_results(cfg)}/data/benchmarks/{name}.parquet"
        else:
            out[name] = suite.source
    return out


def suite_args(cfg: ResolvedConfig) -> str:
    return " ".join(f"--suite '{name}={path}'" for name, path in suite_files(cfg).items())


def benchmark_settings(cfg: ResolvedConfig, suite: str) -> str:
    return to_json(cfg.benchmarks[suite])


def benchmark_inputs(cfg: ResolvedConfig, suite: str) -> list[str]:
    """The registry entry's local file, when it is one (a hub source has no file input)."""
    local = cfg.benchmarks[suite].local
    return [local] if local else []


def toy_settings(cfg: ResolvedConfig) -> str:
    """The toy task's settings (``pretrain_format`` only when not the default, so that studies
    made before it existed keep exactly their settings)."""
    data = cfg.root.data
    toy = to_dict(data.toy)
    if toy["pretrain_format"] == "trace":
        del toy["pretrain_format"]
    return to_json({"toy": toy, "system_prompt": data.system_prompt})


def filter_settings(cfg: ResolvedConfig) -> str:
    data = cfg.root.data
    return to_json({"max_trace_tokens": data.max_trace_tokens, "system_prompt": data.system_prompt,
                    "data_source": data.data_source, "template": data.template, "traces_config": data.traces_config,
                    "traces_split": data.traces_split, "batch_rows": data.batch_rows,
                    "validation_fraction": data.validation_fraction})


def tiny_settings(cfg: ResolvedConfig, base: str = "base") -> str:
    """The tiny base model's settings; a per-seed base ('base-seed<N>') is pre-trained with seed N."""
    tiny = to_dict(cfg.root.base_model.tiny)
    if (seed := seed_of(base)) is not None:
        tiny["seed"] = seed
    return to_json(tiny)


def teacher_traces_file(cfg: ResolvedConfig, model: str) -> str:
    return f"{_results(cfg)}/eval/{model}/teacher_traces.json"


def teacher_traces_outputs(cfg: ResolvedConfig) -> list[str]:
    """Per own model, the teacher-token probabilities of the training traces (report.teacher_traces)."""
    return [teacher_traces_file(cfg, m) for m in teacher_traces_models(cfg)]


def teacher_traces_models(cfg: ResolvedConfig) -> list[str]:
    """This config's own models (an external model's tokenizer need not be the policy's)."""
    return cfg.own_models if cfg.root.report.teacher_traces > 0 else []


def validation_file(cfg: ResolvedConfig) -> str:
    return f"{_results(cfg)}/data/valid.parquet"


def train_settings(cfg: ResolvedConfig, experiment: str) -> str:
    """The experiment's settings; with in-training validation also ``validation`` (its settings
    and file), and on the verl engine its cluster layout (``runtime``), so that local runs
    without validation keep exactly the settings they had before these existed."""
    settings = train_settings_dict(cfg.experiments[experiment])
    if cfg.root.validation.every > 0:
        settings["validation"] = {**to_dict(cfg.root.validation), "data": validation_file(cfg)}
    if cfg.experiments[experiment].engine == "verl":
        settings["runtime"] = to_dict(cfg.root.verl)
    return to_json(settings)


def train_inputs(cfg: ResolvedConfig) -> list[str]:
    """Files a training job reads besides its start model."""
    files = [f"{_results(cfg)}/data/train.parquet"]
    return files + ([validation_file(cfg)] if cfg.root.validation.every > 0 else [])


def eval_settings(cfg: ResolvedConfig, model: str | None = None) -> str:
    """The evaluation settings of one model: the shared ones (without the list of external
    models, so that adding one reruns nothing else) and, for an external model, its own
    (``external``), so that changing them reruns only its evaluation."""
    settings = to_dict(cfg.root.evaluation)
    del settings["models"]
    external = cfg.external_models.get(model) if model is not None else None
    if external is not None:
        settings["external"] = {"name": model, **to_dict(external)}
    return to_json(settings)


def report_settings(cfg: ResolvedConfig) -> str:
    return to_json(cfg.root.report)


def suite_meta(cfg: ResolvedConfig) -> str:
    """Per suite its table (group), title and registry benchmark: the report's layout."""
    meta = {}
    for name, suite in cfg.root.evaluation.suites.items():
        benchmark = suite.source[len(BENCHMARK_SOURCE_PREFIX):] if suite.source.startswith(BENCHMARK_SOURCE_PREFIX) \
            else None
        meta[name] = {"group": suite.group, "title": suite.title or name, "benchmark": benchmark}
    return to_json(meta)


REPORT_ITEMS = {  # report outputs shown in `snakemake --report`: caption file, category
    "results.html": ("results_table.rst", "Results"),
    "results.csv": ("results_csv.rst", "Results"),
    "results.png": ("results_bars.rst", "Results"),
    "training_curves.png": ("training_curves.rst", "Training"),
}


def report_outputs(cfg: ResolvedConfig, mark: Callable[..., Any] | None = None) -> list[Any]:
    """The report stage's outputs; ``mark`` (Snakemake's ``report``) registers the tables and
    plots as items of Snakemake's HTML report, with their captions (workflow/report/)."""
    out = f"{_results(cfg)}/report"
    names = ["results.md", "results.html", "results.csv", "results.png"]
    names += ["training_curves.png"] if cfg.experiments else []
    files: list[Any] = []
    for name in names:
        if mark is not None and name in REPORT_ITEMS:
            caption, category = REPORT_ITEMS[name]
            files.append(mark(f"{out}/{name}", caption=f"../report/{caption}", category=category))
        else:
            files.append(f"{out}/{name}")
    return files + published_files(cfg)


def published_files(cfg: ResolvedConfig) -> list[str]:
    """The published document and its images (``report.publish``), if any."""
    doc = cfg.root.report.publish
    if not doc:
        return []
    from luffy.report.publish import published_paths  # pandas: imported only when publishing

    return [str(p) for p in published_paths(doc, curves=bool(cfg.experiments))]


def report_front_page(cfg: ResolvedConfig, configfiles: list[str], description: str) -> str:
    """The front page of ``snakemake --report``: ``description`` until the report stage ran, then
    a page with the results inline that names any result newer than the report (see
    luffy.report.snakemake_page)."""
    from luffy.report.snakemake_page import front_page

    inputs = [path for paths in report_stage_inputs(cfg).values() for path in paths]
    command = "snakemake " + " ".join(f"--configfile {os.path.relpath(f)}" for f in configfiles)
    return front_page(description, f"{_results(cfg)}/report", inputs, command.strip())


def report_stage_inputs(cfg: ResolvedConfig) -> dict[str, list[str]]:
    """The report stage's inputs, by kind: every model's suite results, every experiment's
    training metrics, the teacher-trace probabilities and the hand-written discussion."""
    results = _results(cfg)
    return {"metrics": [f"{results}/eval/{m}/{s}.json" for m in cfg.models for s in cfg.root.evaluation.suites],
            "curves": [f"{results}/train/{e}/metrics.jsonl" for e in cfg.experiments],
            "discussion": report_inputs(cfg), "teacher_traces": teacher_traces_outputs(cfg)}


def report_inputs(cfg: ResolvedConfig) -> list[str]:
    discussion = cfg.root.report.discussion
    return [discussion] if discussion else []


def init_tracking(cfg: ResolvedConfig) -> None:
    """The MLflow store and parent runs, made by the jobs' ``luffy`` (Snakemake's own
    environment need not have MLflow)."""
    import subprocess

    resolved = to_json({**to_dict(cfg.root), "experiments": to_dict(cfg.experiments), "base_models": cfg.base_models})
    subprocess.run([luffy_command(), "init-tracking", "--resolved-config", resolved], check=False)
