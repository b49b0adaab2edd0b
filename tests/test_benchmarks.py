"""The benchmark registry and its suites: the reference's files, public-schema files, errors."""

import dataclasses
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from luffy.config import ConfigError, SuiteConfig, load_registry, resolve_suite
from luffy.data.benchmarks import build_suite
from luffy.data.schema import DataError, load_benchmark

REGISTRY = "config/benchmarks.yaml"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/benchmarks is not here")

# suite -> (reference file, distinct problems, answer type, samples)
REFERENCE_SUITES = {
    "aime24": ("luffy_valid.all.parquet", 30, "math", 32),
    "aime25": ("luffy_valid.all.parquet", 30, "math", 32),
    "amc": ("luffy_valid.all.parquet", 83, "math", 32),
    "math500": ("luffy_valid.all.parquet", 500, "math", 1),
    "minerva": ("luffy_valid.all.parquet", 272, "math", 1),
    "olympiad": ("luffy_valid.all.parquet", 675, "math", 1),
    "arc_c": ("luffy_valid.arc_c.parquet", 1172, "choice", 1),
    "gpqa": ("luffy_valid.gpqa.parquet", 198, "choice", 1),
}


@pytest.fixture(scope="module")
def registry():
    return load_registry(REGISTRY)


def test_registry_lists_the_nine_benchmarks_with_the_papers_samples(registry):
    assert set(registry) == set(REFERENCE_SUITES) | {"mmlu_pro"}
    assert {name for name, spec in registry.items() if spec.group == "ood"} == {"arc_c", "gpqa", "mmlu_pro"}
    for name, (_, problems, answer_type, n) in REFERENCE_SUITES.items():
        spec = registry[name]
        assert (spec.problems, spec.answer_type, spec.n) == (problems, answer_type, n), name
        assert spec.hub_id and spec.local is None  # the product reads the hub unless told otherwise


@needs_shared
@pytest.mark.parametrize("name", sorted(REFERENCE_SUITES))
def test_each_reference_suite_loads_deduplicated(registry, name, tmp_path):
    file, problems, answer_type, _ = REFERENCE_SUITES[name]
    frame = build_suite(name, dataclasses.replace(registry[name], local=str(SHARED / file)))
    assert len(frame) == problems and (frame["ability"] == answer_type).all()
    out = tmp_path / f"{name}.parquet"
    frame.to_parquet(out)
    suite = load_benchmark(str(out))  # what the evaluate stage reads
    assert suite["prompt"].map(lambda m: m[-1]["role"] == "user").all()
    assert suite["prompt"].map(lambda m: m[-1]["content"]).nunique() <= problems
    if answer_type == "choice":
        assert set(suite["ground_truth"]) <= set("ABCD1234")


def test_mmlu_pro_fixture_in_the_public_schema(registry):
    frame = build_suite("mmlu_pro", dataclasses.replace(registry["mmlu_pro"], local=str(FIXTURES / "mmlu_pro.jsonl")))
    rows = [json.loads(line) for line in (FIXTURES / "mmlu_pro.jsonl").read_text().splitlines()]
    assert len(frame) == len(rows)
    golds = [r["ground_truth"] for r in frame["reward_model"]]
    assert golds == [r["answer"] for r in rows]
    first = frame["prompt"].iloc[0][-1]["content"]
    assert first.startswith("Answer the following multiple choice question.")
    assert "LETTER is one of ABCDEFGHIJ" in first and "\nC) coulomb" in first and "\nJ) watt" in first
    assert "one of ABCD." in frame["prompt"].iloc[1][-1]["content"]  # 4 options: 4 letters


def test_gpqa_and_arc_public_rows(registry, tmp_path):
    gpqa = pd.DataFrame({"Question": ["Q1?", "Q2?"], "Correct Answer": ["right", "yes"],
                         "Incorrect Answer 1": ["w1", "n1"], "Incorrect Answer 2": ["w2", "n2"],
                         "Incorrect Answer 3": ["w3", "n3"]})
    path = tmp_path / "gpqa.parquet"
    gpqa.to_parquet(path)
    spec = dataclasses.replace(registry["gpqa"], local=str(path), problems=2)
    frame, again = build_suite("gpqa", spec), build_suite("gpqa", spec)
    for row, correct in zip(frame.itertuples(), ("right", "yes")):
        gold = row.reward_model["ground_truth"]
        assert f"\n{gold}) {correct}" in row.prompt[-1]["content"]  # the gold letter labels the correct answer
    assert frame["prompt"].map(lambda m: m[-1]["content"]).tolist() == \
        again["prompt"].map(lambda m: m[-1]["content"]).tolist()  # a fixed shuffle
    arc = pd.DataFrame({"question": ["Which?"], "choices": [{"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}],
                        "answerKey": ["3"]})
    arc.to_parquet(path)
    frame = build_suite("arc_c", dataclasses.replace(registry["arc_c"], local=str(path), problems=1))
    assert frame["reward_model"].iloc[0]["ground_truth"] == "3" and "\n3) c" in frame["prompt"].iloc[0][-1]["content"]


def test_bad_benchmark_inputs_are_named(registry, tmp_path):
    with pytest.raises(DataError, match="12 distinct problems, expected 30"):
        frame = pd.DataFrame({"problem": [f"p{i}" for i in range(12)], "answer": ["1"] * 12})
        frame.to_parquet(tmp_path / "a.parquet")
        build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(tmp_path / "a.parquet")))
    with pytest.raises(DataError, match="no column 'question'.*registry's 'columns'"):
        build_suite("minerva", dataclasses.replace(registry["minerva"], local=str(tmp_path / "a.parquet")))
    pd.DataFrame({"problem": ["p", ""], "answer": ["1", "2"]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"empty problem: 1 row\(s\) \[1\]"):
        build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(tmp_path / "b.parquet"), problems=None))
    with pytest.raises(DataError, match="local file not found"):
        build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(tmp_path / "none.parquet")))


@needs_shared
def test_reference_file_without_the_suites_rows(registry):
    with pytest.raises(DataError, match="no rows with data_source 'aime'"):
        build_suite("aime24", dataclasses.replace(registry["aime24"], local=str(SHARED / "luffy_valid.gpqa.parquet")))


def test_hub_failure_names_the_dataset_and_the_workaround(registry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HuggingFaceH4/aime_2024.*local copy"):
        build_suite("aime24", registry["aime24"])


def test_suite_settings_come_from_the_registry(registry):
    suite = SuiteConfig(source="benchmark:aime24")
    resolve_suite(suite, registry["aime24"], "s")
    assert (suite.n, suite.answer_type, suite.grader, suite.group, suite.title, suite.system_prompt) == \
        (32, "math", "math_verify", "math", "AIME24", "drop")
    toy = SuiteConfig(source="toy:id")
    resolve_suite(toy, None, "t")
    assert (toy.n, toy.system_prompt, toy.title) == (1, "keep", None)
    with pytest.raises(ConfigError, match="'s.grader': 'boxed' does not grade choice answers"):
        resolve_suite(SuiteConfig(source="benchmark:gpqa", grader="boxed"), registry["gpqa"], "s")


def test_bad_registry_is_named(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("x:\n  hub_id: a/b\n  format: table\n")
    with pytest.raises(ConfigError, match="'x.format': 'table' is not one of"):
        load_registry(str(bad))
    bad.write_text("x: 3\n")
    with pytest.raises(ConfigError, match="'x': expected a mapping"):
        load_registry(str(bad))
    bad.write_text("x:\n  split: test\n")
    with pytest.raises(ConfigError, match="needs a hub_id or a local file"):
        load_registry(str(bad))
    assert os.path.exists(REGISTRY)


def test_hub_trace_input_offline_is_named(monkeypatch):
    from luffy.data.traces import resolve_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="open-r1/OpenR1-Math-220k \\(default/train\\).*local copy"):
        resolve_sources("hub:open-r1/OpenR1-Math-220k")
