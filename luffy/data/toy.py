"""A synthetic reasoning task: multi-step integer addition and subtraction.

Problem ``What is 12+7-5?``; a teacher trace reasons one operation per line:

    <think>
    12+7=19
    19-5=14
    </think>
    The answer is \\boxed{14}.

The generator writes training problems in the OpenR1-Math-220k schema (several teacher
traces per problem, some with an arithmetic slip, some cut off, some padded with re-checks
so that the length filter has work), evaluation suites in the benchmark schema, and a
format corpus for pre-training the tiny base model: concise traces in the teacher's format
(a base close to its teacher), or a base far from its teacher that never saw its notation:
``pretrain_format: words`` reasons in sentences (``I take 12 and add 7, which gives 19.``),
``direct`` answers without reasoning, both ending ``So the result is \\boxed{14}.``.
Everything is seeded and the three problem sets are disjoint.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import pandas as pd

from luffy.config import ToyTaskConfig
from luffy.data.schema import benchmark_rows

SOURCE = "toy_arithmetic"


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def text(self) -> str:
        expr = str(self.operands[0]) + "".join(f"{op}{x}" for op, x in zip(self.operators, self.operands[1:]))
        return f"What is {expr}?"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, operator, right, result) for each operation, left to right."""
        out, acc = [], self.operands[0]
        for op, x in zip(self.operators, self.operands[1:]):
            new = acc + x if op == "+" else acc - x
            out.append((acc, op, x, new))
            acc = new
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]


def sample_problem(rng: random.Random, min_ops: int, max_ops: int, max_operand: int) -> Problem:
    n_ops = rng.randint(min_ops, max_ops)
    operands = tuple(rng.randint(1, max_operand) for _ in range(n_ops + 1))
    operators = tuple(rng.choice("+-") for _ in range(n_ops))
    return Problem(operands, operators)


def render_trace(problem: Problem, slip_step: int | None = None, slip: int = 0,
                 rechecks: int = 0, rng: random.Random | None = None) -> tuple[str, int]:
    """A complete trace and its final answer; ``slip`` is added at ``slip_step`` (and propagates)."""
    lines, acc = [], problem.operands[0]
    for i, (op, x) in enumerate(zip(problem.operators, problem.operands[1:])):
        new = acc + x if op == "+" else acc - x
        if i == slip_step:
            new += slip
        lines.append(f"{acc}{op}{x}={new}")
        acc = new
    for _ in range(rechecks):
        lines.append(f"check {(rng or random).choice(lines[: len(problem.operators)])}")
    body = "\n".join(lines)
    return f"<think>\n{body}\n</think>\nThe answer is \\boxed{{{acc}}}.", acc


def render_direct(problem: Problem) -> str:
    """An answer without reasoning, in words of its own: the pre-training format of a base
    model far from its teacher (``pretrain_format: direct``)."""
    return f"<think>\n</think>\nSo the result is \\boxed{{{problem.answer}}}."


def render_words(problem: Problem) -> str:
    """The same step-by-step reasoning in words of its own (``pretrain_format: words``): a base
    that reasons, but never in the teacher's notation."""
    verbs = {"+": "add", "-": "subtract"}
    lines = [f"I take {left} and {verbs[op]} {right}, which gives {result}." for left, op, right, result in
             problem.steps()]
    body = "\n".join(lines)
    return f"<think>\n{body}\n</think>\nSo the result is \\boxed{{{problem.answer}}}."


PRETRAIN_RENDERERS = {"trace": lambda p: render_trace(p)[0], "words": render_words, "direct": render_direct}


def _unique_problems(rng: random.Random, count: int, seen: set, min_ops: int, max_ops: int,
                     max_operand: int) -> list[Problem]:
    out: list[Problem] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct toy problems with ops in [{min_ops}, {max_ops}] "
                             f"and operands <= {max_operand}: the space is too small")
        problem = sample_problem(rng, min_ops, max_ops, max_operand)
        if problem.text not in seen:
            seen.add(problem.text)
            out.append(problem)
    return out


def _generation(problem: Problem, rng: random.Random, cfg: ToyTaskConfig) -> tuple[str, bool, bool, str]:
    """One teacher trace: (text, math-verify-correct, reasoning complete, finish reason)."""
    roll = rng.random()
    if roll < cfg.wrong_rate:
        slip = rng.choice([-10, -2, -1, 1, 2, 10])
        text, _ = render_trace(problem, slip_step=rng.randrange(len(problem.operators)), slip=slip)
        return text, False, True, "stop"
    if roll < cfg.wrong_rate + cfg.incomplete_rate:
        text, _ = render_trace(problem)
        if rng.random() < 0.5:  # cut inside the reasoning: no answer at all
            cut = rng.randint(len("<think>\n") + 1, text.index("</think>"))
            return text[:cut], False, False, "length"
        # the answer is there (math-verify accepts it) but the model ran on and was cut off
        left = problem.operands[0]
        return f"{text} Let me double-check: {left}{problem.operators[0]}", True, False, "length"
    rechecks = rng.randint(4, 16) if roll < cfg.wrong_rate + cfg.incomplete_rate + cfg.verbose_rate else 0
    text, _ = render_trace(problem, rechecks=rechecks, rng=rng)
    return text, True, True, "stop"


def openr1_rows(problems: list[Problem], rng: random.Random, cfg: ToyTaskConfig) -> pd.DataFrame:
    rows = []
    for problem in problems:
        k = rng.randint(cfg.generations_min, cfg.generations_max)
        gens = [_generation(problem, rng, cfg) for _ in range(k)]
        reference, _ = render_trace(problem)
        answer = str(problem.answer)
        rows.append({
            "problem": problem.text,
            "solution": reference.split("</think>\n", 1)[1],
            "answer": answer,
            "problem_type": "Arithmetic",
            "question_type": "math-word-problem",
            "source": SOURCE,
            "uuid": str(uuid.UUID(int=rng.getrandbits(128))),
            "is_reasoning_complete": [g[2] for g in gens],
            "generations": [g[0] for g in gens],
            "correctness_math_verify": [g[1] for g in gens],
            "correctness_llama": [None] * k,
            "finish_reasons": [g[3] for g in gens],
            "correctness_count": sum(g[1] for g in gens),
            "messages": [{"role": "user", "content": problem.text},
                         {"role": "assistant", "content": reference}],
        })
    return pd.DataFrame(rows)


@dataclass
class ToyData:
    raw_traces: pd.DataFrame      # OpenR1-Math-220k schema
    pretrain: pd.DataFrame        # problem, answer, trace (correct, concise)
    suites: dict[str, pd.DataFrame]  # benchmark schema, keyed by split ("id", "ood")


def make_toy_data(cfg: ToyTaskConfig, system_prompt: str) -> ToyData:
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    # Evaluation problems are drawn first so that no training or pre-training problem equals one.
    eval_id = _unique_problems(rng, cfg.n_eval_id, seen, cfg.min_ops, cfg.max_ops, cfg.max_operand)
    eval_ood = _unique_problems(rng, cfg.n_eval_ood, seen, cfg.ood_min_ops, cfg.ood_max_ops, cfg.ood_max_operand)
    train = _unique_problems(rng, cfg.n_train, seen, cfg.min_ops, cfg.max_ops, cfg.max_operand)
    pretrain = _unique_problems(rng, cfg.n_pretrain, seen, cfg.min_ops, cfg.max_ops, cfg.max_operand)
    render = PRETRAIN_RENDERERS[cfg.pretrain_format]
    pretrain_frame = pd.DataFrame({
        "problem": [p.text for p in pretrain],
        "answer": [str(p.answer) for p in pretrain],
        "trace": [render(p) for p in pretrain],
    })
    suites = {
        split: benchmark_rows(
            data_source=f"toy_{split}", split="test", system_prompt=system_prompt,
            problems=[p.text for p in problems], answers=[str(p.answer) for p in problems])
        for split, problems in (("id", eval_id), ("ood", eval_ood))
    }
    return ToyData(openr1_rows(train, rng, cfg), pretrain_frame, suites)
