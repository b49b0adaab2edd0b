"""The LUFFY trace filter: OpenR1-Math-220k rows -> training rows with one teacher trace each.

A generation is kept only if it is math-verify-correct AND its reasoning is complete AND it
has at most ``max_trace_tokens`` tokens under the policy's tokenizer; the first survivor
becomes the target; problems with none are dropped. Every problem lands in exactly one
bucket of the report (kept; dropped for the furthest check its best generation failed; or
malformed, per reason), so the counts add up and no row disappears unaccounted for.

Scale: the input is read as parquet record batches and the output written batch by batch,
so memory stays flat in the input size. Token counts are taken lazily in batches: only a
problem's first correct + complete generation is tokenised, the next one only if that was
too long (the tokenizer's Rust batch encoder uses every core). ``too_long`` therefore counts
the generations examined before a target was found.

Validation split: with ``validation_fraction`` > 0, each kept problem goes to the validation
file instead of the training file when a hash of its text falls below the fraction, so the
split is the same whatever the batch size, file order or machine (and it never touches the
test suites, unlike the reference's "best checkpoint" selection).

An input already in the LUFFY schema (e.g. the authors' ``Elliott/Openr1-Math-46k-8192``)
is validated instead: malformed rows and traces over the token limit are counted and
dropped; the prompt is rebuilt with the configured template from the user turn.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from luffy.config import HUB_PREFIX, PROMPT_TEMPLATES, is_glob
from luffy.data.hub import open_file, parquet_files
from luffy.data.schema import (INVALID_UTF8, INVALID_UTF8_COLUMN, LUFFY_REQUIRED, LUFFY_TYPES, OPENR1_REQUIRED,
                               OPENR1_TYPES, DataError, chat_messages, check_column_types, check_luffy_row,
                               check_openr1_row, decode_batch, ground_truth_of, luffy_rows, one_line,
                               require_columns)

DROP_REASONS = ("no_correct_trace", "no_complete_correct_trace", "all_correct_traces_too_long")
QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TokenCounter = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class PromptTemplate:
    """How a problem becomes chat messages (the model's chat template renders them later):
    ``luffy``: system prompt + problem (the reference); ``qwen_math_boxed``: problem + the
    Qwen2.5-Math boxed instruction, no system prompt; ``none``: the problem alone."""

    name: str = "luffy"
    system_prompt: str = ""

    def messages(self, problem: str) -> list[dict[str, str]]:
        if self.name == "luffy":
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return system + [{"role": "user", "content": problem}]
        if self.name == "qwen_math_boxed":
            return [{"role": "user", "content": f"{problem}\n{QWEN_MATH_INSTRUCTION}"}]
        if self.name == "none":
            return [{"role": "user", "content": problem}]
        raise ValueError(f"unknown prompt template '{self.name}', expected one of {PROMPT_TEMPLATES}")


@dataclass
class FilterReport:
    rows_in: int = 0
    rows_out: int = 0
    rows_validation: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    malformed: dict[str, int] = field(default_factory=dict)
    generations_in: int = 0
    generations_rejected: dict[str, int] = field(
        default_factory=lambda: {"wrong": 0, "incomplete": 0, "too_long": 0})
    kept_trace_tokens_max: int = 0
    kept_trace_tokens_sum: int = 0

    @property
    def kept_trace_tokens_mean(self) -> float:
        kept = self.rows_out + self.rows_validation  # the sum counts every kept trace, held out or not
        return self.kept_trace_tokens_sum / kept if kept else 0.0

    def check_totals(self) -> None:
        if self.rows_in != (self.rows_out + self.rows_validation + sum(self.dropped.values())
                            + sum(self.malformed.values())):
            raise AssertionError(f"filter report does not add up: {self}")

    def as_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "rows_validation": self.rows_validation,
                "dropped": dict(self.dropped),
                "malformed": dict(self.malformed), "generations_in": self.generations_in,
                "generations_rejected": dict(self.generations_rejected),
                "kept_trace_tokens_max": self.kept_trace_tokens_max,
                "kept_trace_tokens_mean": self.kept_trace_tokens_mean}


class TraceFilter:
    """The filter, applied batch by batch; ``report`` accumulates over all batches. Each
    ``add_*`` returns the batch's training rows and its held-out validation rows."""

    def __init__(self, count_tokens: TokenCounter, max_trace_tokens: int, template: PromptTemplate,
                 data_source: str, validation_fraction: float = 0.0):
        self.count_tokens, self.max_trace_tokens = count_tokens, max_trace_tokens
        self.template, self.data_source = template, data_source
        self.validation_fraction = validation_fraction
        self.report = FilterReport()

    def _malformed(self, reason: str) -> None:
        self.report.malformed[reason] = self.report.malformed.get(reason, 0) + 1

    def _rows(self, problems: list[str], traces: list[str], answers: list[str], first_index: int) -> pd.DataFrame:
        out = luffy_rows(self.data_source, "", problems, traces, answers)
        out["prompt"] = [self.template.messages(p) for p in problems]
        out["extra_info"] = [{"split": "train", "index": first_index + i} for i in range(len(problems))]
        return out

    def _choose(self, candidates: list[list[str]]) -> list[tuple[str, int] | None]:
        """Per problem, its first candidate within the token limit (text, tokens), or None;
        counted in rounds so that only the candidates needed are tokenised."""
        chosen: list[tuple[str, int] | None] = [None] * len(candidates)
        position = [0] * len(candidates)
        pending = [i for i, c in enumerate(candidates) if c]
        while pending:
            counts = self.count_tokens([candidates[i][position[i]] for i in pending])
            still = []
            for i, tokens in zip(pending, counts):
                if tokens <= self.max_trace_tokens:
                    chosen[i] = (candidates[i][position[i]], tokens)
                    continue
                self.report.generations_rejected["too_long"] += 1
                position[i] += 1
                if position[i] < len(candidates[i]):
                    still.append(i)
            pending = still
        return chosen

    def _select(self, problems: list[str], answers: list[str], candidates: list[list[str]],
                drop_reasons: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Each problem's target (``_choose``) or its drop reason; then the kept problems split
        into training rows and held-out validation rows (benchmark schema)."""
        kept: dict[bool, tuple[list[str], list[str], list[str]]] = {False: ([], [], []), True: ([], [], [])}
        for problem, answer, choice, reason in zip(problems, answers, self._choose(candidates), drop_reasons):
            if choice is None:
                self.report.dropped[reason] += 1
                continue
            self.report.kept_trace_tokens_max = max(self.report.kept_trace_tokens_max, choice[1])
            self.report.kept_trace_tokens_sum += choice[1]
            for column, value in zip(kept[held_out(problem, self.validation_fraction)], (problem, choice[0], answer)):
                column.append(value)
        valid = self._rows(*kept[True], self.report.rows_validation).drop(columns=["target"])
        self.report.rows_validation += len(kept[True][0])
        train = self._rows(*kept[False], self.report.rows_out)
        self.report.rows_out += len(kept[False][0])
        return train, valid

    def add_openr1(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Filter one batch of OpenR1-schema rows."""
        self.report.rows_in += len(frame)
        problems, answers, candidates, reasons = [], [], [], []
        for row in frame.to_dict("records"):
            reason = INVALID_UTF8 if row.get(INVALID_UTF8_COLUMN) else check_openr1_row(row)
            if reason:
                self._malformed(reason)
                continue
            self.report.generations_in += len(row["generations"])
            best, good = 0, []
            for text, ok, done in zip(row["generations"], row["correctness_math_verify"],
                                      row["is_reasoning_complete"]):
                if not ok:
                    self.report.generations_rejected["wrong"] += 1
                elif not done:
                    self.report.generations_rejected["incomplete"] += 1
                    best = max(best, 1)
                else:
                    best = 2
                    good.append(text)
            problems.append(row["problem"])
            answers.append(row["answer"])
            candidates.append(good)
            reasons.append(DROP_REASONS[best])
        return self._select(problems, answers, candidates, reasons)

    def add_luffy(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Validate one batch of LUFFY-schema rows (the problem is the last user turn)."""
        self.report.rows_in += len(frame)
        problems, answers, traces = [], [], []
        for row in frame.to_dict("records"):
            messages = chat_messages(row["prompt"])
            users = [m["content"] for m in messages or [] if m["role"] == "user"]
            reason = check_luffy_row(row) if users and users[-1].strip() else "prompt without a non-empty user turn"
            reason = INVALID_UTF8 if row.get(INVALID_UTF8_COLUMN) else reason
            if reason:
                self._malformed(reason)
                continue
            problems.append(users[-1])
            answers.append(ground_truth_of(row["reward_model"]))
            traces.append([chat_messages(row["target"])[0]["content"]])
        return self._select(problems, answers, traces, ["all_correct_traces_too_long"] * len(problems))


def held_out(problem: str, fraction: float) -> bool:
    """Whether a problem belongs to the validation split: its text's hash, as a number in
    [0, 1), is below ``fraction``."""
    if fraction <= 0:
        return False
    return int(hashlib.sha256(problem.encode()).hexdigest()[:12], 16) / 16 ** 12 < fraction


def filter_traces(frame: pd.DataFrame, count_tokens: TokenCounter, max_trace_tokens: int, system_prompt: str,
                  data_source: str, what: str = "trace file", template: str = "luffy"
                  ) -> tuple[pd.DataFrame, FilterReport]:
    """The filter on an in-memory OpenR1-schema frame (small inputs, tests)."""
    require_columns(frame, OPENR1_REQUIRED, what)
    flt = TraceFilter(count_tokens, max_trace_tokens, PromptTemplate(template, system_prompt), data_source)
    out, _ = flt.add_openr1(frame)
    flt.report.check_totals()
    return out, flt.report


# ---- streaming from files or the hub ----
def resolve_sources(traces: str, split: str = "train", config: str = "default") -> list[str]:
    """Parquet files of the trace input: a file, a directory, a glob, or 'hub:<dataset id>'
    (the dataset's auto-converted parquet for ``config``/``split`` on the HuggingFace hub)."""
    if traces.startswith(HUB_PREFIX):
        return parquet_files(traces[len(HUB_PREFIX):], config, split, f"trace input {traces}")
    if os.path.isdir(traces):
        files = sorted(glob.glob(os.path.join(traces, "**", "*.parquet"), recursive=True))
    elif is_glob(traces):
        files = sorted(glob.glob(traces))
    else:
        files = [traces] if os.path.exists(traces) else []
    if not files:
        raise DataError(f"trace input {traces}: no parquet file found")
    return files


def iter_batches(sources: Iterable[str], batch_rows: int) -> Iterator[tuple[str, pd.DataFrame]]:
    """(source, frame) record batches of every file, with only the columns the filter reads. A
    text column of structs or lists (or the like, ``check_column_types``) is a ``DataError``
    naming the file and the column; an unreadable file one naming the file, on one line."""
    for source in sources:
        try:
            with open_file(source) as fh:
                parquet = pq.ParquetFile(fh)
                names = parquet.schema_arrow.names
                luffy = {"prompt", "target", "reward_model"} <= set(names)  # as ``input_schema`` decides
                check_column_types(parquet.schema_arrow, LUFFY_TYPES if luffy else OPENR1_TYPES,
                                   f"trace file {source}")
                wanted = [c for c in (*OPENR1_REQUIRED, *LUFFY_REQUIRED) if c in names]
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
                    yield source, decode_batch(batch)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"trace file {source}: cannot read as parquet ({type(err).__name__}: {one_line(err)})"
                            ) from None


def input_schema(columns: Sequence[str], what: str) -> str:
    """'openr1' or 'luffy', from the columns; a DataError naming what is missing otherwise."""
    if {"prompt", "target", "reward_model"} <= set(columns):
        return "luffy"
    missing = [c for c in OPENR1_REQUIRED if c not in columns]
    if missing:
        raise DataError(f"{what}: neither the OpenR1-Math-220k schema (missing column(s) {missing}) nor the LUFFY "
                        f"schema (prompt, target, reward_model); found {list(columns)}")
    return "openr1"


class _BatchWriter:
    """Appends frames to one parquet file (schema from the first non-empty frame)."""

    def __init__(self, path: Path):
        self.path, self.writer = path, None

    def write(self, rows: pd.DataFrame) -> None:
        if rows.empty:
            return
        table = pa.Table.from_pandas(rows, preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self, empty_columns: Sequence[str]) -> bool:
        """Close; a file that got no rows is written with ``empty_columns`` and no rows. Returns
        whether any row was written."""
        if self.writer is None:
            pd.DataFrame(columns=list(empty_columns)).to_parquet(self.path, index=False)
            return False
        self.writer.close()
        return True


def prepare_stream(sources: Sequence[str], out: str, flt: TraceFilter, batch_rows: int = 1024,
                   progress: Callable[[int], None] | None = None, validation_out: str | None = None,
                   max_rows: int | None = None) -> FilterReport:
    """Filter every batch of ``sources`` (their first ``max_rows`` rows, when given) into the
    parquet ``out`` and the held-out problems into ``validation_out`` (benchmark schema; no rows
    when nothing is held out). Both are written atomically."""
    from contextlib import ExitStack

    from luffy.io import atomic_path

    if flt.validation_fraction > 0 and not validation_out:
        raise ValueError("a validation fraction needs a validation output file")
    with ExitStack() as stack:
        train = _BatchWriter(stack.enter_context(atomic_path(out, suffix=".parquet")))
        valid = _BatchWriter(stack.enter_context(atomic_path(validation_out, suffix=".parquet"))) \
            if validation_out else None
        try:
            read = 0
            for source, frame in iter_batches(sources, batch_rows):
                if max_rows is not None:
                    if read >= max_rows:
                        break
                    frame = frame.iloc[: max_rows - read]
                    read += len(frame)
                kind = input_schema(list(frame.columns), f"trace file {source}")
                rows, held = flt.add_openr1(frame) if kind == "openr1" else flt.add_luffy(frame)
                train.write(rows)
                if valid is not None:
                    valid.write(held)
                if progress:
                    progress(len(frame))
        finally:
            wrote = train.close(LUFFY_REQUIRED)
            if valid is not None:
                valid.close([c for c in LUFFY_REQUIRED if c != "target"])
        flt.report.check_totals()
        if not wrote:
            raise DataError(f"trace input {', '.join(sources[:3])}: no training row survived the filter "
                            f"({flt.report.as_dict()})")
    return flt.report


def token_counter(tokenizer) -> TokenCounter:
    """Token counts of texts under ``tokenizer`` in one batched (multi-core) call, without
    building offsets or Python id lists where the fast backend allows it."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)

    def count(texts: Sequence[str]) -> list[int]:
        texts = list(texts)
        if fast is not None:
            return [len(e) for e in fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count
