"""The LUFFY policy loss, its on-policy (GRPO) special case, and the SFT loss.

All per-token tensors are ``[batch, T]`` over response positions:
``log_prob`` = log pi_theta(o_t), ``old_log_prob`` = log pi_old(o_t) (the rollout policy,
detached), ``advantages`` = A_i broadcast over the response, ``response_mask`` M_t = 1 on
response tokens (through EOS), ``off_policy_mask`` P_t = 1 on teacher tokens.

Main-run objective (luffy-reference.md section 1), pi_phi = 1 for the teacher:

    L = agg_{i,t} M_it [ -P_it A_i f(pi_theta(tau_t)) - (1 - P_it) A_i pi_theta(o_t) / pi_old(o_t) ]
        - entropy_coef * mean_t H_t

with f(p) = p / (p + gamma) (policy shaping), on-policy ratios optionally PPO-clipped, and
agg either the masked token mean or the sum divided by a constant (Dr.GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SHAPINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    # f(p) = p / (p + gamma);  df/dlog p = gamma p / (p + gamma)^2
    "luffy": lambda p, gamma: p / (p + gamma),
    # f(p) = p (no shaping);   df/dlog p = p
    "none": lambda p, gamma: p,
}
AGGREGATIONS = ("token_mean", "constant")


@dataclass(frozen=True)
class LossSettings:
    clip: bool = False
    clip_ratio: float = 0.2
    shaping: str = "luffy"
    shaping_gamma: float = 0.1
    loss_agg: str = "constant"
    loss_constant: float = 8192.0
    entropy_coef: float = 0.001


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, constant: float | None = None) -> torch.Tensor:
    """token_mean: sum(l * M) / sum(M);  constant: sum(l * M) / constant (Dr.GRPO)."""
    total = (per_token * mask).sum()
    if mode == "token_mean":
        return total / mask.sum().clamp(min=1.0)
    if mode == "constant":
        if not constant or constant <= 0:
            raise ValueError(f"loss_agg='constant' needs a positive loss_constant, got {constant}")
        return total / constant
    raise ValueError(f"unknown loss aggregation '{mode}', expected one of {AGGREGATIONS}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def on_policy_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                         clip: bool, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -A r with r = exp(log pi - log pi_old); with clip, PPO's pessimistic bound

        l = max(-A r, -A clip(r, 1 - eps, 1 + eps))

    Returns (loss, clipped) where ``clipped`` marks tokens whose clipped term was chosen.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    if not clip:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def off_policy_token_loss(log_prob: torch.Tensor, advantages: torch.Tensor, shaping: str,
                          gamma: float) -> torch.Tensor:
    """Per-token -A f(pi_theta) with pi_phi = 1 and no clipping.

    Gradient with f(p) = p/(p+gamma): -A * gamma p / (p + gamma)^2 * grad log p, which gives
    low-probability teacher tokens relatively more weight than f(p) = p does.
    """
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown shaping '{shaping}', expected one of {sorted(SHAPINGS)}")
    return -advantages * SHAPINGS[shaping](torch.exp(log_prob), gamma)


def shaped_weight(log_prob: torch.Tensor, shaping: str, gamma: float) -> torch.Tensor:
    """df/dlog p at each token: the weight shaping puts on grad log p (no gradient)."""
    log_prob = log_prob.detach().clone().requires_grad_(True)
    value = SHAPINGS[shaping](torch.exp(log_prob), gamma)
    (grad,) = torch.autograd.grad(value.sum(), log_prob)
    return grad


def mixed_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, off_policy_mask: torch.Tensor,
                      settings: LossSettings, entropy: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """The LUFFY loss (module docstring) on one mini-batch; GRPO when ``off_policy_mask`` is 0.

    ``advantages`` may be ``[batch]`` (per response) or ``[batch, T]``.
    Returns the scalar loss to minimise and detached metrics.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_prob)
    off_mask = off_policy_mask.float() * response_mask
    on_mask = (1.0 - off_policy_mask.float()) * response_mask
    on_loss, clipped = on_policy_token_loss(log_prob, old_log_prob, advantages, settings.clip, settings.clip_ratio)
    off_loss = off_policy_token_loss(log_prob, advantages, settings.shaping, settings.shaping_gamma)
    per_token = on_mask * on_loss + off_mask * off_loss
    policy_loss = aggregate(per_token, response_mask, settings.loss_agg, settings.loss_constant)
    loss = policy_loss
    metrics = {
        "loss/policy": policy_loss.item(),
        "loss/on_policy": aggregate(on_loss, on_mask, settings.loss_agg, settings.loss_constant).item(),
        "loss/off_policy": aggregate(off_loss, off_mask, settings.loss_agg, settings.loss_constant).item(),
        "off_policy/token_share": (off_mask.sum() / response_mask.sum().clamp(min=1.0)).item(),
        "on_policy/clip_fraction": masked_mean(clipped.float(), on_mask).item(),
        "on_policy/ratio_mean": masked_mean(torch.exp(log_prob - old_log_prob).detach(), on_mask).item(),
    }
    if off_mask.sum() > 0:
        weight = shaped_weight(log_prob, settings.shaping, settings.shaping_gamma)
        metrics["off_policy/shaped_weight_mean"] = masked_mean(weight, off_mask).item()
        metrics["off_policy/prob_mean"] = masked_mean(torch.exp(log_prob.detach()), off_mask).item()
    if entropy is not None:
        mean_entropy = masked_mean(entropy, response_mask)
        loss = loss - settings.entropy_coef * mean_entropy
        metrics["entropy"] = mean_entropy.item()
    metrics["loss/total"] = loss.item()
    return loss, metrics


def sft_loss(log_prob: torch.Tensor, response_mask: torch.Tensor, loss_agg: str = "token_mean",
             loss_constant: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the target tokens: agg_t M_t (-log pi_theta(tau_t))."""
    return aggregate(-log_prob, response_mask, loss_agg, loss_constant)
