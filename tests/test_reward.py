import signal
import sys
import threading
import time

import pytest

from luffy.reward.boxed import grade_boxed, last_boxed, normalise
from luffy.reward.choice import grade_choice
from luffy.reward.math import AnswerTimeout, answer_deadline, grade
from luffy.reward.pool import ANSWER_TYPES, GraderPool


@pytest.mark.parametrize("completion, gold, correct, reason", [
    ("<think>7+7=14</think>\nThe answer is \\boxed{14}.", "14", True, "correct"),
    ("r</think> \\boxed{\\frac{1}{2}}", "0.5", True, "correct"),
    ("r</think> \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "correct"),
    ("r</think> \\boxed{15}", "14", False, "wrong"),
    ("r</think> \\boxed{-14}", "14", False, "wrong"),
    ("<think>\\boxed{14} and I keep thinking", "14", False, "no_think_end"),
    ("r</think> I do not know.", "14", False, "no_answer"),
    ("r</think> \\boxed{", "14", False, "parse_failure"),  # an unclosed box
    ("r</think> \\boxed{}", "14", False, "parse_failure"),    # a box with nothing parseable in it
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
    assert (g.correct, g.reason) == (False, "timeout")
    assert time.perf_counter() - began < 4.0


def _busy(seconds: float) -> None:
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        pass


class _SlowFinaliser:
    def __del__(self):
        _busy(0.3)  # the deadline's first alarm lands here; Python prints it and goes on


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_timeout_lost_in_a_finaliser_comes_back():
    # A one-shot alarm raised inside a finaliser (as the garbage collector runs weakref
    # callbacks mid-parse) is printed, not raised, and the answer ran on past its limit
    # (seen in CI: 4.9 s for a 1 s limit). The deadline raises again until the block ends.
    began = time.perf_counter()
    with pytest.raises(AnswerTimeout):
        with answer_deadline(0.1):
            _SlowFinaliser()
            _busy(3.0)
    assert time.perf_counter() - began < 2.0


def test_a_deadline_never_raises_inside_pythons_report_of_a_lost_exception(monkeypatch):
    """A Python ``sys.unraisablehook`` (pytest's formats the lost exception's traceback) that runs
    past the deadline's ticks completes its report; the block still times out after it."""
    reports = []

    def slow_hook(unraisable) -> None:
        _busy(0.3)  # several of the deadline's ticks land in here
        reports.append(type(unraisable.exc_value).__name__)

    monkeypatch.setattr(sys, "unraisablehook", slow_hook)
    began = time.perf_counter()
    with pytest.raises(AnswerTimeout):
        with answer_deadline(0.1):
            _SlowFinaliser()  # the first alarm is lost in its __del__: Python reports it to the hook
            _busy(3.0)
    assert reports == ["AnswerTimeout"]  # the hook's report finished
    assert time.perf_counter() - began < 2.0


def test_the_deadline_never_outlives_its_block():
    # Blocks that end just as their deadline comes (the race between the body's end and the
    # timer's stop): afterwards no timer runs, the previous handler is back, no alarm arrives.
    previous = signal.getsignal(signal.SIGALRM)
    timed_out = 0
    for i in range(300):
        try:
            with answer_deadline(0.002, again_every_s=0.0005):
                _busy(0.0015 + i * 0.000005)
        except AnswerTimeout:
            timed_out += 1
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is previous
    assert 0 < timed_out < 300  # both endings happened
    _busy(0.1)  # a leaked timer would raise here


def test_the_deadline_is_off_the_main_thread_and_without_a_limit():
    with answer_deadline(None):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(answer_deadline(1.0).seconds))
    worker.start()
    worker.join()
    assert seen == [None]


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for answer in (f"\\boxed{{{payload}}}", payload, f"${payload}$"):
        g = grade("x</think> " + answer, "1")
        assert not g.correct
    assert not marker.exists()


# ---- the graders side by side: (answer in the box, gold, math-verify verdict, boxed verdict) ----
EQUIVALENCES = [
    ("\\frac{1}{2}", "0.5", True, True),                 # fraction vs decimal
    ("0.75", "\\frac{3}{4}", True, True),
    ("3/4", "\\frac{3}{4}", True, True),
    ("\\dfrac{3}{4}", "\\frac34", True, True),             # \dfrac, unbraced \frac
    ("\\frac{2}{4}", "\\frac{1}{2}", True, True),
    ("[1, 3)", "[1,3)", True, True),                      # intervals, LaTeX spacing
    ("(1,3)", "[1,3]", False, False),
    ("\\{3, 2, 1\\}", "\\{1,2,3\\}", True, True),          # sets
    ("4", "\\{1,2,3\\}", False, False),
    ("10\\text{ cm}", "10", True, True),                   # units
    ("10 \\mathrm{cm}", "10", True, True),
    ("90^\\circ", "90", True, True),                       # degrees
    ("90^{\\circ}", "90^\\circ", True, True),
    ("\\left( 1, 2 \\right)", "(1,2)", True, True),
    ("x = 5", "5", True, True),
    ("2\\sqrt3", "2\\sqrt{3}", True, True),
    ("\\sqrt{12}", "2\\sqrt{3}", True, True),
    ("50\\%", "50", False, True),                          # the graders differ: both kept per sample
    ("\\$18.90", "18.90", True, True),
    ("1,000", "1000", True, True),
    ("\\frac{\\pi}{2}", "\\pi/2", True, True),
    ("(x+1)^2", "x^2+2x+1", True, True),
    ("0.3333", "\\frac{1}{3}", False, False),
    ("-\\infty", "\\infty", False, False),
    ("15", "14", False, False),
]


@pytest.mark.parametrize("boxed, gold, math_verify_ok, boxed_ok", EQUIVALENCES)
def test_tricky_equivalences_under_both_graders(boxed, gold, math_verify_ok, boxed_ok):
    completion = f"reasoning</think> so the answer is $\\boxed{{{boxed}}}$."
    assert grade(completion, gold).correct is math_verify_ok
    verdict = grade_boxed(completion, gold)
    assert verdict.correct is boxed_ok and verdict.extracted == boxed
    assert verdict.reason == ("correct" if boxed_ok else "wrong")


def test_boxed_grader_extraction_and_reasons():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("so \\boxed 5.") == "5."
    assert last_boxed("\\boxed{1") is None and last_boxed("no box") is None
    assert grade_boxed("r</think> 14", "14").reason == "no_answer"  # the boxed grader needs a box
    assert grade_boxed("\\boxed{14} still thinking", "14").reason == "no_think_end"
    assert normalise("\\dfrac12") == "\\frac{1}{2}" and normalise(" k = 3. ") == "3"


@pytest.mark.parametrize("completion, gold, label", [
    ("r</think> \\boxed{C}", "C", "C"),
    ("r</think> \\boxed{(B)}", "B", "B"),
    ("r</think> \\boxed{\\text{D}}", "D", "D"),
    ("r</think> \\boxed{C) 10^{-4} eV}", "C", "C"),
    ("r</think> The reasoning.\nANSWER: B", "B", "B"),
    ("r</think> **Answer:** (d)", "D", "D"),
    ("r</think> The answer is (A).", "A", "A"),
    ("r</think> So \\boxed{2}", "2", "2"),                  # ARC-c rows numbered 1-4
    ("r</think> \\boxed{A} ... no, ANSWER: B", "A", "B"),  # the last stated label counts
    ("r</think> \\boxed{J}", "J", "J"),                     # MMLU-Pro has up to 10 options
])
def test_multiple_choice_labels(completion, gold, label):
    verdict = grade_choice(completion, gold)
    assert verdict.extracted == label and verdict.correct is (label == gold)


@pytest.mark.parametrize("completion, reason", [
    ("r</think> \\boxed{Carbon}", "no_answer"), ("r</think> I think C is right", "no_answer"),
    ("r</think> The answer is a prime number.", "no_answer"),
    ("r</think> Answer: I think so.", "no_answer"),  # the "I" of "I think" is not option I
    ("\\boxed{C}", "no_think_end"),
])
def test_multiple_choice_without_a_label(completion, reason):
    assert grade_choice(completion, "C").reason == reason


# ---- the pool: all cores, a hard per-answer limit, nothing executed ----
@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout_s=1.0, grace_s=0.3) as p:
        yield p


def test_the_pools_workers_start_at_once_in_the_background_before_any_grade():
    """The pool starts its workers when it is made, in a thread of its own (so a caller loads its
    model meanwhile), not at its first ``grade``: after ``ready()`` its forkserver runs, with the
    workers it forked, before anything was graded."""
    import psutil

    def forkservers() -> list:
        return [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]

    with GraderPool(workers=2, timeout_s=1.0) as fresh:
        fresh.ready()
        (server,) = forkservers()
        assert len(server.children()) == 2  # both workers, forked before the first grade
        assert fresh.grade(["r</think> \\boxed{2}"], ["2"], ANSWER_TYPES["math"])[0]["math_verify"].correct


def test_a_pool_whose_background_start_failed_starts_again_and_grades(monkeypatch, caplog):
    """The workers' start in the background failed once (in `make demo`: a broken pipe while vLLM
    loaded beside it): ``ready()`` logs it with its traceback, starts a new pool, and grading
    goes on; a second failure ends in one error naming both."""
    import logging

    from luffy.reward.pool import GraderPoolError

    starts = []
    real_start = GraderPool._start

    def flaky_start(self) -> None:  # the first start fails as the pool's did
        starts.append(len(starts))
        try:
            if len(starts) == 1:
                raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError as err:
            self._start_error = err
            return
        real_start(self)

    monkeypatch.setattr(GraderPool, "_start", flaky_start)
    with caplog.at_level(logging.WARNING, logger="luffy.reward.pool"):
        with GraderPool(workers=1, timeout_s=1.0) as fresh:
            verdicts = fresh.grade(["r</think> \\boxed{2}"], ["2"], ANSWER_TYPES["math"])
    assert verdicts[0]["math_verify"].correct and len(starts) == 2
    assert "did not start (BrokenPipeError(32, 'Broken pipe')); starting them again" in caplog.text
    assert "Traceback" in caplog.text  # the first failure's, for whoever reads the log

    def always_broken(self) -> None:
        self._start_error = BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(GraderPool, "_start", always_broken)
    with GraderPool(workers=1, timeout_s=1.0) as broken:
        with pytest.raises(GraderPoolError, match=r"1 worker\(s\) did not start, twice: BrokenPipeError"):
            broken.grade(["x"], ["2"], ANSWER_TYPES["math"])


def test_pool_grades_in_order_with_every_grader(pool):
    completions = [f"r</think> \\boxed{{{v}}}" for v in ("1", "2", "\\frac{1}{2}", "0.5")]
    golds = ["1", "1", "0.5", "\\frac{1}{2}"]
    verdicts = pool.grade(completions, golds, ANSWER_TYPES["math"])
    assert [v["math_verify"].correct for v in verdicts] == [True, False, True, True]
    assert [v["boxed"].correct for v in verdicts] == [True, False, True, True]
    assert pool.grade(["r</think> ANSWER: C"], ["C"], ANSWER_TYPES["choice"])[0]["choice"].correct


@pytest.mark.parametrize("answer", [
    "9^{9^{9^{9}}}",                         # sympy computes a huge integer in C: only a kill stops it
    "(" * 500 + "1" + ")" * 500,
    "\\int_0^\\infty e^{-x^{x^{x}}} dx",
])
def test_pool_bounds_pathological_answers_and_completes_the_batch(pool, answer):
    completions = ["r</think> \\boxed{3}", f"r</think> \\boxed{{{answer}}}", "r</think> \\boxed{4}"]
    began = time.perf_counter()
    verdicts = pool.grade(completions, ["3", "3", "3"], ANSWER_TYPES["math"])
    elapsed = time.perf_counter() - began
    assert [v["math_verify"].correct for v in verdicts] == [True, False, False]
    assert verdicts[1]["boxed"].reason in ("timeout", "wrong", "error") and not verdicts[1]["boxed"].correct
    assert elapsed < 1.0 + 0.3 + 1.5  # the limit, the grace, and slack for a busy machine


def test_pool_never_executes_model_text(pool, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    completions = [f"r</think> \\boxed{{{payload}}}", f"r</think> {payload}", f"r</think> ANSWER: {payload}"]
    for graders in (ANSWER_TYPES["math"], ANSWER_TYPES["choice"]):
        verdicts = pool.grade(completions, ["1"] * 3, graders)
        assert not any(v.correct for verdict in verdicts for v in verdict.values())
    assert not marker.exists()


def test_pool_names_a_bad_request(pool):
    with pytest.raises(ValueError, match="unknown grader"):
        pool.grade(["x"], ["1"], ("sympy_eval",))
    with pytest.raises(ValueError, match="1 completions but 2 gold"):
        pool.grade(["x"], ["1", "2"], ("boxed",))


def test_boxed_grader_decides_plain_numbers_without_sympy():
    from luffy.reward.boxed import plain_number

    assert plain_number("\\frac{3}{4}") == 0.75 and plain_number("-12.5") == -12.5 and plain_number("x") is None
    assert plain_number("\\frac{1}{0}") is None
    assert grade_boxed("r</think> \\boxed{142.0}", "142").correct
    assert not grade_boxed("r</think> \\boxed{0.3333}", "\\frac{1}{3}").correct


def test_a_verdict_is_remembered_for_the_same_answer_text_and_a_time_out_is_not(monkeypatch):
    import luffy.reward.math as rm

    calls = []
    real_parse = rm.parse

    def counting(text, *a, **k):
        calls.append(text)
        return real_parse(text, *a, **k)

    monkeypatch.setattr(rm, "parse", counting)
    monkeypatch.setattr(rm, "_verdicts", {})
    answer = "</think> so the answer is \\boxed{\\frac{3}{7}}"
    first = rm.grade(answer, "3/7")
    parsed = len(calls)
    assert first.correct and first.reason == "correct" and parsed >= 1
    assert rm.grade(answer, "3/7") == first and len(calls) == parsed  # not parsed again
    assert rm.grade(answer, "4/7").reason == "wrong" and len(calls) > parsed  # another gold: graded

    def slow(text, *a, **k):
        raise rm.AnswerTimeout()

    monkeypatch.setattr(rm, "parse", slow)
    assert rm.grade("</think> \\boxed{5}", "5").reason == rm.TIMEOUT
    monkeypatch.setattr(rm, "parse", real_parse)
    assert rm.grade("</think> \\boxed{5}", "5").reason == "correct"  # the time-out was not remembered
    monkeypatch.setattr(rm, "VERDICTS_KEPT", 2)
    for k in range(4):
        rm.grade(f"</think> \\boxed{{{k}}}", str(k))
    assert len(rm._verdicts) == 2 and ("</think> \\boxed{3}".split("</think>", 1)[1], "3") in rm._verdicts
