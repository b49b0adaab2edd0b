"""The lean sampler (luffy.models.generation): HF generate's outputs where both are
deterministic, each prompt prefilled once, finished samples leaving the batch, seeded draws."""

import pytest
import torch

from luffy.models.generation import next_tokens, sample


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7], [4] * 12, [30, 31]]


def test_greedy_samples_equal_hf_generates_prompt_by_prompt(model_and_tokenizer):
    """Left-padded together, each prompt continues exactly as HF generate continues it alone."""
    model, tok = model_and_tokenizer
    groups = sample(model, PROMPTS, n=2, max_new_tokens=24, temperature=0, top_p=1.0, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id)
    for prompt, group in zip(PROMPTS, groups):
        ids = torch.tensor([prompt])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        if tok.eos_token_id in alone:
            alone = alone[: alone.index(tok.eos_token_id) + 1]
        assert group == [alone, alone]


def test_each_prompt_is_prefilled_once_and_finished_samples_leave_the_batch(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    eos = tok.eos_token_id
    rows = []
    forward = type(model).forward

    def counting(self, input_ids=None, **kwargs):
        rows.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    # the first samples of every prompt end at once: EOS is forced on rows 0, 8, 16, ... of the first draw
    draws = iter([torch.tensor([eos if r % 8 == 0 else 40 for r in range(32)])])
    monkeypatch.setattr("luffy.models.generation.next_tokens",
                        lambda logits, t, p: next(draws, torch.full((len(logits),), 41)))
    groups = sample(model, PROMPTS, n=8, max_new_tokens=5, temperature=1.0, top_p=1.0, eos_id=eos,
                    pad_id=tok.pad_token_id)
    assert rows[0] == (4, 12)  # one prefill row per prompt (not 4 x 8)
    assert rows[1:] == [(28, 1)] * 4  # then one token per unfinished sample: 4 of 32 ended at the first draw
    for group in groups:
        assert group[0] == [eos] and group[1:] == [[40, 41, 41, 41, 41]] * 7


def test_seeded_draws_repeat_and_a_nucleus_of_one_token_is_the_argmax():
    logits = torch.randn(6, 50)
    torch.manual_seed(3)
    first = next_tokens(logits, 1.0, 1.0)
    torch.manual_seed(3)
    assert torch.equal(first, next_tokens(logits, 1.0, 1.0))
    top = logits.argmax(-1)
    sharp = logits.clone()
    sharp[torch.arange(6), top] += 100.0  # one token holds all the mass: top_p 0.5 keeps only it
    assert torch.equal(next_tokens(sharp, 1.0, 0.5), top)
    assert torch.equal(next_tokens(logits, 0.0, 1.0), top)


def test_sampled_groups_are_reproducible_and_cut_after_eos(model_and_tokenizer):
    model, tok = model_and_tokenizer
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(sample(model, PROMPTS, n=4, max_new_tokens=30, temperature=1.0, top_p=0.9,
                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, batch_size=3))
    assert runs[0] == runs[1]
    assert [len(g) for g in runs[0]] == [4] * 4
    for response in (r for g in runs[0] for r in g):
        assert 1 <= len(response) <= 30 and tok.eos_token_id not in response[:-1]


def test_the_local_engine_computes_in_bfloat16_with_tf32_on_a_gpu_and_in_float32_on_the_cpu(monkeypatch):
    import contextlib
    import warnings

    from luffy.models.sequences import autocast_for

    assert autocast_for(torch.device("cpu")) is contextlib.nullcontext
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no CUDA here: the context only names its device and dtype
            context = autocast_for(torch.device("cuda"))()
        assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)
        assert matmul.fp32_precision == conv.fp32_precision == "tf32"
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100: float32, no TF32
        assert autocast_for(torch.device("cuda")) is contextlib.nullcontext
        assert matmul.fp32_precision == conv.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
