"""Prompt + response batches and their per-token log-probabilities (teacher-forced).

Layout: each row is ``prompt ++ response`` right-padded, so positions start at 0 for every
row. ``response_mask[b, t]`` marks the *predictions* of response tokens: logits at position
t predict token t + 1, so all per-token tensors have length ``L - 1``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    target_ids: torch.Tensor      # [B, L-1]  token predicted at each position
    response_mask: torch.Tensor   # [B, L-1]  1.0 where the predicted token is a response token

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                      self.target_ids, self.response_mask)))


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The local engine's compute precision on ``device``: on a GPU, TF32 matmuls and bfloat16
    autocast where the GPU has bfloat16 (the weights, gradients and optimizer state stay
    float32; log-probs and losses are computed in float32); on the CPU, float32 throughout (as
    before, so seeded runs there stay bit-exact)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():  # Ampere or newer: TF32 too
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> SequenceBatch:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    batch = len(prompts)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length - 1), dtype=torch.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = list(prompt) + list(response)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        response_mask[i, len(prompt) - 1 : len(row) - 1] = 1.0
    return SequenceBatch(input_ids, attention, input_ids[:, 1:].clone(), response_mask)


def first_response_position(batch: SequenceBatch) -> int:
    """The first position whose prediction is a response token in any row (the shortest
    prompt's length - 1); the last position when no row has a response."""
    columns = batch.response_mask.any(dim=0).nonzero()
    return int(columns[0]) if len(columns) else batch.response_mask.shape[1] - 1


def token_logprobs_and_entropy(model: torch.nn.Module, batch: SequenceBatch, with_entropy: bool = True,
                               entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target_t | prefix) and the policy entropy H_t at each position, both [B, L-1].

    Only the positions from ``first_response_position`` on are computed (the model's
    ``logits_to_keep``): the prompts' logits, which no loss reads, are never built, and the
    positions before hold 0. With ``log Z_t = logsumexp(z_t)``:
    ``log pi(y_t) = z_t[y_t] - log Z_t`` and ``H_t = log Z_t - sum_v softmax(z_t)_v z_t,v``.
    ``entropy_grad=False`` computes H_t without a graph (a metric only: no entropy term in the
    loss), which keeps the vocabulary-wide softmax out of the backward pass.
    """
    start = first_response_position(batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   logits_to_keep=batch.input_ids.shape[1] - start).logits[:, :-1].float()
    log_z = torch.logsumexp(logits, dim=-1)
    token_logp = logits.gather(-1, batch.target_ids[:, start:].unsqueeze(-1)).squeeze(-1) - log_z
    entropy = None
    if with_entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        entropy = torch.nn.functional.pad(entropy, (start, 0))
    return torch.nn.functional.pad(token_logp, (start, 0)), entropy


def length_buckets(rows: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split ``rows`` into micro-batches of similar length with at most ``max_tokens`` padded
    tokens each (rows x longest row; a single longer row still gets its own micro-batch).
    ``max_tokens`` 0 keeps all rows together."""
    if max_tokens <= 0:
        return [list(rows)]
    ordered = sorted(rows, key=lambda r: lengths[r], reverse=True)
    buckets: list[list[int]] = []
    for row in ordered:
        if buckets and (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] <= max_tokens:
            buckets[-1].append(row)
        else:
            buckets.append([row])
    return buckets


def select_rows(batch: SequenceBatch, rows: list[int]) -> SequenceBatch:
    """Rows of a batch, cut to their own longest sequence (less padding)."""
    length = int(batch.attention_mask[rows].sum(dim=1).max())
    return SequenceBatch(batch.input_ids[rows, :length], batch.attention_mask[rows, :length],
                         batch.target_ids[rows, : length - 1], batch.response_mask[rows, : length - 1])
