"""The tiny demo base model: a small Qwen2 causal LM with the shipped character tokenizer,
briefly pre-trained on the toy task's format so that it is a weak (not a blank) policy."""

from __future__ import annotations

import logging
import random
from typing import Callable

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from luffy.config import TinyModelConfig
from luffy.data.templates import encode_prompts, encode_traces
from luffy.models.sequences import build_batch, token_logprobs_and_entropy

log = logging.getLogger(__name__)


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0, use_sliding_window=False, dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.bos_token_id, do_sample=True, temperature=1.0, top_p=1.0)
    return model


def pretrain(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]],
             traces: list[str], cfg: TinyModelConfig,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
    """Next-token loss on the response part of chat-formatted (prompt, trace) pairs."""
    rendered, prompt_ids = encode_prompts(tokenizer, prompts)
    response_ids = encode_traces(tokenizer, rendered, traces)
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    order: list[int] = []
    for step in range(cfg.pretrain_steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(prompt_ids)), len(prompt_ids))
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = build_batch([prompt_ids[i] for i in idx], [response_ids[i] for i in idx], tokenizer.pad_token_id)
        logp, _ = token_logprobs_and_entropy(model, batch, with_entropy=False)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(step, {"pretrain/loss": loss.item(), "pretrain/lr": schedule.get_last_lr()[0]})
    model.eval()
