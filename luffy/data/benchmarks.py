"""Benchmark suites from the registry (``config/benchmarks.yaml``) in the benchmark schema.

A suite comes from one of:
- a file in the reference's evaluation schema (``prompt`` messages, ``reward_model``): the
  rows of the entry's ``data_source``, with the reference's 32x copies de-duplicated (the
  protocol samples n = 32 instead);
- the public dataset, from the HuggingFace hub (its auto-converted parquet) or a local file
  with the same columns, turned into chat rows by the entry's ``format``:
  ``math`` (problem, answer), ``choices`` (question, list of options, answer letter or
  index), ``arc`` (question, choices{text, label}, answerKey), ``gpqa`` (question, correct
  and three incorrect answers, shuffled with a seed fixed per question).
The written rows keep the source's system message, if any; evaluation drops it unless the
suite says ``system_prompt: keep``.

Cell types are checked as the rows are read: text cells hold text (a number is taken as its
text), never a struct or a list, except an answer may be a list of texts (OlympiadBench's
``final_answer``; its first item); options are a list of texts (``choices``) or a struct of
``text`` and ``label`` lists (``arc``). A column none of whose values has its type is refused
by name; a few rows that break it are malformed rows, which refuse the suite like any other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import string
from typing import Any

import numpy as np
import pandas as pd

from luffy.config import BenchmarkSpec
from luffy.data.hub import open_file, parquet_files
from luffy.data.schema import (DataError, benchmark_rows, chat_messages, ground_truth_of, is_list, is_nested, is_null,
                               one_line, read_parquet, value_kind)

log = logging.getLogger(__name__)
LETTERS = string.ascii_uppercase


def is_reference_schema(frame: pd.DataFrame) -> bool:
    return {"prompt", "reward_model"} <= set(frame.columns)


def read_local(path: str, what: str) -> pd.DataFrame:
    if path.endswith((".jsonl", ".json")):
        try:
            return pd.read_json(path, lines=path.endswith(".jsonl"), dtype=False)  # types as written
        except (OSError, ValueError) as err:
            raise DataError(f"{what}: cannot read {path} ({one_line(err)})") from None
    return read_parquet(path, what)


def read_hub(spec: BenchmarkSpec, what: str) -> pd.DataFrame:
    """The public dataset's split, from the hub's auto-converted parquet files."""
    frames = []
    for path in parquet_files(spec.hub_id, spec.hub_config, spec.split, what):
        try:
            with open_file(path) as fh:
                frames.append(pd.read_parquet(fh))
        except Exception as err:  # network, cache or parquet errors, of many unrelated types
            raise DataError(f"{what}: cannot read {path} ({type(err).__name__}: {one_line(err)})") from None
    return pd.concat(frames, ignore_index=True)


def from_reference(frame: pd.DataFrame, spec: BenchmarkSpec, what: str) -> pd.DataFrame:
    """The entry's rows of a reference-schema file, one per distinct (problem, answer)."""
    if spec.data_source is not None:
        if "data_source" not in frame.columns:
            raise DataError(f"{what}: no data_source column to select '{spec.data_source}' from")
        frame = frame[frame["data_source"] == spec.data_source]
        if frame.empty:
            raise DataError(f"{what}: no rows with data_source '{spec.data_source}'")
    sources = frame["data_source"] if "data_source" in frame.columns else [spec.data_source or ""] * len(frame)
    rows, bad = [], []
    for pos, (prompt, reward, source) in enumerate(zip(frame["prompt"], frame["reward_model"], sources)):
        messages, gold = chat_messages(prompt), ground_truth_of(reward)
        if messages is None or gold is None:
            bad.append(pos)
        else:
            rows.append({"prompt": messages, "ground_truth": gold, "data_source": str(source)})
    if bad:
        raise DataError(f"{what}: {len(bad)} row(s) without a chat prompt or ground truth (positions {bad[:10]})")
    return _distinct(rows)


def _scalar(value: Any) -> bool:
    return not is_nested(value)


def _scalars(value: Any) -> bool:
    return is_list(value) and all(_scalar(v) for v in value)


def _labelled(value: Any) -> bool:
    return isinstance(value, dict) and _scalars(value.get("text")) and _scalars(value.get("label"))


TEXT = (_scalar, "text")
# per format: role -> (whether a (non-null) cell has the role's type, the type in words)
ROLE_TYPES: dict[str, dict[str, tuple[Any, str]]] = {
    "math": {"problem": TEXT, "answer": (lambda v: _scalar(v) or _scalars(v), "text")},
    "choices": {"problem": TEXT, "options": (_scalars, "a list of texts"), "answer": (_scalar, "a letter or an index")},
    "arc": {"problem": TEXT, "options": (_labelled, "a struct of 'text' and 'label' lists"), "answer": TEXT},
    "gpqa": {"problem": TEXT, "correct": TEXT, **{f"incorrect_{i}": TEXT for i in (1, 2, 3)}},
}


def _text(value: Any) -> str | None:
    """A checked text cell as stripped text (a number as its text, a list as its first item);
    None when empty."""
    if is_list(value):
        value = value[0] if len(value) else None
    if is_null(value):
        return None
    return str(value).strip() or None


def _column(row: dict[str, Any], spec: BenchmarkSpec, role: str) -> Any:
    """The row's cell of ``role``; a ValueError (a malformed row) when its type is not the role's."""
    column = spec.columns.get(role, role)
    if column not in row:
        raise KeyError(column)
    value = row[column]
    fits, expected = ROLE_TYPES[spec.format][role]
    if not is_null(value) and not fits(value):
        raise ValueError(f"column '{column}' holds {value_kind(value)[0]}, expected {expected}")
    return value


def check_column_types(frame: pd.DataFrame, spec: BenchmarkSpec, what: str) -> None:
    """A ``DataError`` naming the first column none of whose (non-null) cells has its role's
    type, e.g. an answer column of structs; single odd cells are left to the rows' checks."""
    for role, (fits, expected) in ROLE_TYPES[spec.format].items():
        column = spec.columns.get(role, role)
        if column not in frame.columns:
            continue  # the rows' check names it
        values = [v for v in frame[column] if not is_null(v)]
        if values and not any(fits(v) for v in values):
            found = " and ".join(sorted({value_kind(v)[1] for v in values}))
            raise DataError(f"{what}: column '{column}' holds {found}, expected {expected}")


def _options(row: dict[str, Any], spec: BenchmarkSpec) -> tuple[list[str], list[str], str]:
    """(labels, option texts, gold label) of a multiple-choice row."""
    if spec.format == "choices":
        texts = [str(t) for t in _column(row, spec, "options")]
        labels = list(LETTERS[: len(texts)])
        answer = _column(row, spec, "answer")
        gold = LETTERS[int(answer)] if isinstance(answer, (int, np.integer)) else str(answer).strip().upper()
    elif spec.format == "arc":
        choices = _column(row, spec, "options")
        texts, labels = [str(t) for t in choices["text"]], [str(label) for label in choices["label"]]
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} option texts but {len(labels)} labels")
        gold = str(_column(row, spec, "answer")).strip()
    else:  # gpqa: the correct answer among three incorrect ones, in an order fixed by the question
        correct = str(_column(row, spec, "correct")).strip()
        texts = [correct] + [str(_column(row, spec, f"incorrect_{i}")).strip() for i in (1, 2, 3)]
        seed = int(hashlib.sha256(str(_column(row, spec, "problem")).encode()).hexdigest()[:8], 16)
        random.Random(seed).shuffle(texts)
        labels = list(LETTERS[: len(texts)])
        gold = labels[texts.index(correct)]
    if gold not in labels:
        raise ValueError(f"answer '{gold}' is not one of the labels {labels}")
    return labels, texts, gold


def from_public(frame: pd.DataFrame, spec: BenchmarkSpec, name: str, what: str) -> pd.DataFrame:
    """Chat rows (user turn only) from the public dataset's columns, their types checked."""
    check_column_types(frame, spec, what)
    rows, bad = [], {}
    for pos, row in enumerate(frame.to_dict("records")):
        try:
            question = _text(_column(row, spec, "problem"))
            if question is None:
                raise ValueError("empty problem")
            if spec.format == "math":
                gold = _text(_column(row, spec, "answer"))
                if gold is None:
                    raise ValueError("empty answer")
                user = question
            else:
                labels, texts, gold = _options(row, spec)
                user = question + "\n\n" + "\n".join(f"{label}) {text}" for label, text in zip(labels, texts))
            if spec.instruction:
                user = spec.instruction.format(letters="".join(labels) if spec.format != "math" else "") + \
                    "\n\n" + user
            rows.append({"prompt": [{"role": "user", "content": user}], "ground_truth": gold, "data_source": name})
        except KeyError as err:
            raise DataError(f"{what}: no column {err} (columns: {list(frame.columns)}); map it in the registry's "
                            "'columns'") from None
        except (ValueError, TypeError, IndexError) as err:
            bad.setdefault(str(err), []).append(pos)
    if bad:
        detail = "; ".join(f"{reason}: {len(p)} row(s) {p[:10]}" for reason, p in bad.items())
        raise DataError(f"{what}: malformed rows ({detail})")
    return _distinct(rows)


def _distinct(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per distinct (user turn, gold answer), in order of first appearance."""
    seen, out = set(), []
    for row in rows:
        key = (row["prompt"][-1]["content"], row["ground_truth"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return pd.DataFrame(out, columns=["prompt", "ground_truth", "data_source"])


def build_suite(name: str, spec: BenchmarkSpec) -> pd.DataFrame:
    """The suite in the benchmark schema, with its problem count checked."""
    what = f"benchmark {name}"
    if spec.local is not None:
        if not os.path.exists(spec.local):
            raise DataError(f"{what}: local file not found: {spec.local}")
        frame = read_local(spec.local, what)
    else:
        frame = read_hub(spec, what)
    where = f"{what} ({spec.local or spec.hub_id})"  # the rows' errors name the file
    rows = from_reference(frame, spec, where) if is_reference_schema(frame) else from_public(frame, spec, name, where)
    if rows.empty:
        raise DataError(f"{what}: no problems")
    if spec.problems is not None and len(rows) != spec.problems:
        raise DataError(f"{what}: {len(rows)} distinct problems, expected {spec.problems}")
    out = benchmark_rows(name, "test", "", [""] * len(rows), rows["ground_truth"].tolist())
    out["prompt"] = rows["prompt"].tolist()
    out["data_source"] = rows["data_source"].tolist()
    out["ability"] = spec.answer_type
    log.info("%s: %d problems (%s)", what, len(out), spec.local or spec.hub_id)
    return out
