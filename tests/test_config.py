from pathlib import Path

import pytest
import yaml

from luffy.config import ConfigError, json_schema, load_config

REPO = Path(__file__).resolve().parents[1]


def minimal(**extra):
    raw = {"experiments": {"x": {"algorithm": "luffy"}}, "evaluation": {"suites": {"s": {"source": "toy:id"}}}}
    raw.update(extra)
    return raw


def test_demo_config_resolves_with_algorithm_defaults():
    with open(REPO / "config" / "config.yaml") as fh:
        cfg = load_config(yaml.safe_load(fh))
    assert cfg.models == ["base", "grpo", "sft", "luffy"]
    assert cfg.experiments["grpo"].n_off == 0 and cfg.experiments["grpo"].clip is True
    assert cfg.experiments["luffy"].n_off == 1 and cfg.experiments["luffy"].clip is False
    # train_defaults are shared; the constant normaliser defaults to the response budget
    assert cfg.experiments["sft"].steps == cfg.experiments["luffy"].steps
    assert cfg.experiments["luffy"].loss_constant == cfg.experiments["luffy"].max_response_tokens


@pytest.mark.parametrize("raw, key", [
    (minimal(experiments={"x": {"lrr": 1.0}}), "experiments.x.lrr"),
    (minimal(experiments={"x": {"lr": "fast"}}), "experiments.x.lr"),
    (minimal(train_defaults={"stepz": 3}), "train_defaults.stepz"),
    (minimal(evaluation={"suites": {"s": {"source": "toy:id", "n": "many"}}}), "evaluation.suites.s.n"),
    (minimal(base_model={"tiny": {"hidden_size": "big"}}), "base_model.tiny.hidden_size"),
    (minimal(unknown_section=1), "unknown_section"),
    (minimal(experiments={"x": {"algorithm": "ppo"}}), "experiments.x.algorithm"),
    (minimal(experiments={"x": {"algorithm": "grpo", "n_off": 1}}), "experiments.x.n_off"),
    (minimal(experiments={"x": {"mini_batches": 3, "prompts_per_step": 8}}), "experiments.x.mini_batches"),
    (minimal(experiments={"base": {}}), "experiments.base"),
    (minimal(evaluation={"backend": "tgi", "suites": {"s": {"source": "toy:id"}}}), "evaluation.backend"),
    (minimal(evaluation={"suites": {"s": {"source": "toy:test"}}}), "evaluation.suites.s.source"),
    (minimal(evaluation={"suites": {"s": {"source": "benchmark:aime26"}}}), "evaluation.suites.s.source"),
    (minimal(evaluation={"suites": {"s": {"source": "toy:id", "grader": "choice"}}}), "evaluation.suites.s.grader"),
    (minimal(evaluation={"suites": {"s": {"source": "toy:id", "local": "x.parquet"}}}), "evaluation.suites.s.local"),
    (minimal(evaluation={"grading": {"timeout_s": 0}, "suites": {"s": {"source": "toy:id"}}}),
     "evaluation.grading.timeout_s"),
    (minimal(data={"template": "alpaca"}), "data.template"),
    (minimal(validation={"every": 5}), "validation.every"),
    (minimal(validation={"select": "median"}), "validation.select"),
    (minimal(experiments={"x": {"algorithm": "sft", "teacher_logprobs": True}}), "experiments.x.teacher_logprobs"),
])
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(raw)


@pytest.mark.parametrize("raw, path", [
    (minimal(data={"traces": "/no/such/openr1.parquet"}), "/no/such/openr1.parquet"),
    (minimal(evaluation={"suites": {"s": {"source": "missing/aime.parquet"}}}), "missing/aime.parquet"),
    (minimal(base_model={"path": "./no/such/model"}), "./no/such/model"),
])
def test_missing_file_is_named(raw, path):
    with pytest.raises(ConfigError, match="file not found: " + path):
        load_config(raw)


def test_hub_model_id_is_not_checked_as_a_file():
    cfg = load_config(minimal(base_model={"path": "Qwen/Qwen2.5-Math-7B"}))
    assert cfg.root.base_model.path == "Qwen/Qwen2.5-Math-7B"


def test_shipped_json_schema_is_generated_from_the_dataclasses():
    shipped = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert shipped == json_schema(), "regenerate with: luffy schema > workflow/schemas/config.schema.yaml"


def test_json_schema_rejects_unknown_keys():
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="lrr"):
        jsonschema.validate(minimal(experiments={"x": {"lrr": 1.0}}), json_schema())


def test_validation_rides_in_the_train_settings_only_when_on():
    import json

    from luffy import workflow as wf

    off = load_config(minimal())
    name = next(iter(off.experiments))
    assert "validation" not in json.loads(wf.train_settings(off, name))  # old runs keep their settings
    assert wf.train_inputs(off) == [f"{off.root.results_dir}/data/train.parquet"]
    on = load_config(minimal(data={"validation_fraction": 0.1}, validation={"every": 5, "select": "best"}))
    settings = json.loads(wf.train_settings(on, name))
    assert settings["validation"]["every"] == 5 and settings["validation"]["data"].endswith("data/valid.parquet")
    assert wf.train_inputs(on)[1].endswith("data/valid.parquet")


def test_experiments_may_be_empty_to_evaluate_the_base_model_only():
    cfg = load_config({**minimal(), "experiments": {}})
    assert cfg.models == ["base"]
