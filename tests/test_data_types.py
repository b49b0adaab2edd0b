"""Cell types where data enters (issue 20): a struct or a list where text is expected is refused
with its column named (a whole column) or is a malformed row (a few cells), never turned into
text such as "{'a': 1}"; legitimate numbers and answer lists still prepare as before; an
unreadable parquet is reported on one line."""

import dataclasses
import json
import os
import re
import subprocess

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luffy.config import load_registry
from luffy.data.benchmarks import build_suite
from luffy.data.schema import DataError
from luffy.data.traces import PromptTemplate, TraceFilter, filter_traces, prepare_stream

LOG_LINE = re.compile(r"\d{4}[-/]\d\d[-/]\d\d \d\d:\d\d:\d\d|prepare_traces: ")  # log records, tqdm's bar


def luffy(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run(["luffy", *args], capture_output=True, text=True, cwd=cwd, env=env)


def error_lines(result: subprocess.CompletedProcess, stage: str) -> list[str]:
    """The error lines on stderr; every other line must be a log record or the progress bar."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"luffy {stage}: error: ")]
    assert all(LOG_LINE.match(line) for line in lines if line not in errors), result.stderr[-3000:]
    return errors


@pytest.fixture(scope="module")
def registry():
    return load_registry("config/benchmarks.yaml")


def openr1(**columns) -> pd.DataFrame:
    base = {"problem": ["p1", "p2"], "answer": ["1", "2"], "generations": [["g1"], ["g2"]],
            "correctness_math_verify": [[True], [True]], "is_reasoning_complete": [[True], [True]]}
    return pd.DataFrame({**base, **columns})


# ---- benchmarks ----
def test_benchmark_answer_column_of_structs_is_refused_by_name(tmp_path):
    path = tmp_path / "structs.parquet"
    pd.DataFrame({"problem": ["p1", "p2"], "answer": [{"a": 1}, {"a": 2}]}).to_parquet(path)
    result = luffy("prepare-benchmark", "--settings", json.dumps({"local": str(path)}), "--name", "aime24",
                   "--out", str(tmp_path / "suite.parquet"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result, "prepare-benchmark") == [
        f"luffy prepare-benchmark: error: benchmark aime24 ({path}): column 'answer' holds structs (dict), "
        "expected text"]
    assert not (tmp_path / "suite.parquet").exists()


def test_a_few_struct_answers_are_malformed_rows(registry, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"problem": "p0", "answer": "1"}, {"problem": "p1", "answer": {"a": 1}}, {"problem": "p2", "answer": "3"},
            {"problem": ["p3"], "answer": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(path), problems=None))
    message = str(err.value)
    assert message.startswith(f"benchmark aime24 ({path}): malformed rows (")
    assert "column 'answer' holds a struct (dict), expected text: 1 row(s) [1]" in message
    assert "column 'problem' holds a list of text, expected text: 1 row(s) [3]" in message


def test_multiple_choice_options_of_the_wrong_type_are_named(registry, tmp_path):
    path = tmp_path / "options.parquet"
    pd.DataFrame({"question": ["q"], "options": ["a;b;c"], "answer": ["A"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"options.parquet\): column 'options' holds text, expected a list of texts"):
        build_suite("mmlu_pro", dataclasses.replace(registry["mmlu_pro"], local=str(path)))
    pd.DataFrame({"question": ["q"], "options": [[{"text": "a"}, {"text": "b"}]], "answer": [1]}).to_parquet(path)
    with pytest.raises(DataError, match=r"column 'options' holds lists of structs \(dict\), expected a list of texts"):
        build_suite("mmlu_pro", dataclasses.replace(registry["mmlu_pro"], local=str(path)))
    pd.DataFrame({"question": ["q"], "choices": [{"texts": ["a", "b"], "labels": ["A", "B"]}],
                  "answerKey": ["A"]}).to_parquet(path)  # not ARC's {text, label}
    with pytest.raises(DataError, match=r"column 'choices' holds structs \(dict\), expected a struct of 'text' and "
                                        r"'label' lists"):
        build_suite("arc_c", dataclasses.replace(registry["arc_c"], local=str(path), problems=None))


def test_numbers_and_answer_lists_still_prepare_as_text(registry, tmp_path):
    pd.DataFrame({"problem": ["a", "b"], "answer": [42, 7]}).to_parquet(tmp_path / "int.parquet")
    frame = build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(tmp_path / "int.parquet"),
                                                      problems=None))
    assert [r["ground_truth"] for r in frame["reward_model"]] == ["42", "7"]
    pd.DataFrame({"question": ["a"], "final_answer": [["$\\frac{1}{2}$"]]}).to_parquet(tmp_path / "ol.parquet")
    frame = build_suite("olympiad", dataclasses.replace(registry["olympiad"], local=str(tmp_path / "ol.parquet"),
                                                        problems=None))
    assert frame["reward_model"].iloc[0]["ground_truth"] == "$\\frac{1}{2}$"
    # JSON lines: text that looks like a number stays the text written ("025", not 25)
    (tmp_path / "aime.jsonl").write_text('{"problem": "a", "answer": "025"}\n{"problem": "b", "answer": 7}\n')
    frame = build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(tmp_path / "aime.jsonl"),
                                                      problems=None))
    assert [r["ground_truth"] for r in frame["reward_model"]] == ["025", "7"]


# ---- traces ----
def test_trace_answer_column_of_lists_is_refused_by_name(tmp_path):
    path = tmp_path / "traces.parquet"
    openr1(answer=[["1"], ["2"]]).to_parquet(path)
    result = luffy("prepare-traces", "--settings", json.dumps({"max_trace_tokens": 100}), "--traces", str(path),
                   "--tokenizer", "shipped", "--out", str(tmp_path / "o.parquet"), "--report", str(tmp_path / "r.json"),
                   cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result, "prepare-traces") == [
        f"luffy prepare-traces: error: trace file {path}: column 'answer' holds lists of text, expected text"]
    assert not (tmp_path / "o.parquet").exists()


def test_trace_columns_nested_the_wrong_way_are_named(tmp_path):
    cases = {
        "generations": (openr1(generations=[[{"role": "assistant", "content": "g"}]] * 2),
                        "column 'generations' holds lists of structs (dict), expected lists of text"),
        "problem": (openr1(problem=[{"text": "p1"}, {"text": "p2"}]),
                    "column 'problem' holds structs (dict), expected text"),
        "luffy": (pd.DataFrame({"prompt": ["p"], "target": [[{"role": "assistant", "content": "t"}]],
                                "reward_model": [{"ground_truth": "1"}]}),
                  "column 'prompt' holds text, expected lists of {role, content} messages"),
    }
    for name, (frame, expected) in cases.items():
        path = tmp_path / f"{name}.parquet"
        frame.to_parquet(path)
        flt = TraceFilter(lambda texts: [len(t) for t in texts], 100, PromptTemplate(), "src")
        with pytest.raises(DataError) as err:
            prepare_stream([str(path)], str(tmp_path / "out.parquet"), flt)
        assert str(err.value) == f"trace file {path}: {expected}"


def test_a_few_trace_cells_of_structs_or_lists_are_counted_as_malformed():
    frame = openr1(problem=["p1", "p2", ["p3"], "p4"], answer=["1", {"a": 2}, "3", "4"],
                   generations=[["g1"], ["g2"], ["g3"], [{"content": "g4"}]],
                   correctness_math_verify=[[True]] * 4, is_reasoning_complete=[[True]] * 4)
    out, report = filter_traces(frame, lambda texts: [len(t) for t in texts], 100, "", "src")
    assert len(out) == 1 and report.rows_in == 4
    assert report.malformed == {"answer holds a struct (dict), expected text": 1,
                                "problem holds a list of text, expected text": 1,
                                "a generation holds a struct (dict), expected text": 1}


# ---- unreadable files ----
def corrupt_parquet(path) -> None:
    """A parquet file whose footer is intact but whose first page header is garbage (pyarrow's
    message for it spans lines)."""
    pq.write_table(pa.table({"problem": [f"p{i}" * 50 for i in range(200)], "answer": ["1"] * 200}), path,
                   compression="none")
    data = path.read_bytes()
    path.write_bytes(data[:4] + b"\xff" * 200 + data[204:])


def test_a_corrupt_parquet_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.parquet"
    corrupt_parquet(path)
    result = luffy("prepare-benchmark", "--settings", json.dumps({"local": str(path)}), "--name", "aime24",
                   "--out", str(tmp_path / "suite.parquet"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result, "prepare-benchmark")
    assert len(errors) == 1 and "\n" not in errors[0]
    assert re.fullmatch(rf"luffy prepare-benchmark: error: benchmark aime24: cannot read {re.escape(str(path))} as "
                        r"parquet \(OSError: \S.*\S\)", errors[0]), errors[0]
    flt = TraceFilter(lambda texts: [len(t) for t in texts], 100, PromptTemplate(), "src")
    with pytest.raises(DataError) as err:
        prepare_stream([str(path)], str(tmp_path / "out.parquet"), flt)
    assert str(err.value).startswith(f"trace file {path}: cannot read as parquet (OSError: ")
    assert "\n" not in str(err.value) and str(err.value).endswith(")")
