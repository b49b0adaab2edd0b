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
