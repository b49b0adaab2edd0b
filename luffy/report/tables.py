"""The results table in the paper's layout: rows = models, columns = suites, then Avg.

With seeds (``<experiment>-seed<N>``), the Markdown table shows mean +- standard deviation
over each experiment's seeds; the CSV keeps every seed's values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from luffy.config import experiment_family, seed_of
from luffy.data.schema import DataError
from luffy.io import read_json


def collect(eval_dir: str | Path, models: list[str], suites: list[str]) -> pd.DataFrame:
    """Accuracy (percent) per evaluated model and suite, plus the unweighted average over suites."""
    table = {}
    for model in models:
        row = {}
        for suite in suites:
            path = Path(eval_dir) / model / f"{suite}.json"
            if not path.exists():
                raise DataError(f"report: missing evaluation result {path}")
            row[suite] = 100.0 * float(read_json(path)["accuracy"])
        row["Avg"] = sum(row.values()) / len(suites)
        table[model] = row
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index.name = "model"
    return frame


def per_seed(frame: pd.DataFrame, external: dict[str, str] | None = None) -> pd.DataFrame:
    """The per-model table with its experiment and seed as leading columns (the CSV), and with
    external models, each one's source."""
    out = frame.copy()
    out.insert(0, "experiment", [experiment_family(m) for m in frame.index])
    out.insert(1, "seed", pd.array([seed_of(name) for name in frame.index], dtype="Int64"))
    if external:
        out.insert(2, "external_source", [external.get(m, "") for m in frame.index])
    return out


def _results(eval_dir: str | Path, models: list[str], suites: list[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(model, suite, its evaluation's JSON) for each evaluation with a result file."""
    for model in models:
        for suite in suites:
            path = Path(eval_dir) / model / f"{suite}.json"
            if path.exists():
                yield model, suite, read_json(path)


def external_sources(eval_dir: str | Path, models: list[str], suites: list[str]) -> dict[str, str]:
    """External model -> where it came from, as its evaluation recorded it: 'hub:<id>[@<revision>]
    (commit <sha>)' or 'path:<directory>', and its cap on new tokens if it had one."""
    out = {}
    for model in models:
        first = next(_results(eval_dir, [model], suites), None)  # a model's first evaluation says it
        source = first[2].get("external") if first else None
        if source:
            commit, cap = source.get("commit"), source.get("max_tokens")
            out[model] = (source["source"] + (f" (commit {commit})" if commit else "")
                          + (f", at most {cap} new tokens" if cap else ""))
    return out


def grading_timeouts(eval_dir: str | Path, models: list[str], suites: list[str]
                     ) -> dict[tuple[str, str], tuple[dict[str, int], int | None]]:
    """(model, suite) -> (grader -> answers whose grading timed out, answers graded) for each
    evaluation with any, the suite's counted grader first; a result file without
    ``grading_timeouts`` (written before they were counted) says nothing and is passed over."""
    out = {}
    for model, suite, record in _results(eval_dir, models, suites):
        counted = record.get("grader")  # the verdict the tables count: named first
        found = record.get("grading_timeouts") or {}
        counts = {g: int(found[g]) for g in sorted(found, key=lambda g: (g != counted, g)) if found[g]}
        if counts:
            out[(model, suite)] = (counts, record.get("samples"))
    return out


TIMEOUT_NOTE = ("Answers whose grading timed out were graded wrong: load on the machine or a pathological answer "
                "decided these verdicts (limit: evaluation.grading.timeout_s per answer).")


def timeout_note(eval_dir: str | Path, models: list[str], suites: list[str], meta: dict[str, dict[str, Any]]) -> str:
    """A note with a line per evaluation whose grading timed out on some answers, e.g. '- AIME24
    (luffy): 2 of 64 answers' grading timed out (math_verify), graded wrong'; '' when none did."""
    lines = []
    for (model, suite), (counts, samples) in grading_timeouts(eval_dir, models, suites).items():
        (first, n), *rest = counts.items()
        answers = f"{n} of {samples} answers'" if samples else ("1 answer's" if n == 1 else f"{n} answers'")
        others = "".join(f" and {m} ({grader})" for grader, m in rest)
        lines.append(f"- {title(suite, meta)} ({model}): {answers} grading timed out ({first}){others}, graded wrong")
    return f"{TIMEOUT_NOTE}\n\n" + "\n".join(lines) + "\n" if lines else ""


def summarize(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(mean, sample std, number of seeds) per experiment, in first-appearance order."""
    families = [experiment_family(m) for m in frame.index]
    grouped = frame.groupby(families, sort=False)
    mean, std, count = grouped.mean(), grouped.std(ddof=1).fillna(0.0), grouped.size()
    return mean, std, count


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the first column left-aligned (names), the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(value: float, decimals: int) -> str:
    return "-" if pd.isna(value) else f"{value:.{decimals}f}"


EXTERNAL_MARK = " (external)"


def label(model: str, external: dict[str, str] | None = None) -> str:
    """A row's name: an external model's is marked."""
    return f"{model}{EXTERNAL_MARK}" if external and model in external else str(model)


def summary_table(frame: pd.DataFrame, decimals: int, extra_rows: list[list[str]] | None = None,
                  external: dict[str, str] | None = None) -> str:
    """One row per experiment: the value, or mean +- std over seeds (with a line saying so);
    external models marked; then ``extra_rows`` (already formatted, e.g. published numbers)."""
    mean, std, count = summarize(frame)
    seeded = bool((count > 1).any())
    rows = []
    for model in mean.index:
        cells = [_number(mean.loc[model, column], decimals) for column in mean.columns]
        if seeded and count[model] > 1:
            cells = [f"{cell} +- {std.loc[model, column]:.{decimals}f}" for cell, column in zip(cells, mean.columns)]
        rows.append([label(model, external), *cells])
    note = ""
    if seeded:
        note = ("Mean +- standard deviation over seeds (n per row: "
                + ", ".join(f"{name} {n}" for name, n in count.items()) + ").\n\n")
    return note + markdown_table(["Model", *map(str, mean.columns)], rows + (extra_rows or []))


def per_seed_table(frame: pd.DataFrame, decimals: int, external: dict[str, str] | None = None) -> str:
    """Every evaluated model (each seed) with its experiment and seed; external models marked."""
    table = per_seed(frame)
    rows = [[label(model, external), str(row["experiment"]), "" if pd.isna(row["seed"]) else str(row["seed"]),
             *(_number(row[c], decimals) for c in frame.columns)] for model, row in table.iterrows()]
    return markdown_table(["Model", "experiment", "seed", *map(str, frame.columns)], rows)


def _seeds_of(frame: pd.DataFrame, family: str) -> dict[int, str]:
    """seed -> model name of a family's seeded runs."""
    return {seed: name for name in frame.index
            if (seed := seed_of(name)) is not None and experiment_family(name) == family}


def paired_differences(frame: pd.DataFrame, pair: str) -> tuple[str, str, pd.DataFrame]:
    """(a, b, per-seed a - b) for 'a vs b', over the seeds both ran (runs of one seed share
    their base model and seed, so the difference removes what they share)."""
    a, b = (part.strip() for part in pair.split(" vs "))
    seeds_a, seeds_b = _seeds_of(frame, a), _seeds_of(frame, b)
    shared = sorted(set(seeds_a) & set(seeds_b))
    diffs = pd.DataFrame([frame.loc[seeds_a[s]] - frame.loc[seeds_b[s]] for s in shared],
                         index=pd.Index(shared, name="seed"), columns=frame.columns)
    return a, b, diffs


def comparison_figures(diffs: pd.DataFrame) -> pd.DataFrame:
    """Per column: mean difference, its sample std, n, and the two-sided paired t-test p
    (scipy's ``ttest_1samp`` of the per-seed differences against 0, i.e. ``ttest_rel``; a
    difference that is the same for every seed has p 1 when it is 0, else 0)."""
    from scipy import stats

    rows = {}
    for column in diffs.columns:
        values = diffs[column].astype(float)
        mean, std = values.mean(), values.std(ddof=1)
        p = float(stats.ttest_1samp(values, 0.0).pvalue) if std > 0 else float(mean == 0)
        rows[column] = {"diff": mean, "std": std, "n": len(values), "p": p}
    return pd.DataFrame(rows).T


def comparison_table(frame: pd.DataFrame, pairs: list[str], decimals: int) -> str:
    """Paired comparisons over seeds: per suite the mean difference +- std (points) and the
    paired t-test p; a pair without two shared seeds says so."""
    if not pairs:
        return ""
    rows = []
    for pair in pairs:
        a, b, diffs = paired_differences(frame, pair)
        if len(diffs) < 2:
            rows.append([f"{a} - {b}", *(["needs 2+ seeds of both"] + [""] * (len(frame.columns) - 1)), str(len(diffs))])
            continue
        figures = comparison_figures(diffs)
        cells = [f"{figures.loc[c, 'diff']:+.{decimals}f} +- {figures.loc[c, 'std']:.{decimals}f} "
                 f"(p {figures.loc[c, 'p']:.3f})" for c in frame.columns]
        rows.append([f"{a} - {b}", *cells, str(len(diffs))])
    note = ("Paired differences over seeds (points): mean +- std of the per-seed difference, two-sided paired "
            "t-test p; runs of one seed share their base model and seed.\n\n")
    return note + markdown_table(["Comparison", *map(str, frame.columns), "seeds"], rows)


def teacher_table(files: dict[str, str | Path], decimals: int = 3) -> str:
    """Per model family: the mean probability of the teacher's tokens under its models (mean
    +- std over seeds) and the share of teacher tokens below 0.1."""
    if not files:
        return ""
    figures = pd.DataFrame({model: read_json(path) for model, path in files.items()}).T
    columns = ["token_prob_mean", "share_below_0.1"]
    frame = figures[columns].astype(float)
    mean, std, count = summarize(frame)
    rows = [[str(model), *(f"{mean.loc[model, c]:.{decimals}f}" + (f" +- {std.loc[model, c]:.{decimals}f}"
                                                                     if count[model] > 1 else "") for c in columns),
             str(int(count[model]))] for model in mean.index]
    traces = int(figures["traces"].astype(float).iloc[0])
    note = (f"Teacher tokens under each model: the first {traces} training traces teacher-forced after their "
            "prompts; mean probability of a teacher token and share of teacher tokens with probability below "
            "0.1 (mean +- std over seeds).\n\n")
    return note + markdown_table(["Model", "teacher-token probability", "share below 0.1", "n"], rows)


def to_markdown(frame: pd.DataFrame, title: str, decimals: int) -> str:
    return f"## {title}\n\n" + summary_table(frame, decimals)


# ---- the paper's layout: a math table and an out-of-distribution table ----
PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
GROUP_TITLES = {"math": "Math reasoning", "ood": "Out of distribution"}


def suite_groups(suites: list[str], meta: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Suites per table (``math`` then ``ood``), in the configured order; a suite without
    metadata is a math suite."""
    groups: dict[str, list[str]] = {}
    for suite in suites:
        groups.setdefault(meta.get(suite, {}).get("group", "math"), []).append(suite)
    return {g: groups[g] for g in ("math", "ood") if g in groups}


def title(suite: str, meta: dict[str, dict[str, Any]]) -> str:
    return meta.get(suite, {}).get("title") or suite


def titled(frame: pd.DataFrame, meta: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return frame.rename(columns={s: title(s, meta) for s in frame.columns})


def published(group: str) -> pd.DataFrame:
    """The paper's reported table for ``math`` or ``ood`` (rows: models; columns: benchmarks, Avg)."""
    path = PUBLISHED_DIR / f"{group}.csv"
    return pd.read_csv(path, index_col="model") if path.exists() else pd.DataFrame()


def reported_rows(group: str, suites: list[str], meta: dict[str, dict[str, Any]], decimals: int) -> list[list[str]]:
    """The paper's rows under our columns: a value where a suite is that paper benchmark;
    the reported Avg only when the columns are exactly the paper's benchmarks."""
    table = published(group)
    benchmarks = [meta.get(s, {}).get("benchmark") for s in suites]
    if table.empty or not any(b in table.columns for b in benchmarks):
        return []
    same_set = sorted(b for b in benchmarks if b) == sorted(c for c in table.columns if c != "Avg") \
        and len(benchmarks) == len(table.columns) - 1
    rows = []
    for model, values in table.iterrows():
        cells = [_number(values[b], decimals) if b in table.columns else "-" for b in benchmarks]
        rows.append([f"{model} (reported)", *cells, _number(values["Avg"], decimals) if same_set else "-"])
    return rows


def group_intervals(eval_dir: str | Path, models: list[str], suites: list[str]) -> pd.DataFrame:
    """95% bootstrap interval (percent) of each model's accuracy per suite and of the Avg over
    ``suites``, from the per-sample files."""
    from luffy.evaluate.metrics import bootstrap_interval, per_problem_accuracy

    rows = {}
    for model in models:
        accuracies = {s: per_problem_accuracy(pd.read_parquet(Path(eval_dir) / model / f"{s}.parquet"))
                      for s in suites}
        row = {}
        for name, parts in [*((s, [a]) for s, a in accuracies.items()), ("Avg", list(accuracies.values()))]:
            low, high = bootstrap_interval(parts)
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = 100 * low, 100 * high
        rows[model] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "model"
    return frame


def interval_table(intervals: pd.DataFrame, columns: list[str], labels: list[str], decimals: int,
                   external: dict[str, str] | None = None) -> str:
    rows = [[label(model, external),
             *(f"{row[f'{c}_ci_low']:.{decimals}f}-{row[f'{c}_ci_high']:.{decimals}f}" for c in columns)]
            for model, row in intervals.iterrows()]
    return markdown_table(["Model", *labels], rows)


def paper_layout(eval_dir: str | Path, models: list[str], suites: list[str], meta: dict[str, dict[str, Any]],
                 decimals: int, show_published: bool, compare: list[str] | None = None,
                 external: dict[str, str] | None = None
                 ) -> tuple[str, dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Markdown (no heading) of one table per suite group (our rows, then the paper's reported
    rows) with its bootstrap intervals, then the notes (external models, reported rows, answers
    whose grading timed out), and per group the accuracy frame and the intervals;
    ``external``: the external models' sources (null: read from the evaluations)."""
    groups = suite_groups(suites, meta)
    external = external_sources(eval_dir, models, suites) if external is None else external
    parts, frames, intervals, any_reported = [], {}, {}, False
    for group, members in groups.items():
        frame = collect(eval_dir, models, members)
        frames[group], intervals[group] = frame, group_intervals(eval_dir, models, members)
        extra = reported_rows(group, members, meta, decimals) if show_published else []
        any_reported = any_reported or bool(extra)
        table = summary_table(titled(frame, meta), decimals, extra, external)
        heading = GROUP_TITLES[group] if len(groups) > 1 else None
        parts += ([f"### {heading}", ""] if heading else []) + [table.strip(), ""]
        labels = [title(s, meta) for s in members] + ["Avg"]
        parts += ["95% bootstrap intervals over problems (percent):", "",
                  interval_table(intervals[group], members + ["Avg"], labels, decimals, external).strip(), ""]
        comparisons = comparison_table(titled(frame, meta), compare or [], decimals)
        parts += [comparisons.strip(), ""] if comparisons else []
    if external:
        parts += ["Rows marked (external) are models made elsewhere, scored by this pipeline with the same suites, "
                  "samples and graders: " + "; ".join(f"{m}: {src}" for m, src in external.items()) + ".", ""]
    if any_reported:
        parts += ["Rows marked (reported) are the LUFFY paper's published numbers for Qwen2.5-Math-7B models, "
                  "not measured by this pipeline.", ""]
    timeouts = timeout_note(eval_dir, models, suites, meta)
    parts += [timeouts.strip(), ""] if timeouts else []
    return "\n".join(parts), frames, intervals


def combined(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The groups side by side; with several groups each Avg is named after its group."""
    if len(frames) == 1:
        return next(iter(frames.values()))
    return pd.concat([f.rename(columns={"Avg": f"Avg ({g})"}) for g, f in frames.items()], axis=1)


def combined_intervals(intervals: dict[str, pd.DataFrame]) -> pd.DataFrame:
    if len(intervals) == 1:
        return next(iter(intervals.values()))
    return pd.concat([f.rename(columns=lambda c, g=g: c.replace("Avg_", f"Avg ({g})_")) for g, f in intervals.items()],
                     axis=1)
