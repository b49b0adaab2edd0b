"""The teacher trace in its group, through verl 0.9.1's V1 rollout path, and our trainer's side.

Runs for real: a local Ray with verl's TransferQueue store; verl's ``AgentLoopWorkerTQ`` (its
own ``_run_prompt``: ``rollout.n`` sessions per prompt, post-processing, scoring through verl's
``RewardLoopWorker`` and our reward function, rows put into TransferQueue); verl's GRPO
estimator over those rows; our trainer's TransferQueue reads and writes (rl_sft advantages,
mini-batch totals, the step's metrics) on the same rows.

Stand-ins, for exact expectations on token layouts: the vLLM server (a fake that answers with
fixed token ids, the extra fields verl's server client adds, and records the requests), and the
Ray handle of the reward-loop worker (an in-process object with the same ``compute_score.remote``
call; the worker itself is verl's). That every row carries what verl's own loop stores, against
the real vLLM server, is tests/test_verl_e2e.py's (a stand-in proves only what it records).
"""

from __future__ import annotations

import asyncio
import json

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

ANSWER = "<think>\nsome steps\n</think>\nThe answer is \\boxed{7}."  # not a toy answer: reward 0


@pytest.fixture(scope="module")
def transfer_queue():
    """A local Ray with verl's TransferQueue store (one storage unit), as the V1 trainer starts it."""
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf

    from luffy.engines.verl.compose import compose

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = compose("ppo_trainer", []).transfer_queue
    OmegaConf.set_struct(config, False)
    config.backend.SimpleStorage.num_data_storage_units = 1
    tq.init(config)
    yield tq
    tq.close()
    ray.shutdown()


class FakeServer:
    """Stands in for the vLLM server: answers every request with fixed token ids (capped at
    ``max_tokens``) and records what it was asked."""

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.requests: list[dict] = []
        self.version = 0  # the weight version verl's trainer set (the step before the one rolled out)

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.requests.append({"prompt_ids": list(prompt_ids), "max_tokens": sampling_params.get("max_tokens")})
        version = self.version  # what verl's server and its client (llm_server.py:160-162) put on every output
        return TokenOutput(token_ids=self.ids[: sampling_params.get("max_tokens", len(self.ids))],
                           extra_fields={"global_steps": version, "min_global_steps": version,
                                         "max_global_steps": version})


class RewardHandle:
    """Stands in for the Ray handle of a reward-loop worker: ``compute_score.remote(data)`` runs
    verl's ``RewardLoopWorker.compute_score`` in this process."""

    def __init__(self, config):
        from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

        worker = RewardLoopWorker(config)
        self.compute_score = type("Method", (), {"remote": staticmethod(worker.compute_score)})()


class Rollout:
    """One experiment's config, a fake server and verl's V1 agent-loop worker on it."""

    def __init__(self, tiny_model_dir, data, tmp_path, **settings):
        from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

        import luffy.engines.verl.plugin  # noqa: F401  (what VERL_USE_EXTERNAL_MODULES imports on a Ray worker)

        self.settings = resolve_train_config("exp", {}, {
            "engine": "verl", "n": 4, "max_response_tokens": 200, "micro_batch_tokens": 4096, "prompts_per_step": 2,
            "mini_batches": 1, **settings})
        runtime = VerlConfig(rollout_tensor_parallel=1, max_prompt_tokens=512)
        job = TrainJob(experiment="exp", settings=self.settings, data=data, base_model=tiny_model_dir,
                       out_dir=tmp_path / "final", metrics_out=tmp_path / "m.jsonl", work_dir=tmp_path / "work",
                       runtime=to_dict(runtime), gpus=1)
        self.config = validated_ppo(VerlEngine().overrides(job)[1])
        self.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        self.server = FakeServer(self.tokenizer, ANSWER)
        # verl's worker class itself (without the Ray actor wrapper): its __init__ joins the TransferQueue
        self.worker = AgentLoopWorkerTQ.__ray_actor_class__(self.config, self.server, None,
                                                            [RewardHandle(self.config)])
        self.expected = load_train_data(data, self.tokenizer)

    def run(self, tq, frame: pd.DataFrame, step: int = 1):
        """What the trainer and ``AgentLoopWorkerTQ.generate_sequences`` do for a batch of prompts:
        register each prompt in TransferQueue, run ``_run_prompt`` for it; returns the batch's
        rows as verl's trainer samples them (a KVBatchMeta) and their fields by key."""
        from transfer_queue import KVBatchMeta

        rollout = self.config.actor_rollout_ref.rollout
        params = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                      repetition_penalty=1.0, logprobs=rollout.calculate_log_probs)
        uids = [f"s{step}p{i}" for i in range(len(frame))]
        self.server.version = step - 1
        tq.kv_batch_put(keys=uids, partition_id="train",
                        tags=[{"is_prompt": True, "status": "pending", "global_steps": step} for _ in uids])

        async def go():
            for uid, row in zip(uids, frame.to_dict(orient="records")):
                prompt = {**row, "raw_prompt": list(row["prompt"]), "uid": uid, "index": row["extra_info"]["index"],
                          "global_steps": step, "agent_name": rollout.agent.default_agent_loop}
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


def test_teacher_trace_joins_its_group_and_verls_grpo_advantages_equal_ours(tiny_model_dir, train_parquet, tmp_path,
                                                                            transfer_queue, loop):
    from verl import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    data = train_parquet(4)
    rollout = Rollout(tiny_model_dir, data, tmp_path, algorithm="luffy")
    n = rollout.settings.n
    batch, rows = rollout.run(transfer_queue, pd.read_parquet(data).iloc[:2])
    assert len(rows) == 2 * n  # every session of every prompt, one row each
    for p in range(2):
        trace = rollout.expected.trace_ids[p]
        teacher = rows[f"s1p{p}_0_0"]
        assert teacher["responses"].tolist() == trace  # the trace's tokens + EOS, not generated
        assert teacher[OFF_POLICY_MASK].tolist() == [1] * len(trace) == teacher["response_mask"].tolist()
        assert teacher["prompts"].tolist() == rollout.expected.prompt_ids[p]
        for s in range(1, n):
            member = rows[f"s1p{p}_{s}_0"]
            assert member["responses"].tolist() == rollout.server.ids and int(member[OFF_POLICY_MASK].sum()) == 0
            assert str(member["uid"]) == f"s1p{p}"
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


def test_partial_prefix_members_continue_the_trace_prefix(tiny_model_dir, train_parquet, tmp_path, transfer_queue,
                                                          loop):
    data = train_parquet(4)
    rollout = Rollout(tiny_model_dir, data, tmp_path, algorithm="luffy", n_off=2, prefix_strategy="fixed",
                      prefix_ratio_min=0.5, prefix_ratio_max=1.0)
    _, rows = rollout.run(transfer_queue, pd.read_parquet(data).iloc[:1], step=2)
    trace = rollout.expected.trace_ids[0]
    full, partial = rows["s2p0_0_0"], rows["s2p0_1_0"]
    assert full["responses"].tolist() == trace and int(full[OFF_POLICY_MASK].sum()) == len(trace)
    k = (len(trace) - 1) // 2
    assert partial["responses"].tolist() == trace[:k] + rollout.server.ids
    assert partial[OFF_POLICY_MASK].tolist() == [1] * k + [0] * len(rollout.server.ids)
    continuation = [r for r in rollout.server.requests if r["prompt_ids"][-k:] == trace[:k]]
    assert continuation[0]["max_tokens"] == rollout.config.actor_rollout_ref.rollout.response_length - k


def test_teacher_log_probs_ride_on_the_teacher_tokens(tiny_model_dir, train_parquet, tmp_path, transfer_queue, loop):
    data = train_parquet(4)
    frame = pd.read_parquet(data).iloc[:1]
    trace = load_train_data(data, AutoTokenizer.from_pretrained(tiny_model_dir)).trace_ids[0]
    values = [-0.01 * (i + 1) for i in range(len(trace) - 1)]  # scored without the EOS
    frame = frame.assign(teacher_logprobs=[values])
    frame.to_parquet(tmp_path / "scored.parquet")
    rollout = Rollout(tiny_model_dir, str(tmp_path / "scored.parquet"), tmp_path, algorithm="luffy",
                      teacher_logprobs=True)
    _, rows = rollout.run(transfer_queue, frame, step=3)
    assert rows["s3p0_0_0"][TEACHER_LOG_PROB].tolist() == pytest.approx(values + [0.0])
    assert float(rows["s3p0_1_0"][TEACHER_LOG_PROB].abs().sum()) == 0


def test_rl_sft_trace_rows_advantages_totals_and_step_metrics_through_the_trainer(tiny_model_dir, train_parquet,
                                                                                  tmp_path, transfer_queue, loop,
                                                                                  monkeypatch):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from luffy.engines.verl.trainer import LuffyTrainer, minibatch_of_rows, split_baseline_advantages

    data = train_parquet(4)
    rollout = Rollout(tiny_model_dir, data, tmp_path, algorithm="rl_sft")
    n = rollout.settings.n
    assert rollout.config.actor_rollout_ref.rollout.n == n + 1
    batch, rows = rollout.run(transfer_queue, pd.read_parquet(data).iloc[:2], step=4)
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
    assert metrics["response_length/on_policy"] == len(rollout.server.ids)
    assert metrics["grad_norm"] == 1.5 and metrics["step_time_s"] == 2.0
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 3 and line["reward/mean"] == 0.0
