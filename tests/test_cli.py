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
