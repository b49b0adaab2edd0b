"""The LUFFY trace filter: OpenR1-Math-220k rows -> training rows with one teacher trace each.

A generation is kept only if it is math-verify-correct AND its reasoning is complete AND it
has at most ``max_trace_tokens`` tokens under the policy's tokenizer; the first survivor
becomes the target; problems with none are dropped. Every problem lands in exactly one
bucket of the report (kept, or dropped for the furthest check its best generation failed),
so the counts add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd

from luffy.data.schema import luffy_rows, validate_openr1

DROP_REASONS = ("no_correct_trace", "no_complete_correct_trace", "all_correct_traces_too_long")


@dataclass
class FilterReport:
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    generations_in: int = 0
    generations_rejected: dict[str, int] = field(
        default_factory=lambda: {"wrong": 0, "incomplete": 0, "too_long": 0})
    kept_trace_tokens_max: int = 0
    kept_trace_tokens_mean: float = 0.0

    def check_totals(self) -> None:
        if self.rows_in != self.rows_out + sum(self.dropped.values()):
            raise AssertionError(f"filter report does not add up: {self}")

    def as_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "dropped": dict(self.dropped),
                "generations_in": self.generations_in, "generations_rejected": dict(self.generations_rejected),
                "kept_trace_tokens_max": self.kept_trace_tokens_max,
                "kept_trace_tokens_mean": self.kept_trace_tokens_mean}


def filter_traces(frame: pd.DataFrame, count_tokens: Callable[[Sequence[str]], list[int]],
                  max_trace_tokens: int, system_prompt: str, data_source: str,
                  what: str = "trace file") -> tuple[pd.DataFrame, FilterReport]:
    """Apply the LUFFY filter; ``count_tokens`` maps texts to their token counts."""
    validate_openr1(frame, what)
    report = FilterReport(rows_in=len(frame))
    candidates: list[tuple[int, int, str]] = []  # (row, generation, text) of correct + complete
    furthest = [0] * len(frame)  # 0: none correct, 1: correct but incomplete, 2: correct+complete
    for row, (gens, correct, complete) in enumerate(zip(
            frame["generations"], frame["correctness_math_verify"], frame["is_reasoning_complete"])):
        report.generations_in += len(gens)
        for g, (text, ok, done) in enumerate(zip(gens, correct, complete)):
            if not ok:
                report.generations_rejected["wrong"] += 1
            elif not done:
                report.generations_rejected["incomplete"] += 1
                furthest[row] = max(furthest[row], 1)
            else:
                furthest[row] = 2
                candidates.append((row, g, text))
    lengths = count_tokens([text for _, _, text in candidates]) if candidates else []
    chosen: dict[int, tuple[str, int]] = {}
    for (row, _, text), length in zip(candidates, lengths):
        if length > max_trace_tokens:
            report.generations_rejected["too_long"] += 1
        elif row not in chosen:
            chosen[row] = (text, length)
    for row in range(len(frame)):
        if row not in chosen:
            report.dropped[DROP_REASONS[furthest[row]]] += 1
    kept = sorted(chosen)
    report.rows_out = len(kept)
    if kept:
        token_counts = [chosen[r][1] for r in kept]
        report.kept_trace_tokens_max = max(token_counts)
        report.kept_trace_tokens_mean = sum(token_counts) / len(token_counts)
    report.check_totals()
    out = luffy_rows(
        data_source=data_source, system_prompt=system_prompt,
        problems=[frame["problem"].iloc[r] for r in kept],
        traces=[chosen[r][0] for r in kept],
        answers=[frame["answer"].iloc[r] for r in kept])
    return out, report
