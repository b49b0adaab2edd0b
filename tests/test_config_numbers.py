"""NaN, infinity and huge seeds, in every numeric setting, through the loader (what
``luffy check-config`` and Snakemake run), the published JSON schema and the CLI's options.

NaN fails no comparison, so a range check written with < and > admitted it: ``lr: .nan`` passed
and training died at step 0. Seeds had no upper bound and overflowed ``torch.manual_seed``."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from luffy.config import SETTING_SECTIONS, ConfigError, load_config
from luffy.seeding import SEED_MAX, derived_seed

REPO = Path(__file__).resolve().parents[1]
MICRO = yaml.safe_load((Path(__file__).with_name("micro.yaml")).read_text())
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
LUFFY = Path(sys.executable).parent / "luffy"


def _where(path: str) -> list[str] | None:
    """Where a section of SETTING_SECTIONS sits in a raw config (None: not in the config file)."""
    if path.startswith("benchmark registry"):
        return None
    path = path.split(",")[0].strip()
    concrete = {"train_defaults": ["train_defaults"], "evaluation.suites.<name>": ["evaluation", "suites",
                                                                                  next(iter(MICRO["evaluation"]["suites"]))],
                "evaluation.models.<name>": ["evaluation", "models", "teacher"]}
    return concrete.get(path, path.split(".") if path else [])


def _number_fields() -> list[tuple[list[str], str]]:
    out = []
    for path, cls in SETTING_SECTIONS:
        where = _where(path)
        if where is None:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp)):
                out.append((where, f.name))
    return out


NUMBER_FIELDS = _number_fields()


def _with(where: list[str], name: str, value: float) -> dict:
    raw = copy.deepcopy(MICRO)
    raw.setdefault("evaluation", {}).setdefault("models", {})["teacher"] = {"hub": "Qwen/Qwen2.5-Math-7B"}
    node = raw
    for key in where:
        node = node.setdefault(key, {})
    node[name] = value
    return raw


def test_the_walk_covers_the_settings_the_issue_names():
    names = {name for _, name in NUMBER_FIELDS}
    assert {"lr", "temperature", "grad_clip", "shaping_gamma", "timeout_s", "top_p"} <= names
    assert len(NUMBER_FIELDS) >= 39


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_number_setting_refuses_nan_and_infinity_in_loader_and_schema(value):
    assert load_config(_with([], "results_dir", "results"))  # the base config itself is fine
    validator = jsonschema.Draft202012Validator(SCHEMA)
    missed, schema_missed = [], []
    for where, name in NUMBER_FIELDS:
        raw = _with(where, name, value)
        key = ".".join([*where, name])
        try:
            load_config(raw)
            missed.append(key)
        except ConfigError as err:
            assert str(err).startswith(f"config key '{key}': {value!r} is not a finite number"), str(err)
            assert "\n" not in str(err)
        if not list(validator.iter_errors(raw)):
            schema_missed.append(key)
    assert not missed, f"accepted {value}: {missed}"
    assert not schema_missed, f"the JSON schema accepts {value}: {schema_missed}"


def test_seeds_have_a_range_the_seed_arithmetic_cannot_overflow():
    for raw in (_with(["train_defaults"], "seed", 2**63), _with([], "seeds", [0, 10**15]),
                _with(["evaluation"], "seed", SEED_MAX + 1), _with(["data", "toy"], "seed", -1)):
        with pytest.raises(ConfigError, match=rf"is not in \[0, {SEED_MAX}\]"):
            load_config(raw)
    assert load_config(_with(["train_defaults"], "seed", SEED_MAX)).experiments
    # the largest seed, with far more steps, epochs and rows than any run has, still seeds torch
    for parts in ((10**9,), (10**9, 10**9), (2**40, 2**40, 2**40)):
        seed = derived_seed(SEED_MAX, *parts)
        assert 0 <= seed < 2**63
        torch.manual_seed(seed)
    assert derived_seed(3, 5) == 3 * 1_000_003 + 5  # small seeds: the streams the local engine always had


def test_check_config_and_the_cli_options_refuse_nan_in_one_line(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(_with(["train_defaults"], "lr", math.nan)))
    done = subprocess.run([str(LUFFY), "check-config", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["luffy check-config: error: config key 'train_defaults.lr': nan is not a "
                                        "finite number > 0"]
    done = subprocess.run([str(LUFFY), "generate", "1+1?", "--model", str(tmp_path), "--top-p", "nan"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
        "luffy generate: error: argument --top-p: nan is not in (0, 1]")
    done = subprocess.run([str(LUFFY), "generate", "1+1?", "--model", str(tmp_path), "--seed", str(2**63)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
        f"luffy generate: error: argument --seed: {2**63} is not in [0, {SEED_MAX}]")
