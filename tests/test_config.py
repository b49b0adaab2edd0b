import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from luffy.config import ConfigError, json_schema, load_config

REPO = Path(__file__).resolve().parents[1]
MICRO = Path(__file__).with_name("micro.yaml")


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
    (minimal(experiments={"x": {"rollout": "sglang"}}), "experiments.x.rollout"),
    (minimal(experiments={"x": {"rollout_is_cap": 2.0}}), "experiments.x.rollout_is_cap"),  # hf: nothing to correct
    (minimal(experiments={"x": {"rollout": "hf", "rollout_memory": 0.2}}), "experiments.x.rollout_memory"),
    (minimal(experiments={"x": {"rollout": "vllm", "rollout_is_cap": 0.5}}), "experiments.x.rollout_is_cap"),
    (minimal(experiments={"x": {"rollout": "vllm", "rollout_is_cap": -1.0}}), "experiments.x.rollout_is_cap"),
    (minimal(experiments={"x": {"rollout": "vllm", "rollout_memory": 0}}), "experiments.x.rollout_memory"),
    (minimal(experiments={"x": {"rollout": "vllm", "rollout_is_cap": "2"}}), "experiments.x.rollout_is_cap"),
    (minimal(experiments={"x": {"algorithm": "sft", "rollout": "vllm"}}), "experiments.x.rollout"),
    (minimal(experiments={"x": {"engine": "verl", "device": "cpu", "rollout": "hf"}}), "experiments.x.rollout"),
    (minimal(experiments={"x": {"engine": "verl", "device": "cpu", "rollout_memory": 0.3}}),
     "experiments.x.rollout_memory"),
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


@pytest.fixture(scope="module")
def schema_validator():
    """One validator of the published schema for the module (``jsonschema.validate`` checks the
    schema itself against its metaschema on every call: a quarter second each)."""
    import jsonschema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


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


def _sections():
    """(a raw-config path prefix, its settings class) for every section a config can hold."""
    from luffy.config import Config, EvaluationConfig, ExternalModelConfig, JobResources, SuiteConfig, TrainConfig
    out = [("train_defaults", TrainConfig), ("experiments.x", TrainConfig), ("resources.default", JobResources),
           ("resources.stages.train", JobResources), ("resources.experiments.x", JobResources),
           ("evaluation.suites.s", SuiteConfig), ("evaluation.models.m", ExternalModelConfig)]
    stack = [("", Config)]
    while stack:
        prefix, cls = stack.pop()
        out.append((prefix, cls))
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint) and hint is not JobResources:  # resources.default: listed above
                stack.append((f"{prefix}.{name}".lstrip("."), hint))
    assert EvaluationConfig in {cls for _, cls in out}
    return out


def _outside(valid, kind):
    """A value just outside a field's valid values (None where every value of the type is valid)."""
    if valid.choices is not None:
        return "bogus"
    if valid.nonempty:
        return " "
    if valid.pattern is not None:
        return "not an id"
    if valid.low is not None:
        return valid.low - 1 if kind is int else valid.low - (0 if valid.low_open else 0.5)
    if valid.high is not None:
        return valid.high + 1 if kind is int else valid.high + (0 if valid.high_open else 0.5)
    return None


def _cases():
    cases = []
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            valid = f.metadata.get("valid")
            kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            value = _outside(valid, kind) if valid is not None and typing.get_origin(kind) is not dict else None
            if value is not None:
                cases.append(pytest.param(f"{prefix}.{f.name}".lstrip("."), [value] if f.name == "seeds" else value,
                                          id=f"{prefix}.{f.name}"))
    return cases


def _set(raw, key, value):
    *parents, last = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[last] = value


@pytest.mark.parametrize("key, value", _cases())
def test_every_range_is_enforced_alike_by_the_loader_and_the_schema(key, value, schema_validator):
    """Each setting just outside its stated valid values: the loader names the key, the value
    and the range in one line, and the published JSON schema (Snakemake's check) refuses it too."""
    import jsonschema

    raw = minimal(resources={"experiments": {"x": {}}})
    _set(raw, key, value)
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message
    assert "is not" in message and repr(value if key != "seeds" else value[0]) in message
    with pytest.raises(jsonschema.ValidationError):
        schema_validator.validate(raw)


def test_every_setting_states_its_valid_values():
    from luffy.config import SETTING_SECTIONS, BenchmarkSpec

    classes = {cls for _, cls in _sections()} | {BenchmarkSpec}
    assert classes == {cls for _, cls in SETTING_SECTIONS}, "add the section to SETTING_SECTIONS"
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] not in (bool, typing.Optional[bool]) and not dataclasses.is_dataclass(hints[f.name]):
                assert "valid" in f.metadata, f"{cls.__name__}.{f.name} states no valid values"


def test_config_readme_holds_the_generated_settings_reference():
    from luffy.config import SETTINGS_BEGIN, SETTINGS_END, settings_reference

    text = (REPO / "config" / "README.md").read_text()
    block = text[text.index(SETTINGS_BEGIN) + len(SETTINGS_BEGIN):text.index(SETTINGS_END)]
    assert block.strip() == settings_reference().strip(), "regenerate with: luffy settings --update config/README.md"


@pytest.mark.parametrize("raw, message", [
    (minimal(train_defaults={"steps": "5"}), "'train_defaults.steps': '5' (str) is not an integer"),
    (minimal(train_defaults={"lr": "1e-4"}), "YAML reads 1e-4 as a string"),
    (minimal(train_defaults={"std_normalize": "yes"}), "'train_defaults.std_normalize': 'yes' (str) is not true or false"),
    (minimal(experiments={"x": {"lrr": 1.0}}), "'experiments.x.lrr': unknown setting; did you mean 'lr'?"),
    (minimal(evaluation={"suites": {"s": {"source": "toy:id", "temperature": 0.0, "n": 4}}}),
     "'evaluation.suites.s.temperature': 0 (greedy) gives 4 identical samples"),
    (minimal(data={"toy": {"min_ops": 3, "max_ops": 2}}), "'data.toy.min_ops': 3 is not <= max_ops=2"),
    (minimal(data={"toy": {"wrong_rate": 0.5, "incomplete_rate": 0.5, "verbose_rate": 0.5}}),
     "'data.toy.verbose_rate': wrong_rate + incomplete_rate + verbose_rate = 1.5 is not <= 1"),
])
def test_malformed_values_are_refused_never_coerced(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert message in str(err.value)


def test_greedy_evaluation_with_one_sample_is_valid():
    cfg = load_config(minimal(evaluation={"suites": {"s": {"source": "toy:id", "temperature": 0.0, "n": 1}}}))
    assert cfg.root.evaluation.suites["s"].temperature == 0.0


def test_seeds_vary_the_built_base_model_unless_told_otherwise():
    cfg = load_config(minimal(seeds=[0, 3]))
    assert cfg.root.seed_scope == "base" and cfg.base_models == ["base-seed0", "base-seed3"]
    assert cfg.models == ["base-seed0", "base-seed3", "x-seed0", "x-seed3"]
    assert cfg.base_of("x-seed3") == "base-seed3"
    fixed = load_config(minimal(seeds=[0, 3], seed_scope="training"))
    assert fixed.base_models == ["base"] and fixed.base_of("x-seed3") == "base"
    given = load_config(minimal(seeds=[0, 3], base_model={"path": "Qwen/Qwen2.5-Math-7B"}))
    assert given.root.seed_scope == "training" and given.base_models == ["base"]
    with pytest.raises(ConfigError, match="'seed_scope': 'base' re-seeds the pre-training of the tiny base model"):
        load_config(minimal(seeds=[0], seed_scope="base", base_model={"path": "Qwen/Qwen2.5-Math-7B"}))
    assert load_config(minimal()).base_models == ["base"]  # no seeds: one base model


@pytest.mark.parametrize("pair", ["x vs y", "x - base", "x vs x", "x vs base vs x"])
def test_report_comparisons_name_two_experiments(pair):
    with pytest.raises(ConfigError, match=r"'report.compare\[0\]'"):
        load_config(minimal(report={"compare": [pair]}))
    assert load_config(minimal(report={"compare": ["x vs base"]})).root.report.compare == ["x vs base"]


@pytest.mark.parametrize("models, expected", [
    ({"x": {"hub": "a/b", "path": "/p"}}, "give exactly one of hub (a HuggingFace id) or path"),
    ({"x": {}}, "give exactly one of hub (a HuggingFace id) or path"),
    ({"x": {"path": "/p", "revision": "v1"}}, "'evaluation.models.x.revision': a revision applies to a hub model"),
    ({"x": {"hub": "nohub"}}, "'evaluation.models.x.hub': 'nohub' is not '<owner>/<name>'"),
    ({"luffy": {"hub": "a/b"}}, "'luffy' is also an experiment"),
    ({"base": {"hub": "a/b"}}, "names must be [A-Za-z0-9_-], not 'base', 'data' or 'report'"),
    ({"report": {"hub": "a/b"}}, "not 'base', 'data' or 'report' (shared MLflow groups)"),
    ({"x-seed1": {"hub": "a/b"}}, "not end in -seed<N>"),
    ({"x": {"hub": "a/b", "max_model_len": "5"}}, "'evaluation.models.x.max_model_len': '5' (str) is not an integer"),
    ({"x": {"hub": "a/b", "max_model_len": 0}}, "'evaluation.models.x.max_model_len': 0 is not >= 1"),
    ({"x": {"hub": "a/b", "dtype": "fp8"}}, "'evaluation.models.x.dtype': 'fp8' is not one of auto"),
    ({"x": {"hub": "a/b", "chat_template": "nope.jinja"}}, "'evaluation.models.x.chat_template': file not found"),
    ({"x": {"hub": "a/b", "revison": "v"}}, "did you mean 'revision'?"),
])
def test_external_models_are_checked_before_any_job(models, expected):
    raw = yaml.safe_load(MICRO.read_text())
    raw["evaluation"]["models"] = models
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert expected in str(err.value)


def test_an_experiment_cannot_take_the_name_of_a_shared_group():
    raw = yaml.safe_load(MICRO.read_text())
    raw["experiments"]["data"] = {"algorithm": "grpo"}
    with pytest.raises(ConfigError, match="'experiments.data': names must be"):
        load_config(raw)


def test_external_models_join_the_evaluated_models_and_change_no_other_settings():
    from luffy import workflow as wf

    raw = yaml.safe_load(MICRO.read_text())
    own = load_config(raw)
    raw["evaluation"]["models"] = {"qwen": {"hub": "Qwen/Qwen2.5-Math-7B-Instruct", "revision": "main"},
                                   "mine": {"path": "/nowhere/yet", "system_prompt": "Reason."}}
    cfg = load_config(raw)
    assert cfg.models == [*own.models, "qwen", "mine"] and cfg.own_models == own.models
    assert cfg.external_models["qwen"].source == "hub:Qwen/Qwen2.5-Math-7B-Instruct@main"
    assert cfg.external_models["mine"].source == "path:/nowhere/yet"  # checked when its job starts
    # the own models' evaluations keep exactly their settings: adding an external model reruns none
    assert all(wf.eval_settings(cfg, m) == wf.eval_settings(own, m) for m in own.models)
    assert json.loads(wf.eval_settings(cfg, "mine"))["external"]["system_prompt"] == "Reason."
    assert (wf.model_path(cfg, "qwen"), wf.model_path(cfg, "mine")) == ("Qwen/Qwen2.5-Math-7B-Instruct", "/nowhere/yet")
    assert wf.model_inputs(cfg, "mine") == [] and wf.teacher_traces_models(cfg) == []


def test_reading_a_config_imports_no_engine_and_no_torch():
    """The config package imports nothing of luffy.engines (no import circle through the
    registry) and stays light; the registry reads the engine table from the config."""
    import subprocess
    import sys

    code = ("import sys, luffy.config; print(sorted(m for m in sys.modules if m.startswith(('luffy.engines', "
            "'torch', 'verl', 'transformers'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    from luffy.config.engines import ENGINE_NAMES
    from luffy.engines import registry

    assert registry.ENGINE_NAMES is ENGINE_NAMES and set(registry.ENGINES) == set(ENGINE_NAMES)


def test_rollout_settings_resolve_per_sampler_and_stay_out_of_default_runs_settings():
    """rollout null: hf on the local engine, vllm on verl; the vLLM rollout settings get their
    defaults only with rollout vllm, and a run on the default sampler keeps the settings it had
    before they existed (no rerun, the same work directory)."""
    from luffy.config import train_settings_dict

    cfg = load_config(minimal(experiments={"hf": {}, "v": {"rollout": "vllm"},
                                           "capped": {"rollout": "vllm", "rollout_is_cap": 0}}))
    hf, v, capped = (cfg.experiments[name] for name in ("hf", "v", "capped"))
    assert (hf.rollout, hf.rollout_is_cap, hf.rollout_memory) == ("hf", None, None)
    assert (v.rollout, v.rollout_is_cap, v.rollout_memory) == ("vllm", 2.0, 0.3)
    assert capped.rollout_is_cap == 0  # no correction, stated
    assert not {"rollout", "rollout_is_cap", "rollout_memory"} & set(train_settings_dict(hf))
    assert {k: train_settings_dict(v)[k] for k in ("rollout", "rollout_is_cap", "rollout_memory")} == {
        "rollout": "vllm", "rollout_is_cap": 2.0, "rollout_memory": 0.3}
