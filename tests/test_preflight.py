"""The preflight before a training run, and the prepared base model (config overrides, chat template)."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoConfig, AutoTokenizer

from luffy.config import ConfigError, resolve_train_config
from luffy.engines.base import TrainJob
from luffy.models.prepare import prepare_base_model
from luffy.preflight import PreflightError, preflight

THINK_OPEN_TEMPLATE = ("{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                       "+ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
                       "{{ '<|im_start|>assistant\\n<think>' }}{%- endif -%}")


def job(data: str, model: str, tmp_path: Path, **settings) -> TrainJob:
    cfg = resolve_train_config("exp", {}, {"max_response_tokens": 200, **settings})
    return TrainJob(experiment="exp", settings=cfg, data=data, base_model=model, out_dir=tmp_path / "final",
                    metrics_out=tmp_path / "m.jsonl", work_dir=tmp_path / "work")


def rewrite(path: str, out: Path, column: str, change) -> str:
    frame = pd.read_parquet(path)
    frame[column] = [change(v) for v in frame[column]]
    frame.to_parquet(out)
    return str(out)


def test_preflight_passes_good_data_and_measures_it(tiny_model_dir, train_parquet, tmp_path):
    data = train_parquet(12)
    figures = preflight(job(data, tiny_model_dir, tmp_path))
    assert figures["teacher_reward"] == 1.0 and figures["rows"] == len(pd.read_parquet(data))
    assert 0 < figures["longest_prompt_tokens"] and 0 < figures["longest_trace_tokens"] <= 200


def test_preflight_names_what_would_fail_hours_later(tiny_model_dir, train_parquet, tmp_path):
    data = train_parquet(12)
    with pytest.raises(PreflightError, match="do not fit the base model's context of 512 tokens"):
        preflight(job(data, tiny_model_dir, tmp_path, max_response_tokens=500))
    with pytest.raises(PreflightError, match=r"teacher trace\(s\) \[0, 1, 2, 3, 4 \.\.\.\] \(\+EOS\) exceed "
                                             "max_response_tokens=8"):
        preflight(job(data, tiny_model_dir, tmp_path, max_response_tokens=8))
    preflight(job(data, tiny_model_dir, tmp_path, algorithm="grpo", max_response_tokens=8))  # no traces as responses

    wrong = rewrite(data, tmp_path / "wrong.parquet", "reward_model", lambda v: {**v, "ground_truth": "-12345"})
    with pytest.raises(PreflightError, match=r"scores only 0\.0% of \d+ sampled teacher traces correct .*row 0: wrong"):
        preflight(job(wrong, tiny_model_dir, tmp_path))
    preflight(job(wrong, tiny_model_dir, tmp_path, algorithm="sft"))  # SFT needs no reward

    unclosed = rewrite(data, tmp_path / "unclosed.parquet", "target",
                       lambda v: [{**v[0], "content": v[0]["content"].replace("</think>", "")}])
    with pytest.raises(PreflightError, match="never close their reasoning with </think>"):
        preflight(job(unclosed, tiny_model_dir, tmp_path))


def test_a_template_ending_with_think_gets_traces_without_a_second_one(tiny_model_dir, train_parquet, tmp_path):
    template = tmp_path / "think.jinja"
    template.write_text(THINK_OPEN_TEMPLATE)
    model = tmp_path / "model"
    prepare_base_model(tiny_model_dir, {}, str(template), model)
    data = train_parquet(12)  # the toy traces start with "<think>\n"; this template ends with "<think>", no newline
    with pytest.raises(PreflightError, match="generation prompt ends with <think> and trace"):
        preflight(job(data, str(model), tmp_path))
    stripped = rewrite(data, tmp_path / "stripped.parquet", "target",
                       lambda v: [{**v[0], "content": v[0]["content"][len("<think>"):]}])
    assert preflight(job(stripped, str(model), tmp_path))["teacher_reward"] == 1.0


def test_prepared_base_model_has_the_overrides_and_template_and_shares_the_weights(tiny_model_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(THINK_OPEN_TEMPLATE)
    out = tmp_path / "base"
    changed = prepare_base_model(tiny_model_dir, {"max_position_embeddings": 1024, "rope_theta": 40000.0},
                                 str(template), out)
    assert changed["max_position_embeddings"] == {"from": 512, "to": 1024}
    config = AutoConfig.from_pretrained(out)
    assert config.max_position_embeddings == 1024 and config.rope_parameters["rope_theta"] == 40000.0
    assert AutoTokenizer.from_pretrained(out).chat_template == THINK_OPEN_TEMPLATE
    weights = next(Path(tiny_model_dir).glob("*.safetensors"))
    assert os.stat(weights).st_ino == os.stat(out / weights.name).st_ino  # hard-linked, not copied
    assert json.loads((out / "luffy_base.json").read_text())["source"] == tiny_model_dir
    with pytest.raises(ConfigError, match=r"\['no_such_key'\] are not keys of"):
        prepare_base_model(tiny_model_dir, {"no_such_key": 1}, None, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_vllm_rollouts_without_vllm_are_refused_before_any_work(tiny_model_dir, train_parquet, tmp_path, monkeypatch):
    import importlib.util

    from luffy.engines.local.engine import LocalEngine

    data = train_parquet(12)
    vllm_job = job(data, tiny_model_dir, tmp_path, rollout="vllm")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PreflightError, match="rollout: vllm needs vLLM in this environment"):
        preflight(vllm_job, LocalEngine())
    preflight(job(data, tiny_model_dir, tmp_path), LocalEngine())  # rollout hf needs no vLLM
