"""An Oat-style boxed grader (the grader behind the reference's current README numbers).

    answer  = content of the last \\boxed{...} (or \\fbox{...}) after ``</think>``
    correct = normalise(answer) == normalise(gold)              (string equality)
           or |a - b| <= 1e-9 max(1, |b|)                       (both plain numbers: decided here)
           or latex2sympy(answer) - latex2sympy(gold) == 0       (sympy equality)
           or math-verify(gold, answer)                         (fallback)

``normalise`` is the MATH dataset's answer normalisation (Hendrycks et al.): no spaces,
``\\left``/``\\right``, ``\\!``, dollars, degrees, ``\\text{units}`` and trailing periods
removed, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``0.5`` ->
``\\frac{1}{2}``, a leading ``x =`` dropped. The sympy step parses LaTeX with a grammar
(latex2sympy2_extended, ANTLR), never Python's ``eval``; like every grader here it runs
under the caller's time limit (``luffy.reward.pool``) because sympy can take unbounded time
on hostile input such as ``9^{9^{9^{9}}}``.
"""

from __future__ import annotations

import re

from luffy.reward.math import Grade, answer_part, grade_answer

BOX_COMMANDS = ("\\boxed", "\\fbox")
UNIT_WORDS = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:[a-zA-Z]+\s*)+\}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or of a
    last ``\\boxed x`` without braces; None when there is none or its braces never close."""
    start = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:]
    cmd = next(c for c in BOX_COMMANDS if rest.startswith(c))
    rest = rest[len(cmd):]
    if rest.startswith(" "):  # "\boxed 5"
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _fix_slash(s: str) -> str:
    """``a/b`` with integers a, b -> ``\\frac{a}{b}``."""
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else s


def normalise(answer: str) -> str:
    """The MATH answer normalisation (see the module docstring)."""
    s = answer.strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = UNIT_WORDS.sub("", s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if "=" in s and len(s.split("=")[0].strip()) <= 2:  # "x = 5", "k=3"
        s = s.split("=", 1)[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_slash(s)
    return s


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
FRACTION = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")


def plain_number(s: str) -> float | None:
    """The value of a normalised answer that is an integer, decimal or \\frac{a}{b}, else None."""
    if NUMBER.fullmatch(s):
        return float(s)
    match = FRACTION.fullmatch(s)
    if match and int(match.group(3)) != 0:
        return (-1 if match.group(1) else 1) * int(match.group(2)) / int(match.group(3))
    return None


def sympy_equal(a: str, b: str) -> bool:
    """Whether two normalised LaTeX answers are equal as sympy expressions (False when either
    does not parse). Parsing is grammar-based; nothing is evaluated as code."""
    from latex2sympy2_extended import latex2sympy
    from sympy import simplify

    try:
        left, right = latex2sympy(a), latex2sympy(b)
        return bool(simplify(left - right) == 0)
    except Exception:  # unparseable or incomparable (sets, intervals): not equal here
        return False


def grade_boxed(completion: str, gold: str) -> Grade:
    """Oat-style verdict on one completion (module docstring). No time limit of its own."""
    answer = answer_part(completion)
    if answer is None:
        return Grade(False, None, "no_think_end")
    boxed = last_boxed(answer)
    if boxed is None:
        return Grade(False, None, "no_answer")
    predicted, target = normalise(boxed), normalise(gold)
    if predicted == target:
        return Grade(True, boxed, "correct")
    left, right = plain_number(predicted), plain_number(target)
    if left is not None and right is not None:  # two numbers: no symbolic work needed
        ok = abs(left - right) <= 1e-9 * max(1.0, abs(right))
        return Grade(ok, boxed, "correct" if ok else "wrong")
    if sympy_equal(predicted, target):
        return Grade(True, boxed, "correct")
    fallback = grade_answer(f"\\boxed{{{boxed}}}", gold, timeout_s=None)
    return Grade(fallback.correct, boxed, fallback.reason)
