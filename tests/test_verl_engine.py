"""The verl engine against the real verl 0.9.1 package, on the CPU.

What runs for real: verl's Hydra configs and checks (compose, ``validate_config``, the dataclass
conversions), its V1 agent-loop worker (``AgentLoopWorkerTQ``'s own ``_run_prompt``: sessions,
post-processing into TransferQueue rows), its reward-loop worker and reward manager calling our
reward function, its GRPO advantage estimator, and its model merger on an FSDP checkpoint that
its checkpoint manager wrote (2 ranks, gloo).

Stand-ins, each for something that cannot run here: the vLLM server (a fake that answers with
fixed token ids and records the requests), TransferQueue's Ray-actor store (the worker's puts
are recorded instead), and the Ray actor handle of the reward worker (an in-process object with
the same ``compute_score.remote`` call).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf


from luffy.algo.advantages import group_advantages
from luffy.config import ConfigError, VerlConfig, load_config, resolve_train_config, to_dict
from luffy.engines.base import TrainJob
from luffy.engines.verl.compose import VerlConfigError, validated_ppo, validated_sft
from luffy.engines.verl.engine import VerlEngine
from luffy.engines.verl.loss import OFF_POLICY_MASK, SFT_MASK, TEACHER_LOG_PROB
from luffy.engines.verl.overrides import check_extra_overrides

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "experiments" / "paper_qwen2.5_math_7b.yaml"


def job_for(name: str, settings, data: str, model: str, work: Path, runtime: VerlConfig | None = None) -> TrainJob:
    return TrainJob(experiment=name, settings=settings, data=data, base_model=model, out_dir=work / "final",
                    metrics_out=work / "metrics.jsonl", work_dir=work / "work",
                    runtime=to_dict(runtime or VerlConfig()))


# ---- configs: every shipped verl experiment composes and validates with verl's own config ----

def shipped_verl_experiments():
    for path in sorted((REPO / "config").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict) or "experiments" not in raw:
            continue
        resolved = load_config(raw)
        for name, settings in resolved.experiments.items():
            if settings.engine == "verl":
                yield pytest.param(resolved, name, id=f"{path.stem}:{name}")


@pytest.mark.parametrize("resolved,name", list(shipped_verl_experiments()))
def test_shipped_verl_experiments_compose_and_validate(resolved, name, tiny_model_dir, train_parquet, tmp_path):
    settings = resolved.experiments[name]
    # the workflow's prepared base model stands in as the tiny model (its config and tokenizer are read)
    job = job_for(name, settings, train_parquet(8), tiny_model_dir, tmp_path, resolved.root.verl)
    entry, overrides = VerlEngine().overrides(job)
    if settings.algorithm == "sft":
        config = validated_sft(overrides)
        assert entry == "verl.trainer.sft_trainer_ray"
        assert config.optim.lr == settings.lr and config.data.train_batch_size == settings.prompts_per_step
        assert config.trainer.total_training_steps == settings.steps * settings.mini_batches
        return
    config = validated_ppo(overrides)
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    assert entry == "verl.trainer.main_ppo" and config.trainer.v1.trainer_mode == "luffy" and config.trainer.use_v1
    # the paper's main-run values (luffy-reference.md section 2) where they belong
    assert (config.data.train_batch_size, actor.ppo_mini_batch_size, actor.ppo_epochs) == (128, 64, 1)
    assert (config.data.max_prompt_length, config.data.max_response_length) == (1024, 8192)
    assert rollout.n == (9 if settings.algorithm == "rl_sft" else 8) and rollout.temperature == 1.0
    assert (rollout.tensor_model_parallel_size, config.trainer.n_gpus_per_node, config.trainer.nnodes) == (2, 8, 1)
    assert actor.optim.lr == 1e-6 and actor.optim.weight_decay == 0.01 and list(actor.optim.betas) == [0.9, 0.999]
    assert actor.optim.clip_grad == 1.0 and actor.entropy_coeff == 0.001 and not actor.use_kl_loss
    assert config.algorithm.adv_estimator == "grpo" and not config.algorithm.norm_adv_by_std_in_grpo
    assert config.trainer.total_training_steps == 500
    assert actor.ppo_max_token_len_per_gpu >= 1024 + 8192
    assert config.reward.custom_reward_function.path == "pkg://luffy.engines.verl.reward"
    section = config.luffy
    assert section.loss_agg == "constant" and section.loss_constant == 8192.0 and section.entropy_coef == 0.001
    if name == "luffy":
        assert (section.n_off, section.clip, section.shaping, section.shaping_gamma) == (1, False, "luffy", 0.1)
        assert (section.prefix_ratio_min, section.prefix_ratio_max) == (1.0, 1.0)
    if name == "grpo":
        assert (section.n_off, section.clip, section.clip_ratio) == (0, True, 0.2)


def test_settings_verl_cannot_honour_are_named_errors():
    with pytest.raises(ConfigError, match="filter_groups': not supported by engine verl"):
        resolve_train_config("x", {}, {"engine": "verl", "filter_groups": True})
    with pytest.raises(ConfigError, match="warmup_steps': not supported by engine verl"):
        resolve_train_config("x", {}, {"engine": "verl", "warmup_steps": 5})
    with pytest.raises(ConfigError, match="advantage_baseline': not supported by engine verl"):
        resolve_train_config("x", {}, {"engine": "verl", "advantage_baseline": "on_policy"})
    with pytest.raises(ConfigError, match="engine': 'deepspeed' is not one of"):
        resolve_train_config("x", {}, {"engine": "deepspeed"})
    raw = yaml.safe_load(PAPER.read_text())
    with pytest.raises(ConfigError, match="experiments.luffy.engine': in-training validation"):
        load_config({**raw, "validation": {"every": 10}, "data": {**raw["data"], "validation_fraction": 0.01}})
    with pytest.raises(ConfigError, match="micro_batch_tokens': must hold one whole sequence"):
        load_config({**raw, "train_defaults": {**raw["train_defaults"], "micro_batch_tokens": 8192}})
    with pytest.raises(ConfigError, match="mini_batches': a mini-batch of 448 sequences does not split evenly"):
        load_config({**raw, "verl": {**raw["verl"], "gpus_per_node": 6, "rollout_tensor_parallel": 2},
                     "experiments": {"luffy": {"algorithm": "luffy", "n": 7}}})
    with pytest.raises(ConfigError, match="verl.rollout_tensor_parallel'"):
        load_config({**raw, "verl": {**raw["verl"], "rollout_tensor_parallel": 3}})


def test_extra_overrides_cannot_change_mapped_settings_and_unknown_keys_fail_composition(tiny_model_dir,
                                                                                         train_parquet, tmp_path):
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.optim"):
        check_extra_overrides(["actor_rollout_ref.actor.optim.lr=1.0e-5"])
    with pytest.raises(ValueError, match="not a Hydra override"):
        check_extra_overrides(["just-a-word"])
    check_extra_overrides(["actor_rollout_ref.rollout.enforce_eager=true"])  # not ours: allowed
    settings = resolve_train_config("luffy", {}, {"engine": "verl", "micro_batch_tokens": 16384})
    runtime = VerlConfig(overrides=["actor_rollout_ref.rollout.no_such_setting=1"])
    job = job_for("luffy", settings, train_parquet(8), tiny_model_dir, tmp_path, runtime)
    with pytest.raises(VerlConfigError, match="no_such_setting"):
        validated_ppo(VerlEngine().overrides(job)[1])
    # without flash-attn, verl's sequence packing would let packed sequences attend to each other
    job = job_for("luffy", settings, job.data, tiny_model_dir, tmp_path, VerlConfig(attn_implementation="sdpa"))
    model = validated_ppo(VerlEngine().overrides(job)[1]).actor_rollout_ref.model
    assert model.override_config.attn_implementation == "sdpa" and not model.use_remove_padding


# ---- the agent loop and the reward, driven the way verl's V1 worker drives them ----

class FakeServer:
    """Stands in for the vLLM server: answers every request with fixed token ids (capped at
    ``max_tokens``) and records what it was asked."""

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.requests: list[dict] = []

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append({"prompt_ids": list(prompt_ids), "max_tokens": sampling_params.get("max_tokens")})
        return TokenOutput(token_ids=self.ids[: sampling_params.get("max_tokens", len(self.ids))])


class RewardHandle:
    """Stands in for the Ray handle of a reward-loop worker: ``compute_score.remote(data)`` runs
    verl's ``RewardLoopWorker.compute_score`` in this process."""

    def __init__(self, config):
        from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

        worker = RewardLoopWorker(config)
        self.compute_score = type("Method", (), {"remote": staticmethod(worker.compute_score)})()


@pytest.fixture
def loop():
    """One event loop for the whole test, current while verl's objects are built (they keep the
    loop they find, as in a Ray actor, whose methods all run on one loop)."""
    event_loop = asyncio.new_event_loop()
    asyncio.set_event_loop(event_loop)
    yield event_loop
    asyncio.set_event_loop(None)
    event_loop.close()


@pytest.fixture
def recorded_puts(monkeypatch, loop):
    """TransferQueue's store runs as Ray actors: record the worker's puts instead."""
    from verl.trainer.ppo.v1 import agent_loop_tq

    puts = []

    async def batch_put(keys, fields, tags, partition_id):
        puts.append((list(keys), fields, tags))

    async def put(**kwargs):
        return None

    monkeypatch.setattr(agent_loop_tq.tq, "async_kv_batch_put", batch_put)
    monkeypatch.setattr(agent_loop_tq.tq, "async_kv_put", put)
    return puts


def v1_worker(config, server, reward_handle):
    """verl's ``AgentLoopWorkerTQ`` (its methods, unchanged) without the Ray actor wrapper and
    without connecting to TransferQueue."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

    import luffy.engines.verl.plugin  # noqa: F401  (what VERL_USE_EXTERNAL_MODULES imports on a Ray worker)

    cls = AgentLoopWorkerTQ.__ray_actor_class__
    worker = cls.__new__(cls)
    AgentLoopWorker.__init__(worker, config, server, None, [reward_handle])
    worker.background_tasks = set()
    return worker


def run_prompts(worker, config, rows: pd.DataFrame, step: int = 1) -> None:
    """What ``AgentLoopWorkerTQ.generate_sequences`` does per dataset row: one ``_run_prompt``
    (rollout.n sessions) per prompt, with the row's fields as keyword arguments."""
    rollout = config.actor_rollout_ref.rollout
    params = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k, repetition_penalty=1.0,
                  logprobs=rollout.calculate_log_probs)

    async def go():
        for i, row in enumerate(rows.to_dict(orient="records")):
            prompt = {**row, "raw_prompt": list(row["prompt"]),
                      "uid": f"u{i}", "index": row["extra_info"]["index"], "global_steps": step,
                      "agent_name": rollout.agent.default_agent_loop}
            trajectory = {"step": step, "sample_index": i, "rollout_n": 0, "validate": False}
            await worker._run_prompt(prompt, params, trajectory=trajectory)

    asyncio.get_event_loop().run_until_complete(go())


def experiment(tiny_model_dir, data, tmp_path, **settings):
    cfg = resolve_train_config("exp", {}, {"engine": "verl", "n": 4, "max_response_tokens": 200,
                                           "micro_batch_tokens": 4096, "prompts_per_step": 2, "mini_batches": 1,
                                           **settings})
    runtime = VerlConfig(nnodes=1, gpus_per_node=1, rollout_tensor_parallel=1, max_prompt_tokens=512)
    job = job_for("exp", cfg, data, tiny_model_dir, tmp_path, runtime)
    return cfg, validated_ppo(VerlEngine().overrides(job)[1])


ANSWER = "<think>\nsome steps\n</think>\nThe answer is \\boxed{7}."


def rows_by_session(puts):
    rows = {}
    for keys, fields, tags in puts:
        for key, i in zip(keys, range(len(keys))):
            rows[key] = {name: fields[name][i] for name in fields.keys()}
    return rows


def test_teacher_trace_joins_its_group_and_verls_grpo_advantages_equal_ours(tiny_model_dir, train_parquet,
                                                                            tmp_path, recorded_puts):
    from verl import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    from luffy.data.templates import encode_traces, render_prompt
    from luffy.data.training import load_train_data

    data = train_parquet(4)
    cfg, config = experiment(tiny_model_dir, data, tmp_path, algorithm="luffy")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    server = FakeServer(tokenizer, ANSWER)
    worker = v1_worker(config, server, RewardHandle(config))
    frame = pd.read_parquet(data).iloc[:2]
    run_prompts(worker, config, frame)
    rows = rows_by_session(recorded_puts)
    assert len(rows) == 2 * cfg.n  # every session of every prompt, one row each
    expected = load_train_data(data, tokenizer)
    for p in range(2):
        trace = expected.trace_ids[p]
        teacher = rows[f"u{p}_0_0"]
        assert teacher["responses"].tolist() == trace  # the trace's tokens + EOS, not generated
        assert teacher[OFF_POLICY_MASK].tolist() == [1] * len(trace)
        assert teacher["response_mask"].tolist() == [1] * len(trace)
        assert teacher["prompts"].tolist() == expected.prompt_ids[p]
        for s in range(1, cfg.n):
            member = rows[f"u{p}_{s}_0"]
            assert member["responses"].tolist() == server.ids and member[OFF_POLICY_MASK].sum() == 0
            assert str(member["uid"]) == f"u{p}"
    assert len(server.requests) == 2 * (cfg.n - 1)  # the teacher members asked the server for nothing
    assert all(r["max_tokens"] is None or r["max_tokens"] == config.actor_rollout_ref.rollout.response_length
               for r in server.requests)

    # verl's GRPO estimator over those rows, with their rewards from our reward function
    keys = sorted(rows, key=lambda k: (k.split("_")[0], int(k.split("_")[1])))
    rewards = torch.tensor([float(rows[k]["rm_scores"].sum()) for k in keys])
    width = max(len(rows[k]["responses"]) for k in keys)
    scores = torch.zeros(len(keys), width)
    mask = torch.zeros(len(keys), width)
    for i, k in enumerate(keys):
        n = len(rows[k]["responses"])
        scores[i, n - 1] = rewards[i]
        mask[i, :n] = 1
    batch = DataProto.from_dict(tensors={"token_level_rewards": scores, "response_mask": mask},
                                non_tensors={"uid": np.array([k.split("_")[0] for k in keys], dtype=object)})
    out = compute_advantage_for_multi_trajectories(batch, batch_keys=keys, adv_estimator="grpo", num_repeat=cfg.n,
                                                   norm_adv_by_std_in_grpo=False, config=config.algorithm)
    verl_advantages = out.batch["advantages"][:, 0]
    ours = group_advantages(rewards.view(2, cfg.n)).reshape(-1)
    torch.testing.assert_close(verl_advantages, ours)
    assert rewards.view(2, cfg.n)[:, 0].tolist() == [1.0, 1.0]  # the traces are graded correct
    assert set(rewards.view(2, cfg.n)[:, 1:].reshape(-1).tolist()) == {0.0}  # "7" is not the toy answers


def test_partial_prefix_members_and_rl_sft_trace_rows(tiny_model_dir, train_parquet, tmp_path, recorded_puts):
    from luffy.data.training import load_train_data

    data = train_parquet(4)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = load_train_data(data, tokenizer)
    frame = pd.read_parquet(data).iloc[:1]

    cfg, config = experiment(tiny_model_dir, data, tmp_path / "prefix", algorithm="luffy", n_off=2,
                             prefix_strategy="fixed", prefix_ratio_min=0.5, prefix_ratio_max=1.0)
    server = FakeServer(tokenizer, ANSWER)
    run_prompts(v1_worker(config, server, RewardHandle(config)), config, frame)
    rows = rows_by_session(recorded_puts)
    trace = expected.trace_ids[0]
    full, partial = rows["u0_0_0"], rows["u0_1_0"]
    assert full["responses"].tolist() == trace and int(full[OFF_POLICY_MASK].sum()) == len(trace)
    k = (len(trace) - 1) // 2
    assert partial["responses"].tolist() == trace[:k] + server.ids
    assert partial[OFF_POLICY_MASK].tolist() == [1] * k + [0] * len(server.ids)
    continuation = [r for r in server.requests if r["prompt_ids"][-k:] == trace[:k]]
    assert continuation and continuation[0]["max_tokens"] == config.actor_rollout_ref.rollout.response_length - k

    recorded_puts.clear()
    cfg, config = experiment(tiny_model_dir, data, tmp_path / "rl_sft", algorithm="rl_sft")
    assert config.actor_rollout_ref.rollout.n == cfg.n + 1
    server = FakeServer(tokenizer, ANSWER)
    run_prompts(v1_worker(config, server, RewardHandle(config)), config, frame)
    rows = rows_by_session(recorded_puts)
    trace_row = rows["u0_0_0"]
    assert trace_row["responses"].tolist() == trace
    assert trace_row["response_mask"].sum() == 0 and trace_row[SFT_MASK].tolist() == [1] * len(trace)
    assert all(rows[f"u0_{s}_0"][SFT_MASK].sum() == 0 and rows[f"u0_{s}_0"]["response_mask"].sum() > 0
               for s in range(1, cfg.n + 1))


def test_teacher_log_probs_ride_on_the_teacher_tokens(tiny_model_dir, train_parquet, tmp_path, recorded_puts):
    from luffy.data.training import load_train_data

    data = train_parquet(4)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = load_train_data(data, tokenizer)
    frame = pd.read_parquet(data).iloc[:1]
    trace = expected.trace_ids[0]
    values = [-0.01 * (i + 1) for i in range(len(trace) - 1)]  # scored without the EOS
    frame = frame.assign(teacher_logprobs=[values])
    scored = tmp_path / "scored.parquet"
    frame.to_parquet(scored)
    cfg, config = experiment(tiny_model_dir, str(scored), tmp_path, algorithm="luffy", teacher_logprobs=True)
    run_prompts(v1_worker(config, FakeServer(tokenizer, ANSWER), RewardHandle(config)), config, frame)
    rows = rows_by_session(recorded_puts)
    assert rows["u0_0_0"][TEACHER_LOG_PROB].tolist() == pytest.approx(values + [0.0])
    assert rows["u0_1_0"][TEACHER_LOG_PROB].abs().sum() == 0


def test_reward_function_as_verl_calls_it_grades_and_keeps_its_time_limit(tiny_model_dir, train_parquet, tmp_path,
                                                                          loop):
    from verl import DataProto
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    _, config = experiment(tiny_model_dir, train_parquet(4), tmp_path, algorithm="luffy")
    OmegaConf.update(config, "reward.custom_reward_function.reward_kwargs.timeout_s", 1.0)
    worker = RewardLoopWorker(config)
    tokenizer = worker.input_tokenizer

    def item(text: str, gold: str):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        responses = torch.tensor([ids])
        return DataProto.from_dict(
            tensors={"prompts": torch.tensor([[1, 2]]), "responses": responses,
                     "attention_mask": torch.ones(1, 2 + len(ids), dtype=torch.long)},
            non_tensors={"data_source": np.array(["openr1_math"], dtype=object),
                         "reward_model": np.array([{"ground_truth": gold}], dtype=object),
                         "extra_info": np.array([{}], dtype=object)})

    def score(text, gold):
        return loop.run_until_complete(worker.compute_score(item(text, gold)))

    cases = [("<think>x</think> so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
             ("<think>x</think> \\boxed{3}", "4", 0.0),
             ("no reasoning end \\boxed{4}", "4", 0.0),
             ("<think>a</think><think>b</think> \\boxed{4}", "4", 1.0)]
    for text, gold, expected in cases:
        result = score(text, gold)
        assert result["reward_score"] == expected, text
    assert score("\\boxed{4}", "4")["reward_extra_info"]["no_think_end"] == 1.0
    began = time.perf_counter()
    stuck = score("<think>x</think> \\boxed{9^{9^{9^{9^{9}}}}}", "1")
    assert stuck["reward_score"] == 0.0 and time.perf_counter() - began < 1.0 + 2.0


# ---- the plug-ins load through verl's own mechanism; the trainer's pure parts ----

def test_plugin_registers_agent_loop_and_trainer_through_verls_external_modules():
    import subprocess
    import sys

    code = ("import verl\nfrom verl.trainer.ppo.v1 import get_trainer_cls\n"
            "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
            "print(get_trainer_cls('luffy').__name__, _agent_loop_registry['luffy_agent']['_target_'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "VERL_USE_EXTERNAL_MODULES": "luffy.engines.verl.plugin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LuffyTrainer", "luffy.engines.verl.agent_loop.LuffyAgentLoop"]


def test_trainer_helpers_group_rows_and_name_metrics_as_the_local_engine():
    from luffy.engines.verl.trainer import groups_by_uid, our_names, split_baseline_advantages, step_metrics

    assert groups_by_uid(["a", "b", "a", "b", "c"]) == [[0, 2], [1, 3], [4]]
    # rl_sft: the trace row (first of each group) is outside the baseline but gets an advantage
    advantages = split_baseline_advantages(["a", "a", "a", "b", "b", "b"], [1, 1, 0, 1, 0, 0],
                                           [False, True, True, False, True, True], std_normalize=False)
    assert advantages == pytest.approx([0.5, 0.5, -0.5, 1.0, 0.0, 0.0])
    metrics = step_metrics(["a", "a", "b", "b"], [1.0, 0.0, 1.0, 1.0], [True, False, True, False], [10, 4, 12, 6],
                           [False, True, False, False])
    assert metrics["reward/on_policy_mean"] == 0.5 and metrics["reward/off_policy_mean"] == 1.0
    assert metrics["accuracy/group_solved"] == 0.5 and metrics["response_length/off_policy"] == 11
    assert metrics["response/no_think_end_share"] == 0.25
    named = our_names({"actor/loss/policy": 0.5, "actor/grad_norm": 2.0, "timing_s/step": 3.0, "actor/pg_loss": 1.0,
                       "actor/lr": 1e-6})
    assert named == {"loss/policy": 0.5, "grad_norm": 2.0, "step_time_s": 3.0, "lr": 1e-6}


# ---- train: verl's process stands in (GPUs only); what the engine launches and collects is real ----

def overrides_of(command: list[str]) -> dict[str, str]:
    return {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in command if "=" in o}


def test_train_launches_verl_with_the_plugins_and_collects_its_last_checkpoint(tiny_model_dir, train_parquet,
                                                                               tmp_path, monkeypatch):
    import subprocess
    import sys

    helper = Path(__file__).parent / "helpers" / "write_fsdp_checkpoint.py"
    launched = []

    def fake_verl(command, env):
        """What a finished main_ppo run leaves behind: its last checkpoint (written by verl's
        checkpoint manager), the tracker file, and our trainer's metric lines."""
        launched.append((command, env))
        values = overrides_of(command)
        root, steps = Path(values["trainer.default_local_dir"]), int(values["trainer.total_training_steps"])
        subprocess.run([sys.executable, str(helper), tiny_model_dir, str(root / f"global_step_{steps}" / "actor"),
                        "1", "29541"], check=True, capture_output=True)
        (root / "latest_checkpointed_iteration.txt").write_text(str(steps))
        with open(values["luffy.metrics_path"].strip("'"), "a") as fh:
            for step in range(steps):
                fh.write(json.dumps({"step": step, "reward/mean": 0.5}) + "\n")
        return 0

    monkeypatch.setattr(VerlEngine, "_launch", staticmethod(fake_verl))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative.db")
    settings = resolve_train_config("luffy", {}, {"engine": "verl", "steps": 3, "micro_batch_tokens": 16384})
    job = job_for("luffy", settings, train_parquet(8), tiny_model_dir, tmp_path)
    engine = VerlEngine()
    engine.train(job, sink=lambda m, s: None, run_id=lambda: "run-123")

    (command, env), = launched
    values = overrides_of(command)
    assert command[1:3] == ["-m", "verl.trainer.main_ppo"]
    assert env["VERL_USE_EXTERNAL_MODULES"] == "luffy.engines.verl.plugin" and env["MLFLOW_RUN_ID"] == "run-123"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{Path('relative.db').resolve()}"
    for name in ("VERL_USE_EXTERNAL_MODULES", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "VERL_FILE_LOGGER_PATH"):
        assert f"ray_kwargs.ray_init.runtime_env.env_vars.{name}" in values  # every Ray worker gets them too
    assert Path(values["trainer.default_local_dir"]).is_relative_to(job.work_dir.resolve())
    assert engine.resume_run_id(job.work_dir) == "run-123"
    manifest = json.loads((job.out_dir / "checkpoint.json").read_text())
    assert manifest["engine"] == "verl" and manifest["weights"] == "actor"
    assert manifest["selected"]["verl_global_step"] == 3
    assert (job.out_dir / "actor" / "model_world_size_1_rank_0.pt").exists()
    assert not list((job.out_dir / "actor").glob("optim_*"))
    assert [json.loads(line)["step"] for line in job.metrics_out.read_text().splitlines()] == [0, 1, 2]

    monkeypatch.setattr(VerlEngine, "_launch", staticmethod(lambda command, env: 3))
    from luffy.engines.verl.engine import VerlRunFailed
    with pytest.raises(VerlRunFailed, match="exited with status 3"):
        engine.train(job, sink=lambda m, s: None, run_id=lambda: "run-123")


def test_sft_runs_on_verls_sft_trainer_with_conversations_and_our_metric_names(tiny_model_dir, train_parquet,
                                                                              tmp_path, monkeypatch):
    import subprocess
    import sys

    helper = Path(__file__).parent / "helpers" / "write_fsdp_checkpoint.py"
    seen = {}

    def fake_sft(command, env):
        values = overrides_of(command)
        seen.update(command=command, train_files=values["data.train_files"].strip("'"))
        root, steps = Path(values["trainer.default_local_dir"]), int(values["trainer.total_training_steps"])
        subprocess.run([sys.executable, str(helper), tiny_model_dir, str(root / f"global_step_{steps}"), "1",
                        "29542"], check=True, capture_output=True)
        (root / "latest_checkpointed_iteration.txt").write_text(str(steps))
        with open(env["VERL_FILE_LOGGER_PATH"], "w") as fh:
            for step in range(1, steps + 1):
                fh.write(json.dumps({"step": step, "data": {"train/loss": 1.0 / step, "train/lr": 5e-5}}) + "\n")
        return 0

    monkeypatch.setattr(VerlEngine, "_launch", staticmethod(fake_sft))
    settings = resolve_train_config("sft", {}, {"engine": "verl", "algorithm": "sft", "steps": 2, "mini_batches": 1,
                                                "data_end": 0.5})
    job = job_for("sft", settings, train_parquet(8), tiny_model_dir, tmp_path)
    logged = []
    VerlEngine().train(job, sink=lambda m, s: logged.append((s, m)), run_id=lambda: None)
    assert seen["command"][1:3] == ["-m", "verl.trainer.sft_trainer_ray"]
    conversations = pd.read_parquet(seen["train_files"])
    assert len(conversations) == len(pd.read_parquet(job.data)) // 2  # data_end 0.5
    first = list(conversations["messages"].iloc[0])
    assert [m["role"] for m in first][-1] == "assistant" and "</think>" in first[-1]["content"]
    lines = [json.loads(line) for line in job.metrics_out.read_text().splitlines()]
    assert lines == [{"step": 0, "loss/sft": 1.0, "lr": 5e-5}, {"step": 1, "loss/sft": 0.5, "lr": 5e-5}]
    assert logged == [(0, {"loss/sft": 1.0, "lr": 5e-5}), (1, {"loss/sft": 0.5, "lr": 5e-5})]
