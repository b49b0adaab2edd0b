"""Every advantage and loss formula against values and gradients computed by hand."""

import math

import pytest
import torch

from luffy.algo.advantages import group_advantages
from luffy.algo.losses import (LossSettings, aggregate, mixed_policy_loss, off_policy_token_loss,
                               on_policy_token_loss, shaped_weight, sft_loss)


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ---- advantages ----

def test_mixed_group_advantage_is_reward_minus_group_mean():
    # group of 4: teacher (reward 1) + 3 on-policy (0, 1, 0) -> mean 0.5
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]))


def test_teacher_lifts_an_all_wrong_on_policy_group():
    # all 7 on-policy wrong, teacher right: the teacher gets 7/8, each sample -1/8
    rewards = torch.tensor([[1.0] + [0.0] * 7])
    adv = group_advantages(rewards)
    assert adv[0, 0].item() == pytest.approx(7 / 8)
    assert torch.allclose(adv[0, 1:], torch.full((7,), -1 / 8))


def test_std_normalised_advantage_uses_unbiased_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mean, std = 0.25, math.sqrt(((0.75 ** 2) + 3 * (0.25 ** 2)) / 3)
    adv = group_advantages(rewards, std_normalize=True)
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (std + 1e-6)
    assert torch.allclose(adv, expected)
    assert mean == pytest.approx(rewards.mean().item())


def test_uniform_group_with_std_has_zero_advantage_and_group_of_one_is_zero():
    assert torch.all(group_advantages(torch.ones(2, 4), std_normalize=True) == 0)
    assert torch.all(group_advantages(torch.tensor([[1.0], [0.0]]), std_normalize=True) == 0)


def test_advantages_reject_wrong_shape():
    with pytest.raises(ValueError, match="num_prompts, n"):
        group_advantages(torch.ones(4))


# ---- on-policy ratio loss ----

def test_on_policy_loss_value_and_gradient_without_clip():
    logp, old = leaf([math.log(0.5)]), torch.tensor([math.log(0.25)], dtype=torch.float64)
    adv = torch.tensor([2.0], dtype=torch.float64)
    loss, clipped = on_policy_token_loss(logp, old, adv, clip=False, clip_ratio=0.2)
    assert loss.item() == pytest.approx(-2.0 * 2.0)  # -A * r, r = 0.5 / 0.25
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-2.0 * 2.0)  # d(-A r)/dlog pi = -A r
    assert not clipped.any()


@pytest.mark.parametrize("advantage, ratio, expect_clipped, expected_loss", [
    (1.0, 1.5, True, -1.2),    # A > 0, r > 1 + eps: clipped at 1.2, no gradient
    (1.0, 0.5, False, -0.5),   # A > 0, r < 1 - eps: the unclipped term is the larger loss
    (-1.0, 0.5, True, 0.8),    # A < 0, r < 1 - eps: clipped at 0.8, no gradient
    (-1.0, 1.5, False, 1.5),   # A < 0, r > 1 + eps: unclipped, gradient flows
])
def test_ppo_clip_value_and_gradient(advantage, ratio, expect_clipped, expected_loss):
    logp = leaf([math.log(ratio)])
    old = torch.zeros(1, dtype=torch.float64)
    loss, clipped = on_policy_token_loss(logp, old, torch.tensor([advantage], dtype=torch.float64), True, 0.2)
    assert loss.item() == pytest.approx(expected_loss)
    assert bool(clipped.item()) is expect_clipped
    loss.sum().backward()
    expected_grad = 0.0 if expect_clipped else -advantage * ratio
    assert logp.grad.item() == pytest.approx(expected_grad)


# ---- off-policy shaping ----

@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.95])
@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_luffy_shaping_value_and_gradient(p, gamma):
    logp = leaf([math.log(p)])
    adv = torch.tensor([0.75], dtype=torch.float64)
    loss = off_policy_token_loss(logp, adv, "luffy", gamma)
    assert loss.item() == pytest.approx(-0.75 * p / (p + gamma))
    loss.sum().backward()
    # d f / d log pi = gamma * pi / (pi + gamma)^2
    assert logp.grad.item() == pytest.approx(-0.75 * gamma * p / (p + gamma) ** 2)
    assert shaped_weight(logp, "luffy", gamma).item() == pytest.approx(gamma * p / (p + gamma) ** 2)


def test_no_shaping_is_plain_probability():
    p = 0.3
    logp = leaf([math.log(p)])
    loss = off_policy_token_loss(logp, torch.tensor([1.0], dtype=torch.float64), "none", 0.1)
    assert loss.item() == pytest.approx(-p)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-p)  # d p / d log p = p


def test_shaping_upweights_low_probability_tokens_relative_to_no_shaping():
    logp = torch.log(torch.tensor([0.02, 0.9], dtype=torch.float64))
    shaped, plain = shaped_weight(logp, "luffy", 0.1), shaped_weight(logp, "none", 0.1)
    assert (shaped[0] / shaped[1]) > (plain[0] / plain[1])


def test_unknown_shaping_is_an_error():
    with pytest.raises(ValueError, match="unknown shaping 'sqrt'"):
        off_policy_token_loss(torch.zeros(1), torch.ones(1), "sqrt", 0.1)


# ---- aggregation ----

def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(per_token, mask, "constant", 8.0).item() == pytest.approx((1 + 2 + 4) / 8)
    with pytest.raises(ValueError, match="positive loss_constant"):
        aggregate(per_token, mask, "constant", 0.0)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(per_token, mask, "seq_mean")


# ---- the whole mixed loss ----

def test_mixed_loss_matches_hand_computation():
    # two responses x 2 tokens; row 0 is the teacher (off-policy), row 1 on-policy; last token of row 1 is padding
    p = torch.tensor([[0.5, 0.2], [0.4, 0.9]], dtype=torch.float64)
    logp = p.log().clone().requires_grad_(True)
    old = torch.log(torch.tensor([[0.5, 0.2], [0.5, 0.9]], dtype=torch.float64))
    adv = torch.tensor([0.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    off = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=torch.float64)
    settings = LossSettings(clip=False, shaping="luffy", shaping_gamma=0.1, loss_agg="constant", loss_constant=4.0,
                            entropy_coef=0.01)
    loss, metrics = mixed_policy_loss(logp, old, adv, mask, off, settings, entropy)
    off_terms = -0.5 * (0.5 / 0.6) - 0.5 * (0.2 / 0.3)
    on_term = 0.5 * (0.4 / 0.5)
    expected = (off_terms + on_term) / 4.0 - 0.01 * (1.0 + 2.0 + 3.0) / 3
    assert loss.item() == pytest.approx(expected)
    assert metrics["off_policy/token_share"] == pytest.approx(2 / 3)
    loss.backward()
    expected_grad = torch.tensor([[-0.5 * 0.1 * 0.5 / 0.6 ** 2, -0.5 * 0.1 * 0.2 / 0.3 ** 2],
                                  [0.5 * 0.8, 0.0]], dtype=torch.float64) / 4.0
    assert torch.allclose(logp.grad, expected_grad)
    assert metrics["off_policy/shaped_weight_mean"] == pytest.approx(
        (0.1 * 0.5 / 0.6 ** 2 + 0.1 * 0.2 / 0.3 ** 2) / 2)


def test_mixed_loss_without_teacher_is_grpo_token_mean():
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    settings = LossSettings(clip=True, loss_agg="token_mean", entropy_coef=0.0)
    loss, metrics = mixed_policy_loss(logp, logp.detach(), adv, mask, torch.zeros_like(mask), settings)
    assert loss.item() == pytest.approx((-1 * 3 + 1) / 4)  # ratio 1 everywhere
    assert "off_policy/shaped_weight_mean" not in metrics
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]], dtype=torch.float64))


def test_sft_loss_is_masked_nll_with_gradient():
    logp = leaf([[math.log(0.5), math.log(0.25)], [math.log(0.1), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    loss = sft_loss(logp, mask)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(10)) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, -mask / 3)

