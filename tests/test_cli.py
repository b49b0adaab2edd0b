"""Bad inputs at the command line: exit status 2 and a one-line message naming the problem."""

import json
import os
import subprocess

import pandas as pd


def luffy(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run(["luffy", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_trace_file_with_a_missing_column_is_named(tmp_path):
    pd.DataFrame({"problem": ["p"], "answer": ["1"], "generations": [["g"]]}).to_parquet(tmp_path / "t.parquet")
    result = luffy("prepare-traces", "--settings", json.dumps({"max_trace_tokens": 10}), "--traces",
                   str(tmp_path / "t.parquet"), "--tokenizer", "shipped", "--out", str(tmp_path / "o.parquet"),
                   "--report", str(tmp_path / "r.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert "missing column(s) ['correctness_math_verify', 'is_reasoning_complete']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_missing_training_file_is_named(tmp_path, tiny_model_dir):
    result = luffy("train", "--settings", json.dumps({"steps": 1}), "--data", str(tmp_path / "none.parquet"),
                   "--base-model", tiny_model_dir, "--out-dir", str(tmp_path / "o"), "--metrics",
                   str(tmp_path / "m.jsonl"), "--work-dir", str(tmp_path / "w"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"file not found: {tmp_path / 'none.parquet'}" in result.stderr


def test_bad_settings_json_is_reported(tmp_path):
    result = luffy("make-toy-traces", "--settings", "{not json", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "luffy make-toy-traces: error:" in result.stderr


def test_generate_answers_one_question(tmp_path, tiny_model_dir):
    result = luffy("generate", "--model", tiny_model_dir, "--backend", "hf", "--max-tokens", "12", "--n", "2",
                   "What is 2 + 3?", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample ") == 2
    empty = luffy("generate", "--model", tiny_model_dir, "--backend", "hf", " ", cwd=tmp_path)
    assert empty.returncode == 2 and "the question is empty" in empty.stderr


def test_threads_follow_the_slurm_allocation():
    from luffy.cli import allocated_threads

    assert allocated_threads(2, {}) == 2
    assert allocated_threads(2, {"SLURM_CPUS_PER_TASK": "64"}) == 64
    assert allocated_threads(2, {"SLURM_CPUS_PER_TASK": ""}) == 2


def _openr1_table(rows, flags_type):
    import pyarrow as pa

    columns = list(zip(*rows))
    return pa.table({"problem": pa.array(columns[0], pa.binary()).view(pa.string()),  # may hold invalid UTF-8
                     "answer": pa.array(columns[1]), "generations": pa.array(columns[2]),
                     "correctness_math_verify": pa.array(columns[3], pa.list_(flags_type)),
                     "is_reasoning_complete": pa.array(columns[4], pa.list_(flags_type))})


def test_flags_that_are_not_booleans_and_invalid_utf8_are_counted_never_used(tmp_path):
    """Correctness flags stored as strings ('False'), numbers or nulls, and text that is not
    valid UTF-8: each row is malformed, counted per reason, and not used; the rest goes on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = (b"good", "1", ["<think>t</think> \\boxed{1}"])
    traces = tmp_path / "traces"
    traces.mkdir()
    pq.write_table(_openr1_table([(*good, ["True"], ["True"]), (b"p1", "1", ["g"], ["False"], ["True"]),
                                  (b"p2", "1", ["g"], ["True"], ["False"])], pa.string()), traces / "a.parquet")
    pq.write_table(_openr1_table([(*good, [1], [1]), (b"p3", "1", ["g"], [0], [1])], pa.int64()),
                   traces / "b.parquet")
    pq.write_table(_openr1_table([(*good, [True], [True]), (b"p4", "1", ["g", "h"], [True, None], [True, True]),
                                  (b"bad \xff\xfe text", "1", ["g"], [True], [True])], pa.bool_()),
                   traces / "c.parquet")
    result = luffy("prepare-traces", "--settings", json.dumps({"max_trace_tokens": 1000}), "--traces", str(traces),
                   "--tokenizer", "shipped", "--out", str(tmp_path / "o.parquet"), "--report", str(tmp_path / "r.json"),
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["malformed"] == {"a correctness_math_verify flag that is not a boolean": 6,
                                   "text that is not valid UTF-8": 1}
    assert report["rows_in"] == 8 and report["rows_out"] == 1  # the good problem, once (the others repeat it)
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values()) + sum(report["malformed"].values())
    out = pd.read_parquet(tmp_path / "o.parquet")
    assert out["prompt"].map(lambda p: p[-1]["content"]).tolist() == ["good"]


def test_invalid_utf8_in_a_training_file_is_named(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"data_source": ["s", "s"], "ability": ["math", "math"],
                      "prompt": [[{"role": "user", "content": "q"}]] * 2,
                      "target": pa.array([b"[]", b"\xff"], pa.binary()).view(pa.string()),
                      "reward_model": [{"ground_truth": "1", "style": "rule"}] * 2,
                      "extra_info": [{"index": 0}, {"index": 1}]})
    pq.write_table(table, tmp_path / "train.parquet")
    result = luffy("train", "--settings", json.dumps({"steps": 1}), "--data", str(tmp_path / "train.parquet"),
                   "--base-model", tiny_model_dir, "--out-dir", str(tmp_path / "o"), "--metrics",
                   str(tmp_path / "m.jsonl"), "--work-dir", str(tmp_path / "w"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "text that is not valid UTF-8: 1 row(s) [1]" in result.stderr and "Traceback" not in result.stderr


def test_a_model_path_that_does_not_exist_is_named(tmp_path):
    """Not transformers' 75-line traceback about hub repo ids: one line that names the path."""
    missing = str(tmp_path / "models" / "nope")
    for args in (["generate", "--model", missing, "--backend", "hf", "What is 2 + 3?"],
                 ["train", "--settings", json.dumps({"steps": 1}), "--data", str(tmp_path / "d.parquet"),
                  "--base-model", missing, "--out-dir", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.jsonl"),
                  "--work-dir", str(tmp_path / "w")]):
        result = luffy(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"'{missing}': the path does not exist" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3
    relative = luffy("generate", "--model", "results/models/luffy", "1 + 1?", cwd=tmp_path)
    assert relative.returncode == 2 and "'results/models/luffy': the path does not exist" in relative.stderr


def test_command_line_numbers_outside_their_range_are_refused(tmp_path):
    for flag, value, valid in (("--top-p", "0", "in (0, 1]"), ("--temperature", "-1", ">= 0"), ("--n", "0", ">= 1"),
                               ("--max-tokens", "0", ">= 1")):
        result = luffy("generate", "--model", "m", flag, value, "q", cwd=tmp_path)
        assert result.returncode == 2 and f"argument {flag}: {value} is not {valid}" in result.stderr
    greedy = luffy("generate", "--model", str(tmp_path), "--temperature", "0", "--n", "4", "q", cwd=tmp_path)
    assert greedy.returncode == 2 and "temperature 0 (greedy) gives 4 identical samples" in greedy.stderr


def test_teacher_traces_measures_the_teacher_token_probability(tmp_path, tiny_model_dir, train_parquet):
    data = train_parquet(12)
    out = tmp_path / "eval" / "base" / "teacher_traces.json"
    result = luffy("teacher-traces", "--model", tiny_model_dir, "--data", data, "--traces", "8", "--out", str(out),
                   "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["traces"] == 8 and figures["tokens"] > 8 * 10
    assert 0 < figures["token_prob_median"] < 1 and 0 <= figures["share_below_0.1"] <= 1
    # an untrained model over a 261-token vocabulary: about 1/261 per token
    assert abs(figures["token_prob_mean"] - 1 / 261) < 0.01 and figures["logprob_mean"] < -4


def test_an_unreadable_external_model_is_named_when_its_evaluation_starts(tmp_path, monkeypatch):
    """Missing, not a model, an unknown hub id (offline: not in the cache): one line naming the
    external model and its source; nothing is written."""
    from pathlib import Path

    import yaml

    from luffy import workflow as wf
    from luffy.config import load_config

    (tmp_path / "notamodel").mkdir()
    (tmp_path / "afile").write_text("x")
    raw = yaml.safe_load((Path(__file__).with_name("micro.yaml")).read_text())
    raw["evaluation"]["models"] = {"gone": {"path": str(tmp_path / "gone")}, "empty": {"path": str(tmp_path / "notamodel")},
                                   "file": {"path": str(tmp_path / "afile")},
                                   "unknown": {"hub": "nobody-luffy-test/no-such-model", "revision": "v9"}}
    cfg = load_config(raw)
    suite = tmp_path / "suite.parquet"
    expected = {"gone": f"external model 'gone' (path:{tmp_path}/gone): the directory does not exist",
                "empty": f"external model 'empty' (path:{tmp_path}/notamodel): no config.json in the directory",
                "file": f"external model 'file' (path:{tmp_path}/afile): a file, not a model directory",
                "unknown": "external model 'unknown' (hub:nobody-luffy-test/no-such-model@v9): cannot read its config"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here; offline, an id not in the cache is unreadable
    for name, message in expected.items():
        result = luffy("evaluate", "--settings", wf.eval_settings(cfg, name), "--model", wf.model_path(cfg, name),
                       "--suite", f"toy_id={suite}", "--out-dir", str(tmp_path / "eval" / name), "--group", name,
                       cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"luffy evaluate: error: {message}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "eval" / name).exists()
