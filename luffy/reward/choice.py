"""Multiple-choice grading (ARC-c, GPQA-diamond, MMLU-Pro): the option label the answer picks.

The label is the last one stated after ``</think>``, in a ``\\boxed{...}`` (``\\boxed{C}``,
``\\boxed{(C)}``, ``\\boxed{\\text{C}}``, ``\\boxed{C) 10^{-4} eV}``), an "ANSWER: X" line
(GPQA's requested format, any case, markdown bold allowed) or "the answer is (X)". Labels
are letters A-J or digits 1-9 (22 ARC-c rows number their options); the verdict is label
equality with the gold label.
"""

from __future__ import annotations

import re

from luffy.reward.boxed import last_boxed
from luffy.reward.math import Grade, answer_part

LABEL = r"([A-J]|[1-9])"
BOXED_LABEL = re.compile(r"^\s*(?:\\text\{|\\mathrm\{|\\textbf\{)?\s*\(?\s*" + LABEL + r"\s*\)?\s*\}?\s*(?:[).:]|\s|$)")
# after the phrase: a label in parentheses (any case), or a bare capital letter / digit that
# ends the line or is followed by punctuation, so that "Answer: I think ..." or "the answer
# is a prime" do not read as labels
PHRASE_LABEL = r"\**\s*(?:\(\s*([A-Ja-j1-9])\s*\)|([A-J1-9])(?=[ \t]*(?:$|[).,:;*\n])))"
ANSWER_LINE = re.compile(r"(?i:answer)\s*[:：]\s*" + PHRASE_LABEL, re.MULTILINE)
ANSWER_IS = re.compile(r"(?i:answer\s+is)\s*[:：]?\s*" + PHRASE_LABEL, re.MULTILINE)


def extract_choice(answer: str) -> str | None:
    """The last label stated (position, label) in a box or an answer phrase, or None."""
    found: list[tuple[int, str]] = []
    boxed = last_boxed(answer)
    if boxed is not None:
        match = BOXED_LABEL.match(boxed)
        if match:
            found.append((answer.rfind(boxed), match.group(1)))
    for pattern in (ANSWER_LINE, ANSWER_IS):
        found += [(m.start(), m.group(1) or m.group(2)) for m in pattern.finditer(answer)]
    return max(found)[1].upper() if found else None


def grade_choice(completion: str, gold: str) -> Grade:
    answer = answer_part(completion)
    if answer is None:
        return Grade(False, None, "no_think_end")
    label = extract_choice(answer)
    if label is None:
        return Grade(False, None, "no_answer")
    ok = label == gold.strip().upper()
    return Grade(ok, label, "correct" if ok else "wrong")
