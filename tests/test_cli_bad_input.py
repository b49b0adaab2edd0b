"""Every ``luffy`` subcommand ends bad input with one error line and exit status 2, never a
traceback: YAML syntax (with line and column), bytes that are not UTF-8, a directory where a
file belongs, a model directory without config.json, a missing file, malformed or NaN settings.

The walk covers every subcommand the parser has (a new one without cases fails the test); each
case runs ``luffy.cli.main`` in-process, as the ``luffy`` command does, and a few run as the
command itself."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from luffy import cli
from luffy.config import (BaseModelConfig, BenchmarkSpec, DataConfig, EvaluationConfig, ReportConfig, SuiteConfig,
                          TinyModelConfig, TrainConfig, to_json)

LUFFY = Path(sys.executable).parent / "luffy"


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    """Kinds of bad input files, each with a name the stages would accept."""
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "model_without_config").mkdir()
    (tmp_path / "model_without_config" / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "syntax.yaml").write_text("experiments:\n  luffy: {algorithm: luffy\n")
    (tmp_path / "latin1.yaml").write_bytes("results_dir: r\u00e9sultats\n".encode("latin-1"))
    (tmp_path / "not_parquet.parquet").write_bytes(b"PAR1 not really\xff\xfe")
    (tmp_path / "not_json.json").write_bytes(b"\xff\xfe{")
    suites = "evaluation: {suites: {s: {source: 'toy:id'}}}\n"
    (tmp_path / "no_credentials.yaml").write_text(suites)
    (tmp_path / "server_never_started.yaml").write_text(
        suites + f"tracking: {{uri: 'http://127.0.0.1:9', credentials: c, server: {{dir: {tmp_path / 'none'}}}}}\n")
    return {"no_credentials": tmp_path / "no_credentials.yaml",
            "server_never_started": tmp_path / "server_never_started.yaml","directory": tmp_path / "a_directory", "model_without_config": tmp_path / "model_without_config",
            "yaml_syntax": tmp_path / "syntax.yaml", "not_utf8": tmp_path / "latin1.yaml",
            "not_parquet": tmp_path / "not_parquet.parquet", "not_json": tmp_path / "not_json.json",
            "missing": tmp_path / "missing.parquet"}


def _cases(bad: dict[str, Path], out: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """subcommand -> [(what is bad, argv)]."""
    o = str(out)
    d, m, x = str(bad["directory"]), str(bad["model_without_config"]), str(bad["missing"])
    p = str(bad["not_parquet"])
    train = to_json(TrainConfig())

    def train_args(settings: str = train, data: str = p, base: str = m) -> list[str]:
        return ["train", "--settings", settings, "--data", data, "--base-model", base, "--out-dir", f"{o}/final",
                "--metrics", f"{o}/m.jsonl", "--work-dir", f"{o}/work"]

    config_cases = [(kind, [str(bad[kind])]) for kind in ("yaml_syntax", "not_utf8", "directory", "missing")]
    return {
        "make-toy-traces": [("settings not JSON", ["--settings", "{", "--out-dir", o]),
                            ("output directory is a file", ["--settings", to_json(DataConfig()),
                                                            "--out-dir", str(bad["yaml_syntax"])])],
        "prepare-traces": [(kind, ["--settings", to_json(DataConfig()), "--traces", path, "--tokenizer", "shipped",
                                   "--out", f"{o}/t.parquet", "--report", f"{o}/r.json"])
                           for kind, path in (("directory", d), ("not parquet", p), ("missing", x))]
                          + [("tokenizer directory without tokenizer files",
                              ["--settings", to_json(DataConfig()), "--traces", p, "--tokenizer", d,
                               "--out", f"{o}/t.parquet", "--report", f"{o}/r.json"])],
        "prepare-benchmark": [(kind, ["--settings", to_json(BenchmarkSpec(hub_id="x/y", local=path)), "--name", "s",
                                      "--out", f"{o}/s.parquet"])
                              for kind, path in (("directory", d), ("not parquet", p), ("not UTF-8 JSON lines",
                                                                                         str(bad["not_json"])))],
        "make-base-model": [("corpus is a directory", ["--settings", to_json(TinyModelConfig()), "--system-prompt", "s",
                                                       "--corpus", d, "--out-dir", f"{o}/b", "--metrics", f"{o}/m"]),
                            ("NaN setting", ["--settings", json.dumps({"lr": float("nan")}), "--system-prompt", "s",
                                             "--corpus", p, "--out-dir", f"{o}/b", "--metrics", f"{o}/m"])],
        "prepare-base-model": [("model directory without config.json",
                                ["--settings", to_json(BaseModelConfig(path=m)), "--out-dir", f"{o}/b"])],
        "train": [("NaN learning rate", train_args(settings=json.dumps({**json.loads(train), "lr": float("nan")}))[1:]),
                  ("seed beyond the range", train_args(settings=json.dumps({**json.loads(train), "seed": 2**63}))[1:]),
                  ("base model without config.json", train_args()[1:]),
                  ("data is a directory", train_args(data=d, base=str(out))[1:])],
        "convert": [(kind, ["--checkpoint", path, "--out-dir", f"{o}/hf"]) for kind, path in
                    (("directory without manifest", d), ("missing", x))],
        "evaluate": [("model directory without config.json",
                      ["--settings", _eval_settings(), "--model", m, "--suite", f"s={p}", "--out-dir", f"{o}/e"]),
                     ("suite without a name", ["--settings", _eval_settings(), "--model", m, "--suite", p,
                                               "--out-dir", f"{o}/e"]),
                     ("suite without settings", ["--settings", _eval_settings(), "--model", m, "--suite", f"t={p}",
                                                 "--out-dir", f"{o}/e"])],
        "teacher-traces": [("model directory without config.json", ["--model", m, "--data", p, "--traces", "2",
                                                                    "--out", f"{o}/t.json"])],
        "report": [("evaluation directory is missing", ["--settings", to_json(ReportConfig()), "--eval-dir", x,
                                                        "--models", "base", "--suites", "s", "--out-dir", f"{o}/r"]),
                   ("suite meta not JSON", ["--settings", to_json(ReportConfig()), "--eval-dir", d, "--models", "base",
                                            "--suites", "s", "--suite-meta", "{", "--out-dir", f"{o}/r"])],
        "generate": [("model directory without config.json", ["What is 1+1?", "--model", m]),
                     ("model is a file", ["What is 1+1?", "--model", p])],
        "score-traces": [("teacher directory without config.json", ["--teacher", m, "--tokenizer", "shipped",
                                                                     "--data", p, "--out", f"{o}/s.parquet"])],
        "init-tracking": [("not JSON", ["--resolved-config", "{"])],
        "compare": config_cases,
        "tracking-server": config_cases + [
            ("tracking.credentials unset", [str(bad["no_credentials"])]),
            ("a reader before the server's first start", [str(bad["server_never_started"]), "--add-reader", "ann"]),
            ("a reader name that is no user name", [str(bad["server_never_started"]), "--add-reader", "a b"])],
        "check-config": config_cases,
        "rehearse": config_cases,
        "settings": [("README is a directory", ["--update", d]), ("README is missing", ["--update", x])],
        "schema": [],  # takes no input
    }


def _eval_settings() -> str:
    settings = json.loads(to_json(EvaluationConfig(suites={"s": SuiteConfig(source="toy:id")})))
    del settings["models"]
    return json.dumps(settings)


def test_every_subcommand_ends_bad_input_in_one_line(bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    cases = _cases(bad, tmp_path / "out")
    parser = cli._parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(cases) == sorted(subcommands), "a subcommand without bad-input cases"
    problems = []
    for stage, stage_cases in cases.items():
        for what, argv in stage_cases:
            try:
                code = cli.main([stage, *argv])
            except SystemExit as stop:  # argparse's usage error (also one line and status 2)
                code = stop.code
            except BaseException as err:  # noqa: BLE001 - the test's point: nothing escapes
                problems.append(f"{stage} ({what}): {type(err).__name__}: {err}")
                continue
            err_lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
            if code != 2 or len(err_lines) != 1:
                problems.append(f"{stage} ({what}): exit {code}, error lines {err_lines}")
    assert not problems, "\n".join(problems)


def test_as_typed_yaml_syntax_names_line_and_column_and_a_model_directory_needs_config_json(bad):
    """The command itself: stderr is exactly the one line."""
    done = subprocess.run([str(LUFFY), "check-config", str(bad["yaml_syntax"])], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"luffy check-config: error: config file {bad['yaml_syntax']}: YAML syntax error at line 3, column 1: "
        "expected ',' or '}', but got '<stream end>'"]
    done = subprocess.run([str(LUFFY), "check-config", str(bad["not_utf8"])], capture_output=True, text=True)
    assert done.stderr.splitlines() == [
        f"luffy check-config: error: config file {bad['not_utf8']}: not UTF-8 text (byte 0xe9 at offset 14)"]
    done = subprocess.run([str(LUFFY), "generate", "What is 1+1?", "--model", str(bad["model_without_config"])],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"luffy generate: error: model '{bad['model_without_config']}': a directory without config.json, not a "
        "model directory"]
