import random

import pytest

from luffy.algo.groups import prefix_length, prefix_ratios, sampled_logprob_layout


def test_random_ratios_are_uniform_in_range_and_seeded():
    a = prefix_ratios("random", 1000, 0.2, 0.6, random.Random(0))
    assert min(a) >= 0.2 and max(a) <= 0.6 and abs(sum(a) / len(a) - 0.4) < 0.02
    assert a == prefix_ratios("random", 1000, 0.2, 0.6, random.Random(0))


def test_fixed_ratios_are_evenly_spaced():
    assert prefix_ratios("fixed", 3, 0.0, 1.0, random.Random(0)) == pytest.approx([1.0, 0.5, 0.0])
    assert prefix_ratios("fixed", 1, 0.2, 0.8, random.Random(0)) == [0.8]


def test_linear_ratios_decay_over_training():
    assert prefix_ratios("linear", 2, 0.2, 1.0, random.Random(0), progress=0.0) == [1.0, 1.0]
    assert prefix_ratios("linear", 1, 0.2, 1.0, random.Random(0), progress=0.5) == pytest.approx([0.6])
    assert prefix_ratios("linear", 1, 0.2, 1.0, random.Random(0), progress=1.0) == pytest.approx([0.2])


def test_full_trace_is_ratio_one_and_bad_input_is_refused():
    assert prefix_ratios("random", 2, 1.0, 1.0, random.Random(3)) == [1.0, 1.0]
    assert prefix_length(10, 1.0) == 10 and prefix_length(10, 0.55) == 5 and prefix_length(10, 0.0) == 0
    assert prefix_length(3, 0.7) == 2
    with pytest.raises(ValueError, match="ratio_min <= ratio_max"):
        prefix_ratios("random", 1, 0.8, 0.2, random.Random(0))
    with pytest.raises(ValueError, match="unknown prefix strategy"):
        prefix_ratios("cosine", 1, 0.0, 1.0, random.Random(0))


def test_sampled_logprobs_fill_the_response_after_the_teacher_prefix():
    import torch

    from luffy.models.sequences import build_batch

    batch = build_batch([[1, 2], [1, 2, 3]], [[7, 8, 9], [4, 5]], pad_id=0)
    out = sampled_logprob_layout(batch.response_mask, [1, 0], [[-0.5, -0.25], [-1.0, -2.0]])
    # row 0: prompt of 2, the first response token the teacher's: the sampler's values at positions 2, 3
    assert out[0].tolist() == [0.0, 0.0, -0.5, -0.25]
    assert out[1].tolist() == [0.0, 0.0, -1.0, -2.0]
    with pytest.raises(ValueError, match="row 1: 2 sampled tokens but 1 sampler log-probs"):
        sampled_logprob_layout(batch.response_mask, [1, 0], [[-0.5, -0.25], [-1.0]])
    assert torch.equal(sampled_logprob_layout(batch.response_mask, [3, 2], [[], []]), torch.zeros(2, 4))
