"""Group-relative advantages (GRPO) over a LUFFY mixed group.

Shapes: ``rewards`` is ``[num_prompts, n]``: the n members of each prompt's group, the
off-policy (teacher) members included, in any order.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantage over its prompt's whole (mixed) group.

        A_i = R_i - mean_j R_j                          (LUFFY main run)
        A_i = (R_i - mean_j R_j) / (std_j R_j + eps)    (std_normalize=True; unbiased std)

    A group of one has advantage 0. Returns ``[num_prompts, n]``, to be broadcast over the
    response's tokens.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, n], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize or rewards.shape[1] < 2:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)
