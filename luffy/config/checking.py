"""Type and range checking of settings: ``Valid`` (a setting's valid values, stated once),
``ConfigError``, and the merge of raw YAML/JSON layers over a section's dataclass.

A raw value of the wrong type is an error, never converted ('5' is not 5); every set value
is then checked against its field's ``Valid``. NaN is no number of any range, and an infinity
only where a range says so (``Valid.infinite``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from luffy.seeding import SEED_MAX


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file named in the message."""


@dataclass(frozen=True)
class Valid:
    """A setting's valid values, stated once: the loader enforces them, the JSON schema and
    config/README.md show them. Numbers: an interval (``low``/``high``, open or closed);
    text: ``choices``, or a description (``text``) and whether it may be empty."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    text: str | None = None
    nonempty: bool = False
    pattern: str | None = None  # text: a regular expression the whole value matches
    infinite: bool = False  # numbers: whether .inf / -.inf is a value (NaN never is)

    @staticmethod
    def _number(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.text is not None:
            return self.text
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self._number(self.low)}, {self._number(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self._number(self.low)}"
        return f"{'<' if self.high_open else '<='} {self._number(self.high)}"

    def admits(self, value: Any) -> bool:
        if isinstance(value, str):
            return ((self.choices is None or value in self.choices) and not (self.nonempty and not value.strip())
                    and (self.pattern is None or re.fullmatch(self.pattern, value) is not None))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (self.low is not None or self.high is not None) and not finite_enough(value, self.infinite):
                return False  # a range of numbers; NaN would fail no comparison
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                return False
            return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))
        return True


def finite_enough(value: Any, infinite: bool = False) -> bool:
    """Whether a number is a value of a setting: never NaN (it fails no comparison, so it would
    pass every range), and an infinity only where the range says so."""
    if not isinstance(value, float):
        return True
    return not math.isnan(value) and (infinite or not math.isinf(value))


GE0, GE1, GT0 = Valid(low=0), Valid(low=1), Valid(low=0, low_open=True)
SEED = Valid(low=0, high=SEED_MAX)  # luffy.seeding: every stream seed derived from it fits torch's 64 bits
UNIT = Valid(low=0, high=1)                          # [0, 1]
SHARE = Valid(low=0, high=1, low_open=True)          # (0, 1]
GREEDY_OK = Valid(low=0, text=">= 0 (0: greedy decoding, only with n: 1)")
TEXT = Valid(text="any text")
NAME = Valid(text="a non-empty name", nonempty=True)
BOOL = "true or false"


def _help(text: str, default: Any = MISSING, valid: Valid | None = None, **kw: Any) -> Any:
    """A dataclass field with a one-line help string and its valid values (field metadata)."""
    metadata = {"help": text, **({"valid": valid} if valid is not None else {})}
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _describe(err: OmegaConfBaseException, prefix: str) -> str:
    key = getattr(err, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(err).split("\n")[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    origin = typing.get_origin(tp)
    return {dict: "a mapping", list: "a list"}.get(origin, str(tp))


def _check_raw(schema: type, raw: Any, prefix: str) -> None:
    """The raw (YAML or JSON) values against the dataclass: unknown keys name the closest
    known one; a value of the wrong type is an error, never converted ('5' is not 5)."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for name, value in raw.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"config key '{_key(prefix, name)}': unknown setting{hint}")
        _check_value(hints[name], value, _key(prefix, name))


def _check_value(tp: Any, value: Any, key: str) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return
    if dataclasses.is_dataclass(tp):
        _check_raw(tp, value, key)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
        for name, item in value.items():
            _check_value(args[1] if len(args) == 2 else Any, item, _key(key, str(name)))
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': {value!r} is not {_type_name(tp)}")
        for i, item in enumerate(value):
            _check_value(args[0] if args else Any, item, f"{key}[{i}]")
        return
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}.get(tp, lambda v: True)
    if not ok(value):
        hint = " (YAML reads 1e-4 as a string: write 1.0e-4)" if tp is float and isinstance(value, str) else ""
        raise ConfigError(f"config key '{key}': {value!r} ({type(value).__name__}) is not {_type_name(tp)}{hint}")


def _numeric(tp: Any) -> bool:
    """Whether a field's type holds numbers (float, optional, or a list or mapping of them)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp is float or (typing.get_origin(tp) in (typing.Union, list, dict) and any(map(_numeric, args)))


def _check_ranges(obj: Any, prefix: str) -> None:
    """Every set value of a (nested) settings object within its field's stated valid range."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _key(prefix, f.name)
        valid: Valid | None = f.metadata.get("valid")
        numeric = _numeric(hints[f.name])
        values = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key)
        elif values is not None:
            for name, item in values:
                if dataclasses.is_dataclass(item):
                    _check_ranges(item, _key(key, str(name)))
                else:
                    _check_one(item, valid, key, numeric)
        elif value is not None:
            _check_one(value, valid, key, numeric)


def _check_one(value: Any, valid: Valid | None, key: str, numeric: bool) -> None:
    """One set value within its field's range; a number field refuses NaN and infinity even
    where it states no range."""
    if numeric and not finite_enough(value, valid is not None and valid.infinite):
        raise ConfigError(f"config key '{key}': {value!r} is not a finite number"
                          + (f" {valid.describe()}" if valid is not None else ""))
    if valid is not None and not valid.admits(value):
        raise ConfigError(f"config key '{key}': {value!r} is not {valid.describe()}")


def _merge(schema: type, *layers: Any, prefix: str = "") -> Any:
    for layer in layers:
        _check_raw(schema, layer, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, prefix)) from None
    _check_ranges(obj, prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested structure of them) to plain JSON-able Python."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_json(obj: Any) -> str:
    """Canonical JSON (sorted keys): stable, so Snakemake params only change with the settings."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))


def from_json(schema: type, text: str) -> Any:
    """Inverse of ``to_json`` for one section, validated against its dataclass."""
    return _merge(schema, json.loads(text))
