"""Every advantage and loss formula against values and gradients computed by hand."""

import math

import pytest
import torch

from luffy.algo.advantages import group_advantages, informative_groups
from luffy.algo.losses import (LossSettings, aggregate, kl_penalty, mixed_policy_loss, off_policy_token_loss,
                               on_policy_token_loss, rollout_correction, shaped_weight, sft_loss)


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


def test_on_policy_only_baseline():
    # teacher (1) + on-policy (1, 0, 0): baseline over the on-policy members = 1/3
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    on_policy = torch.tensor([[False, True, True, True]])
    adv = group_advantages(rewards, baseline_mask=on_policy)
    assert torch.allclose(adv, torch.tensor([[2 / 3, 2 / 3, -1 / 3, -1 / 3]]))
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    adv = group_advantages(rewards, std_normalize=True, baseline_mask=on_policy)
    assert torch.allclose(adv, torch.tensor([[2 / 3, 2 / 3, -1 / 3, -1 / 3]]) / (std + 1e-6))
    with pytest.raises(ValueError, match="at least one baseline member"):
        group_advantages(rewards, baseline_mask=torch.zeros_like(on_policy))


def test_dynamic_filtering_keeps_groups_with_reward_variance():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert informative_groups(rewards).tolist() == [False, False, True]


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
    settings = LossSettings(shaping="luffy", shaping_gamma=gamma)
    logp = leaf([math.log(p)])
    adv = torch.tensor([0.75], dtype=torch.float64)
    loss = off_policy_token_loss(logp, adv, settings)
    assert loss.item() == pytest.approx(-0.75 * p / (p + gamma))
    loss.sum().backward()
    # d f / d log pi = gamma * pi / (pi + gamma)^2
    assert logp.grad.item() == pytest.approx(-0.75 * gamma * p / (p + gamma) ** 2)
    assert shaped_weight(logp, settings).item() == pytest.approx(gamma * p / (p + gamma) ** 2)


P, W, ALPHA = 0.3, 0.2, 0.7


@pytest.mark.parametrize("shaping, value, dvalue_dlogp", [
    ("none", P, P),
    ("logp", W * math.log(P), W),
    ("p_logp", P + W * math.log(P), P + W),
    ("sqrt", math.sqrt(P), math.sqrt(P) / 2),
    ("pow", P ** ALPHA, ALPHA * P ** ALPHA),
])
def test_other_shapings_value_and_gradient(shaping, value, dvalue_dlogp):
    settings = LossSettings(shaping=shaping, shaping_weight=W, shaping_power=ALPHA)
    logp = leaf([math.log(P)])
    loss = off_policy_token_loss(logp, torch.tensor([2.0], dtype=torch.float64), settings)
    assert loss.item() == pytest.approx(-2.0 * value)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-2.0 * dvalue_dlogp)


def test_off_policy_weight_clipping_stops_the_gradient():
    settings = LossSettings(shaping="none", off_clip_min=0.2, off_clip_max=0.6)
    logp = leaf([math.log(0.1), math.log(0.4), math.log(0.9)])
    loss = off_policy_token_loss(logp, torch.ones(3, dtype=torch.float64), settings)
    assert loss.tolist() == pytest.approx([-0.2, -0.4, -0.6])
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, -0.4, 0.0])


def test_true_teacher_probability_gives_the_importance_ratio():
    # pi_theta = 0.3, pi_phi = 0.6 -> w = 0.5 (shaping is not applied to the true ratio)
    logp = leaf([math.log(0.3)])
    teacher = torch.tensor([math.log(0.6)], dtype=torch.float64)
    loss = off_policy_token_loss(logp, torch.tensor([1.0], dtype=torch.float64), LossSettings(), teacher)
    assert loss.item() == pytest.approx(-0.5)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-0.5)  # d(pi/pi_phi)/dlog pi = pi/pi_phi


def test_shaping_upweights_low_probability_tokens_relative_to_no_shaping():
    logp = torch.log(torch.tensor([0.02, 0.9], dtype=torch.float64))
    shaped = shaped_weight(logp, LossSettings(shaping="luffy", shaping_gamma=0.1))
    plain = shaped_weight(logp, LossSettings(shaping="none"))
    assert (shaped[0] / shaped[1]) > (plain[0] / plain[1])


def test_unknown_shaping_is_an_error():
    with pytest.raises(ValueError, match="unknown shaping 'cube'"):
        off_policy_token_loss(torch.zeros(1), torch.ones(1), LossSettings(shaping="cube"))


def test_clip_higher_uses_its_own_upper_bound():
    logp = leaf([math.log(1.25), math.log(1.35)])
    loss, clipped = on_policy_token_loss(logp, torch.zeros(2, dtype=torch.float64),
                                         torch.ones(2, dtype=torch.float64), True, 0.2, clip_ratio_high=0.28)
    assert loss.tolist() == pytest.approx([-1.25, -1.28])
    assert clipped.tolist() == [False, True]
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.25, 0.0])


def test_kl_penalty_value_and_gradient():
    logp, ref = leaf([math.log(0.5)]), torch.tensor([math.log(0.25)], dtype=torch.float64)
    kl = kl_penalty(logp, ref)
    assert kl.item() == pytest.approx(0.5 - math.log(0.5) - 1.0)  # exp(d) - d - 1, d = log(0.25/0.5)
    kl.sum().backward()
    assert logp.grad.item() == pytest.approx(-0.5 + 1.0)  # d/dlogp = -exp(d) + 1
    assert kl_penalty(ref.clone(), ref).item() == 0.0


# ---- aggregation ----

def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(per_token, mask, "constant", 8.0).item() == pytest.approx((1 + 2 + 4) / 8)
    with pytest.raises(ValueError, match="positive loss_constant"):
        aggregate(per_token, mask, "constant", 0.0)
    # per-sequence token means (1.5, 4.0), then their mean
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((1.5 + 4.0) / 2)
    assert aggregate(per_token, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                     "seq_mean_token_mean").item() == pytest.approx(1.5)  # empty sequences do not count
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
                            entropy_coef=0.01, kl_coef=0.0)
    loss, metrics = mixed_policy_loss(logp, old, adv, mask, off, settings, entropy, ref_log_prob=old)
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
    assert "kl" not in metrics  # kl_coef 0: no reference-model term


def test_mixed_loss_adds_the_kl_term():
    logp = torch.log(torch.tensor([[0.5]], dtype=torch.float64)).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25]], dtype=torch.float64))
    mask, off = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    settings = LossSettings(loss_agg="token_mean", entropy_coef=0.0, kl_coef=0.1)
    loss, metrics = mixed_policy_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), mask, off,
                                      settings, ref_log_prob=ref)
    assert metrics["kl"] == pytest.approx(0.5 - math.log(0.5) - 1.0)
    assert loss.item() == pytest.approx(0.1 * metrics["kl"])


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



def test_rl_with_sft_loss_adds_the_weighted_trace_nll():
    from luffy.algo.losses import sft_loss_term

    trace_logp = leaf([[math.log(0.5), math.log(0.25)]])
    loss, nll = sft_loss_term(trace_logp, torch.ones(1, 2, dtype=torch.float64), coef=0.5)
    assert nll.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert loss.item() == pytest.approx(0.5 * nll.item())
    loss.backward()
    assert trace_logp.grad[0].tolist() == pytest.approx([-0.25, -0.25])  # -coef / tokens


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batch_losses_add_up_to_the_mini_batch_loss(agg):
    from luffy.algo.losses import BatchTotals

    torch.manual_seed(0)
    logp = torch.log(torch.rand(4, 5, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(4, 5, dtype=torch.float64)
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    off = torch.zeros_like(mask)
    off[0] = 1.0
    entropy, ref = torch.rand(4, 5, dtype=torch.float64), old - 0.1
    settings = LossSettings(clip=True, loss_agg=agg, loss_constant=7.0, entropy_coef=0.01, kl_coef=0.1)
    whole, whole_metrics = mixed_policy_loss(logp, old, adv, mask, off, settings, entropy, ref_log_prob=ref)
    (full_grad,) = torch.autograd.grad(whole, logp)
    totals = BatchTotals.of(mask)
    parts, entropy_sum = [], 0.0
    for rows in ([0, 2], [1, 3]):
        part, metrics = mixed_policy_loss(logp[rows], old[rows], adv[rows], mask[rows], off[rows], settings,
                                          entropy[rows], ref_log_prob=ref[rows], totals=totals)
        parts.append(part)
        entropy_sum += metrics["entropy"]
    (split_grad,) = torch.autograd.grad(parts[0] + parts[1], logp)
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item())
    assert torch.allclose(split_grad, full_grad)
    assert entropy_sum == pytest.approx(whole_metrics["entropy"])


D = math.log(1.5)  # log pi - log pi_old


@pytest.mark.parametrize("shaping, ratio, dratio_dlogp", [
    ("none", 1.5, 1.5),
    ("logp", D, 1.0),
    ("p_logp", 1.5 + 0.3 * D, 1.5 + 0.3),
    ("sqrt", math.sqrt(1.5), 0.5 * math.sqrt(1.5)),
    ("pow", 1.5 ** 0.7, 0.7 * 1.5 ** 0.7),
])
def test_on_policy_ratio_variants_value_and_gradient(shaping, ratio, dratio_dlogp):
    settings = LossSettings(on_policy_shaping=shaping, on_policy_weight=0.3, on_policy_power=0.7)
    logp = leaf([math.log(0.3)])
    old = torch.tensor([math.log(0.2)], dtype=torch.float64)
    loss, _ = on_policy_token_loss(logp, old, torch.tensor([2.0], dtype=torch.float64), False, 0.2, None, settings)
    assert loss.item() == pytest.approx(-2.0 * ratio)
    loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-2.0 * dratio_dlogp)


def test_on_policy_luffy_ratio_is_a_ratio_of_shaped_probabilities():
    settings = LossSettings(on_policy_shaping="luffy", on_policy_gamma=0.1)
    p, q = 0.3, 0.2
    logp = leaf([math.log(p)])
    loss, _ = on_policy_token_loss(logp, torch.tensor([math.log(q)], dtype=torch.float64),
                                   torch.tensor([1.0], dtype=torch.float64), False, 0.2, None, settings)
    assert loss.item() == pytest.approx(-(p / (p + 0.1)) / (q / (q + 0.1)))
    loss.sum().backward()  # d/dlog p of f(p)/f(q) = (0.1 p / (p + 0.1)^2) / f(q)
    assert logp.grad.item() == pytest.approx(-(0.1 * p / (p + 0.1) ** 2) / (q / (q + 0.1)))


def test_token_prob_max_drops_confident_tokens_from_the_loss():
    logp = torch.log(torch.tensor([[0.5, 0.99]], dtype=torch.float64)).requires_grad_(True)
    mask, off = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    settings = LossSettings(loss_agg="constant", loss_constant=1.0, entropy_coef=0.0, token_prob_max=0.9)
    loss, _ = mixed_policy_loss(logp, logp.detach(), torch.tensor([1.0], dtype=torch.float64), mask, off, settings)
    assert loss.item() == pytest.approx(-1.0)  # only the 0.5 token: -A * ratio 1
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, 0.0])


# ---- the sampler's importance correction (vLLM rollouts) ----

def test_rollout_correction_is_the_truncated_ratio_on_on_policy_tokens():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = torch.tensor([[-1.0, -2.5, -2.0, -1.0]])  # ratios 1, e^0.5, e^1.5 (capped at 2), e^-2
    on = torch.tensor([[1.0, 1.0, 1.0, 0.0]])            # the last token is the teacher's: not counted
    weight, metrics = rollout_correction(old, rollout, on, cap=2.0)
    torch.testing.assert_close(weight, torch.tensor([[1.0, math.exp(0.5), 2.0, math.exp(-2.0)]]))
    assert not weight.requires_grad
    assert metrics["rollout/logprob_gap"] == pytest.approx((0 + 0.5 + 1.5) / 3)
    assert metrics["rollout/is_weight_mean"] == pytest.approx((1 + math.exp(0.5) + 2) / 3)
    assert metrics["rollout/is_capped_share"] == pytest.approx(1 / 3)
    none, raw = rollout_correction(old, rollout, on, cap=0)  # no correction: only the metrics
    assert none is None and raw["rollout/is_weight_mean"] == pytest.approx((1 + math.exp(0.5) + math.exp(1.5)) / 3)


def test_rollout_weight_scales_only_the_on_policy_term():
    """L with weights w: the on-policy tokens' loss and gradient are w times those without; the
    teacher tokens' are unchanged; w = 1 changes nothing."""
    settings = LossSettings(clip=True, loss_agg="token_mean", entropy_coef=0.0)
    mask = torch.ones(2, 3)
    off = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    advantages = torch.tensor([1.0, -0.5])
    old = torch.full((2, 3), -1.0)
    w = torch.tensor([[0.5, 2.0, 1.0], [3.0, 3.0, 0.25]])

    def loss_and_grad(weight):
        logp = leaf([[-1.1, -0.9, -1.0], [-0.7, -1.3, -1.05]])
        loss, _ = mixed_policy_loss(logp, old.double(), advantages.double(), mask.double(), off.double(), settings,
                                    rollout_weight=None if weight is None else weight.double())
        loss.backward()
        return loss.item(), logp.grad

    base_loss, base_grad = loss_and_grad(None)
    same_loss, same_grad = loss_and_grad(torch.ones(2, 3))
    assert same_loss == base_loss and torch.equal(same_grad, base_grad)
    _, grad = loss_and_grad(w)
    on = 1 - off.double()
    torch.testing.assert_close(grad * on, base_grad * w.double() * on)
    torch.testing.assert_close(grad * off.double(), base_grad * off.double())  # teacher tokens: no weight
