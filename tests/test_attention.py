"""Grouped-query attention through SDPA's own GQA (luffy.models.attention): the same logits,
gradients and greedy samples as transformers' ``sdpa``, without repeating the key/value heads."""

import pytest
import torch

from luffy.models.attention import NAME, use_gqa_sdpa
from luffy.models.generation import sample


@pytest.fixture
def two_models(tiny_model_dir):
    """The tiny model (2 query heads per key/value head) twice: transformers' sdpa and ours."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = use_gqa_sdpa(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    assert reference.config._attn_implementation == "sdpa" and ours.config._attn_implementation == NAME
    assert ours.model.layers[0].self_attn.num_key_value_groups == 2
    return reference, ours


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids, mask


def test_logits_and_gradients_equal_transformers_sdpa_on_a_left_padded_batch(two_models, monkeypatch):
    reference, ours = two_models
    ids, mask = left_padded()
    results = []
    for model in (reference, ours):
        if model is ours:  # our attention never repeats the key/value heads
            monkeypatch.setattr("transformers.integrations.sdpa_attention.repeat_kv",
                                lambda *a: pytest.fail("key/value heads repeated"))
        model.train()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_greedy_samples_with_a_kv_cache_equal_transformers_sdpa(two_models, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7], [4] * 12, [30, 31]]
    runs = [sample(model.eval(), prompts, n=2, max_new_tokens=24, temperature=0, top_p=1.0, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id) for model in two_models]
    assert runs[0] == runs[1]


def test_a_model_on_another_attention_keeps_it(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert use_gqa_sdpa(eager).config._attn_implementation == "eager"
