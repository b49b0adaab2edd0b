"""The verl engine against the real verl 0.9.1 package, on the CPU: configs, reward, launch.

What runs for real: verl's Hydra configs and checks (compose, ``validate_config``, the dataclass
conversions), its reward-loop worker and reward manager calling our reward function, its
external-module plug-in mechanism, and its checkpoint manager writing the checkpoints that the
engine collects. Stand-in: verl's training process of a GPU job (a cuda run cannot exist on the
CPU); the fake leaves behind what a finished run leaves. verl's own loop runs for real on the CPU
in tests/test_verl_e2e.py.
"""

from __future__ import annotations

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


from luffy.config import ConfigError, VerlConfig, job_resources, load_config, resolve_train_config, to_dict
from luffy.engines.base import TrainJob
from luffy.engines.verl.compose import VerlConfigError, validated_ppo, validated_sft
from luffy.engines.verl.engine import VerlEngine
from luffy.engines.verl.overrides import check_extra_overrides

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "experiments" / "paper_qwen2.5_math_7b.yaml"
VERL_TOY = REPO / "config" / "verl_toy.yaml"


def job_for(name: str, settings, data: str, model: str, work: Path, runtime: VerlConfig | None = None,
            nodes: int = 1, gpus: int = 8) -> TrainJob:
    return TrainJob(experiment=name, settings=settings, data=data, base_model=model, out_dir=work / "final",
                    metrics_out=work / "metrics.jsonl", work_dir=work / "work",
                    runtime=to_dict(runtime or VerlConfig()), nodes=nodes, gpus=gpus)


# ---- configs: every shipped verl experiment composes and validates with verl's own config ----

def shipped_verl_experiments():
    for path in sorted((REPO / "config").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict) or "experiments" not in raw:
            continue
        engines = {(raw.get("train_defaults") or {}).get("engine")}
        engines |= {(e or {}).get("engine") for e in (raw["experiments"] or {}).values()}
        if "verl" not in engines:  # (other configs may read files outside the repository, e.g. ../shared)
            continue
        resolved = load_config(raw)
        for name, settings in resolved.experiments.items():
            if settings.engine == "verl":
                yield pytest.param(resolved, name, path == PAPER, id=f"{path.stem}:{name}")


@pytest.mark.parametrize("resolved,name,paper", list(shipped_verl_experiments()))
def test_shipped_verl_experiments_compose_and_validate(resolved, name, paper, tiny_model_dir, train_parquet,
                                                       tmp_path):
    settings = resolved.experiments[name]
    # the workflow's prepared base model stands in as the tiny model (its config and tokenizer are read)
    resources = job_resources(resolved.root, "train", name)
    job = job_for(name, settings, train_parquet(8), tiny_model_dir, tmp_path, resolved.root.verl,
                  nodes=resources.nodes, gpus=resources.gpus * resources.nodes)
    entry, overrides = VerlEngine().overrides(job)
    if settings.algorithm == "sft":
        config = validated_sft(overrides)
        assert entry == "verl.trainer.sft_trainer_ray"
        assert config.optim.lr == settings.lr and config.data.train_batch_size == settings.prompts_per_step
        assert config.trainer.total_training_steps == settings.steps * settings.mini_batches
        assert config.engine.strategy == "fsdp2"  # on GPUs as on the CPU: the rehearsed strategy
        return
    config = validated_ppo(overrides)
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    assert actor.strategy == config.actor_rollout_ref.ref.strategy == "fsdp2"  # the rehearsed strategy
    assert entry == "verl.trainer.main_ppo" and config.trainer.v1.trainer_mode == "luffy" and config.trainer.use_v1
    assert (config.data.train_batch_size, actor.ppo_mini_batch_size) == (
        settings.prompts_per_step, settings.prompts_per_step // settings.mini_batches)
    assert config.data.max_response_length == settings.max_response_tokens
    assert rollout.n == settings.n + (settings.algorithm == "rl_sft")
    assert actor.ppo_max_token_len_per_gpu >= resolved.root.verl.max_prompt_tokens + settings.max_response_tokens
    assert config.reward.custom_reward_function.path == "pkg://luffy.engines.verl.reward"
    if not paper:
        return
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
    six_gpus = {**raw["resources"], "stages": {**raw["resources"]["stages"], "train": {"gpus": 6}}, "experiments": {}}
    with pytest.raises(ConfigError, match="mini_batches': a mini-batch of 448 sequences does not split evenly"):
        load_config({**raw, "resources": six_gpus, "experiments": {"luffy": {"algorithm": "luffy", "n": 7}}})
    with pytest.raises(ConfigError, match="rollout_tensor_parallel=3 does not divide its 8 GPUs"):
        load_config({**raw, "verl": {**raw["verl"], "rollout_tensor_parallel": 3}})
    no_gpus = {**raw["resources"], "stages": {}, "experiments": {}}
    with pytest.raises(ConfigError, match="verl trains on GPUs"):
        load_config({**raw, "resources": no_gpus})


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


# ---- the reward, called the way verl's reward-loop worker calls it ----

def experiment(tiny_model_dir, data, tmp_path, **settings):
    """A small verl experiment and its composed, validated ppo_trainer config."""
    cfg = resolve_train_config("exp", {}, {"engine": "verl", "n": 4, "max_response_tokens": 200,
                                           "micro_batch_tokens": 4096, "prompts_per_step": 2, "mini_batches": 1,
                                           **settings})
    runtime = VerlConfig(rollout_tensor_parallel=1, max_prompt_tokens=512)
    job = job_for("exp", cfg, data, tiny_model_dir, tmp_path, runtime, gpus=1)
    return cfg, validated_ppo(VerlEngine().overrides(job)[1])


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


# ---- train on GPUs: verl's process stands in (a cuda run cannot exist on the CPU; the CPU mode runs for
# real in tests/test_verl_e2e.py); what the engine launches for a GPU job and collects is real ----

def overrides_of(command: list[str]) -> dict[str, str]:
    return {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in command if "=" in o}


def test_train_launches_verl_with_the_plugins_and_collects_its_last_checkpoint(tiny_model_dir, train_parquet,
                                                                               tmp_path, monkeypatch):
    import subprocess
    import sys

    helper = Path(__file__).parent / "helpers" / "write_fsdp_checkpoint.py"
    launched = []

    def fake_verl(command, env, nodes, gpus, watch):
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
    # Ray's processes inherit the environment; none of it is in verl's config, which its MLflow logger records
    # as the run's parameters (a resumed run could not change them)
    assert not [key for key in values if key.startswith("ray_kwargs.ray_init.runtime_env")]
    assert env["VERL_FILE_LOGGER_PATH"] == str(job.work_dir.resolve() / "verl_log" / "current.jsonl")
    assert Path(values["trainer.default_local_dir"]).is_relative_to(job.work_dir.resolve())
    assert engine.resume_run_id(job.work_dir) == "run-123"
    manifest = json.loads((job.out_dir / "checkpoint.json").read_text())
    assert manifest["engine"] == "verl" and manifest["weights"] == "actor"
    assert manifest["selected"]["verl_global_step"] == 3
    assert (job.out_dir / "actor" / "model_world_size_1_rank_0.pt").exists()
    assert not list((job.out_dir / "actor").glob("optim_*"))
    assert [json.loads(line)["step"] for line in job.metrics_out.read_text().splitlines()] == [0, 1, 2]

    monkeypatch.setattr(VerlEngine, "_launch", staticmethod(lambda command, env, nodes, gpus, watch: 3))
    from luffy.engines.verl.engine import VerlRunFailed
    with pytest.raises(VerlRunFailed, match="exited with status 3"):
        engine.train(job, sink=lambda m, s: None, run_id=lambda: "run-123")


def test_sft_runs_on_verls_sft_trainer_with_conversations_and_our_metric_names(tiny_model_dir, train_parquet,
                                                                              tmp_path, monkeypatch):
    import subprocess
    import sys

    helper = Path(__file__).parent / "helpers" / "write_fsdp_checkpoint.py"
    seen = {}

    def fake_sft(command, env, nodes, gpus, watch):
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


def test_fsdp1_stays_selectable_on_gpus_and_is_refused_on_the_cpu_and_named_by_the_rehearsal(tiny_model_dir,
                                                                                             train_parquet, tmp_path):
    from luffy.rehearsal import Scale, describe, rehearsal_config

    settings = resolve_train_config("luffy", {}, {"engine": "verl", "micro_batch_tokens": 16384})
    job = job_for("luffy", settings, train_parquet(8), tiny_model_dir, tmp_path, VerlConfig(strategy="fsdp"))
    actor = validated_ppo(VerlEngine().overrides(job)[1]).actor_rollout_ref.actor
    assert actor.strategy == "fsdp"
    raw = yaml.safe_load(VERL_TOY.read_text())
    raw["train_defaults"]["device"] = "cpu"
    raw["verl"] = {**raw.get("verl", {}), "attn_implementation": "sdpa", "rollout_tensor_parallel": 1}
    load_config(raw)  # FSDP2 (the default) on the CPU
    with pytest.raises(ConfigError, match="'experiments.luffy.device': verl on the CPU needs verl.strategy: fsdp2"):
        load_config({**raw, "verl": {**raw["verl"], "strategy": "fsdp"}})
    paper = yaml.safe_load(PAPER.read_text())
    paper["verl"] = {**paper.get("verl", {}), "strategy": "fsdp"}
    rehearsal = rehearsal_config(paper, Scale())
    assert rehearsal["verl"]["strategy"] == "fsdp2"
    assert "the GPU run's FSDP1 (verl.strategy: fsdp) is not rehearsed" in describe(paper, rehearsal, Scale())
