"""Dataset schemas: OpenR1-Math-220k (raw traces), LUFFY training rows, benchmark suites.

Validation raises ``DataError`` naming the file, the column or the rows at fault, so a bad
input never surfaces as a traceback from deep inside pandas.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from luffy.errors import DataError, one_line  # noqa: F401  (raised and used here; importable from here)

OPENR1_REQUIRED = ("problem", "answer", "generations", "correctness_math_verify", "is_reasoning_complete")
LUFFY_REQUIRED = ("data_source", "prompt", "target", "ability", "reward_model", "extra_info")
BENCHMARK_REQUIRED = ("data_source", "prompt", "reward_model")
TEACHER_LOGPROBS = "teacher_logprobs"  # optional LUFFY column: log pi_phi per trace token
MAX_LISTED_ROWS = 10


INVALID_UTF8 = "text that is not valid UTF-8"
INVALID_UTF8_COLUMN = "_invalid_utf8"  # per row, added by ``decode_batch`` when a text is not valid UTF-8


def _as_binary(tp: pa.DataType) -> pa.DataType:
    """``tp`` with every (nested) string type replaced by binary, which reads any bytes."""
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        return pa.binary()
    if pa.types.is_list(tp) or pa.types.is_large_list(tp):
        return pa.list_(_as_binary(tp.value_type))
    if pa.types.is_struct(tp):
        return pa.struct([pa.field(f.name, _as_binary(f.type)) for f in tp])
    return tp


def _decode(value: Any, bad: list[bool]) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            bad[0] = True
            return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_decode(v, bad) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v, bad) for k, v in value.items()}
    return value


def decode_batch(batch: pa.RecordBatch | pa.Table) -> pd.DataFrame:
    """A record batch as a frame. When one of its texts is not valid UTF-8 (which Arrow
    refuses for the whole batch, or pandas for the whole column), its text columns are read as bytes and decoded value by value, and the rows
    with invalid text are flagged in ``INVALID_UTF8_COLUMN`` (the text is kept, with U+FFFD
    in place of the bad bytes), so the caller can count them instead of failing."""
    try:
        batch.validate(full=True)  # checks UTF-8 (to_pandas may not: pandas can keep Arrow strings)
        return batch.to_pandas()
    except pa.ArrowException:
        pass
    schema = batch.schema
    text_columns = [f.name for f in schema if _as_binary(f.type) != f.type]
    raw = batch.cast(pa.schema([pa.field(f.name, _as_binary(f.type)) for f in schema])).to_pylist()
    flags = []
    for record in raw:
        bad = [False]
        for name in text_columns:
            record[name] = _decode(record[name], bad)
        flags.append(bad[0])
    frame = pd.DataFrame(raw, columns=schema.names)
    frame[INVALID_UTF8_COLUMN] = flags
    return frame


def read_parquet(path: str, what: str) -> pd.DataFrame:
    """A whole parquet file as a frame; a missing or unreadable file, or text that is not
    valid UTF-8 (its column and rows named), is a ``DataError``."""
    try:
        frame = decode_batch(pq.read_table(path))
    except FileNotFoundError:
        raise DataError(f"{what}: file not found: {path}") from None
    except Exception as err:  # pyarrow raises several unrelated types for a non-parquet file
        raise DataError(f"{what}: cannot read {path} as parquet ({type(err).__name__}: {one_line(err)})") from None
    if INVALID_UTF8_COLUMN in frame.columns:
        rows = np.flatnonzero(frame.pop(INVALID_UTF8_COLUMN).to_numpy()).tolist()
        raise_bad_rows({INVALID_UTF8: rows} if rows else {}, f"{what} ({path})")
    return frame


def require_columns(frame: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; found {list(frame.columns)}")


def is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def is_null(value: Any) -> bool:
    """A missing value: None, or a float NaN (how pandas fills a gap)."""
    return value is None or (isinstance(value, (float, np.floating)) and bool(np.isnan(value)))


def is_nested(value: Any) -> bool:
    """A struct (dict) or a list: what a text cell must never hold."""
    return isinstance(value, dict) or is_list(value)


def value_kind(value: Any) -> tuple[str, str]:
    """(one, many): words for what a cell holds, e.g. ('a struct (dict)', 'structs (dict)'),
    ('a list of text', 'lists of text'), ('a number', 'numbers')."""
    if isinstance(value, str):
        return "text", "text"
    if isinstance(value, dict):
        return "a struct (dict)", "structs (dict)"
    if is_list(value):
        inner = sorted({value_kind(v)[1] for v in value if not is_null(v)})
        of = f" of {' and '.join(inner)}" if inner else ""
        return f"a list{of}", f"lists{of}"
    if is_null(value):
        return "null", "nulls"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean", "booleans"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "a number", "numbers"
    if isinstance(value, bytes):
        return "bytes", "bytes"
    return f"a {type(value).__name__}", f"{type(value).__name__} values"


def nested_text(column: str, value: Any) -> str | None:
    """The malformed-row reason for a struct or list in a text column (None otherwise)."""
    return f"{column} holds {value_kind(value)[0]}, expected text" if is_nested(value) else None


# Arrow column types as nested shapes: TEXT, ("list", item shape) or {field: shape}.
TEXT = "text"
MESSAGES = ("list", {"role": TEXT, "content": TEXT})
OPENR1_TYPES = {"problem": (TEXT, "text"), "answer": (TEXT, "text"), "generations": (("list", TEXT), "lists of text")}
LUFFY_TYPES = {"prompt": (MESSAGES, "lists of {role, content} messages"),
               "target": (MESSAGES, "lists of {role, content} messages"),
               "reward_model": ({"ground_truth": TEXT}, "structs with a text ground_truth")}


def _arrow_list(tp: pa.DataType) -> bool:
    return pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp)


def _arrow_struct(tp: pa.DataType) -> bool:
    return pa.types.is_struct(tp) or pa.types.is_map(tp)


def arrow_kind(tp: pa.DataType) -> str:
    """Words for what a column of Arrow type ``tp`` holds, e.g. 'lists of text', 'structs (dict)'."""
    if pa.types.is_dictionary(tp):
        return arrow_kind(tp.value_type)
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        return "text"
    if _arrow_list(tp):
        return f"lists of {arrow_kind(tp.value_type)}"
    if _arrow_struct(tp):
        return "structs (dict)"
    if pa.types.is_boolean(tp):
        return "booleans"
    if pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_decimal(tp):
        return f"numbers ({tp})"
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp):
        return "bytes"
    return f"{tp} values"


def _fits(tp: pa.DataType, shape: Any) -> bool:
    """Whether an Arrow type has ``shape``'s nesting. Only the nesting is checked: a null
    column fits anything, and a number or boolean fits text (per-row checks judge those)."""
    if pa.types.is_null(tp):
        return True
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    if shape == TEXT:
        return not (_arrow_list(tp) or _arrow_struct(tp))
    if isinstance(shape, tuple):
        return _arrow_list(tp) and _fits(tp.value_type, shape[1])
    return pa.types.is_struct(tp) and all(_fits(tp.field(name).type, sub) for name, sub in shape.items()
                                          if tp.get_field_index(name) >= 0)


def check_column_types(schema: pa.Schema, types: dict[str, tuple[Any, str]], what: str) -> None:
    """A ``DataError`` naming the first column (of ``types``, where present) whose Arrow type
    nests differently from its expected shape, e.g. structs where text is expected."""
    for name, (shape, expected) in types.items():
        index = schema.get_field_index(name)
        if index >= 0 and not _fits(schema.field(index).type, shape):
            raise DataError(f"{what}: column '{name}' holds {arrow_kind(schema.field(index).type)}, "
                            f"expected {expected}")


def bad_rows(frame: pd.DataFrame, check: Callable[[dict[str, Any]], str | None]) -> dict[str, list[int]]:
    """Row positions per problem found by ``check`` (which returns a reason or None)."""
    found: dict[str, list[int]] = {}
    for pos, row in enumerate(frame.itertuples(index=False)):
        reason = check(row._asdict())
        if reason:
            found.setdefault(reason, []).append(pos)
    return found


def raise_bad_rows(found: dict[str, list[int]], what: str) -> None:
    if not found:
        return
    parts = []
    for reason, rows in found.items():
        listed = ", ".join(map(str, rows[:MAX_LISTED_ROWS])) + (" ..." if len(rows) > MAX_LISTED_ROWS else "")
        parts.append(f"{reason}: {len(rows)} row(s) [{listed}]")
    raise DataError(f"{what}: malformed rows (0-based positions): " + "; ".join(parts))


def check_openr1_row(row: dict[str, Any]) -> str | None:
    problem, answer = row["problem"], row["answer"]
    if not isinstance(problem, str) or not problem.strip():
        return nested_text("problem", problem) or "empty or non-string problem"
    if not isinstance(answer, str) or not answer.strip():
        return nested_text("answer", answer) or "empty or non-string answer"
    lists = [row["generations"], row["correctness_math_verify"], row["is_reasoning_complete"]]
    if not all(is_list(v) for v in lists):
        return "generations / correctness_math_verify / is_reasoning_complete not lists"
    if len({len(v) for v in lists}) != 1:
        return "generations, correctness_math_verify and is_reasoning_complete differ in length"
    for generation in row["generations"]:
        if not isinstance(generation, str):
            return nested_text("a generation", generation) or "a generation is not a string"
    for column in ("correctness_math_verify", "is_reasoning_complete"):
        if not all(isinstance(flag, (bool, np.bool_)) for flag in row[column]):
            return f"a {column} flag that is not a boolean"
    return None


def validate_openr1(frame: pd.DataFrame, what: str) -> None:
    require_columns(frame, OPENR1_REQUIRED, what)
    raise_bad_rows(bad_rows(frame, check_openr1_row), what)


def messages(system_prompt: str, user: str) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [{"role": "user", "content": user}]


def luffy_rows(data_source: str, system_prompt: str, problems: Sequence[str], traces: Sequence[str],
               answers: Sequence[str], split: str = "train") -> pd.DataFrame:
    """Training rows in the LUFFY schema (also what verl's RLHFDataset expects)."""
    return pd.DataFrame({
        "data_source": [data_source] * len(problems),
        "prompt": [messages(system_prompt, p) for p in problems],
        "target": [[{"role": "assistant", "content": t}] for t in traces],
        "ability": ["math"] * len(problems),
        "reward_model": [{"style": "rule", "ground_truth": a} for a in answers],
        "extra_info": [{"split": split, "index": i} for i in range(len(problems))],
    })


def benchmark_rows(data_source: str, split: str, system_prompt: str, problems: Sequence[str],
                   answers: Sequence[str]) -> pd.DataFrame:
    """Evaluation rows in the schema of the reference's benchmark parquets."""
    return pd.DataFrame({
        "data_source": [data_source] * len(problems),
        "prompt": [messages(system_prompt, p) for p in problems],
        "ability": ["math"] * len(problems),
        "reward_model": [{"style": "rule", "ground_truth": a} for a in answers],
        "extra_info": [{"split": split, "index": i} for i in range(len(problems))],
    })


def chat_messages(value: Any) -> list[dict[str, str]] | None:
    if not is_list(value) or not len(value):
        return None
    out = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            return None
        out.append({"role": str(message["role"]), "content": message["content"]})
    return out


def ground_truth_of(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("ground_truth"), str) and value["ground_truth"].strip():
        return value["ground_truth"]
    return None


def check_prompt_row(row: dict[str, Any]) -> str | None:
    if chat_messages(row["prompt"]) is None:
        return "prompt is not a non-empty list of {role, content} messages"
    if ground_truth_of(row["reward_model"]) is None:
        return "reward_model.ground_truth missing or empty"
    return None


def check_luffy_row(row: dict[str, Any]) -> str | None:
    reason = check_prompt_row(row)
    if reason:
        return reason
    target = chat_messages(row["target"])
    if target is None or target[0]["role"] != "assistant" or not target[0]["content"]:
        return "target is not [{role: assistant, content: trace}]"
    return None


def read_validated(path: str, what: str, required: Sequence[str],
                   check: Callable[[dict[str, Any]], str | None]) -> pd.DataFrame:
    """A non-empty parquet with the required columns and no row failing ``check``."""
    frame = read_parquet(path, what)
    require_columns(frame, required, what)
    raise_bad_rows(bad_rows(frame, check), what)
    if frame.empty:
        raise DataError(f"{what}: no rows")
    return frame


def read_luffy(path: str) -> pd.DataFrame:
    """A training parquet, validated against the LUFFY schema."""
    return read_validated(path, f"training data {path}", LUFFY_REQUIRED, check_luffy_row)


def luffy_fields(frame: pd.DataFrame) -> tuple[list[list[dict[str, str]]], list[str], list[str]]:
    """(prompt messages, teacher trace, ground truth) per row of a validated training frame."""
    prompts = [chat_messages(v) for v in frame["prompt"]]
    traces = [chat_messages(v)[0]["content"] for v in frame["target"]]
    answers = [ground_truth_of(v) for v in frame["reward_model"]]
    return prompts, traces, answers


def load_luffy(path: str) -> tuple[list[list[dict[str, str]]], list[str], list[str]]:
    """Training rows: (prompt messages, teacher trace, ground truth) per row."""
    return luffy_fields(read_luffy(path))


def check_teacher_logprobs(value: Any) -> str | None:
    if not is_list(value) or not len(value):
        return f"{TEACHER_LOGPROBS} is not a non-empty list"
    if not all(isinstance(v, (int, float, np.floating)) for v in value):
        return f"{TEACHER_LOGPROBS} holds a non-number"
    values = np.asarray(value, dtype=float)
    if not np.isfinite(values).all() or (values > 1e-6).any():
        return f"{TEACHER_LOGPROBS} holds a value that is not a finite log-probability (<= 0)"
    return None


def teacher_logprobs_of(frame: pd.DataFrame, what: str) -> list[list[float]]:
    """The optional per-token teacher log-probs of each row's trace, log pi_phi(tau_t): one value
    per token of the trace as the policy tokenizer encodes it (``encode_traces``), optionally
    followed by one for the EOS token (taken as 0, i.e. pi_phi = 1, when absent)."""
    if TEACHER_LOGPROBS not in frame.columns:
        raise DataError(f"{what}: no '{TEACHER_LOGPROBS}' column, which teacher_logprobs: true needs "
                        f"(write it with `luffy score-traces`); found {list(frame.columns)}")
    raise_bad_rows(bad_rows(frame[[TEACHER_LOGPROBS]], lambda row: check_teacher_logprobs(row[TEACHER_LOGPROBS])),
                   what)
    return [[float(v) for v in value] for value in frame[TEACHER_LOGPROBS]]


def load_benchmark(path: str) -> pd.DataFrame:
    """A suite as (problem_id, prompt messages, ground_truth, data_source) rows."""
    frame = read_validated(path, f"benchmark {path}", BENCHMARK_REQUIRED, check_prompt_row)
    return pd.DataFrame({
        "problem_id": range(len(frame)),
        "prompt": [chat_messages(v) for v in frame["prompt"]],
        "ground_truth": [ground_truth_of(v) for v in frame["reward_model"]],
        "data_source": frame["data_source"].astype(str).tolist(),
    })
