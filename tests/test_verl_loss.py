"""The loss installed on verl's actor equals ``mixed_policy_loss`` on the whole batch.

Runs the real verl 0.9.1 split: a mini-batch in verl's TransferQueue layout (jagged nested
tensors, as the V1 trainer hands it to the worker) is cut into data-parallel parts the way the
dispatch cuts it, each part into micro-batches by verl's ``prepare_micro_batches`` (dynamic
batch size on and off), and every micro-batch goes through our closure exactly as verl's FSDP
engine calls it: ``loss_fn(model_output, data, dp_group)`` with verl's ``batch_num_tokens``,
``global_batch_size`` and ``dp_size`` in the data. FSDP's gradient average over ranks is the
mean of the ranks' gradients. Stand-in: the model is a tensor of per-position logits (no
transformer, no GPU), so log-probs and entropies are differentiable functions of it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import prepare_micro_batches

from luffy.algo import metrics as names
from luffy.algo.losses import LossSettings, mixed_policy_loss, sft_loss_term
from luffy.config import resolve_train_config
from luffy.engines.verl.loss import (MINIBATCH_TOTALS, OFF_POLICY_MASK, SFT_MASK, TEACHER_LOG_PROB, PartitionMismatch,
                                     luffy_loss)
from luffy.engines.verl.overrides import luffy_section
from luffy.engines.verl.trainer import minibatch_of_rows, minibatch_totals

ROWS = 8


def nested(tensors):
    return torch.nested.as_nested_tensor(list(tensors), layout=torch.jagged)


class Batch:
    """A mini-batch of ROWS sequences: teacher rows (off-policy prefix), on-policy rows, and
    for rl_sft trace rows (response_mask 0, sft mask 1)."""

    def __init__(self, seed: int, teacher_rows=(0, 4), trace_rows=()):
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(2, 6, (ROWS,), generator=g)
        self.response = torch.randint(2, 9, (ROWS,), generator=g)
        self.length = self.prompt + self.response
        self.start = torch.cat([torch.zeros(1, dtype=torch.long), self.length.cumsum(0)[:-1]])
        self.theta = torch.randn(int(self.length.sum()), generator=g)
        self.trace_rows = set(trace_rows)
        r = [int(n) for n in self.response]
        logp = [F.logsigmoid(self.theta[self.positions(i)]) for i in range(ROWS)]
        self.fields = {
            "old_log_probs": [lp + 0.1 * torch.randn(n, generator=g) for lp, n in zip(logp, r)],
            "advantages": [torch.full((n,), float(torch.randn(1, generator=g))) for n in r],
            "response_mask": [torch.full((n,), 0 if i in self.trace_rows else 1) for i, n in enumerate(r)],
            OFF_POLICY_MASK: [(torch.arange(n) < (n if i in teacher_rows else 0)).long() for i, n in enumerate(r)],
            TEACHER_LOG_PROB: [-torch.rand(n, generator=g) for n in r],
            "ref_log_prob": [lp - 0.2 * torch.rand(n, generator=g) for lp, n in zip(logp, r)],
        }
        if trace_rows:
            self.fields[SFT_MASK] = [torch.full((n,), int(i in self.trace_rows)) for i, n in enumerate(r)]

    def positions(self, i: int) -> slice:
        """Positions of the logits that predict row i's response tokens."""
        first = int(self.start[i] + self.prompt[i]) - 1
        return slice(first, first + int(self.response[i]))

    def tensordict(self, dp_size: int, totals: list[list[float]] | None):
        tokens = [torch.arange(int(n)) for n in self.length]
        data = {"prompts": nested(torch.zeros(int(p), dtype=torch.long) for p in self.prompt),
                "responses": nested(torch.ones(int(n), dtype=torch.long) for n in self.response),
                "input_ids": nested(tokens), "row_id": torch.arange(ROWS),
                **{k: nested(v) for k, v in self.fields.items()}}
        data["loss_mask"] = data["response_mask"]
        if totals is not None:  # as TransferQueue hands a per-row field over: nested
            data[MINIBATCH_TOTALS] = nested(torch.tensor(row) for row in totals)
        td = tu.get_tensordict(data)
        batch_num_tokens = int(sum(int(t.sum()) for t in self.fields["response_mask"]))
        tu.assign_non_tensor(td, batch_num_tokens=batch_num_tokens, dp_size=dp_size, global_batch_size=ROWS)
        return td

    def model_output(self, theta: torch.Tensor, rows: list[int]) -> dict:
        values = torch.cat([theta[int(self.start[i]): int(self.start[i] + self.length[i])] for i in rows])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.length[rows].cumsum(0)])
        return {"log_probs": torch.nested.nested_tensor_from_jagged(F.logsigmoid(values), offsets),
                "entropy": torch.nested.nested_tensor_from_jagged(torch.sigmoid(values) * 2.0, offsets)}

    def padded(self, key: str) -> torch.Tensor:
        out = torch.zeros(ROWS, int(self.response.max()))
        for i, value in enumerate(self.fields[key]):
            out[i, : len(value)] = value.float()
        return out

    def reference(self, theta: torch.Tensor, settings: LossSettings, teacher: bool, sft_coef: float | None):
        """The whole mini-batch as one batch, as the local engine computes it."""
        width = int(self.response.max())
        logp = torch.zeros(ROWS, width)
        entropy = torch.zeros(ROWS, width)
        for i in range(ROWS):
            n = int(self.response[i])
            logp[i, :n] = F.logsigmoid(theta[self.positions(i)])
            entropy[i, :n] = torch.sigmoid(theta[self.positions(i)]) * 2.0
        loss, metrics = mixed_policy_loss(
            logp, self.padded("old_log_probs"), self.padded("advantages"), self.padded("response_mask"),
            self.padded(OFF_POLICY_MASK), settings, entropy,
            teacher_log_prob=self.padded(TEACHER_LOG_PROB) if teacher else None,
            ref_log_prob=self.padded("ref_log_prob") if settings.kl_coef > 0 else None)
        if sft_coef is not None:
            term, nll = sft_loss_term(logp, self.padded(SFT_MASK), sft_coef)
            loss = loss + term
            metrics[names.LOSS_SFT] = nll.item()
            metrics[names.LOSS_TOTAL] += term.item()
        return loss, metrics


EXPERIMENTS = {
    "luffy": {"algorithm": "luffy"},
    "grpo": {"algorithm": "grpo"},
    "rl_sft": {"algorithm": "rl_sft", "sft_coef": 0.7},
    "no_shaping_clipped_weight_token_max": {"algorithm": "luffy", "shaping": "none", "off_clip_max": 0.6,
                                            "token_prob_max": 0.8},
    "pow_clip_higher_seq_mean": {"algorithm": "luffy", "shaping": "pow", "clip": True, "clip_ratio_high": 0.28,
                                 "loss_agg": "seq_mean_token_mean"},
    "token_mean_luffy_ratio_kl": {"algorithm": "luffy", "loss_agg": "token_mean", "on_policy_shaping": "luffy",
                                  "kl_coef": 0.1},
    "teacher_logprobs_p_logp": {"algorithm": "luffy", "teacher_logprobs": True, "on_policy_shaping": "p_logp"},
}


def split_like_verl(td, dp_size: int, dynamic: bool):
    """The micro-batches of each data-parallel rank."""
    ranks = tu.chunk_tensordict(td, dp_size)
    out = []
    for rank in ranks:
        tu.assign_non_tensor(rank, use_dynamic_bsz=dynamic, max_token_len_per_gpu=24, micro_batch_size_per_gpu=2)
        micro, _ = prepare_micro_batches(rank, dp_group=None, same_micro_num_in_dp=True)
        out.append(micro)
    return out


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_installed_loss_equals_the_whole_batch_loss(name, dynamic, dp_size, tmp_path):
    settings = resolve_train_config(name, {}, {**EXPERIMENTS[name], "loss_constant": 64.0})
    section = luffy_section(settings, str(tmp_path / "metrics.jsonl"))
    rl_sft = settings.algorithm == "rl_sft"
    batch = Batch(seed=len(name) * 7 + dp_size, teacher_rows=() if settings.algorithm != "luffy" else (0, 4),
                  trace_rows=(0, 4) if rl_sft else ())
    totals = None
    if rl_sft:  # the trainer's per-row mini-batch totals (here the whole batch is one mini-batch)
        totals = minibatch_totals(minibatch_of_rows(ROWS, dp_size, ROWS),
                                  [int(m.sum()) for m in batch.fields["response_mask"]],
                                  [int(m.sum()) for m in batch.fields[SFT_MASK]])
    ranks = split_like_verl(batch.tensordict(dp_size, totals), dp_size, dynamic)
    assert sum(len(m) for m in ranks) > dp_size  # several micro-batches per rank

    theta = batch.theta.clone().requires_grad_(True)
    loss_sum, shares = 0.0, {key: 0.0 for key in names.ADDITIVE}
    for micro_batches in ranks:
        for micro in micro_batches:
            loss, metrics = luffy_loss(batch.model_output(theta, micro["row_id"].tolist()), micro, None, luffy=section)
            loss.backward()
            loss_sum += loss.item()
            for key in shares:
                if key in metrics:
                    shares[key] += sum(metrics[key].values) / dp_size  # verl: summed per rank, mean over ranks
    grad = theta.grad / dp_size  # FSDP averages the ranks' gradients

    reference_theta = batch.theta.clone().requires_grad_(True)
    ref_loss, ref_metrics = batch.reference(reference_theta, LossSettings.of(settings), settings.teacher_logprobs,
                                            settings.sft_coef if rl_sft else None)
    ref_loss.backward()
    assert loss_sum / dp_size == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, reference_theta.grad, rtol=1e-5, atol=1e-7)
    assert grad.abs().sum() > 0
    for key in ("loss/total", "loss/policy", "entropy"):
        assert shares[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key


def test_a_mini_batch_split_other_than_verls_is_refused(tmp_path):
    settings = resolve_train_config("rl_sft", {}, {"algorithm": "rl_sft"})
    batch = Batch(seed=3, teacher_rows=(), trace_rows=(0, 4))
    policy = [int(m.sum()) for m in batch.fields["response_mask"]]
    trace = [int(m.sum()) for m in batch.fields[SFT_MASK]]
    wrong = minibatch_totals(minibatch_of_rows(ROWS, 1, ROWS // 2), policy, trace)  # two mini-batches assumed
    td = batch.tensordict(1, wrong)
    theta = batch.theta.clone().requires_grad_(True)
    with pytest.raises(PartitionMismatch, match="mini-batch split"):
        luffy_loss(batch.model_output(theta, list(range(ROWS))), td, None,
                   luffy=luffy_section(settings, str(tmp_path / "m.jsonl")))


def test_minibatch_membership_follows_verls_rank_then_minibatch_split():
    # 8 rows, 2 ranks of 4 rows, mini-batches of 4 rows = 2 per rank
    assert minibatch_of_rows(8, 2, 4) == [0, 0, 1, 1, 0, 0, 1, 1]
    assert minibatch_of_rows(8, 1, 4) == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="do not split"):
        minibatch_of_rows(8, 3, 4)
    assert minibatch_totals([0, 0, 1], [3, 0, 5], [0, 4, 0]) == [[3.0, 1.0, 4.0], [3.0, 1.0, 4.0], [5.0, 1.0, 0.0]]
