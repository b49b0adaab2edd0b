import time

import pytest

from luffy.reward.math import grade


@pytest.mark.parametrize("completion, gold, correct, reason", [
    ("<think>7+7=14</think>\nThe answer is \\boxed{14}.", "14", True, "correct"),
    ("r</think> \\boxed{\\frac{1}{2}}", "0.5", True, "correct"),
    ("r</think> \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "correct"),
    ("r</think> \\boxed{15}", "14", False, "wrong"),
    ("r</think> \\boxed{-14}", "14", False, "wrong"),
    ("<think>\\boxed{14} and I keep thinking", "14", False, "no_think_end"),
    ("r</think> I do not know.", "14", False, "no_answer"),
    ("r</think> \\boxed{", "14", False, "no_answer"),
    # answer inside the thinking does not count; only what follows </think>
    ("\\boxed{14}</think> so \\boxed{13}", "14", False, "wrong"),
])
def test_grades(completion, gold, correct, reason):
    g = grade(completion, gold)
    assert (g.correct, g.reason) == (correct, reason)


def test_extracted_answer_is_recorded():
    assert grade("x</think> \\boxed{42}", "42").extracted == "42"


@pytest.mark.parametrize("answer", [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}",
])
def test_pathological_answers_are_bounded_in_time(answer):
    began = time.perf_counter()
    g = grade("x</think> " + answer, "14", timeout_s=1)
    assert not g.correct
    assert time.perf_counter() - began < 4.0


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for answer in (f"\\boxed{{{payload}}}", payload, f"${payload}$"):
        g = grade("x</think> " + answer, "1")
        assert not g.correct
    assert not marker.exists()
