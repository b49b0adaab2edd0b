"""The local engine: data order, every training option, prefixes, the rl_sft baseline, micro-batching."""

import json

import pytest
import torch

from luffy.algo.losses import AGGREGATIONS, ON_POLICY_RATIOS, SHAPINGS
from luffy.config import AGGREGATION_NAMES, SHAPING_NAMES, resolve_train_config
from luffy.data.schema import DataError
from luffy.data.training import load_train_data
from luffy.engines.local.trainer import LocalTrainer, prompt_indices
from luffy.models.sequences import length_buckets
from luffy.models.tokenizer import load_shipped_tokenizer


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    epoch0 = [i for step in range(5) for i in prompt_indices(step, 2, 10, seed=3)]
    assert sorted(epoch0) == list(range(10))
    assert epoch0 == [i for step in range(5) for i in prompt_indices(step, 2, 10, seed=3)]
    assert epoch0 != [i for step in range(5) for i in prompt_indices(step, 2, 10, seed=4)]
    assert sorted(prompt_indices(5, 10, 10, seed=3)) == list(range(10))  # the next epoch, reshuffled


def test_every_training_option_runs_through_the_local_engine(tiny_model_dir, train_parquet, tmp_path):
    data = train_parquet(12, 80)
    cfg = resolve_train_config("all_options", {}, {
        "algorithm": "luffy", "steps": 2, "prompts_per_step": 2, "n": 3, "max_response_tokens": 96,
        "mini_batches": 1, "checkpoint_every": 1, "lr": 1.0e-3, "clip": True, "clip_ratio_high": 0.28,
        "advantage_baseline": "on_policy", "std_normalize": True, "filter_groups": True, "shaping": "pow",
        "off_clip_max": 0.9, "kl_coef": 0.05, "loss_agg": "seq_mean_token_mean", "on_policy_shaping": "p_logp",
        "token_prob_max": 0.99})
    trainer = LocalTrainer(cfg, data, tiny_model_dir, tmp_path / "work")
    trainer.run(tmp_path / "final", tmp_path / "metrics.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        assert 0.0 <= m["groups/kept_share"] <= 1.0
        if m["groups/kept_share"] > 0:  # an update ran: the KL term against the frozen start is logged
            assert m["kl"] >= 0.0
    assert (tmp_path / "final" / "model.pt").exists()


def test_config_shaping_names_match_the_algorithm():
    assert set(SHAPING_NAMES) == set(SHAPINGS) == set(ON_POLICY_RATIOS)
    assert set(AGGREGATION_NAMES) == set(AGGREGATIONS)


def test_partial_prefix_members_carry_the_trace_prefix_then_a_continuation(tiny_model_dir, train_parquet, tmp_path):
    data = train_parquet(6, 80)
    cfg = resolve_train_config("prefix", {}, {
        "algorithm": "luffy", "steps": 1, "prompts_per_step": 2, "n": 4, "n_off": 2, "max_response_tokens": 96,
        "mini_batches": 1, "prefix_strategy": "fixed", "prefix_ratio_min": 0.5, "prefix_ratio_max": 1.0})
    trainer = LocalTrainer(cfg, data, tiny_model_dir, tmp_path / "work")
    idx = [0, 1]
    members = trainer._off_policy_members(idx, step=0)
    for i, group in zip(idx, members):
        trace = trainer.data.trace_ids[i]
        (full, full_count, _), (partial, k, _) = group
        assert full == trace and full_count == len(trace)  # ratio 1: the whole trace + EOS
        assert k == (len(trace) - 1) // 2 and partial[:k] == trace[:k]  # ratio 0.5: prefix ...
        assert len(partial) > k  # ... then the policy's own tokens
    metrics = trainer.rl_step(0)
    assert 0.0 < metrics["off_policy/token_share"] < 1.0


def test_rl_with_sft_loss_baseline_runs_and_logs_its_nll(tiny_model_dir, train_parquet, tmp_path):
    data = train_parquet(6, 80)
    cfg = resolve_train_config("rl_sft", {}, {"algorithm": "rl_sft", "steps": 1, "prompts_per_step": 2, "n": 3,
                                              "max_response_tokens": 64, "mini_batches": 1, "sft_coef": 0.5})
    assert (cfg.n_off, cfg.clip, cfg.advantage_baseline) == (0, True, "on_policy")
    trainer = LocalTrainer(cfg, data, tiny_model_dir, tmp_path / "work")
    metrics = trainer.rl_step(0)
    assert metrics["loss/sft"] > 0 and metrics["off_policy/token_share"] == 0.0


def test_complementary_fractions_give_disjoint_problem_sets(train_parquet):
    data = train_parquet(20, 200)
    tok = load_shipped_tokenizer()
    first = load_train_data(data, tok, 0.0, 0.5)
    second = load_train_data(data, tok, 0.5, 1.0)
    assert len(first.prompt_ids) + len(second.prompt_ids) == len(load_train_data(data, tok).prompt_ids)
    assert not {tuple(p) for p in first.prompt_ids} & {tuple(p) for p in second.prompt_ids}
    with pytest.raises(DataError, match="are empty"):
        load_train_data(data, tok, 0.5, 0.51)


def test_length_buckets_cover_rows_once_within_budget():
    lengths = [10, 50, 20, 50, 5, 30]
    buckets = length_buckets(list(range(6)), lengths, max_tokens=100)
    assert sorted(r for b in buckets for r in b) == list(range(6))
    for bucket in buckets:
        assert len(bucket) == 1 or len(bucket) * max(lengths[r] for r in bucket) <= 100
    assert length_buckets([0, 1], lengths, max_tokens=0) == [[0, 1]]
    assert length_buckets([1], lengths, max_tokens=10) == [[1]]  # a longer row still runs alone


def test_micro_batching_does_not_change_the_update(tiny_model_dir, train_parquet, tmp_path):
    data = train_parquet(8, 80)
    results = []
    for micro in (0, 96):
        cfg = resolve_train_config("m", {}, {"algorithm": "luffy", "steps": 1, "prompts_per_step": 4, "n": 4,
                                             "max_response_tokens": 64, "mini_batches": 2, "loss_agg": "token_mean",
                                             "micro_batch_tokens": micro, "kl_coef": 0.1})
        trainer = LocalTrainer(cfg, data, tiny_model_dir, tmp_path / f"work{micro}")
        results.append(trainer.rl_step(0))
    whole, split = results
    for key in ("loss/total", "loss/policy", "entropy", "kl", "grad_norm", "off_policy/token_share"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key


def test_teacher_logprobs_give_the_true_ratio_on_full_and_prefix_members(tiny_model_dir, train_parquet, tmp_path):
    """Scored by the policy itself, pi_theta / pi_phi is 1 on every teacher token before the
    first update, so the off-policy weight's mean is 1 whatever the tokens' probabilities:
    the teacher log-probs land on exactly the teacher tokens of full and prefix members."""
    from luffy.models.scoring import score_traces

    import pandas as pd

    data, scored = train_parquet(6, 80), str(tmp_path / "scored.parquet")
    assert score_traces(tiny_model_dir, tiny_model_dir, data, scored, micro_batch_tokens=600) == len(pd.read_parquet(data))
    cfg = resolve_train_config("teacher", {}, {
        "algorithm": "luffy", "steps": 1, "prompts_per_step": 2, "n": 4, "n_off": 2, "max_response_tokens": 96,
        "mini_batches": 1, "prefix_strategy": "fixed", "prefix_ratio_min": 0.5, "prefix_ratio_max": 1.0,
        "teacher_logprobs": True})
    trainer = LocalTrainer(cfg, scored, tiny_model_dir, tmp_path / "work")
    assert [len(lp) for lp in trainer.data.teacher_logp] == [len(ids) for ids in trainer.data.trace_ids]
    metrics = trainer.rl_step(0)
    assert metrics["off_policy/shaped_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["off_policy/prob_mean"] < 0.99  # the plain shaping would not have given 1


def test_teacher_logprobs_bad_data_is_named(tiny_model_dir, train_parquet, tmp_path):
    import pandas as pd

    tok = load_shipped_tokenizer()
    data = train_parquet(4, 80)
    with pytest.raises(DataError, match="no 'teacher_logprobs' column.*score-traces"):
        load_train_data(data, tok, teacher_logprobs=True)
    frame = pd.read_parquet(data)
    frame["teacher_logprobs"] = [[-0.5] * 3, [0.7], [float("nan")], [-1.0] * 2]
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    with pytest.raises(DataError, match=r"not a finite log-probability \(<= 0\): 2 row\(s\) \[1, 2\]"):
        load_train_data(str(bad), tok, teacher_logprobs=True)
    frame["teacher_logprobs"] = [[-0.5] * 3] * 4
    frame.to_parquet(bad)
    with pytest.raises(DataError, match=r"length differs from the trace's token count .* 4 row\(s\) \[0, 1, 2, 3\]"):
        load_train_data(str(bad), tok, teacher_logprobs=True)
    with pytest.raises(Exception, match="teacher_logprobs.*needs off-policy members"):
        resolve_train_config("g", {}, {"algorithm": "grpo", "teacher_logprobs": True})


def test_in_training_validation_selects_the_best_step(tiny_model_dir, train_parquet, tmp_path):
    import pandas as pd

    data = train_parquet(12, 80)
    valid = tmp_path / "valid.parquet"
    pd.read_parquet(data).drop(columns=["target"]).iloc[:4].to_parquet(valid)
    cfg = resolve_train_config("val", {}, {"algorithm": "grpo", "steps": 3, "prompts_per_step": 2, "n": 2,
                                           "max_response_tokens": 48, "mini_batches": 1, "lr": 1.0e-3})
    validation = {"every": 2, "n": 2, "temperature": 0.6, "max_problems": 3, "select": "best", "data": str(valid)}
    trainer = LocalTrainer(cfg, data, tiny_model_dir, tmp_path / "work", validation=validation, grader_workers=2)
    assert len(trainer.valid_prompts) == 3
    first = trainer.validate()
    assert first == trainer.validate()  # the same draws at every validation: comparable across steps
    trainer.run(tmp_path / "final", tmp_path / "metrics.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validated = [m["step"] for m in lines if "val/accuracy" in m]
    assert validated == [1, 2]  # every 2 steps, and at the end
    best = json.loads((tmp_path / "work" / "best.json").read_text())
    chosen = json.loads((tmp_path / "final" / "checkpoint.json").read_text())["selected"]
    assert chosen["step"] == best["step"] and chosen["accuracy"] == max(m["val/accuracy"] for m in lines
                                                                        if "val/accuracy" in m)


@pytest.mark.parametrize("mini_batches,ppo_epochs", [(1, 1), (2, 2)])
def test_pi_old_from_the_first_updates_own_forward_changes_no_loss_and_no_gradient(
        tiny_model_dir, train_parquet, tmp_path, monkeypatch, mini_batches, ppo_epochs):
    """The first update's own forward stands in for the no-grad pi_old pass over its rows (the
    other mini-batches' rows still get the pass, before any update): every update's losses and
    gradients equal those of the no-grad pass over every row, with real optimizer steps between
    the updates (a later mini-batch given its own, already updated, log-probs as pi_old would
    differ)."""
    import luffy.engines.local.trainer as local

    no_dropout = local.without_dropout
    data = train_parquet(12, 80)
    cfg = resolve_train_config("own_old", {}, {
        "algorithm": "luffy", "steps": 1, "prompts_per_step": 4, "n": 3, "max_response_tokens": 24,
        "mini_batches": mini_batches, "ppo_epochs": ppo_epochs, "clip": True, "lr": 1.0e-2,
        "micro_batch_tokens": 96, "entropy_coef": 0.01})

    def updates(work: str, own_old: bool):
        monkeypatch.setattr(local, "without_dropout", lambda model: own_old)
        trainer = LocalTrainer(cfg, data, tiny_model_dir, tmp_path / work)
        assert no_dropout(trainer.model) and trainer.own_old == own_old  # the tiny model has no dropout
        grads, step = [], trainer._optimizer_step

        def recording_step():
            grads.append([p.grad.clone() for p in trainer.model.parameters()])
            return step()

        trainer._optimizer_step = recording_step
        d = trainer.data
        assert len(d.trace_ids) >= 4
        prompts = [d.prompt_ids[g] for g in range(4) for _ in range(3)]
        responses = [d.trace_ids[g] if m == 0 else d.trace_ids[(g + m) % len(d.trace_ids)][: 5 + 3 * m]
                     for g in range(4) for m in range(3)]
        off_tokens = [len(r) if m == 0 else 0 for m, r in zip([0, 1, 2] * 4, responses)]
        advantages = torch.tensor([1.0, -0.5, -0.5, -1.0, 0.5, 0.5] * 2)
        sources = [g for g in range(4) for _ in range(3)]
        return trainer._policy_updates(prompts, responses, off_tokens, advantages, sources), grads

    fast, fast_grads = updates("own", True)
    full, full_grads = updates("pass", False)
    assert len(fast) == len(full) == mini_batches * ppo_epochs
    for a, b in zip(fast, full):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for update_a, update_b in zip(fast_grads, full_grads):
        for ga, gb in zip(update_a, update_b):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_a_model_with_dropout_gets_the_no_grad_pi_old_pass(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from luffy.engines.local.trainer import without_dropout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert without_dropout(model)
    model.config.attention_dropout = 0.1
    assert not without_dropout(model)
    model.config.attention_dropout = 0.0
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert not without_dropout(model)
