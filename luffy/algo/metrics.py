"""The per-step training metrics every engine logs, under one set of names.

Both engines write these names, one line per step, to ``metrics.jsonl`` and to the
experiment's MLflow ``train`` run; the report's training curves read them. This module is
plain Python (no torch), so the report and the config can import it.

Names and meanings:

    reward/mean                 mean reward over every member of every group
    reward/on_policy_mean       mean reward of the policy's own samples
    reward/off_policy_mean      mean reward of the teacher members (the trace's own grade)
    accuracy/on_policy          = reward/on_policy_mean (binary rewards)
    accuracy/group_solved       share of groups with at least one correct on-policy sample
    response_length/on_policy   mean tokens of an on-policy response
    response_length/off_policy  mean tokens of a teacher member (SFT: of a trace)
    response/no_think_end_share share of members without a closing </think> (reward 0)
    groups/kept_share           share of groups kept by dynamic filtering (1 without it)
    loss/policy, loss/total     the policy loss and the total minimised (entropy, KL included)
    loss/on_policy, loss/off_policy   the two terms, each aggregated over its own tokens
    loss/sft                    NLL of the traces (sft, rl_sft)
    entropy, kl                 token-mean policy entropy, k3 KL to the starting model
    off_policy/token_share      share of response tokens that are the teacher's
    off_policy/shaped_weight_mean, off_policy/prob_mean   mean df/dlog p and pi on teacher tokens
    on_policy/clip_fraction, on_policy/ratio_mean          PPO clip share and mean ratio
    rollout/logprob_gap         (rollout vllm) mean |log pi_old - log pi_vllm| over on-policy tokens
    rollout/is_weight_mean      (rollout vllm) mean truncated importance weight min(pi_old / pi_vllm, C)
    rollout/is_capped_share     (rollout vllm) share of on-policy tokens whose ratio exceeded C
    grad_norm, lr, step_time_s  gradient norm before clipping, learning rate, wall time of the step
    val/accuracy                validation accuracy (when validation is on)
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

REWARD_MEAN = "reward/mean"
REWARD_ON_POLICY = "reward/on_policy_mean"
REWARD_OFF_POLICY = "reward/off_policy_mean"
ACCURACY_ON_POLICY = "accuracy/on_policy"
GROUP_SOLVED = "accuracy/group_solved"
LENGTH_ON_POLICY = "response_length/on_policy"
LENGTH_OFF_POLICY = "response_length/off_policy"
NO_THINK_END_SHARE = "response/no_think_end_share"
GROUPS_KEPT = "groups/kept_share"
LOSS_POLICY = "loss/policy"
LOSS_TOTAL = "loss/total"
LOSS_ON_POLICY = "loss/on_policy"
LOSS_OFF_POLICY = "loss/off_policy"
LOSS_SFT = "loss/sft"
ENTROPY = "entropy"
KL = "kl"
OFF_TOKEN_SHARE = "off_policy/token_share"
SHAPED_WEIGHT = "off_policy/shaped_weight_mean"
OFF_PROB = "off_policy/prob_mean"
CLIP_FRACTION = "on_policy/clip_fraction"
RATIO_MEAN = "on_policy/ratio_mean"
ROLLOUT_LOGPROB_GAP = "rollout/logprob_gap"
ROLLOUT_IS_WEIGHT = "rollout/is_weight_mean"
ROLLOUT_IS_CAPPED = "rollout/is_capped_share"
GRAD_NORM = "grad_norm"
LR = "lr"
STEP_TIME = "step_time_s"
VAL_ACCURACY = "val/accuracy"

# Shares of a loss: over micro-batches (and data-parallel ranks) they add up, not average.
ADDITIVE = (LOSS_POLICY, LOSS_TOTAL, ENTROPY, KL)

STEP_METRICS = (REWARD_MEAN, REWARD_ON_POLICY, REWARD_OFF_POLICY, ACCURACY_ON_POLICY, GROUP_SOLVED,
                LENGTH_ON_POLICY, LENGTH_OFF_POLICY, NO_THINK_END_SHARE, GROUPS_KEPT, LOSS_POLICY, LOSS_TOTAL,
                LOSS_ON_POLICY, LOSS_OFF_POLICY, LOSS_SFT, ENTROPY, KL, OFF_TOKEN_SHARE, SHAPED_WEIGHT, OFF_PROB,
                CLIP_FRACTION, RATIO_MEAN, ROLLOUT_LOGPROB_GAP, ROLLOUT_IS_WEIGHT, ROLLOUT_IS_CAPPED, GRAD_NORM, LR,
                STEP_TIME, VAL_ACCURACY)


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values (a metric that has nothing to average)."""
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def combine_micro_batches(parts: Sequence[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Micro-batch metrics -> the mini-batch's: ``parts`` are (response tokens, metrics) per
    micro-batch. Shares of the loss (``ADDITIVE``) add up; the others are means weighted by
    each micro-batch's tokens (micro-batches without the metric, or with NaN, are skipped)."""
    out: dict[str, float] = {}
    for key in {k for _, metrics in parts for k in metrics}:
        present = [(w, m[key]) for w, m in parts if key in m and not math.isnan(m[key])]
        if key in ADDITIVE:
            out[key] = sum(v for _, v in present)
        elif present:
            weight = sum(w for w, _ in present)
            out[key] = sum(w * v for w, v in present) / weight if weight else present[0][1]
    return out


def mean_over_updates(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The step's value of each metric: its mean over the step's optimizer updates."""
    keys = {k for d in dicts for k in d}
    return {k: mean(d[k] for d in dicts if k in d and not math.isnan(d[k])) for k in sorted(keys)}


def rollout_metrics(rewards: Sequence[Sequence[float]], off_policy: Sequence[Sequence[bool]],
                    lengths: Sequence[Sequence[int]], no_think_end: Sequence[Sequence[bool]],
                    kept: Sequence[bool] | None = None) -> dict[str, float]:
    """The step's rollout metrics from its groups: per prompt, per member, the reward, whether
    the member is a teacher member, its response tokens and whether it lacks ``</think>``."""
    members = [(r, off, n, miss) for group in zip(rewards, off_policy, lengths, no_think_end)
               for r, off, n, miss in zip(*group)]
    on = [r for r, off, _, _ in members if not off]
    solved = [max((r for r, off in zip(rs, offs) if not off), default=0.0) for rs, offs in zip(rewards, off_policy)]
    return {
        GROUPS_KEPT: mean(float(k) for k in kept) if kept is not None else 1.0,
        REWARD_MEAN: mean(r for r, _, _, _ in members),
        REWARD_ON_POLICY: mean(on),
        REWARD_OFF_POLICY: mean(r for r, off, _, _ in members if off),
        ACCURACY_ON_POLICY: mean(on),
        GROUP_SOLVED: mean(solved),
        LENGTH_ON_POLICY: mean(n for _, off, n, _ in members if not off),
        LENGTH_OFF_POLICY: mean(n for _, off, n, _ in members if off),
        NO_THINK_END_SHARE: mean(float(miss) for _, _, _, miss in members),
    }
