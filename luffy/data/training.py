"""The training rows as token ids: prompts rendered with the policy's chat template, teacher
traces (+EOS) as their continuations, gold answers, and optionally the traces' per-token
teacher log-probs. Every engine and the preflight read training data through here."""

from __future__ import annotations

import dataclasses
import math

from luffy.data.schema import DataError, luffy_fields, read_luffy, teacher_logprobs_of
from luffy.data.templates import encode_prompts, encode_traces


@dataclasses.dataclass
class TrainData:
    prompt_ids: list[list[int]]
    trace_ids: list[list[int]]
    answers: list[str]
    rendered: list[str]  # the prompts rendered by the chat template (ending with its generation prompt)
    first_row: int = 0   # the file's row of the first entry (a data_start slice starts later)
    teacher_logp: list[list[float]] | None = None  # log pi_phi per trace token, EOS included


def load_train_data(path: str, tokenizer, start: float = 0.0, end: float = 1.0,
                    teacher_logprobs: bool = False) -> TrainData:
    """Rows [floor(start N), floor(end N)) of the training file: complementary fractions give
    disjoint problem sets (e.g. SFT on the first half, RL on the second). With
    ``teacher_logprobs`` also each trace's per-token teacher log-probs, which must match the
    trace's token count (EOS: 0 when not given)."""
    frame = read_luffy(path)
    prompts, traces, answers = luffy_fields(frame)
    first, last = math.floor(start * len(prompts)), math.floor(end * len(prompts))
    if last <= first:
        raise DataError(f"training data {path}: rows [{start}, {end}) of {len(prompts)} are empty")
    prompts, traces, answers = prompts[first:last], traces[first:last], answers[first:last]
    rendered, prompt_ids = encode_prompts(tokenizer, prompts)
    data = TrainData(prompt_ids, encode_traces(tokenizer, rendered, traces), answers, rendered, first)
    if teacher_logprobs:
        data.teacher_logp = teacher_logprobs_of(frame, f"training data {path}")[first:last]
        misaligned = [first + r for r, (lp, ids) in enumerate(zip(data.teacher_logp, data.trace_ids))
                      if len(lp) not in (len(ids) - 1, len(ids))]
        if misaligned:
            raise DataError(f"training data {path}: teacher_logprobs length differs from the trace's token count "
                            f"under the policy tokenizer in {len(misaligned)} row(s) {misaligned[:10]}; score the "
                            f"traces with the policy's tokenizer and chat template (`luffy score-traces`)")
        data.teacher_logp = [lp + [0.0] * (len(ids) - len(lp)) for lp, ids in zip(data.teacher_logp, data.trace_ids)]
    return data
