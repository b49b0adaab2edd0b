import pandas as pd
import pytest

from luffy.config import ToyTaskConfig
from luffy.data.schema import DataError, load_benchmark, load_luffy, validate_openr1
from luffy.data.templates import response_text
from luffy.data.toy import make_toy_data, render_trace, sample_problem
from luffy.data.traces import DROP_REASONS, filter_traces
from luffy.reward.math import grade


def char_count(texts):
    return [len(t) for t in texts]


def openr1(rows):
    base = {"solution": "", "problem_type": "x", "question_type": "x", "source": "t", "uuid": "u",
            "correctness_llama": None, "finish_reasons": None, "correctness_count": 0, "messages": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def row(problem, answer, gens, correct, complete):
    return {"problem": problem, "answer": answer, "generations": gens, "correctness_math_verify": correct,
            "is_reasoning_complete": complete}


def test_filter_keeps_first_survivor_and_counts_every_reason():
    frame = openr1([
        row("p0", "1", ["wrong", "long correct " * 20, "ok-1", "ok-2"], [False, True, True, True], [True] * 4),
        row("p1", "2", ["w1", "w2"], [False, False], [True, True]),                     # no correct trace
        row("p2", "3", ["cut", "cut2"], [True, False], [False, True]),                  # correct but incomplete
        row("p3", "4", ["too long " * 30], [True], [True]),                             # correct, complete, long
        row("p4", "5", ["fine"], [True], [True]),
    ])
    out, report = filter_traces(frame, char_count, max_trace_tokens=40, system_prompt="SYS", data_source="src")
    assert report.rows_in == 5 and report.rows_out == 2
    assert report.dropped == {"no_correct_trace": 1, "no_complete_correct_trace": 1, "all_correct_traces_too_long": 1}
    assert report.rows_in == report.rows_out + sum(report.dropped.values())
    assert report.generations_in == 10
    assert report.generations_rejected == {"wrong": 4, "incomplete": 1, "too_long": 2}
    assert [t[0]["content"] for t in out["target"]] == ["ok-1", "fine"]
    assert out["prompt"][0] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "p0"}]
    assert out["reward_model"][1] == {"style": "rule", "ground_truth": "5"}
    assert list(out.columns) == ["data_source", "prompt", "target", "ability", "reward_model", "extra_info"]
    assert set(report.dropped) == set(DROP_REASONS)


def test_missing_columns_are_named():
    frame = openr1([row("p", "1", ["g"], [True], [True])]).drop(columns=["is_reasoning_complete"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['is_reasoning_complete'\]"):
        validate_openr1(frame, "trace file x")


def malformed_frame():
    return openr1([
        row("ok", "1", ["g"], [True], [True]),
        row("p", "1", ["g1", "g2"], [True], [True, True]),   # misaligned lists
        row("", "1", ["g"], [True], [True]),                 # empty problem
        row("p", 3, ["g"], [True], [True]),                  # non-string answer
        row("p", "1", None, [True], [True]),                 # null generations
        row("p", "1", ["g", None], [True, True], [True, True]),  # a null generation
    ])


def test_malformed_rows_are_counted_per_reason_never_silently_dropped():
    out, report = filter_traces(malformed_frame(), char_count, 100, "", "src")
    assert len(out) == 1 and report.rows_in == 6
    assert report.malformed == {
        "generations, correctness_math_verify and is_reasoning_complete differ in length": 1,
        "empty or non-string problem": 1, "empty or non-string answer": 1,
        "generations / correctness_math_verify / is_reasoning_complete not lists": 1,
        "a generation is not a string": 1}
    report.check_totals()


def test_the_schema_check_still_names_rows_by_position():
    with pytest.raises(DataError) as err:
        validate_openr1(malformed_frame(), "trace file x")
    message = str(err.value)
    assert "differ in length: 1 row(s) [1]" in message and "not lists: 1 row(s) [4]" in message


def test_streaming_equals_in_memory_and_accepts_the_luffy_schema(tmp_path):
    from luffy.data.traces import PromptTemplate, TraceFilter, prepare_stream, resolve_sources

    frame = openr1([row(f"p{i}", str(i), ["wrong", "x" * (5 + i % 40), "ok"], [False, True, True], [True] * 3)
                    for i in range(50)] + [row("", "1", ["g"], [True], [True])])
    whole, report = filter_traces(frame, char_count, 30, "SYS", "src")
    for part, rows in enumerate((slice(0, 20), slice(20, 51))):
        frame.iloc[rows].to_parquet(tmp_path / f"part{part}.parquet")
    sources = resolve_sources(str(tmp_path / "part*.parquet"))
    assert [s.rsplit("/", 1)[1] for s in sources] == ["part0.parquet", "part1.parquet"]
    flt = TraceFilter(char_count, 30, PromptTemplate("luffy", "SYS"), "src")
    prepare_stream(sources, str(tmp_path / "out.parquet"), flt, batch_rows=7)  # many small batches
    streamed = pd.read_parquet(tmp_path / "out.parquet")
    assert streamed["target"].map(lambda t: t[0]["content"]).tolist() == \
        whole["target"].map(lambda t: t[0]["content"]).tolist()
    assert streamed["extra_info"].map(lambda e: e["index"]).tolist() == list(range(len(whole)))
    assert flt.report.as_dict() == report.as_dict() and report.malformed == {"empty or non-string problem": 1}
    # the filtered output is itself a valid input (the authors' released set has this schema)
    again = TraceFilter(char_count, 30, PromptTemplate("qwen_math_boxed"), "src")
    prepare_stream([str(tmp_path / "out.parquet")], str(tmp_path / "again.parquet"), again)
    rows = pd.read_parquet(tmp_path / "again.parquet")
    assert len(rows) == len(whole) and again.report.rows_out == len(whole)
    assert rows["prompt"].iloc[0].tolist() == [
        {"role": "user", "content": "p0\nPlease reason step by step, and put your final answer within \\boxed{}."}]
    strict = TraceFilter(char_count, 8, PromptTemplate("none"), "src")
    prepare_stream([str(tmp_path / "out.parquet")], str(tmp_path / "strict.parquet"), strict)
    assert strict.report.dropped["all_correct_traces_too_long"] == len(whole) - strict.report.rows_out > 0


def test_no_survivor_is_an_error_and_nothing_is_written(tmp_path):
    from luffy.data.traces import PromptTemplate, TraceFilter, prepare_stream

    openr1([row("p", "1", ["w"], [False], [True])]).to_parquet(tmp_path / "in.parquet")
    flt = TraceFilter(char_count, 30, PromptTemplate(), "src")
    with pytest.raises(DataError, match="no training row survived"):
        prepare_stream([str(tmp_path / "in.parquet")], str(tmp_path / "out.parquet"), flt)
    assert not (tmp_path / "out.parquet").exists() and flt.report.dropped["no_correct_trace"] == 1
    pd.DataFrame({"problem": ["p"]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(DataError, match="neither the OpenR1-Math-220k schema"):
        prepare_stream([str(tmp_path / "other.parquet")], str(tmp_path / "out.parquet"), flt)


def test_unreadable_file_is_a_data_error(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="cannot read .*x.parquet as parquet"):
        load_luffy(str(bad))
    with pytest.raises(DataError, match="file not found"):
        load_benchmark(str(tmp_path / "missing.parquet"))


def test_toy_data_is_seeded_disjoint_and_in_schema():
    cfg = ToyTaskConfig(n_train=50, n_pretrain=60, n_eval_id=20, n_eval_ood=20)
    a, b = make_toy_data(cfg, "SYS"), make_toy_data(cfg, "SYS")
    pd.testing.assert_frame_equal(a.raw_traces, b.raw_traces)
    validate_openr1(a.raw_traces, "toy")
    eval_problems = {m[-1]["content"] for s in a.suites.values() for m in s["prompt"]}
    assert not eval_problems & set(a.raw_traces["problem"]) and not eval_problems & set(a.pretrain["problem"])
    assert not set(a.raw_traces["problem"]) & set(a.pretrain["problem"])
    # the trace generator's own labels agree with the real grader
    for _, r in a.raw_traces.iterrows():
        for text, correct in zip(r["generations"], r["correctness_math_verify"]):
            assert grade(text, r["answer"]).correct == correct


def test_toy_benchmark_loads(tmp_path):
    data = make_toy_data(ToyTaskConfig(n_train=5, n_pretrain=5, n_eval_id=7, n_eval_ood=3), "SYS")
    path = tmp_path / "suite.parquet"
    data.suites["ood"].to_parquet(path)
    suite = load_benchmark(str(path))
    assert len(suite) == 3 and suite["prompt"][0][0] == {"role": "system", "content": "SYS"}


def test_trace_rendering_and_think_prefix():
    import random

    problem = sample_problem(random.Random(1), 2, 2, 9)
    text, answer = render_trace(problem)
    assert text.startswith("<think>\n") and f"\\boxed{{{answer}}}" in text and answer == problem.answer
    assert response_text("...<think>\n", text) == text[len("<think>\n"):]
    assert response_text("no think prompt", text) == text


def test_toy_space_too_small_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        make_toy_data(ToyTaskConfig(n_train=500, n_pretrain=0, n_eval_id=0, n_eval_ood=0, min_ops=1, max_ops=1,
                                    max_operand=3), "")


def test_atomic_outputs_have_ordinary_permissions(tmp_path):
    import os

    from luffy.io import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "d" / "f").read_text() == "y"


def test_validation_split_is_stable_and_counted(tmp_path):
    from luffy.data.traces import PromptTemplate, TraceFilter, held_out, prepare_stream

    openr1([row(f"p{i}", "1", ["ok"], [True], [True]) for i in range(200)]).to_parquet(tmp_path / "in.parquet")
    flt = TraceFilter(char_count, 10, PromptTemplate("luffy", "S"), "src", validation_fraction=0.2)
    report = prepare_stream([str(tmp_path / "in.parquet")], str(tmp_path / "t.parquet"), flt, batch_rows=30,
                            validation_out=str(tmp_path / "v.parquet"))
    held = sum(held_out(f"p{i}", 0.2) for i in range(200))
    assert 0 < held < 200 and (report.rows_validation, report.rows_out) == (held, 200 - held)
    valid = pd.read_parquet(tmp_path / "v.parquet")
    assert len(valid) == held and "target" not in valid.columns
    assert report.kept_trace_tokens_mean == 2.0  # every kept trace "ok", held out or not


@pytest.mark.parametrize("fmt", ["direct", "words"])
def test_a_far_teacher_base_is_pre_trained_in_a_format_of_its_own(fmt):
    """pretrain_format direct / words: the base's corpus never uses the teacher's notation
    (``12+7=19`` lines, ``The answer is``); the task, the suites and the teacher traces are
    those of the default format."""
    near = make_toy_data(ToyTaskConfig(n_train=20, n_pretrain=30, n_eval_id=5, n_eval_ood=5), "SYS")
    far = make_toy_data(ToyTaskConfig(n_train=20, n_pretrain=30, n_eval_id=5, n_eval_ood=5,
                                      pretrain_format=fmt), "SYS")
    assert far.raw_traces.equals(near.raw_traces) and far.pretrain["problem"].equals(near.pretrain["problem"])
    assert all(s.equals(near.suites[k]) for k, s in far.suites.items())
    for problem, trace, answer in zip(far.pretrain["problem"], far.pretrain["trace"], far.pretrain["answer"]):
        assert trace.endswith(f"</think>\nSo the result is \\boxed{{{answer}}}.")
        assert "=" not in trace and "The answer is" not in trace
        steps = trace.count("I take ")
        assert steps == (0 if fmt == "direct" else problem.count("+") + problem.count("-"))
    assert all("=" in t and "The answer is" in t for t in near.pretrain["trace"])
