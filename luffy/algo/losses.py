"""The LUFFY policy loss, its on-policy (GRPO) special case, the SFT loss and the KL penalty.

All per-token tensors are ``[batch, T]`` over response positions:
``log_prob`` = log pi_theta(o_t), ``old_log_prob`` = log pi_old(o_t) (the rollout policy,
detached), ``advantages`` = A_i broadcast over the response, ``response_mask`` M_t = 1 on
response tokens (through EOS), ``off_policy_mask`` P_t = 1 on teacher tokens.

Main-run objective (luffy-reference.md section 1), pi_phi = 1 for the teacher:

    L = agg_{i,t} M_it [ -P_it A_i f(pi_theta(tau_t)) - (1 - P_it) A_i pi_theta(o_t) / pi_old(o_t) ]
        - entropy_coef * mean_t H_t  (+ kl_coef * mean_t KL_t)

Options (see docs/algorithm.md for the reference's names):
- f, the off-policy shaping (``SHAPINGS``): p/(p+gamma) (LUFFY), p, w log p, p + w log p,
  sqrt p, p^alpha; optionally clipped to [off_clip_min, off_clip_max]. When per-token
  teacher log-probs are given, the off-policy term uses the true importance ratio
  pi_theta / pi_phi instead of f(pi_theta) (as the reference does).
- on-policy PPO clip, symmetric (1 - eps, 1 + eps) or clip-higher (1 - eps_low, 1 + eps_high).
- agg (``AGGREGATIONS``): masked token mean; mean over sequences of their token means;
  sum divided by a constant (Dr.GRPO; the reference divides by the response length 8192).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

ShapingFn = Callable[[torch.Tensor, torch.Tensor, "LossSettings"], torch.Tensor]

# Each maps (p, log p, settings) -> f(p). Gradients with respect to log p are in the comments.
SHAPINGS: dict[str, ShapingFn] = {
    # f = p / (p + gamma);   df/dlog p = gamma p / (p + gamma)^2
    "luffy": lambda p, logp, s: p / (p + s.shaping_gamma),
    # f = p;                 df/dlog p = p
    "none": lambda p, logp, s: p,
    # f = w log p;           df/dlog p = w
    "logp": lambda p, logp, s: s.shaping_weight * logp,
    # f = p + w log p;       df/dlog p = p + w
    "p_logp": lambda p, logp, s: p + s.shaping_weight * logp,
    # f = sqrt p;            df/dlog p = sqrt(p) / 2
    "sqrt": lambda p, logp, s: torch.sqrt(p),
    # f = p^alpha;           df/dlog p = alpha p^alpha
    "pow": lambda p, logp, s: torch.pow(p, s.shaping_power),
}
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")


@dataclass(frozen=True)
class LossSettings:
    clip: bool = False
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None  # clip-higher; None = symmetric
    shaping: str = "luffy"
    shaping_gamma: float = 0.1
    shaping_weight: float = 0.1
    shaping_power: float = 0.5
    off_clip_min: float | None = None
    off_clip_max: float | None = None
    on_policy_shaping: str = "none"
    on_policy_weight: float = 1.0
    on_policy_power: float = 0.5
    on_policy_gamma: float = 0.1
    token_prob_max: float | None = None  # drop tokens with pi_theta above this from the loss
    loss_agg: str = "constant"
    loss_constant: float = 8192.0
    entropy_coef: float = 0.001
    kl_coef: float = 0.0

    @classmethod
    def of(cls, settings: object) -> "LossSettings":
        """The loss settings of an experiment: each field is the experiment's setting of the same
        name (any object with those attributes, e.g. a resolved ``TrainConfig``)."""
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "clip": bool(values["clip"]), "loss_constant": float(values["loss_constant"])})


@dataclass(frozen=True)
class BatchTotals:
    """Response tokens and non-empty sequences of a whole mini-batch.

    When the loss is computed micro-batch by micro-batch, normalising each part by the
    mini-batch's totals (instead of its own) makes the parts add up exactly to the
    mini-batch loss, so gradient accumulation changes nothing but memory and padding.
    """

    tokens: float
    sequences: float

    @staticmethod
    def of(mask: torch.Tensor) -> "BatchTotals":
        return BatchTotals(float(mask.sum()), float((mask.sum(-1) > 0).sum()))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, constant: float | None = None,
              totals: BatchTotals | None = None) -> torch.Tensor:
    """Reduce a ``[batch, T]`` loss over the tokens where ``mask`` is 1.

    token_mean:          sum_{i,t} l M / sum_{i,t} M
    seq_mean_token_mean: mean_i [ sum_t l M / sum_t M ]   (sequences with no token count 0)
    constant:            sum_{i,t} l M / constant          (Dr.GRPO)

    With ``totals`` the denominators are the whole mini-batch's (see ``BatchTotals``).
    """
    totals = totals or BatchTotals.of(mask)
    total = (per_token * mask).sum()
    if mode == "token_mean":
        return total / max(totals.tokens, 1.0)
    if mode == "seq_mean_token_mean":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / max(totals.sequences, 1.0)
    if mode == "constant":
        if not constant or constant <= 0:
            raise ValueError(f"loss_agg='constant' needs a positive loss_constant, got {constant}")
        return total / constant
    raise ValueError(f"unknown loss aggregation '{mode}', expected one of {AGGREGATIONS}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, totals: BatchTotals | None = None) -> torch.Tensor:
    denominator = mask.sum().clamp(min=1.0) if totals is None else max(totals.tokens, 1.0)
    return (values * mask).sum() / denominator


# The on-policy "ratio" r, with d = log pi - log pi_old (the reference's on_policy_reshape):
ON_POLICY_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor, "LossSettings"], torch.Tensor]] = {
    "none": lambda logp, old, s: torch.exp(logp - old),                                  # r = e^d
    "logp": lambda logp, old, s: logp - old,                                             # r = d
    "p_logp": lambda logp, old, s: torch.exp(logp - old) + s.on_policy_weight * (logp - old),  # e^d + w d
    "sqrt": lambda logp, old, s: torch.exp(0.5 * (logp - old)),                          # sqrt(e^d)
    "pow": lambda logp, old, s: torch.exp(s.on_policy_power * (logp - old)),             # (e^d)^alpha
    # f(pi) / f(pi_old) with f(p) = p / (p + gamma)
    "luffy": lambda logp, old, s: (torch.exp(logp) / (torch.exp(logp) + s.on_policy_gamma))
    / (torch.exp(old) / (torch.exp(old) + s.on_policy_gamma)),
}


def on_policy_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                         clip: bool, clip_ratio: float, clip_ratio_high: float | None = None,
                         settings: "LossSettings | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -A r with r = exp(log pi - log pi_old) (or ``settings.on_policy_shaping``'s
    variant, ``ON_POLICY_RATIOS``); with clip, PPO's pessimistic bound

        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))

    (eps_high = eps_low unless clip-higher sets it). Returns (loss, clipped) where
    ``clipped`` marks tokens whose clipped term was chosen (they carry no gradient).
    """
    shaping = settings.on_policy_shaping if settings is not None else "none"
    if shaping not in ON_POLICY_RATIOS:
        raise ValueError(f"unknown on-policy shaping '{shaping}', expected one of {sorted(ON_POLICY_RATIOS)}")
    ratio = ON_POLICY_RATIOS[shaping](log_prob, old_log_prob, settings)
    unclipped = -advantages * ratio
    if not clip:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def off_policy_weight(log_prob: torch.Tensor, settings: LossSettings,
                      teacher_log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """The off-policy term's weight on each teacher token, before the advantage:

        w_t = clip(f(pi_theta(tau_t)), off_clip_min, off_clip_max)      (pi_phi = 1)
        w_t = clip(pi_theta(tau_t) / pi_phi(tau_t), ...)                (teacher log-probs given)
    """
    if teacher_log_prob is not None:
        weight = torch.exp(log_prob - teacher_log_prob)
    else:
        if settings.shaping not in SHAPINGS:
            raise ValueError(f"unknown shaping '{settings.shaping}', expected one of {sorted(SHAPINGS)}")
        weight = SHAPINGS[settings.shaping](torch.exp(log_prob), log_prob, settings)
    if settings.off_clip_min is not None or settings.off_clip_max is not None:
        weight = torch.clamp(weight, min=settings.off_clip_min, max=settings.off_clip_max)
    return weight


def off_policy_token_loss(log_prob: torch.Tensor, advantages: torch.Tensor, settings: LossSettings,
                          teacher_log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token -A w_t (``off_policy_weight``); no PPO clip on teacher tokens.

    Gradient with f(p) = p/(p+gamma): -A * gamma p / (p + gamma)^2 * grad log p, which gives
    low-probability teacher tokens relatively more weight than f(p) = p does.
    """
    return -advantages * off_policy_weight(log_prob, settings, teacher_log_prob)


def shaped_weight(log_prob: torch.Tensor, settings: LossSettings,
                  teacher_log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """dw/dlog p at each token: the weight the off-policy term puts on grad log p (no gradient)."""
    log_prob = log_prob.detach().clone().requires_grad_(True)
    value = off_policy_weight(log_prob, settings, teacher_log_prob)
    (grad,) = torch.autograd.grad(value.sum(), log_prob)
    return grad


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (verl's ``low_var_kl``):

        KL_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1   (>= 0, 0 when equal)
    """
    delta = ref_log_prob - log_prob
    return torch.exp(delta) - delta - 1.0


def rollout_correction(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, on_mask: torch.Tensor,
                       cap: float) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance sampling (TIS) between the sampler and the trainer, per token:

        w_t = min(pi_old(o_t) / pi_rollout(o_t), C) = min(exp(log pi_old - log pi_rollout), C)

    When another engine (vLLM) draws the rollouts, its kernels and precision make its
    distribution pi_rollout differ from the trainer's pi_old at the same weights; multiplying
    each on-policy token's loss by w_t (no gradient) re-weights its samples to pi_old, and the
    cap C bounds the variance (verl's token-level ``rollout_is`` with its threshold, TRL's
    ``vllm_importance_sampling_cap``). ``cap`` 0: no correction (weights None), only the
    metrics. Returns (w or None, metrics over ``on_mask``'s tokens): the mean absolute log-prob
    gap |log pi_old - log pi_rollout|, the mean weight min(ratio, C) (the raw ratio without a
    cap) and the share of tokens whose ratio exceeded C."""
    gap = (old_log_prob - rollout_log_prob).detach()
    ratio = torch.exp(gap)
    weight = ratio.clamp(max=cap) if cap > 0 else None
    metrics = {"rollout/logprob_gap": masked_mean(gap.abs(), on_mask).item(),
               "rollout/is_weight_mean": masked_mean(ratio if weight is None else weight, on_mask).item(),
               "rollout/is_capped_share": masked_mean((ratio > cap).float(), on_mask).item() if cap > 0 else 0.0}
    return weight, metrics


def mixed_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, off_policy_mask: torch.Tensor,
                      settings: LossSettings, entropy: torch.Tensor | None = None,
                      teacher_log_prob: torch.Tensor | None = None, ref_log_prob: torch.Tensor | None = None,
                      totals: BatchTotals | None = None,
                      rollout_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The LUFFY loss (module docstring) on one mini-batch; GRPO when ``off_policy_mask`` is 0.

    ``rollout_weight``: per-token weights w_t (``rollout_correction``) multiplying the on-policy
    term, -(1 - P_it) w_it A_i r_it, when another engine sampled the rollouts.

    ``advantages`` may be ``[batch]`` (per response) or ``[batch, T]``. With ``totals`` the
    inputs are one micro-batch of a larger mini-batch: the returned loss and the metrics
    ``loss/policy``, ``loss/total``, ``entropy`` and ``kl`` are then that micro-batch's
    additive share; the other metrics are means over its own tokens.
    Returns the scalar loss to minimise and detached metrics.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_prob)
    off_mask = off_policy_mask.float() * response_mask
    on_mask = (1.0 - off_policy_mask.float()) * response_mask
    on_loss, clipped = on_policy_token_loss(log_prob, old_log_prob, advantages, settings.clip, settings.clip_ratio,
                                            settings.clip_ratio_high, settings)
    if rollout_weight is not None:
        on_loss = on_loss * rollout_weight
    off_loss = off_policy_token_loss(log_prob, advantages, settings, teacher_log_prob)
    per_token = on_mask * on_loss + off_mask * off_loss
    if settings.token_prob_max is not None:
        # the reference's all_max_clip: tokens the policy already predicts with probability above
        # the threshold add nothing to the loss (the mask carries no gradient). Unlike the
        # reference, the normaliser still counts them, so micro-batching stays exact; with
        # loss_agg=constant (the paper's) the two agree.
        per_token = per_token * (torch.exp(log_prob.detach()) <= settings.token_prob_max).to(per_token)
    policy_loss = aggregate(per_token, response_mask, settings.loss_agg, settings.loss_constant, totals)
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
        weight = shaped_weight(log_prob, settings, teacher_log_prob)
        metrics["off_policy/shaped_weight_mean"] = masked_mean(weight, off_mask).item()
        metrics["off_policy/prob_mean"] = masked_mean(torch.exp(log_prob.detach()), off_mask).item()
    if entropy is not None:
        mean_entropy = masked_mean(entropy, response_mask, totals)
        loss = loss - settings.entropy_coef * mean_entropy
        metrics["entropy"] = mean_entropy.item()
    if ref_log_prob is not None and settings.kl_coef > 0:
        kl = masked_mean(kl_penalty(log_prob, ref_log_prob), response_mask, totals)
        loss = loss + settings.kl_coef * kl
        metrics["kl"] = kl.item()
    metrics["loss/total"] = loss.item()
    return loss, metrics


def sft_loss(log_prob: torch.Tensor, response_mask: torch.Tensor, loss_agg: str = "token_mean",
             loss_constant: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the target tokens: agg_t M_t (-log pi_theta(tau_t))."""
    return aggregate(-log_prob, response_mask, loss_agg, loss_constant)


def sft_loss_term(trace_log_prob: torch.Tensor, trace_mask: torch.Tensor, coef: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The term the "RL w/ SFT loss" baseline adds to the on-policy GRPO loss (advantages over
    the on-policy members only):

        L = L_GRPO + coef * mean_t(-log pi_theta(tau_t))

    the NLL being the token mean over the teacher traces of the same prompts.
    Returns (coef * nll, nll).
    """
    nll = sft_loss(trace_log_prob, trace_mask, "token_mean")
    return coef * nll, nll
