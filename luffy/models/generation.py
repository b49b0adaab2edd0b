"""Sampling with HF transformers ``generate`` (rollouts of the local engine, the HF eval backend)."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def sample(model: PreTrainedModel, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int,
           temperature: float, top_p: float, eos_id: int, pad_id: int,
           batch_size: int = 64) -> list[list[list[int]]]:
    """``n`` sampled responses per prompt, each cut after its first EOS (which it keeps).

    Prompts are left-padded in batches of ``batch_size`` prompts; a response that reaches
    ``max_new_tokens`` without EOS is returned as is (truncated).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
            top_k=0 if temperature > 0 else None,
            max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos_id, pad_token_id=pad_id)
        new_tokens = generated[:, width:].tolist()
        for i in range(len(chunk)):
            group = []
            for row in new_tokens[i * n : (i + 1) * n]:
                group.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
            out.append(group)
    model.train(was_training)
    return out
