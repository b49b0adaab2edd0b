"""Rules across settings: what one setting requires of others (an experiment's algorithm and
group, the resources of each stage and experiment, what the verl engine needs, model names,
files that must exist), each broken rule a ``ConfigError`` naming the key to change."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from luffy.config.checking import ConfigError, _merge, to_dict
from luffy.config.engines import unsupported_settings
from luffy.config.sections import (ALGORITHM_DEFAULTS, HUB_PREFIX, RESERVED_MODEL_NAMES, SEED_SUFFIX, STAGES, Config,
                                   ExternalModelConfig, JobResources, TrainConfig, experiment_family)


def is_glob(path: str) -> bool:
    """Whether a path is a glob pattern (several files) rather than one file or directory."""
    return any(ch in path for ch in "*?[")


# the local engine's vLLM rollout settings and their values when left null
ROLLOUT_VLLM_DEFAULTS: dict[str, float] = {"rollout_is_cap": 2.0, "rollout_memory": 0.3}
ROLLOUT_VLLM_KEYS = tuple(ROLLOUT_VLLM_DEFAULTS)


def train_settings_dict(cfg: TrainConfig) -> dict[str, Any]:
    """An experiment's resolved settings as a dict, without the rollout keys unless it samples
    with the local engine's vLLM: a run on the default sampler keeps the settings (and so the
    Snakemake params and work directory) it had before these settings existed."""
    settings = to_dict(cfg)
    if not (cfg.engine == "local" and cfg.rollout == "vllm"):
        for key in ("rollout", *ROLLOUT_VLLM_KEYS):
            settings.pop(key, None)
    return settings


def resolve_train_config(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Merge an experiment over ``train_defaults`` and fill the algorithm's own defaults."""
    prefix = f"experiments.{name}"
    _merge(TrainConfig, defaults, prefix="train_defaults")  # a shared value out of range is named where it is set
    cfg: TrainConfig = _merge(TrainConfig, defaults, overrides or {}, prefix=prefix)
    for key, value in {"advantage_baseline": "mixed", **ALGORITHM_DEFAULTS[cfg.algorithm]}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.loss_constant is None:
        cfg.loss_constant = float(cfg.max_response_tokens)
    explicit_vllm = {key: getattr(cfg, key) for key in ROLLOUT_VLLM_KEYS if getattr(cfg, key) is not None}
    if cfg.rollout is None:
        cfg.rollout = "vllm" if cfg.engine == "verl" else "hf"
    local_vllm = cfg.engine == "local" and cfg.rollout == "vllm"
    if local_vllm:
        for key, value in ROLLOUT_VLLM_DEFAULTS.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
    checks = [
        (cfg.algorithm in ("grpo", "rl_sft") and cfg.n_off != 0, "n_off",
         f"{cfg.algorithm} groups are on-policy only: n_off must be 0"),
        (cfg.algorithm == "luffy" and not 0 <= cfg.n_off < cfg.n, "n_off",
         f"must be in [0, n={cfg.n}) so the group has on-policy members"),
        (cfg.advantage_baseline == "on_policy" and cfg.n_off >= cfg.n, "advantage_baseline",
         "needs on-policy members (n_off < n)"),
        (cfg.clip_ratio_high is not None and cfg.clip_ratio_high < cfg.clip_ratio, "clip_ratio_high",
         "must be >= clip_ratio"),
        (cfg.off_clip_min is not None and cfg.off_clip_max is not None and cfg.off_clip_min > cfg.off_clip_max,
         "off_clip_min", "must be <= off_clip_max"),
        (cfg.teacher_logprobs and (cfg.algorithm != "luffy" or cfg.n_off == 0), "teacher_logprobs",
         "needs off-policy members (algorithm luffy, n_off >= 1)"),
        (cfg.data_start >= cfg.data_end, "data_start", f"must be < data_end={cfg.data_end}"),
        (cfg.prefix_ratio_min > cfg.prefix_ratio_max, "prefix_ratio_min",
         f"must be <= prefix_ratio_max={cfg.prefix_ratio_max}"),
        (cfg.prompts_per_step % cfg.mini_batches, "mini_batches",
         f"must divide prompts_per_step={cfg.prompts_per_step}"),
        (cfg.engine == "verl" and cfg.rollout != "vllm", "rollout",
         "engine verl samples with vLLM only; leave rollout unset or use engine local"),
        (cfg.algorithm == "sft" and cfg.rollout == "vllm" and cfg.engine == "local", "rollout",
         "sft samples nothing (it trains on the traces); leave rollout unset"),
        (not local_vllm and bool(explicit_vllm), next(iter(explicit_vllm), ""),
         "applies to the local engine's vLLM rollouts (engine local, rollout: vllm)"
         + ("; verl's vLLM is set in the verl section" if cfg.engine == "verl" else "")),
        (cfg.rollout_is_cap is not None and 0 < cfg.rollout_is_cap < 1, "rollout_is_cap",
         "must be 0 (no correction) or >= 1 (a cap below 1 would shrink every token's weight)"),
    ]
    for bad, key, why in checks:
        if bad:
            raise ConfigError(f"config key '{prefix}.{key}': {why}")
    for key, why in unsupported_settings(cfg.engine, cfg):
        raise ConfigError(f"config key '{prefix}.{key}': not supported by engine {cfg.engine}: {why}")
    return cfg


def job_resources(root: Config, stage: str, experiment: str | None = None) -> JobResources:
    """A job's resources: ``default``, then its stage's, then (train) its experiment's settings
    (an expanded ``<name>-seed<N>`` takes its declared experiment's)."""
    layers = [root.resources.default, root.resources.stages.get(stage)]
    if stage == "train" and experiment is not None:
        layers.append(root.resources.experiments.get(experiment_family(experiment)))
    out = JobResources()
    for layer in layers:
        for f in dataclasses.fields(JobResources):
            value = getattr(layer, f.name) if layer is not None else None
            if value is not None:
                setattr(out, f.name, value)
    return out


def _check_resources(root: Config, experiments: dict[str, TrainConfig]) -> None:
    res = root.resources
    unknown = sorted(set(res.stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"config key 'resources.stages': {unknown} are not stages (expected some of {STAGES})")
    declared = {experiment_family(name) for name in experiments}
    unknown = sorted(set(res.experiments) - declared)
    if unknown:
        raise ConfigError(f"config key 'resources.experiments': {unknown} are not experiments")
    missing = [f.name for f in dataclasses.fields(JobResources) if getattr(res.default, f.name) is None]
    if missing:
        raise ConfigError(f"config key 'resources.default': {missing} must be set (the other levels may leave "
                          "them null)")
    for stage in STAGES:
        if stage != "train" and job_resources(root, stage).nodes != 1:
            raise ConfigError(f"config key 'resources.stages.{stage}.nodes': only training runs over several nodes")
        limit, runtime = res.job_time_limit, job_resources(root, stage).runtime
        if stage != "train" and limit is not None and runtime > limit:
            raise ConfigError(f"config key 'resources.stages.{stage}.runtime': {runtime} minutes exceed "
                              f"resources.job_time_limit ({limit}); only training runs as a chain of jobs")
    for name, cfg in experiments.items():
        job = job_resources(root, "train", name)
        if job.nodes > 1 and (cfg.engine != "verl" or (job.gpus < 1 and cfg.device != "cpu")):
            raise ConfigError(f"config key 'resources.experiments.{experiment_family(name)}.nodes': several nodes "
                              "need the verl engine and GPUs (gpus >= 1), or verl on the CPU (device: cpu)")


def sequences_per_prompt(cfg: TrainConfig) -> int:
    """Sequences a training step holds per prompt (what verl splits over its ranks): the group of
    ``n`` (rl_sft: and the trace's SFT sequence); SFT: the trace alone."""
    return 1 if cfg.algorithm == "sft" else cfg.n + int(cfg.algorithm == "rl_sft")


def _check_verl(root: Config, experiments: dict[str, TrainConfig]) -> None:
    """The verl section's ranges, and what the verl engine needs of each experiment run on it."""
    from luffy.engines.verl.overrides import check_extra_overrides

    v = root.verl
    try:
        check_extra_overrides(v.overrides)
    except ValueError as err:
        raise ConfigError(f"config key 'verl.overrides': {err}") from None
    for name, cfg in experiments.items():
        if cfg.engine != "verl":
            continue
        key = f"experiments.{name}"
        job = job_resources(root, "train", name)
        on_cpu = cfg.device == "cpu"
        gpus = job.nodes if on_cpu else job.nodes * job.gpus  # on the CPU: one logical GPU per node
        rows = (cfg.prompts_per_step // cfg.mini_batches) * sequences_per_prompt(cfg)
        checks = [
            (root.validation.every > 0, "engine", "in-training validation (validation.every > 0) is not available "
             "with engine verl; set validation.every: 0 or use engine local"),
            (gpus < 1, "engine", "verl trains on GPUs: give its train job gpus >= 1 (resources), or set device: cpu "
             "(verl's own loop on the CPU, for small models)"),
            (on_cpu and v.attn_implementation != "sdpa", "device", "verl on the CPU needs verl.attn_implementation: "
             "sdpa (flash-attn runs on GPUs only)"),
            (on_cpu and v.rollout_tensor_parallel != 1, "device", "verl on the CPU needs "
             "verl.rollout_tensor_parallel: 1 (one logical GPU)"),
            (on_cpu and v.strategy != "fsdp2", "device", "verl on the CPU needs verl.strategy: fsdp2 (FSDP1 asks "
             "for an accelerator)"),
            (cfg.algorithm != "sft" and cfg.micro_batch_tokens < v.max_prompt_tokens + cfg.max_response_tokens,
             "micro_batch_tokens", f"must hold one whole sequence on a GPU: >= verl.max_prompt_tokens + "
             f"max_response_tokens = {v.max_prompt_tokens + cfg.max_response_tokens}"),
            (gpus >= 1 and rows % gpus, "mini_batches", f"a mini-batch of {rows} sequences does not split evenly "
             f"over the {gpus} GPUs (verl splits every mini-batch over its data-parallel ranks)"),
            (gpus >= 1 and gpus % v.rollout_tensor_parallel, "engine",
             f"verl.rollout_tensor_parallel={v.rollout_tensor_parallel} does not divide its {gpus} GPUs"),
        ]
        for bad, setting, why in checks:
            if bad:
                raise ConfigError(f"config key '{key}.{setting}': {why}")


def _check_model_name(name: str, key: str) -> None:
    if name in RESERVED_MODEL_NAMES or not name.replace("_", "").replace("-", "").isalnum() or SEED_SUFFIX.match(name):
        raise ConfigError(f"config key '{key}': names must be [A-Za-z0-9_-], not 'base', 'data' or 'report' (shared "
                          "MLflow groups) and not end in -seed<N>")


def _check_external_models(models: dict[str, ExternalModelConfig], experiments: list[str]) -> None:
    """Names that cannot be taken for this config's own models; exactly one source each."""
    for name, model in models.items():
        key = f"evaluation.models.{name}"
        _check_model_name(name, key)
        if name in experiments:
            raise ConfigError(f"config key '{key}': '{name}' is also an experiment; give the external model "
                              "another name")
        if (model.hub is None) == (model.path is None):
            raise ConfigError(f"config key '{key}': give exactly one of hub (a HuggingFace id) or path (a local "
                              "directory)")
        if model.revision is not None and model.hub is None:
            raise ConfigError(f"config key '{key}.revision': a revision applies to a hub model, not to a path")
        if model.chat_template is not None:
            _check_file(model.chat_template, f"{key}.chat_template")


def _check_file(path: str, key: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"config key '{key}': file not found: {path}")


def _looks_local(path: str) -> bool:
    """A path (not a hub id such as 'Qwen/Qwen2.5-Math-7B'): absolute, relative with ./ or ~."""
    return path.startswith((".", "/", "~"))


def _check_sections(root: Config) -> None:
    """Rules within the tracking, data, validation and base-model sections (before any experiment)."""
    tracking = root.tracking
    if tracking.credentials is not None and not tracking.uri.startswith(("http://", "https://")):
        raise ConfigError(f"config key 'tracking.credentials': credentials are for a tracking server (an http(s):// "
                          f"uri), not {tracking.uri!r}; remove them or set tracking.uri to the server")
    if not tracking.server.user.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"config key 'tracking.server.user': {tracking.server.user!r} is not a user name (letters, "
                          "digits, _ . -)")
    toy = root.data.toy
    traces = root.data.traces
    if traces != "toy" and not traces.startswith(HUB_PREFIX) and not is_glob(traces):
        _check_file(traces, "data.traces")
    val = root.validation
    if val.temperature == 0 and val.n > 1:
        raise ConfigError(f"config key 'validation.temperature': 0 (greedy) gives {val.n} identical samples; "
                          "use n: 1 or a temperature > 0")
    if val.every > 0 and root.data.validation_fraction <= 0:
        raise ConfigError("config key 'validation.every': needs data.validation_fraction > 0 (a held-out split)")
    for low, high in (("min_ops", "max_ops"), ("ood_min_ops", "ood_max_ops"), ("generations_min", "generations_max")):
        if getattr(toy, low) > getattr(toy, high):
            raise ConfigError(f"config key 'data.toy.{low}': {getattr(toy, low)} is not <= {high}={getattr(toy, high)}")
    rates = toy.wrong_rate + toy.incomplete_rate + toy.verbose_rate
    if rates > 1:
        raise ConfigError(f"config key 'data.toy.verbose_rate': wrong_rate + incomplete_rate + verbose_rate = "
                          f"{rates:g} is not <= 1 (shares of the same traces)")
    tiny = root.base_model.tiny
    if tiny.hidden_size % tiny.num_heads or tiny.num_heads % tiny.num_kv_heads:
        raise ConfigError("config key 'base_model.tiny': hidden_size must be a multiple of num_heads and "
                          "num_heads a multiple of num_kv_heads")
    if root.base_model.path is not None and _looks_local(root.base_model.path):
        _check_file(root.base_model.path, "base_model.path")
    if root.base_model.chat_template is not None:
        _check_file(root.base_model.chat_template, "base_model.chat_template")
    if root.base_model.path is None and (root.base_model.config_overrides or root.base_model.chat_template):
        raise ConfigError("config key 'base_model.config_overrides': the tiny demo model (path: null) is built "
                          "with its own config and template; these settings apply to a base_model.path")


def _check_report(root: Config, families: list[str]) -> None:
    """The report's comparisons name two of ``families`` (the experiments and base); a
    discussion needs a published report."""
    rep = root.report
    if rep.publish is not None and not rep.publish.endswith(".md"):
        raise ConfigError(f"config key 'report.publish': '{rep.publish}' is not a Markdown (.md) file")
    for i, pair in enumerate(rep.compare):
        parts = [part.strip() for part in pair.split(" vs ")]
        if len(parts) != 2 or any(part not in families for part in parts) or parts[0] == parts[1]:
            raise ConfigError(f"config key 'report.compare[{i}]': '{pair}' is not '<a> vs <b>' with two different "
                              f"experiments (or base) of this config: {families}")
    if rep.discussion is not None:
        if rep.publish is None:
            raise ConfigError("config key 'report.discussion': needs report.publish")
        _check_file(rep.discussion, "report.discussion")
