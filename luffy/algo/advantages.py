"""Group-relative advantages (GRPO) over a LUFFY mixed group, and dynamic group filtering.

Shapes: ``rewards`` is ``[num_prompts, n]``: the n members of each prompt's group, the
off-policy (teacher) members included, in any order.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6,
                     baseline_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-response advantage against its prompt's group baseline.

        A_i = R_i - mean_{j in B} R_j                          (LUFFY main run: B = the mixed group)
        A_i = (R_i - mean_{j in B} R_j) / (std_{j in B} R_j + eps)    (std_normalize; unbiased std)

    ``baseline_mask`` ([num_prompts, n], bool) selects B; the RL-with-SFT-loss baseline uses
    the on-policy members only (the reference's "grpo_split"); every member, B or not, gets
    an advantage. A baseline of one member gives no std division. Returns ``[num_prompts, n]``,
    to be broadcast over the response's tokens.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, n], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    member = torch.ones_like(rewards) if baseline_mask is None else baseline_mask.float()
    count = member.sum(dim=1, keepdim=True)
    if bool((count < 1).any()):
        raise ValueError("every group needs at least one baseline member")
    mean = (rewards * member).sum(dim=1, keepdim=True) / count
    centred = rewards - mean
    if not std_normalize:
        return centred
    variance = ((rewards - mean) ** 2 * member).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1.0)
    std = torch.where(count > 1, variance.sqrt(), torch.zeros_like(variance))
    return torch.where(count > 1, centred / (std + eps), centred)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Dynamic filtering: True for groups whose rewards are not all equal ([num_prompts]).

    An all-correct or all-wrong group has zero advantage everywhere: it adds no policy
    gradient, only noise to the normaliser and the entropy term.
    """
    return rewards.amax(dim=1) != rewards.amin(dim=1)
