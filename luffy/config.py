"""Structured configuration: one dataclass per section, loaded and validated with OmegaConf.

The YAML files in ``config/`` override these defaults. Unknown keys and values of the wrong
type are errors that name the key (``ConfigError``). ``experiments`` maps a name to a
``TrainConfig``; each experiment is merged over ``train_defaults`` so a config states the
shared budget once and each experiment only what differs.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is generated from these classes
(``luffy schema``), so there is one source of truth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from luffy.engines.registry import ENGINE_NAMES, unsupported_settings

REFERENCE_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final "
    "solution. This involves analyzing, summarizing, exploring, reassessing, and refining your "
    "thought process through multiple iterations. Structure your response into two sections: "
    'Thought and Solution. In the Thought section, present your reasoning using the format: '
    '"<think>\\n {thoughts} </think>\\n". Each thought should include detailed analysis, '
    'brainstorming, verification, and refinement of ideas. After "</think>\\n," in the Solution '
    "section, provide the final, logical, and accurate answer, clearly derived from the "
    "exploration in the Thought section. If applicable, include the answer in \\boxed{} for "
    "closed-form results like multiple choices or mathematical solutions."
)

ALGORITHMS = ("luffy", "grpo", "sft", "rl_sft")
# Names of luffy.algo.losses.SHAPINGS / AGGREGATIONS (kept here so that reading the config
# does not import torch; a test checks they agree).
SHAPING_NAMES = ("luffy", "none", "logp", "p_logp", "sqrt", "pow")
ON_POLICY_SHAPING_NAMES = SHAPING_NAMES
AGGREGATION_NAMES = ("token_mean", "seq_mean_token_mean", "constant")
BACKENDS = ("auto", "vllm", "hf")
TOY_SOURCE_PREFIX = "toy:"
TOY_SPLITS = ("id", "ood")
BENCHMARK_SOURCE_PREFIX = "benchmark:"
ANSWER_TYPES = ("math", "choice")
GRADERS_FOR = {"math": ("math_verify", "boxed"), "choice": ("choice",)}  # the first is the default
BENCHMARK_FORMATS = ("math", "choices", "arc", "gpqa")
SUITE_GROUPS = ("math", "ood")
PROMPT_TEMPLATES = ("luffy", "qwen_math_boxed", "none")
HUB_PREFIX = "hub:"  # data.traces read from the HuggingFace hub


def is_glob(path: str) -> bool:
    """Whether a path is a glob pattern (several files) rather than one file or directory."""
    return any(ch in path for ch in "*?[")


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file named in the message."""


def _help(text: str, default: Any = MISSING, **kw: Any) -> Any:
    """A dataclass field with a one-line help string (kept in the field metadata)."""
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TrackingConfig:
    uri: str = _help("MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins",
                     "sqlite:///mlflow.db")
    experiment: str = _help("MLflow experiment name", "luffy")


@dataclass
class ToyTaskConfig:
    seed: int = _help("seed of the synthetic task generator", 0)
    n_train: int = _help("training problems (each with teacher traces)", 1000)
    n_pretrain: int = _help("problems in the format corpus used to pre-train the tiny base model", 2000)
    n_eval_id: int = _help("held-out in-distribution evaluation problems", 100)
    n_eval_ood: int = _help("harder out-of-distribution evaluation problems", 100)
    min_ops: int = _help("fewest operations in an in-distribution problem", 1)
    max_ops: int = _help("most operations in an in-distribution problem", 3)
    max_operand: int = _help("largest operand in an in-distribution problem", 20)
    ood_min_ops: int = _help("fewest operations in an OOD problem", 3)
    ood_max_ops: int = _help("most operations in an OOD problem", 4)
    ood_max_operand: int = _help("largest operand in an OOD problem", 40)
    generations_min: int = _help("fewest teacher traces per training problem", 2)
    generations_max: int = _help("most teacher traces per training problem", 4)
    wrong_rate: float = _help("share of traces with an arithmetic slip (wrong answer)", 0.25)
    incomplete_rate: float = _help("share of traces cut off before </think>", 0.15)
    verbose_rate: float = _help("share of traces padded with re-checks (often too long)", 0.15)


@dataclass
class DataConfig:
    traces: str = _help("'toy' (synthetic task); 'hub:open-r1/OpenR1-Math-220k' (read from the HuggingFace hub); "
                        "or local parquet: a file, a directory or a glob. OpenR1-Math-220k schema, or the LUFFY "
                        "schema of an already-filtered set (validated)", "toy")
    traces_config: str = _help("hub inputs: the dataset's config", "default")
    traces_split: str = _help("hub inputs: the dataset's split", "train")
    batch_rows: int = _help("rows per record batch while filtering (memory is flat in the input size)", 1024)
    max_trace_tokens: int = _help("longest teacher trace kept, in policy-tokenizer tokens", 8192)
    template: str = _help("training prompts: luffy (system_prompt + problem, the reference) | qwen_math_boxed "
                          "(problem + the Qwen2.5-Math boxed instruction) | none (the problem alone)", "luffy")
    system_prompt: str = _help("system prompt of the luffy template ('' for none)", REFERENCE_SYSTEM_PROMPT)
    validation_fraction: float = _help("share of the filtered training problems held out (by a hash of the "
                                       "problem) as a validation split, never the test suites", 0.0)
    data_source: str = _help("data_source value written to the training parquet", "openr1_math")
    toy: ToyTaskConfig = _help("synthetic task settings (used when traces == 'toy')", ToyTaskConfig)


@dataclass
class ValidationConfig:
    every: int = _help("validate every K training steps and at the end, on data.validation_fraction's "
                       "held-out problems (0: off)", 0)
    n: int = _help("samples per validation problem", 1)
    temperature: float = _help("validation sampling temperature (the eval protocol's)", 0.6)
    max_problems: Optional[int] = _help("first N validation problems (null: all)", 256)
    select: str = _help("exported model: last (the final step) | best (the step with the best validation "
                        "accuracy)", "last")


@dataclass
class TinyModelConfig:
    hidden_size: int = _help("hidden size of the tiny Qwen2 model", 128)
    num_layers: int = _help("transformer layers", 2)
    num_heads: int = _help("attention heads", 4)
    num_kv_heads: int = _help("key/value heads", 2)
    intermediate_size: int = _help("MLP width", 256)
    max_position_embeddings: int = _help("context length", 512)
    pretrain_steps: int = _help("pre-training steps on the format corpus", 300)
    batch_size: int = _help("pre-training batch size (sequences)", 32)
    lr: float = _help("pre-training learning rate", 3.0e-3)
    seed: int = _help("initialisation and data-order seed", 0)


@dataclass
class BaseModelConfig:
    path: Optional[str] = _help(
        "HuggingFace model id or local directory of the policy; null builds the tiny demo model", None)
    config_overrides: dict[str, Any] = _help(
        "keys of the model's config.json to change in a prepared copy (results/models/base), e.g. the "
        "paper's {max_position_embeddings: 16384, rope_theta: 40000.0}", dict)
    chat_template: Optional[str] = _help(
        "a Jinja chat template file that replaces the tokenizer's in the prepared copy (null: keep it)", None)
    tiny: TinyModelConfig = _help("the tiny demo model (when path is null)", TinyModelConfig)


@dataclass
class TrainConfig:
    algorithm: str = _help("luffy | grpo | sft | rl_sft (on-policy GRPO + sft_coef x NLL of the trace)", "luffy")
    engine: str = _help("training engine: local (one process, CPU or one GPU, HF generate rollouts) | verl "
                        "(verl 0.9.1 on GPU nodes, vLLM rollouts; the `verl` section sets its cluster layout)", "local")
    steps: int = _help("training steps (one batch of prompts each)", 500)
    prompts_per_step: int = _help("prompts per step (SFT: traces per step)", 128)
    n: int = _help("responses per prompt (group size)", 8)
    n_off: Optional[int] = _help("off-policy members per group (null: luffy 1, grpo 0)", None)
    prefix_strategy: str = _help("teacher prefix ratio per off-policy member: random U[min,max] | fixed "
                                 "(evenly spaced) | linear (decays from max to min over the steps)", "random")
    prefix_ratio_min: float = _help("smallest share of the teacher trace given as prefix", 1.0)
    prefix_ratio_max: float = _help("largest share of the teacher trace (1.0 = full trace, the paper)", 1.0)
    temperature: float = _help("rollout sampling temperature", 1.0)
    max_response_tokens: int = _help("longest sampled response", 8192)
    lr: float = _help("AdamW learning rate", 1.0e-6)
    warmup_steps: int = _help("linear warm-up steps (the first step already has lr > 0)", 0)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.999)
    grad_clip: float = _help("gradient-norm clip", 1.0)
    mini_batches: int = _help("optimizer updates per step (PPO mini-batches)", 2)
    ppo_epochs: int = _help("passes over each step's batch", 1)
    micro_batch_tokens: int = _help("padded tokens per forward/backward (length-sorted micro-batches with "
                                    "gradient accumulation; 0 = the whole mini-batch at once)", 8192)
    clip: Optional[bool] = _help("PPO-clip the on-policy ratio (null: grpo yes, luffy no)", None)
    clip_ratio: float = _help("PPO clip epsilon (the lower one under clip-higher)", 0.2)
    clip_ratio_high: Optional[float] = _help("clip-higher: upper PPO epsilon (null: = clip_ratio)", None)
    std_normalize: bool = _help("divide group advantages by the group std", False)
    advantage_baseline: Optional[str] = _help(
        "mixed (the whole group) | on_policy (on-policy members only); null: rl_sft on_policy, others mixed", None)
    filter_groups: bool = _help("drop groups whose rewards are all equal before the update", False)
    shaping: str = _help("off-policy f(p): luffy p/(p+gamma) | none p | logp w*log p | p_logp p+w*log p | "
                         "sqrt | pow p^alpha", "luffy")
    shaping_gamma: float = _help("gamma of f(p) = p/(p+gamma)", 0.1)
    shaping_weight: float = _help("w of the logp and p_logp shapings", 0.1)
    shaping_power: float = _help("alpha of the pow shaping", 0.5)
    teacher_logprobs: bool = _help("off-policy weight pi_theta/pi_phi with pi_phi from the data's teacher_logprobs "
                                   "column (`luffy score-traces`) instead of f(pi_theta) with pi_phi = 1", False)
    off_clip_min: Optional[float] = _help("lower clip of the off-policy weight (null: none)", None)
    off_clip_max: Optional[float] = _help("upper clip of the off-policy weight (null: none)", None)
    on_policy_shaping: str = _help("on-policy ratio: none e^d | logp d | p_logp e^d+w*d | sqrt | pow e^(alpha d) | "
                                   "luffy f(p)/f(p_old), with d = log pi - log pi_old", "none")
    on_policy_weight: float = _help("w of the p_logp on-policy ratio", 1.0)
    on_policy_power: float = _help("alpha of the pow on-policy ratio", 0.5)
    on_policy_gamma: float = _help("gamma of the luffy on-policy ratio", 0.1)
    token_prob_max: Optional[float] = _help("tokens with pi above this add nothing to the loss (null: off)", None)
    kl_coef: float = _help("KL penalty to the base model (k3 estimator); 0 = off, as in the paper", 0.0)
    sft_coef: float = _help("rl_sft: weight of the trace NLL added to the on-policy loss", 1.0)
    loss_agg: str = _help("token_mean | seq_mean_token_mean | constant (sum / loss_constant, Dr.GRPO)",
                          "constant")
    loss_constant: Optional[float] = _help("normaliser of loss_agg=constant (null: max_response_tokens)", None)
    entropy_coef: float = _help("entropy bonus coefficient", 0.001)
    checkpoint_every: int = _help("checkpoint every K steps (and at the end)", 50)
    seed: int = _help("seed of sampling and data order", 0)
    device: str = _help("auto | cpu | cuda", "auto")
    init_from: Optional[str] = _help("start from another experiment's trained model (SFT then RL); "
                                     "null: the base model", None)
    data_start: float = _help("first fraction of the training rows used (complementary problem sets)", 0.0)
    data_end: float = _help("end fraction of the training rows used", 1.0)


@dataclass
class VllmConfig:
    gpu_memory_utilization: float = _help("vLLM memory share (on CPU: of host RAM for the KV cache)", 0.9)
    dtype: str = _help("vLLM dtype", "auto")
    enforce_eager: bool = _help("disable CUDA graphs / compilation", False)
    max_model_len: Optional[int] = _help("context limit (null: the model's)", None)
    enable_prefix_caching: bool = _help("share prompt KV across the n samples", True)


@dataclass
class BenchmarkSpec:
    """One entry of the benchmark registry (``config/benchmarks.yaml``)."""

    title: str = _help("the suite's name in tables", "")
    group: str = _help("the table it belongs to: math | ood", "math")
    hub_id: str = _help("public dataset id on the HuggingFace hub", "")
    hub_config: Optional[str] = _help("the dataset's config (subset); null: default", None)
    split: str = _help("the dataset's split", "test")
    format: str = _help("row layout: math (problem, answer) | choices (question, options list, answer letter) | "
                        "arc (question, choices{text,label}, answerKey) | gpqa (question, correct + 3 incorrect "
                        "answers, shuffled with a fixed seed)", "math")
    columns: dict[str, str] = _help("role -> column of the public dataset (problem, answer, options, correct, "
                                    "incorrect_1..3)", dict)
    instruction: Optional[str] = _help("appended to the user turn of public-schema rows; {letters} = the option "
                                       "letters (e.g. ABCD)", None)
    answer_type: str = _help("math | choice", "math")
    n: int = _help("samples per problem (the paper: 32 for AIME24, AIME25, AMC; 1 otherwise)", 1)
    local: Optional[str] = _help("local parquet used instead of the hub: the reference's eval schema (rows of "
                                 "data_source, 32x copies de-duplicated) or the public dataset's columns", None)
    data_source: Optional[str] = _help("data_source of this suite's rows in a reference-schema file", None)
    problems: Optional[int] = _help("expected number of distinct problems (checked; null: not checked)", None)


@dataclass
class SuiteConfig:
    source: str = _help("'toy:id' / 'toy:ood' (synthetic suites), 'benchmark:<name>' (the registry) or a parquet "
                        "in the benchmark schema")
    local: Optional[str] = _help("benchmark sources: a local file replacing the registry's hub / local source", None)
    n: Optional[int] = _help("samples per problem, the engine's n (null: the registry's, else 1)", None)
    temperature: float = _help("sampling temperature", 0.6)
    top_p: float = _help("nucleus sampling", 1.0)
    max_tokens: int = _help("most new tokens per sample", 8192)
    system_prompt: Optional[str] = _help("drop (the paper's protocol: the model's own chat template on the user "
                                         "turn) | keep (the file's system message); null: keep for toy suites (the "
                                         "tiny model learns with it), drop otherwise", None)
    answer_type: Optional[str] = _help("math | choice (null: the registry's, else math)", None)
    grader: Optional[str] = _help("the verdict that counts; math: math_verify | boxed, choice: choice; every "
                                  "grader of the answer type is stored per sample (null: the first)", None)
    group: Optional[str] = _help("results table: math | ood (null: the registry's, else math)", None)
    title: Optional[str] = _help("name in tables (null: the registry's title, else the suite's name)", None)


@dataclass
class GradingConfig:
    workers: Optional[int] = _help("grader processes (null: the job's threads)", None)
    timeout_s: float = _help("time limit per answer, all its graders together (a stuck worker is killed)", 5.0)
    memory_mb: int = _help("address-space cap of a grader process (0: none)", 4096)


@dataclass
class EvaluationConfig:
    backend: str = _help("auto (vLLM where installed, else HF) | vllm | hf", "auto")
    seed: int = _help("sampling seed", 0)
    hf_batch_size: int = _help("prompts per HF generate call", 64)
    vllm: VllmConfig = _help("vLLM engine settings", VllmConfig)
    grading: GradingConfig = _help("the grader pool", GradingConfig)
    suites: dict[str, SuiteConfig] = _help("suite name -> settings", dict)


@dataclass
class ReportConfig:
    title: str = _help("heading of the results table", "Results")
    decimals: int = _help("decimals of accuracies (in percent)", 1)
    publish: Optional[str] = _help("Markdown file the report (re)generates with the tables, the plots and the "
                                   "discussion, e.g. docs/toy-reproduction.md (null: none)", None)
    discussion: Optional[str] = _help("hand-written Markdown appended to the published file", None)
    published: bool = _help("show the LUFFY paper's reported rows, marked (reported), under tables whose suites "
                            "are its benchmarks", True)


ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "sdpa")


@dataclass
class VerlConfig:
    """How the verl engine lays out its experiments on GPUs (none of this changes the math); the
    nodes and GPUs of a run are its train job's (``resources``)."""

    max_prompt_tokens: int = _help("longest prompt in tokens (verl's data.max_prompt_length; the paper: 1024); "
                                   "a longer training prompt is a preflight error", 1024)
    rollout_tensor_parallel: int = _help("vLLM tensor-parallel size of a rollout replica (divides the GPUs)", 2)
    rollout_gpu_memory_utilization: float = _help("share of GPU memory vLLM may take while rolling out, in (0, 1]",
                                                  0.6)
    rollout_max_num_seqs: int = _help("most sequences a vLLM replica decodes at once (>= 1)", 256)
    rollout_max_num_batched_tokens: int = _help("vLLM's token budget per scheduler step (>= 1)", 16384)
    attn_implementation: str = _help("actor attention: flash_attention_2 (needs flash-attn; verl packs sequences) | "
                                     "sdpa (no packing: slower, same math)", "flash_attention_2")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass (memory for time)", True)
    param_offload: bool = _help("FSDP: keep parameters on the CPU between uses", False)
    optimizer_offload: bool = _help("FSDP: keep optimizer states on the CPU between uses", False)
    agent_workers: int = _help("agent-loop workers that drive the rollouts (>= 1)", 8)
    reward_workers: int = _help("reward-loop workers that grade (>= 1)", 8)
    grader_processes: int = _help("grader processes per reward worker (>= 1)", 2)
    grader_timeout_s: float = _help("time limit per graded answer (> 0); a stuck grader process is killed", 5.0)
    max_checkpoints: int = _help("checkpoints kept in the work directory (>= 1; the newest are kept)", 2)
    overrides: list[str] = _help("extra Hydra overrides for verl's ppo_trainer config (key=value; checked by "
                                 "composing it before the run); the settings this pipeline maps are refused", list)


STAGES = ("make_toy_traces", "prepare_traces", "prepare_benchmark", "make_base_model", "prepare_base_model", "train",
          "convert", "evaluate", "report")


@dataclass
class JobResources:
    """What one job asks its scheduler for (null: the next level up decides)."""

    cpus: Optional[int] = _help("CPU cores, also the job's threads (>= 1)", None)
    mem_mb: Optional[int] = _help("memory in MB (>= 1)", None)
    runtime: Optional[int] = _help("wall-clock limit in minutes (>= 1)", None)
    gpus: Optional[int] = _help("GPUs per node (>= 0)", None)
    nodes: Optional[int] = _help("nodes (>= 1; more than one only for training on the verl engine)", None)


@dataclass
class ResourcesConfig:
    default: JobResources = _help("every job's resources unless its stage or experiment says otherwise",
                                  lambda: JobResources(cpus=2, mem_mb=4000, runtime=60, gpus=0, nodes=1))
    stages: dict[str, JobResources] = _help(f"stage (rule) -> its resources over `default`; stages: {STAGES}", dict)
    experiments: dict[str, JobResources] = _help(
        "experiment -> the resources of its train job over `stages.train` (an experiment with seeds: its "
        "declared name)", dict)


@dataclass
class Config:
    results_dir: str = _help("where every output goes", "results")
    tracking: TrackingConfig = _help("MLflow", TrackingConfig)
    data: DataConfig = _help("training data", DataConfig)
    base_model: BaseModelConfig = _help("the policy's starting point", BaseModelConfig)
    train_defaults: dict[str, Any] = _help("settings shared by every experiment (TrainConfig keys)", dict)
    experiments: dict[str, Any] = _help("experiment name -> TrainConfig overrides", dict)
    seeds: list[int] = _help("run every experiment once per seed (as <name>-seed<N>); [] = each its own seed",
                             list)
    validation: ValidationConfig = _help("in-training validation and checkpoint selection", ValidationConfig)
    benchmarks: str = _help("the benchmark registry ('benchmark:<name>' suite sources)", "config/benchmarks.yaml")
    evaluation: EvaluationConfig = _help("evaluation protocol", EvaluationConfig)
    report: ReportConfig = _help("tables and plots", ReportConfig)
    verl: VerlConfig = _help("the verl engine's cluster layout (experiments with engine: verl)", VerlConfig)
    resources: ResourcesConfig = _help("what each job asks its scheduler for (cores, memory, time, GPUs, nodes); "
                                       "a laptop's run uses the cores only", ResourcesConfig)


ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "luffy": {"n_off": 1, "clip": False},
    "grpo": {"n_off": 0, "clip": True},
    "sft": {"n_off": 0, "clip": False},
    "rl_sft": {"n_off": 0, "clip": True, "advantage_baseline": "on_policy"},
}
RESERVED_MODEL_NAMES = ("base",)


def _describe(err: OmegaConfBaseException, prefix: str) -> str:
    key = getattr(err, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(err).split("\n")[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def _merge(schema: type, *layers: Any, prefix: str = "") -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, prefix)) from None


def resolve_train_config(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Merge an experiment over ``train_defaults`` and fill the algorithm's own defaults."""
    prefix = f"experiments.{name}"
    for key in list(defaults) + list(overrides or {}):
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            where = prefix if key in (overrides or {}) else "train_defaults"
            raise ConfigError(f"config key '{where}.{key}': unknown setting (expected one of TrainConfig's keys)")
    cfg: TrainConfig = _merge(TrainConfig, defaults, overrides or {}, prefix=prefix)
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"config key '{prefix}.algorithm': '{cfg.algorithm}' is not one of {ALGORITHMS}")
    for key, value in {"advantage_baseline": "mixed", **ALGORITHM_DEFAULTS[cfg.algorithm]}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.loss_constant is None:
        cfg.loss_constant = float(cfg.max_response_tokens)
    checks = [
        (cfg.algorithm in ("grpo", "rl_sft") and cfg.n_off != 0, "n_off",
         f"{cfg.algorithm} groups are on-policy only: n_off must be 0"),
        (cfg.algorithm == "luffy" and not 0 <= cfg.n_off < cfg.n, "n_off",
         f"must be in [0, n={cfg.n}) so the group has on-policy members"),
        (cfg.engine not in ENGINE_NAMES, "engine", f"'{cfg.engine}' is not one of {ENGINE_NAMES}"),
        (cfg.shaping not in SHAPING_NAMES, "shaping", f"'{cfg.shaping}' is not one of {SHAPING_NAMES}"),
        (cfg.on_policy_shaping not in ON_POLICY_SHAPING_NAMES, "on_policy_shaping",
         f"'{cfg.on_policy_shaping}' is not one of {ON_POLICY_SHAPING_NAMES}"),
        (cfg.token_prob_max is not None and not 0 < cfg.token_prob_max <= 1, "token_prob_max", "must be in (0, 1]"),
        (cfg.loss_agg not in AGGREGATION_NAMES, "loss_agg", f"'{cfg.loss_agg}' is not one of {AGGREGATION_NAMES}"),
        (cfg.advantage_baseline not in ("mixed", "on_policy"), "advantage_baseline",
         f"'{cfg.advantage_baseline}' is not one of ('mixed', 'on_policy')"),
        (cfg.advantage_baseline == "on_policy" and cfg.n_off >= cfg.n, "advantage_baseline",
         "needs on-policy members (n_off < n)"),
        (cfg.clip_ratio_high is not None and cfg.clip_ratio_high < cfg.clip_ratio, "clip_ratio_high",
         "must be >= clip_ratio"),
        (cfg.off_clip_min is not None and cfg.off_clip_max is not None and cfg.off_clip_min > cfg.off_clip_max,
         "off_clip_min", "must be <= off_clip_max"),
        (cfg.kl_coef < 0, "kl_coef", "must be >= 0"),
        (cfg.teacher_logprobs and (cfg.algorithm != "luffy" or cfg.n_off == 0), "teacher_logprobs",
         "needs off-policy members (algorithm luffy, n_off >= 1)"),
        (not 0.0 <= cfg.data_start < cfg.data_end <= 1.0, "data_start", "need 0 <= data_start < data_end <= 1"),
        (cfg.prefix_strategy not in ("random", "fixed", "linear"), "prefix_strategy",
         f"'{cfg.prefix_strategy}' is not one of ('random', 'fixed', 'linear')"),
        (not 0.0 <= cfg.prefix_ratio_min <= cfg.prefix_ratio_max <= 1.0, "prefix_ratio_min",
         "need 0 <= prefix_ratio_min <= prefix_ratio_max <= 1"),
        (cfg.steps < 1, "steps", "must be >= 1"),
        (cfg.n < 1, "n", "must be >= 1"),
        (cfg.prompts_per_step < 1, "prompts_per_step", "must be >= 1"),
        (cfg.mini_batches < 1 or cfg.prompts_per_step % cfg.mini_batches, "mini_batches",
         f"must divide prompts_per_step={cfg.prompts_per_step}"),
        (cfg.checkpoint_every < 1, "checkpoint_every", "must be >= 1"),
        (cfg.micro_batch_tokens < 0, "micro_batch_tokens", "must be >= 0"),
        (cfg.lr <= 0, "lr", "must be > 0"),
        (cfg.shaping_gamma <= 0, "shaping_gamma", "must be > 0"),
        (cfg.device not in ("auto", "cpu", "cuda"), "device", f"'{cfg.device}' is not one of auto, cpu, cuda"),
    ]
    for bad, key, why in checks:
        if bad:
            raise ConfigError(f"config key '{prefix}.{key}': {why}")
    for key, why in unsupported_settings(cfg.engine, cfg):
        raise ConfigError(f"config key '{prefix}.{key}': not supported by engine {cfg.engine}: {why}")
    return cfg


@dataclass
class ResolvedConfig:
    """The validated configuration: typed sections plus the resolved experiments."""

    root: Config
    experiments: dict[str, TrainConfig]  # expanded: one entry per (experiment, seed)
    benchmarks: dict[str, BenchmarkSpec] = field(default_factory=dict)  # suite name -> its registry entry

    @property
    def models(self) -> list[str]:
        """Evaluated models: the base model, then every (expanded) experiment."""
        return ["base", *self.experiments]


SEED_SUFFIX = re.compile(r"^(?P<family>.+)-seed(?P<seed>\d+)$")


def experiment_family(name: str) -> str:
    """'luffy-seed2' -> 'luffy': the declared experiment an expanded run belongs to."""
    match = SEED_SUFFIX.match(name)
    return match.group("family") if match else name


def _expand_seeds(declared: dict[str, TrainConfig], seeds: list[int]) -> dict[str, TrainConfig]:
    for name, cfg in declared.items():
        if cfg.init_from is not None and cfg.init_from not in declared:
            raise ConfigError(f"config key 'experiments.{name}.init_from': '{cfg.init_from}' is not an experiment")
        seen, current = {name}, cfg.init_from
        while current is not None:
            if current in seen:
                raise ConfigError(f"config key 'experiments.{name}.init_from': cycle through '{current}'")
            seen.add(current)
            current = declared[current].init_from
    if not seeds:
        return declared
    expanded = {}
    for name, cfg in declared.items():
        for seed in seeds:
            run = dataclasses.replace(cfg, seed=seed)
            if cfg.init_from is not None:
                run.init_from = f"{cfg.init_from}-seed{seed}"  # each seed continues its own first stage
            expanded[f"{name}-seed{seed}"] = run
    return expanded


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
    ranges = {"cpus": 1, "mem_mb": 1, "runtime": 1, "gpus": 0, "nodes": 1}
    levels = [("default", res.default), *((f"stages.{k}", v) for k, v in res.stages.items()),
              *((f"experiments.{k}", v) for k, v in res.experiments.items())]
    for where, level in levels:
        for key, lowest in ranges.items():
            value = getattr(level, key)
            if value is not None and value < lowest:
                raise ConfigError(f"config key 'resources.{where}.{key}': must be >= {lowest}")
    for stage in STAGES:
        if stage != "train" and job_resources(root, stage).nodes != 1:
            raise ConfigError(f"config key 'resources.stages.{stage}.nodes': only training runs over several nodes")
    for name, cfg in experiments.items():
        job = job_resources(root, "train", name)
        if job.nodes > 1 and (cfg.engine != "verl" or job.gpus < 1):
            raise ConfigError(f"config key 'resources.experiments.{experiment_family(name)}.nodes': several nodes "
                              "need the verl engine and GPUs (gpus >= 1)")


def _check_verl(root: Config, experiments: dict[str, TrainConfig]) -> None:
    """The verl section's ranges, and what the verl engine needs of each experiment run on it."""
    from luffy.engines.verl.overrides import check_extra_overrides

    v = root.verl
    checks = [
        (v.max_prompt_tokens < 1, "max_prompt_tokens", "must be >= 1"),
        (v.rollout_tensor_parallel < 1, "rollout_tensor_parallel", "must be >= 1"),
        (not 0.0 < v.rollout_gpu_memory_utilization <= 1.0, "rollout_gpu_memory_utilization", "must be in (0, 1]"),
        (v.rollout_max_num_seqs < 1, "rollout_max_num_seqs", "must be >= 1"),
        (v.rollout_max_num_batched_tokens < 1, "rollout_max_num_batched_tokens", "must be >= 1"),
        (v.attn_implementation not in ATTENTION_IMPLEMENTATIONS, "attn_implementation",
         f"'{v.attn_implementation}' is not one of {ATTENTION_IMPLEMENTATIONS}"),
        (v.agent_workers < 1, "agent_workers", "must be >= 1"),
        (v.reward_workers < 1, "reward_workers", "must be >= 1"),
        (v.grader_processes < 1, "grader_processes", "must be >= 1"),
        (v.grader_timeout_s <= 0, "grader_timeout_s", "must be > 0"),
        (v.max_checkpoints < 1, "max_checkpoints", "must be >= 1"),
    ]
    for bad, key, why in checks:
        if bad:
            raise ConfigError(f"config key 'verl.{key}': {why}")
    try:
        check_extra_overrides(v.overrides)
    except ValueError as err:
        raise ConfigError(f"config key 'verl.overrides': {err}") from None
    for name, cfg in experiments.items():
        if cfg.engine != "verl":
            continue
        key = f"experiments.{name}"
        job = job_resources(root, "train", name)
        gpus = job.nodes * job.gpus
        rows = (cfg.prompts_per_step // cfg.mini_batches) * (1 if cfg.algorithm == "sft" else cfg.n + int(
            cfg.algorithm == "rl_sft"))
        checks = [
            (root.validation.every > 0, "engine", "in-training validation (validation.every > 0) is not available "
             "with engine verl; set validation.every: 0 or use engine local"),
            (gpus < 1, "engine", "verl trains on GPUs: give its train job gpus >= 1 (resources)"),
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


def _check_file(path: str, key: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"config key '{key}': file not found: {path}")


def _looks_local(path: str) -> bool:
    """A path (not a hub id such as 'Qwen/Qwen2.5-Math-7B'): absolute, relative with ./ or ~."""
    return path.startswith((".", "/", "~"))


def load_config(raw: dict[str, Any] | DictConfig) -> ResolvedConfig:
    """Validate a raw config mapping (e.g. Snakemake's ``config``) and resolve experiments."""
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    root: Config = _merge(Config, raw or {})
    toy = root.data.toy
    traces = root.data.traces
    if traces != "toy" and not traces.startswith(HUB_PREFIX) and not is_glob(traces):
        _check_file(traces, "data.traces")
    if root.data.template not in PROMPT_TEMPLATES:
        raise ConfigError(f"config key 'data.template': '{root.data.template}' is not one of {PROMPT_TEMPLATES}")
    if root.data.batch_rows < 1:
        raise ConfigError("config key 'data.batch_rows': must be >= 1")
    if not 0.0 <= root.data.validation_fraction < 1.0:
        raise ConfigError("config key 'data.validation_fraction': must be in [0, 1)")
    val = root.validation
    if val.every < 0 or val.n < 1 or (val.max_problems is not None and val.max_problems < 1):
        raise ConfigError("config key 'validation': need every >= 0, n >= 1, max_problems >= 1 (or null)")
    if val.select not in ("last", "best"):
        raise ConfigError(f"config key 'validation.select': '{val.select}' is not one of ('last', 'best')")
    if val.every > 0 and root.data.validation_fraction <= 0:
        raise ConfigError("config key 'validation.every': needs data.validation_fraction > 0 (a held-out split)")
    if toy.generations_min < 1 or toy.generations_max < toy.generations_min:
        raise ConfigError("config key 'data.toy.generations_min': need 1 <= generations_min <= generations_max")
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
    experiments = {}
    for name, overrides in root.experiments.items():
        if (name in RESERVED_MODEL_NAMES or not name.replace("_", "").replace("-", "").isalnum()
                or SEED_SUFFIX.match(name)):
            raise ConfigError(f"config key 'experiments.{name}': names must be [A-Za-z0-9_-], not 'base' "
                              "and not end in -seed<N>")
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"config key 'experiments.{name}': expected a mapping of settings")
        experiments[name] = resolve_train_config(name, root.train_defaults or {}, overrides or {})
    if len(set(root.seeds)) != len(root.seeds):
        raise ConfigError(f"config key 'seeds': repeated seeds in {root.seeds}")
    experiments = _expand_seeds(experiments, list(root.seeds))
    _check_resources(root, experiments)
    _check_verl(root, experiments)
    ev = root.evaluation
    if ev.backend not in BACKENDS:
        raise ConfigError(f"config key 'evaluation.backend': '{ev.backend}' is not one of {BACKENDS}")
    if not ev.suites:
        raise ConfigError("config key 'evaluation.suites': at least one suite is required")
    if ev.grading.workers is not None and ev.grading.workers < 1:
        raise ConfigError("config key 'evaluation.grading.workers': must be >= 1 (or null)")
    if ev.grading.timeout_s <= 0:
        raise ConfigError("config key 'evaluation.grading.timeout_s': must be > 0")
    benchmarks = {}
    registry: dict[str, BenchmarkSpec] | None = None  # read once, when a suite names a benchmark
    for name, suite in ev.suites.items():
        key = f"evaluation.suites.{name}"
        if suite.source.startswith(TOY_SOURCE_PREFIX):
            split = suite.source[len(TOY_SOURCE_PREFIX):]
            if split not in TOY_SPLITS:
                raise ConfigError(f"config key '{key}.source': toy split '{split}' is not one of {TOY_SPLITS}")
        elif suite.source.startswith(BENCHMARK_SOURCE_PREFIX):
            registry = load_registry(root.benchmarks) if registry is None else registry
            benchmarks[name] = _resolve_benchmark(registry, root.benchmarks, suite, key)
        else:
            _check_file(suite.source, f"{key}.source")
        resolve_suite(suite, benchmarks.get(name), key)
    rep = root.report
    if rep.publish is not None and not rep.publish.endswith(".md"):
        raise ConfigError(f"config key 'report.publish': '{rep.publish}' is not a Markdown (.md) file")
    if rep.discussion is not None:
        if rep.publish is None:
            raise ConfigError("config key 'report.discussion': needs report.publish")
        _check_file(rep.discussion, "report.discussion")
    return ResolvedConfig(root=root, experiments=experiments, benchmarks=benchmarks)


def load_registry(path: str) -> dict[str, BenchmarkSpec]:
    """The benchmark registry: name -> validated ``BenchmarkSpec``."""
    _check_file(path, "benchmarks")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # YAML syntax
        raise ConfigError(f"benchmark registry {path}: cannot read ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"benchmark registry {path}: expected a mapping name -> settings")
    out = {}
    for name, entry in raw.items():
        if str(name).startswith("_"):  # shared YAML anchors
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"benchmark registry {path}: '{name}': expected a mapping of settings")
        spec: BenchmarkSpec = _merge(BenchmarkSpec, entry, prefix=f"{path}: {name}")
        checks = [(spec.format not in BENCHMARK_FORMATS, "format", f"'{spec.format}' is not one of {BENCHMARK_FORMATS}"),
                  (spec.answer_type not in ANSWER_TYPES, "answer_type", f"'{spec.answer_type}' is not one of {ANSWER_TYPES}"),
                  (spec.group not in SUITE_GROUPS, "group", f"'{spec.group}' is not one of {SUITE_GROUPS}"),
                  (not spec.hub_id and not spec.local, "hub_id", "a benchmark needs a hub_id or a local file"),
                  (spec.n < 1, "n", "must be >= 1")]
        for bad, key, why in checks:
            if bad:
                raise ConfigError(f"benchmark registry {path}: '{name}.{key}': {why}")
        out[name] = spec
    return out


def _resolve_benchmark(registry: dict[str, BenchmarkSpec], registry_path: str, suite: SuiteConfig,
                       key: str) -> BenchmarkSpec:
    """The registry entry a 'benchmark:<name>' suite names, with the suite's local file applied."""
    name = suite.source[len(BENCHMARK_SOURCE_PREFIX):]
    if name not in registry:
        raise ConfigError(f"config key '{key}.source': benchmark '{name}' is not in {registry_path} "
                          f"(known: {sorted(registry)})")
    spec = dataclasses.replace(registry[name], columns=dict(registry[name].columns))
    if suite.local is not None:
        spec.local = suite.local
    if spec.local is not None and _looks_local(spec.local):
        _check_file(spec.local, f"{key}.local")
    return spec


def resolve_suite(suite: SuiteConfig, spec: BenchmarkSpec | None, key: str) -> None:
    """Fill a suite's null settings from its registry entry (or the defaults) and check them."""
    for field_name, fallback in (("n", 1), ("answer_type", "math"), ("group", "math")):
        if getattr(suite, field_name) is None:
            setattr(suite, field_name, getattr(spec, field_name) if spec else fallback)
    if suite.system_prompt is None:
        suite.system_prompt = "keep" if suite.source.startswith(TOY_SOURCE_PREFIX) else "drop"
    if suite.title is None and spec is not None and spec.title:
        suite.title = spec.title
    if suite.local is not None and spec is None:
        raise ConfigError(f"config key '{key}.local': only 'benchmark:<name>' sources take a local file")
    if suite.answer_type not in ANSWER_TYPES:
        raise ConfigError(f"config key '{key}.answer_type': '{suite.answer_type}' is not one of {ANSWER_TYPES}")
    graders = GRADERS_FOR[suite.answer_type]
    if suite.grader is None:
        suite.grader = graders[0]
    if suite.grader not in graders:
        raise ConfigError(f"config key '{key}.grader': '{suite.grader}' does not grade {suite.answer_type} answers "
                          f"(one of {graders})")
    if suite.group not in SUITE_GROUPS:
        raise ConfigError(f"config key '{key}.group': '{suite.group}' is not one of {SUITE_GROUPS}")
    if suite.system_prompt not in ("drop", "keep"):
        raise ConfigError(f"config key '{key}.system_prompt': '{suite.system_prompt}' is not one of ('drop', 'keep')")
    if suite.n < 1 or suite.max_tokens < 1:
        raise ConfigError(f"config key '{key}': n and max_tokens must be >= 1")


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested structure of them) to plain JSON-able Python."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Canonical JSON (sorted keys): stable, so Snakemake params only change with the settings."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))


def from_json(schema: type, text: str) -> Any:
    """Inverse of ``to_json`` for one section, validated against its dataclass."""
    return _merge(schema, json.loads(text))


# ---- JSON schema generation (workflow/schemas/config.schema.yaml) ----

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        schema = _type_schema(inner[0])
        types = schema.get("type")
        if types is not None:
            schema["type"] = [*([types] if isinstance(types, str) else types), "null"]
        return schema
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict:
        value_type = args[1] if len(args) == 2 else Any
        schema: dict[str, Any] = {"type": "object"}
        if value_type is not Any:
            schema["additionalProperties"] = _type_schema(value_type)
        return schema
    if tp is float:
        return {"type": "number"}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    return {}


def dataclass_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = _type_schema(hints[f.name])
        if "help" in f.metadata:
            prop["description"] = f.metadata["help"]
        props[f.name] = prop
    return {"type": "object", "additionalProperties": False, "properties": props}


def json_schema() -> dict[str, Any]:
    schema = dataclass_schema(Config)
    schema["properties"]["train_defaults"] = dataclass_schema(TrainConfig)
    schema["properties"]["experiments"]["additionalProperties"] = {
        "anyOf": [dataclass_schema(TrainConfig), {"type": "null"}]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "LUFFY pipeline configuration (generated from luffy/config.py by `luffy schema`)",
            **schema}
