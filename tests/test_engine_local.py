"""Local-engine pieces that need no model."""

from luffy.engines.local.trainer import prompt_indices


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    epoch0 = [i for step in range(5) for i in prompt_indices(step, 2, 10, seed=3)]
    assert sorted(epoch0) == list(range(10))
    assert epoch0 == [i for step in range(5) for i in prompt_indices(step, 2, 10, seed=3)]
    assert epoch0 != [i for step in range(5) for i in prompt_indices(step, 2, 10, seed=4)]
    assert sorted(prompt_indices(5, 10, 10, seed=3)) == list(range(10))  # the next epoch, reshuffled
