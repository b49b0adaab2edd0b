"""Sampling for the local engine's rollouts and the HF evaluation backend: a lean decode loop
over a transformers model's KV cache.

HF ``generate`` with ``num_return_sequences=n`` repeats each prompt n times before its prefill,
so every prompt is processed n times, and it keeps decoding finished rows (feeding padding)
until the longest is done. Here each prompt is prefilled once, its cache is shared by its n
samples (``batch_repeat_interleave``), and finished samples leave the batch (with their cache
rows) as they end.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, TemperatureLogitsWarper, TopPLogitsWarper


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab]: the argmax at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top-``top_p`` nucleus (transformers'
    own warpers, as ``generate`` applies them)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(-1)


@torch.no_grad()
def sample(model: PreTrainedModel, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int,
           temperature: float, top_p: float, eos_id: int, pad_id: int,
           batch_size: int = 64) -> list[list[list[int]]]:
    """``n`` sampled responses per prompt, each cut after its first EOS (which it keeps).

    Prompts are left-padded in batches of ``batch_size`` prompts; a response that reaches
    ``max_new_tokens`` without EOS is returned as is (truncated). Seeded by torch's global
    generator: the same seed gives the same responses on the same machine.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            out += _sample_batch(model, prompts[start : start + batch_size], n, max_new_tokens, temperature, top_p,
                                 eos_id, pad_id, device)
    finally:
        model.train(was_training)
    return out


def _sample_batch(model, chunk, n, max_new_tokens, temperature, top_p, eos_id, pad_id, device):
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(chunk):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate: left padding does not shift positions
    prefill = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = prefill.past_key_values
    if n > 1:
        cache.batch_repeat_interleave(n)
    logits = prefill.logits[:, -1].float().repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    position = mask.sum(-1)  # each row's next position
    rows = len(chunk) * n
    responses: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows, device=device)  # the rows still decoding, in cache order
    for t in range(max_new_tokens):
        token = next_tokens(logits, temperature, top_p)
        for row, value in zip(alive.tolist(), token.tolist()):
            responses[row].append(value)
        going = token != eos_id
        if t + 1 == max_new_tokens or not bool(going.any()):
            break
        if not bool(going.all()):  # finished rows leave the batch, their cache rows with them
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, token, mask, position = alive[keep], token[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=-1)
        step = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                     past_key_values=cache, use_cache=True)
        position = position + 1
        logits = step.logits[:, -1].float()
    return [responses[i * n : (i + 1) * n] for i in range(len(chunk))]
