"""Our ``luffy.algo`` loss as verl's actor loss function (installed with ``set_loss_fn``).

verl calls it once per micro-batch as ``loss_fn(model_output, data, dp_group)`` and
backpropagates the returned loss on each data-parallel rank; FSDP then averages the ranks'
gradients. The loss is ``mixed_policy_loss`` with the *global* mini-batch's totals as
normalisers (verl puts them in the data: ``batch_num_tokens``, response tokens over all ranks;
``global_batch_size``, sequences; ``dp_size``), times ``dp_size``:

    loss_micro = dp_size * mixed_policy_loss(micro; totals = global mini-batch)

so that the micro-batches of a rank add up to its share, and the ranks' average is the loss of
the whole mini-batch as one batch: the same value and gradient as the local engine's update.

Per-token fields our agent loop adds to every row (right-aligned with ``responses``):

    luffy_off_policy_mask   P_t = 1 on teacher tokens
    luffy_teacher_log_prob  log pi_phi on teacher tokens (teacher_logprobs: true)
    luffy_sft_mask          1 on the trace tokens of an RL-with-SFT-loss trace row (whose
                            response_mask is 0, so verl's token count is the policy tokens')

and the trainer adds, for rl_sft, ``luffy_minibatch_totals`` = (policy tokens, policy
sequences, trace tokens) of the row's global mini-batch: the SFT term is the token mean of
the traces' NLL over the mini-batch, as in the local engine:

    loss += dp_size * sft_coef * sum_{trace tokens in micro} (-log pi) / trace tokens in mini-batch
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from luffy.algo import metrics as names
from luffy.algo.losses import BatchTotals, LossSettings, mixed_policy_loss
from luffy.engines.base import EngineError

OFF_POLICY_MASK = "luffy_off_policy_mask"
TEACHER_LOG_PROB = "luffy_teacher_log_prob"
SFT_MASK = "luffy_sft_mask"
MINIBATCH_TOTALS = "luffy_minibatch_totals"
PER_TOKEN_FIELDS = (OFF_POLICY_MASK, TEACHER_LOG_PROB, SFT_MASK)
ADDITIVE = (*names.ADDITIVE, names.LOSS_SFT)  # loss shares: micro-batches and ranks add up


class PartitionMismatch(EngineError):
    """The trainer's idea of which rows form a mini-batch differs from verl's."""


def loss_settings(section: dict[str, Any]) -> LossSettings:
    """The ``LossSettings`` of the config's ``luffy`` section (its keys are the settings' names)."""
    return LossSettings.of(SimpleNamespace(**section))


def _response_widths(data) -> torch.Tensor:
    responses = data["responses"]
    if responses.is_nested:
        return responses.offsets().diff()
    return data["attention_mask"][:, data["prompts"].shape[1]:].sum(dim=1)


def _aligned(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A per-token field, padded or cut to the response width and zero past each row's response."""
    width = valid.shape[1]
    value = value[:, :width].to(torch.float32)
    if value.shape[1] < width:
        value = torch.nn.functional.pad(value, (0, width - value.shape[1]))
    return value * valid


@dataclass
class MicroBatch:
    """One micro-batch's per-token tensors, ``[rows, T]`` over response positions (padded)."""

    log_prob: torch.Tensor
    entropy: torch.Tensor | None
    response_mask: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    off_policy_mask: torch.Tensor
    teacher_log_prob: torch.Tensor | None = None
    ref_log_prob: torch.Tensor | None = None
    sft_mask: torch.Tensor | None = None


def micro_batch_loss(mb: MicroBatch, settings: LossSettings, totals: BatchTotals, dp_size: int,
                     sft_coef: float = 0.0, sft_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's part of the mini-batch loss, for a rank of ``dp_size`` (verl-free, so
    that it also runs where verl cannot be imported): the loss to backpropagate and the metric
    values, additive ones already scaled like the loss (module docstring)."""
    loss, values = mixed_policy_loss(mb.log_prob, mb.old_log_prob, mb.advantages, mb.response_mask,
                                     mb.off_policy_mask, settings, mb.entropy, teacher_log_prob=mb.teacher_log_prob,
                                     ref_log_prob=mb.ref_log_prob, totals=totals)
    if mb.sft_mask is not None and sft_tokens is not None:
        nll_share = (-mb.log_prob * mb.sft_mask).sum() / max(sft_tokens, 1.0)
        loss = loss + sft_coef * nll_share
        values[names.LOSS_SFT] = nll_share.item()
        values[names.LOSS_TOTAL] += sft_coef * nll_share.item()
    for key in values:
        if key in ADDITIVE:
            values[key] *= dp_size
    return loss * dp_size, values


def luffy_loss(model_output: dict[str, Any], data, dp_group=None, *, luffy: dict[str, Any]):
    """verl's loss-function protocol -> (loss, {name: Metric}); see the module docstring."""
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy")
    entropy = None if entropy is None else no_padding_2_padding(entropy, data)
    fields = ["response_mask", "old_log_probs", "advantages",
              *[key for key in (*PER_TOKEN_FIELDS, "ref_log_prob") if key in data.keys()]]
    padded = data.select(*fields).to_padded_tensor()
    width = log_prob.shape[1]
    valid = (torch.arange(width, device=log_prob.device).unsqueeze(0)
             < _response_widths(data).to(log_prob.device).unsqueeze(1)).to(torch.float32)
    per_token = {key: _aligned(padded[key], valid).to(log_prob.device) for key in fields}

    sft_tokens = None
    if MINIBATCH_TOTALS in data.keys():
        totals_field = data[MINIBATCH_TOTALS]  # one (3,) row each; TransferQueue hands it over nested
        rows = (torch.stack(totals_field.unbind()) if totals_field.is_nested else totals_field).to(torch.float64)
        policy_tokens, policy_sequences, sft_tokens = rows[0].tolist()
        if not bool((rows == rows[0]).all()) or abs(policy_tokens - float(data["batch_num_tokens"])) > 0.5:
            raise PartitionMismatch(
                f"the trainer counted {policy_tokens:.0f} policy tokens in this row's mini-batch, verl "
                f"{float(data['batch_num_tokens']):.0f}: verl 0.9.1's mini-batch split is not the one assumed")
        totals = BatchTotals(tokens=policy_tokens, sequences=policy_sequences)
    else:
        totals = BatchTotals(tokens=float(data["batch_num_tokens"]), sequences=float(data["global_batch_size"]))

    mb = MicroBatch(log_prob=log_prob, entropy=entropy, response_mask=per_token["response_mask"],
                    old_log_prob=per_token["old_log_probs"], advantages=per_token["advantages"],
                    off_policy_mask=per_token.get(OFF_POLICY_MASK, torch.zeros_like(log_prob)),
                    teacher_log_prob=per_token.get(TEACHER_LOG_PROB) if luffy["teacher_logprobs"] else None,
                    ref_log_prob=per_token.get("ref_log_prob"), sft_mask=per_token.get(SFT_MASK))
    loss, values = micro_batch_loss(mb, loss_settings(luffy), totals, int(data["dp_size"]), luffy["sft_coef"],
                                    sft_tokens)
    # additive shares: summed over micro-batches, averaged over ranks; the others: each micro-batch's mean
    return loss, {key: Metric(AggregationType.SUM if key in ADDITIVE else AggregationType.MEAN, value)
                  for key, value in values.items()}
