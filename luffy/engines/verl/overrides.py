"""An experiment's settings as Hydra overrides of verl 0.9.1's own configs: ``ppo_trainer``
(LUFFY, GRPO, RL with SFT loss) and ``sft_trainer_engine`` (SFT). The only place where our
settings meet verl's names; plain Python (no verl import), so config validation can use it.

The ``luffy`` section added to ``ppo_trainer`` carries what verl has no key for (the group
plan, the loss settings, where step metrics go); our plug-ins read it on the Ray workers.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from luffy.engines.verl import cpu
from luffy.engines.verl.keys import refusal

TRAINER_MODE = "luffy"          # our V1 trainer, registered by the plug-in
TIME_UP_FILE = "LUFFY_TIME_UP_FILE"  # a chained job: where the trainer says which step it saved at for the time limit
AGENT_LOOP = "luffy_agent"      # our agent loop, registered by the plug-in
PLUGIN_MODULE = "luffy.engines.verl.plugin"
REWARD_FUNCTION = ("pkg://luffy.engines.verl.reward", "compute_score")
AGGREGATION_TO_VERL = {"token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
                       "constant": "seq-mean-token-sum-norm"}

# The keys this module sets: `verl.overrides` may not set them again (one source per setting).
PPO_MAPPED = (
    "data.train_files", "data.val_files", "data.max_prompt_length", "data.max_response_length",
    "data.train_batch_size", "data.seed", "data.shuffle", "data.truncation", "data.val_max_samples",
    "actor_rollout_ref.model.path", "actor_rollout_ref.model.use_remove_padding",
    "actor_rollout_ref.model.enable_gradient_checkpointing", "actor_rollout_ref.model.override_config",
    "actor_rollout_ref.actor.optim", "actor_rollout_ref.actor.ppo_mini_batch_size",
    "actor_rollout_ref.actor.ppo_epochs", "actor_rollout_ref.actor.use_dynamic_bsz",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", "actor_rollout_ref.actor.shuffle",
    "actor_rollout_ref.actor.entropy_coeff", "actor_rollout_ref.actor.calculate_entropy",
    "actor_rollout_ref.actor.use_kl_loss", "actor_rollout_ref.actor.kl_loss_coef",
    "actor_rollout_ref.actor.kl_loss_type",
    "actor_rollout_ref.actor.loss_agg_mode", "actor_rollout_ref.actor.loss_scale_factor",
    "actor_rollout_ref.actor.clip_ratio_low", "actor_rollout_ref.actor.clip_ratio_high",
    "actor_rollout_ref.actor.grad_clip", "actor_rollout_ref.actor.strategy",
    "actor_rollout_ref.actor.fsdp_config.param_offload",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload", "actor_rollout_ref.actor.data_loader_seed",
    "actor_rollout_ref.rollout.name", "actor_rollout_ref.rollout.n", "actor_rollout_ref.rollout.temperature",
    "actor_rollout_ref.rollout.top_p", "actor_rollout_ref.rollout.top_k", "actor_rollout_ref.rollout.seed",
    "actor_rollout_ref.rollout.calculate_log_probs", "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
    "actor_rollout_ref.rollout.agent", "actor_rollout_ref.rollout.tensor_model_parallel_size",
    "actor_rollout_ref.rollout.gpu_memory_utilization", "actor_rollout_ref.rollout.max_num_seqs",
    "actor_rollout_ref.rollout.max_num_batched_tokens", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",
    "algorithm.adv_estimator", "algorithm.norm_adv_by_std_in_grpo", "algorithm.use_kl_in_reward",
    "algorithm.filter_groups", "reward.custom_reward_function", "reward.num_workers",
    "trainer.total_training_steps", "trainer.total_epochs", "trainer.project_name", "trainer.experiment_name",
    "trainer.logger", "trainer.nnodes", "trainer.n_gpus_per_node", "trainer.save_freq", "trainer.test_freq",
    "trainer.val_before_train", "trainer.default_local_dir", "trainer.resume_mode", "trainer.max_actor_ckpt_to_keep",
    "trainer.use_v1", "trainer.v1.trainer_mode", "trainer.device", "luffy",
)
SFT_MAPPED = (
    "data.train_files", "data.val_files", "data.messages_key", "data.train_batch_size", "data.max_length",
    "data.max_token_len_per_gpu", "data.use_dynamic_bsz", "data.truncation", "model.path",
    "model.enable_gradient_checkpointing", "model.use_remove_padding", "model.override_config", "optim", "engine",
    "trainer.total_training_steps", "trainer.total_epochs", "trainer.project_name", "trainer.experiment_name",
    "trainer.logger", "trainer.nnodes", "trainer.n_gpus_per_node", "trainer.save_freq", "trainer.test_freq",
    "trainer.default_local_dir", "trainer.resume_mode", "trainer.max_ckpt_to_keep", "trainer.seed", "trainer.device",
)
_OVERRIDE = re.compile(r"^(\+{0,2}|~)([A-Za-z_][\w.]*)=(.*)$", re.S)
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@-]+$")


@dataclass(frozen=True)
class VerlJob:
    """Where an experiment's verl run reads and writes (absolute paths: Ray workers have their
    own working directories)."""

    experiment: str
    train_files: str
    model: str
    checkpoint_dir: str
    project: str          # the MLflow experiment
    nnodes: int = 1       # the job's nodes ...
    gpus_per_node: int = 8  # ... and GPUs on each (on the CPU: one logical GPU)
    val_files: str | None = None
    device: str = "cuda"  # cuda | cpu (verl's own loop on the CPU: luffy.engines.verl.cpu)


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted unless plainly safe)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot pass the non-finite number {value} to verl")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.match(text) and text not in ("null", "true", "false") and not re.match(r"^-?[\d.]+(e-?\d+)?$", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pairs(prefix: str, values: dict[str, Any], add: bool = False) -> list[str]:
    return [f"{'+' if add else ''}{prefix}.{key}={hydra_value(value)}" for key, value in values.items()]


def luffy_section(settings: Any, metrics_path: str) -> dict[str, Any]:
    """What our plug-ins need that verl has no key for: the group plan, the loss settings, and
    where the trainer writes its per-step metrics (one JSON line per step)."""
    from luffy.algo.losses import LossSettings  # torch: only when a run is built, not when a config is read

    loss = asdict(LossSettings.of(settings))
    return {
        "algorithm": settings.algorithm, "n": settings.n, "n_off": settings.n_off,
        "trace_rows": 1 if settings.algorithm == "rl_sft" else 0,
        "prefix_strategy": settings.prefix_strategy, "prefix_ratio_min": settings.prefix_ratio_min,
        "prefix_ratio_max": settings.prefix_ratio_max, "steps": settings.steps, "seed": settings.seed,
        "teacher_logprobs": settings.teacher_logprobs, "sft_coef": settings.sft_coef,
        "advantage_baseline": settings.advantage_baseline, "metrics_path": metrics_path, **loss,
    }


def packs_sequences(runtime: Any) -> bool:
    """verl's sequence packing (remove padding) relies on flash-attn's variable-length kernels;
    with sdpa, packed sequences would attend across each other, so packing goes off."""
    return runtime.attn_implementation == "flash_attention_2"


def rollout_n(settings: Any) -> int:
    """Rows per prompt: the group, plus the trace row of the RL-with-SFT-loss baseline."""
    return settings.n + (1 if settings.algorithm == "rl_sft" else 0)


def ppo_overrides(settings: Any, runtime: Any, job: VerlJob, metrics_path: str) -> list[str]:
    """Overrides of verl's ``ppo_trainer`` config for a luffy, grpo or rl_sft experiment."""
    if settings.algorithm == "sft":
        raise ValueError("sft experiments run on verl's SFT trainer (sft_overrides)")
    s, r = settings, runtime
    mini_batch = s.prompts_per_step // s.mini_batches
    out = [
        f"data.train_files={hydra_value(job.train_files)}",
        f"data.val_files={hydra_value(job.val_files or job.train_files)}",
        # no validation runs (test_freq -1): the train file stands in, one row of it loaded
        "data.val_max_samples=1",
        f"data.max_prompt_length={r.max_prompt_tokens}",
        f"data.max_response_length={s.max_response_tokens}",
        f"data.train_batch_size={s.prompts_per_step}",
        f"data.seed={s.seed}",
        "data.shuffle=true",
        "data.truncation=error",
        f"actor_rollout_ref.model.path={hydra_value(job.model)}",
        f"actor_rollout_ref.model.use_remove_padding={hydra_value(packs_sequences(r))}",
        f"actor_rollout_ref.model.enable_gradient_checkpointing={hydra_value(r.gradient_checkpointing)}",
        f"+actor_rollout_ref.model.override_config.attn_implementation={r.attn_implementation}",
        f"actor_rollout_ref.actor.optim.lr={hydra_value(float(s.lr))}",
        f"actor_rollout_ref.actor.optim.weight_decay={hydra_value(float(s.weight_decay))}",
        f"actor_rollout_ref.actor.optim.betas={hydra_value([float(s.beta1), float(s.beta2)])}",
        f"actor_rollout_ref.actor.optim.clip_grad={hydra_value(float(s.grad_clip))}",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        "actor_rollout_ref.actor.optim.lr_scheduler_type=constant",
        f"actor_rollout_ref.actor.grad_clip={hydra_value(float(s.grad_clip))}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch}",
        f"actor_rollout_ref.actor.ppo_epochs={s.ppo_epochs}",
        "actor_rollout_ref.actor.shuffle=false",
        f"actor_rollout_ref.actor.data_loader_seed={s.seed}",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={s.micro_batch_tokens}",
        f"actor_rollout_ref.actor.entropy_coeff={hydra_value(float(s.entropy_coef))}",
        "actor_rollout_ref.actor.calculate_entropy=true",
        f"actor_rollout_ref.actor.use_kl_loss={hydra_value(s.kl_coef > 0)}",
        f"actor_rollout_ref.actor.kl_loss_coef={hydra_value(float(s.kl_coef))}",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        # verl aggregates its own entropy metric with these; our loss (the `luffy` section) decides the update
        f"actor_rollout_ref.actor.loss_agg_mode={AGGREGATION_TO_VERL[s.loss_agg]}",
        f"actor_rollout_ref.actor.loss_scale_factor={hydra_value(float(s.loss_constant))}",
        f"actor_rollout_ref.actor.clip_ratio_low={hydra_value(float(s.clip_ratio))}",
        f"actor_rollout_ref.actor.clip_ratio_high={hydra_value(float(s.clip_ratio_high or s.clip_ratio))}",
        f"actor_rollout_ref.actor.strategy={r.strategy}",  # the reference model follows the actor's
        f"actor_rollout_ref.actor.fsdp_config.param_offload={hydra_value(r.param_offload)}",
        f"actor_rollout_ref.actor.fsdp_config.optimizer_offload={hydra_value(r.optimizer_offload)}",
        "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.rollout.n={rollout_n(s)}",
        f"actor_rollout_ref.rollout.temperature={hydra_value(float(s.temperature))}",
        "actor_rollout_ref.rollout.top_p=1.0",
        "actor_rollout_ref.rollout.top_k=-1",
        f"actor_rollout_ref.rollout.seed={s.seed}",
        # teacher rows carry no rollout log-probs, and verl wants all rows or none (pi_old is recomputed)
        "actor_rollout_ref.rollout.calculate_log_probs=false",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={s.micro_batch_tokens}",
        f"actor_rollout_ref.ref.log_prob_max_token_len_per_gpu={s.micro_batch_tokens}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_LOOP}",
        f"actor_rollout_ref.rollout.agent.num_workers={r.agent_workers}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={r.rollout_tensor_parallel}",
        f"actor_rollout_ref.rollout.gpu_memory_utilization={hydra_value(float(r.rollout_gpu_memory_utilization))}",
        f"actor_rollout_ref.rollout.max_num_seqs={r.rollout_max_num_seqs}",
        f"actor_rollout_ref.rollout.max_num_batched_tokens={r.rollout_max_num_batched_tokens}",
        "algorithm.adv_estimator=grpo",
        f"algorithm.norm_adv_by_std_in_grpo={hydra_value(s.std_normalize)}",
        "algorithm.use_kl_in_reward=false",
        "algorithm.filter_groups.enable=false",
        f"reward.custom_reward_function.path={REWARD_FUNCTION[0]}",
        f"reward.custom_reward_function.name={REWARD_FUNCTION[1]}",
        f"+reward.custom_reward_function.reward_kwargs.timeout_s={hydra_value(float(r.grader_timeout_s))}",
        f"+reward.custom_reward_function.reward_kwargs.processes={r.grader_processes}",
        f"reward.num_workers={r.reward_workers}",
        *_trainer(s, r, job),
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        f"trainer.max_actor_ckpt_to_keep={s.keep_checkpoints}",
        "trainer.use_v1=true",
        f"trainer.v1.trainer_mode={TRAINER_MODE}",
        *_pairs("luffy", luffy_section(s, metrics_path), add=True),
    ]
    if job.device == "cpu":
        out += cpu.ppo_overrides()
    return out + list(r.overrides)


def _trainer(s: Any, r: Any, job: VerlJob) -> list[str]:
    """The trainer keys both of verl's trainers share."""
    return [
        f"trainer.total_training_steps={s.steps * (s.mini_batches if s.algorithm == 'sft' else 1)}",
        # enough epochs for the steps (each epoch has at least one step); the step count ends the run
        f"trainer.total_epochs={s.steps * (s.mini_batches if s.algorithm == 'sft' else 1)}",
        f"trainer.project_name={hydra_value(job.project)}",
        f"trainer.experiment_name={hydra_value(job.experiment)}",
        "trainer.logger=[console,mlflow,file]",
        f"trainer.nnodes={job.nnodes}",
        f"trainer.n_gpus_per_node={job.gpus_per_node}",
        f"trainer.save_freq={s.checkpoint_every * (s.mini_batches if s.algorithm == 'sft' else 1)}",
        f"trainer.default_local_dir={hydra_value(job.checkpoint_dir)}",
        "trainer.resume_mode=auto",
        f"trainer.device={job.device}",
    ]


def sft_overrides(settings: Any, runtime: Any, job: VerlJob) -> list[str]:
    """Overrides of verl's ``sft_trainer_engine`` config for an sft experiment: each of our steps
    (``prompts_per_step`` traces in ``mini_batches`` updates) is ``mini_batches`` of verl's steps."""
    if settings.algorithm != "sft":
        raise ValueError(f"{settings.algorithm} experiments run on verl's PPO trainer (ppo_overrides)")
    s, r = settings, runtime
    return [
        f"data.train_files={hydra_value(job.train_files)}",
        "data.val_files=null",
        "data.messages_key=messages",
        f"data.train_batch_size={s.prompts_per_step // s.mini_batches}",
        f"data.max_length={r.max_prompt_tokens + s.max_response_tokens}",
        "data.use_dynamic_bsz=true",
        f"data.max_token_len_per_gpu={s.micro_batch_tokens}",
        "data.truncation=error",
        f"model.path={hydra_value(job.model)}",
        f"model.enable_gradient_checkpointing={hydra_value(r.gradient_checkpointing)}",
        f"model.use_remove_padding={hydra_value(packs_sequences(r))}",
        f"+model.override_config.attn_implementation={r.attn_implementation}",
        f"optim.lr={hydra_value(float(s.lr))}",
        f"optim.weight_decay={hydra_value(float(s.weight_decay))}",
        f"optim.betas={hydra_value([float(s.beta1), float(s.beta2)])}",
        f"optim.clip_grad={hydra_value(float(s.grad_clip))}",
        f"optim.lr_warmup_steps={s.warmup_steps * s.mini_batches}",
        "optim.lr_scheduler_type=constant",
        f"engine.strategy={r.strategy}",
        f"engine.param_offload={hydra_value(r.param_offload)}",
        f"engine.optimizer_offload={hydra_value(r.optimizer_offload)}",
        *_trainer(s, r, job),
        "trainer.test_freq=-1",
        f"trainer.max_ckpt_to_keep={s.keep_checkpoints}",
        f"trainer.seed={s.seed}",
    ] + list(r.overrides)


def override_key(override: str) -> str:
    match = _OVERRIDE.match(override)
    if not match:
        raise ValueError(f"'{override}' is not a Hydra override (key=value)")
    return match.group(2)


def check_extra_overrides(overrides: Iterable[str]) -> None:
    """User overrides must be key=value, leave the settings this module maps alone, and set
    nothing LUFFY would ignore or break (``keys.REFUSED``: why, and what to use instead)."""
    mapped = set(PPO_MAPPED) | set(SFT_MAPPED)
    for override in overrides:
        key = override_key(override)
        clash = [m for m in mapped if key == m or key.startswith(m + ".") or m.startswith(key + ".")]
        if clash:
            raise ValueError(f"'{override}' sets {clash[0]}, which the experiment's settings decide "
                             "(change the setting instead)")
        refused = refusal(key)
        if refused:
            raise ValueError(f"'{override}': verl's {refused[0]} is refused: {refused[1]}")
