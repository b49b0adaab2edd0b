"""Grader throughput and time safety: the process pool vs serial reference-style grading.

Answers: a realistic mix of model answers (reasoning text, then a final answer in
\\boxed{}: integers, fractions written as decimals or \\dfrac, radicals, intervals, about 40%
wrong) plus 1% pathological ones (towers of powers, 500 nested parentheses, huge sums, ...).

- serial reference: ``verify(parse("$" + gold + "$"), parse(answer))`` in a loop on the main
  thread with math-verify's default timeouts, on the normal answers (the pathological ones
  can hang it inside C code, which is the point of the pool);
- pool: ``luffy.reward.pool.GraderPool`` over all cores, math-verify grader only (the same
  work) and math-verify + boxed (what a math suite stores);
- time safety: each pathological answer alone through the pool; its wall time minus the
  limit is the overshoot (goal: <= 0.5 s), and the batch must complete.

Run: .venv/bin/python benchmarks/grading.py [--answers 3000] [--timeout 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from math_verify import parse, verify

from luffy.reward.math import answer_part
from luffy.reward.pool import GraderPool

FILLER = ("Let me think about this step by step. We set up the equation and simplify both sides, "
          "checking the arithmetic carefully. ")
NORMAL = [  # (gold, ways the model writes a correct answer)
    ("42", ["42", "42.0", "\\text{42}"]),
    ("\\frac{3}{4}", ["\\frac{3}{4}", "\\dfrac{3}{4}", "0.75", "3/4"]),
    ("2\\sqrt{3}", ["2\\sqrt{3}", "2\\sqrt3", "\\sqrt{12}"]),
    ("(1, 3]", ["(1,3]", "(1, 3]"]),
    ("x^2 + 2x + 1", ["(x+1)^2", "x^2+2x+1"]),
    ("\\pi/2", ["\\frac{\\pi}{2}", "\\pi/2"]),
    ("\\{1, 2, 3\\}", ["\\{1,2,3\\}", "\\{3, 2, 1\\}"]),
    ("90^\\circ", ["90^\\circ", "90"]),
    ("-7", ["-7", "- 7"]),
    ("1.6", ["1.6", "\\frac{8}{5}"]),
]
PATHOLOGICAL = [
    "9^{9^{9^{9}}}",
    "(" * 500 + "1" + ")" * 500,
    "10^{10^{10^{10}}} - 10^{10^{10^{10}}}",
    "+".join(["x"] * 3000),
    "\\frac{" * 200 + "1" + "}{2}" * 200,
    "2^{2^{2^{2^{2^{2}}}}}!",
    "\\sqrt{" * 300 + "2" + "}" * 300,
    "\\int_0^\\infty e^{-x^{x^{x}}} dx",
]


def make_answers(count: int, seed: int) -> tuple[list[str], list[str], list[bool]]:
    rng = random.Random(seed)
    answers, golds, pathological = [], [], []
    for i in range(count):
        gold, forms = rng.choice(NORMAL)
        bad = i % 100 == 99
        if bad:
            final = PATHOLOGICAL[(i // 100) % len(PATHOLOGICAL)]
        elif rng.random() < 0.4:
            final = rng.choice(rng.choice(NORMAL)[1])  # (usually) another problem's answer: wrong
        else:
            final = rng.choice(forms)
        text = FILLER * rng.randint(2, 20) + f"</think>\nSo the answer is $\\boxed{{{final}}}$."
        answers.append(text)
        golds.append(gold)
        pathological.append(bad)
    return answers, golds, pathological


def reference_serial(answers: list[str], golds: list[str]) -> list[bool]:
    out = []
    for answer, gold in zip(answers, golds):
        part = answer_part(answer)
        try:
            out.append(bool(part is not None and verify(parse("$" + gold + "$"), parse(part))))
        except Exception:
            out.append(False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=3000)
    parser.add_argument("--timeout", type=float, default=3.0, help="per-answer limit of the pool (s)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    answers, golds, bad = make_answers(args.answers, args.seed)
    normal = [(a, g) for a, g, b in zip(answers, golds, bad) if not b]
    n_answers, n_golds = [a for a, _ in normal], [g for _, g in normal]
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, {platform.python_version()}")
    print(f"answers: {len(answers)} ({len(normal)} normal, {sum(bad)} pathological)")

    began = time.perf_counter()
    reference = reference_serial(n_answers, n_golds)
    serial_s = time.perf_counter() - began
    print(f"serial reference, normal answers: {len(normal) / serial_s:8.1f} answers/s ({serial_s:.1f} s)")

    with GraderPool(workers=args.workers, timeout_s=args.timeout) as pool:
        pool.grade(n_answers[:50], n_golds[:50], ("math_verify",))  # workers started and warm
        began = time.perf_counter()
        ours = pool.grade(n_answers, n_golds, ("math_verify",))
        pool_s = time.perf_counter() - began
        agree = sum(o["math_verify"].correct == r for o, r in zip(ours, reference)) / len(reference)
        print(f"pool ({pool.workers} workers), math-verify: {len(normal) / pool_s:8.1f} answers/s ({pool_s:.1f} s); "
              f"speed-up {serial_s / pool_s:.2f}x; verdicts agree with the reference on {agree:.1%}")
        began = time.perf_counter()
        pool.grade(n_answers, n_golds, ("math_verify", "boxed"))
        both_s = time.perf_counter() - began
        print(f"pool, math-verify + boxed: {len(normal) / both_s:8.1f} answers/s ({both_s:.1f} s)")

        began = time.perf_counter()
        verdicts = pool.grade(answers, golds, ("math_verify", "boxed"))
        mixed_s = time.perf_counter() - began
        reasons = sorted({v["math_verify"].reason for v, b in zip(verdicts, bad) if b})
        print(f"pool, whole mix incl. 1% pathological: {len(answers) / mixed_s:8.1f} answers/s ({mixed_s:.1f} s); "
              f"completed {len(verdicts)}/{len(answers)}; pathological reasons {reasons}")
        overshoots = []
        for text in PATHOLOGICAL:
            completion = f"</think> $\\boxed{{{text}}}$"
            began = time.perf_counter()
            (verdict,) = pool.grade([completion], ["1"], ("math_verify", "boxed"))
            elapsed = time.perf_counter() - began
            overshoots.append(elapsed - args.timeout)
            print(f"  {text[:40]!r:44} {elapsed:5.2f} s  {verdict['math_verify'].reason}/{verdict['boxed'].reason}")
        print(f"worst time over the {args.timeout:.1f} s limit: {max(overshoots):+.2f} s (goal <= +0.50 s)")


if __name__ == "__main__":
    main()
