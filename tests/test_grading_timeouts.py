"""Issue 20: an answer whose grading timed out is a verdict the results show. Each suite's
result file counts them per grader (``grading_timeouts``), the evaluate run logs
``<suite>/grading_timeouts/<grader>``, and the report notes every evaluation that had any."""

import json

import pandas as pd
import pytest

from luffy.config import EvaluationConfig, GradingConfig, ReportConfig, SuiteConfig, resolve_suite
from luffy.data.schema import benchmark_rows, load_benchmark

# math-verify runs on for more than 100 s on this answer (sympy and a tower of powers): the
# per-answer limit decides it on any machine, quiet or loaded
PATHOLOGICAL = "r</think> \\boxed{9^{9^{9^{9}}}}"
TIMEOUT_S = 3.0  # far above the milliseconds the ordinary answers take, even on a busy machine


class ScriptedBackend:
    """A generation backend that answers each suite (in the order they are evaluated) with
    given completions, per problem ``n`` of them: the model's text is not under test here."""

    name = "scripted"
    max_context = 4096

    def __init__(self, replies):
        self.replies = list(replies)

    def generate(self, prompts, sampling):
        reply = self.replies.pop(0)
        assert len(reply) == len(prompts) and all(len(samples) == sampling.n for samples in reply)
        return reply


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """A math suite (4 problems) and a multiple-choice suite (3 problems), as parquet files."""
    out = tmp_path_factory.mktemp("suites")
    rows = {"toy_id": benchmark_rows("toy_id", "test", "S", [f"What is {i} + 1?" for i in range(4)],
                                     [str(i + 1) for i in range(4)]),
            "quiz": benchmark_rows("quiz", "test", "S", [f"Pick {c}." for c in "ABC"], list("ABC"))}
    paths = {}
    for name, frame in rows.items():
        paths[name] = str(out / f"{name}.parquet")
        frame.to_parquet(paths[name])
    return paths


def settings_for(paths) -> EvaluationConfig:
    suites = {"toy_id": SuiteConfig(source=paths["toy_id"], n=2, temperature=1.0, max_tokens=8, system_prompt="keep"),
              "quiz": SuiteConfig(source=paths["quiz"], n=2, temperature=1.0, max_tokens=8, system_prompt="keep",
                                  answer_type="choice")}
    for name, suite in suites.items():
        resolve_suite(suite, None, name)
    return EvaluationConfig(backend="hf", suites=suites, grading=GradingConfig(workers=2, timeout_s=TIMEOUT_S))


def replies(paths, pathological: int):
    """Correct answers everywhere, except the second sample of the first ``pathological`` math
    problems; on the choice suite one wrong label per problem."""
    golds = load_benchmark(paths["toy_id"])["ground_truth"].tolist()
    math = [[f"r</think> \\boxed{{{gold}}}", PATHOLOGICAL if i < pathological else f"r</think> \\boxed{{{gold}}}"]
            for i, gold in enumerate(golds)]
    labels = load_benchmark(paths["quiz"])["ground_truth"]
    quiz = [[f"r</think> ANSWER: {gold}", "r</think> ANSWER: J"] for gold in labels]
    return [math, quiz]


def test_timed_out_answers_are_counted_in_results_mlflow_and_the_report(suites, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    from luffy import stages
    from luffy.evaluate import backends

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "timeouts")
    settings = settings_for(suites)
    eval_dir = tmp_path / "eval"
    for model, pathological in (("base", 0), ("luffy", 2)):
        backend = ScriptedBackend(replies(suites, pathological))
        monkeypatch.setattr(backends, "make_backend", lambda *args, backend=backend, **kwargs: backend)
        stages.evaluate(settings, tiny_model_dir, suites, str(eval_dir / model), model, "evaluate", threads=2)

    # (a) the suite's results: per grader of its answer type, the answers whose grading timed out
    results = {(m, s): json.loads((eval_dir / m / f"{s}.json").read_text()) for m in ("base", "luffy")
               for s in ("toy_id", "quiz")}
    assert results["luffy", "toy_id"]["grading_timeouts"] == {"math_verify": 2, "boxed": 2}
    assert results["base", "toy_id"]["grading_timeouts"] == {"math_verify": 0, "boxed": 0}
    assert results["luffy", "quiz"]["grading_timeouts"] == results["base", "quiz"]["grading_timeouts"] == {"choice": 0}
    samples = pd.read_parquet(eval_dir / "luffy" / "toy_id.parquet")
    timed_out = samples[samples["completion"] == PATHOLOGICAL]
    assert (timed_out["reason_math_verify"] == "timeout").all() and not timed_out["correct"].any()
    assert results["luffy", "toy_id"]["accuracy"] == pytest.approx(6 / 8)  # graded wrong, counted in the accuracy

    # (b) the evaluate run: a metric per suite and grader
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("timeouts")
    for model, expected in (("luffy", 2.0), ("base", 0.0)):
        [run] = client.search_runs([experiment.experiment_id],
                                   f"tags.`luffy.group` = '{model}' AND tags.`luffy.stage` = 'evaluate'")
        metrics = run.data.metrics
        assert metrics["toy_id/grading_timeouts/math_verify"] == metrics["toy_id/grading_timeouts/boxed"] == expected
        assert metrics["quiz/grading_timeouts/choice"] == 0.0

    # (c) the report's notes: the evaluation that had timeouts, and only that one
    markdown = stages.report(ReportConfig(title="T", published=False), str(eval_dir), ["base", "luffy"],
                             ["toy_id", "quiz"], {}, str(tmp_path / "report"), "report", "report",
                             suite_meta={"toy_id": {"title": "Toy-ID"}, "quiz": {"title": "Quiz", "group": "ood"}})
    line = "- Toy-ID (luffy): 2 of 8 answers' grading timed out (math_verify) and 2 (boxed), graded wrong"
    assert line in markdown.splitlines()
    assert markdown.count("grading timed out") == 2  # the note's lead and its one line
    assert "Answers whose grading timed out were graded wrong" in markdown
    assert line in (tmp_path / "report" / "results.md").read_text()


def test_no_timeouts_and_older_result_files_give_no_note(tmp_path):
    """Zero timeouts, and a result file from before they were counted (no key), say nothing."""
    from luffy.report.tables import grading_timeouts, paper_layout

    for model, record in (("base", {"accuracy": 0.5, "samples": 2}),
                          ("luffy", {"accuracy": 0.5, "samples": 2, "grading_timeouts": {"math_verify": 0}})):
        (tmp_path / model).mkdir()
        (tmp_path / model / "toy_id.json").write_text(json.dumps(record))
        pd.DataFrame({"problem_id": [0, 0], "sample_index": [0, 1], "correct": [True, False]}).to_parquet(
            tmp_path / model / "toy_id.parquet")
    assert grading_timeouts(tmp_path, ["base", "luffy"], ["toy_id"]) == {}
    body, _, _ = paper_layout(tmp_path, ["base", "luffy"], ["toy_id"], {}, decimals=1, show_published=False)
    assert "| base | 50.0 | 50.0 |" in body and "timed out" not in body
