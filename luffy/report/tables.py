"""The results table in the paper's layout: rows = models, columns = suites, then Avg.

With seeds (``<experiment>-seed<N>``), the Markdown table shows mean +- standard deviation
over each experiment's seeds; the CSV keeps every seed's values.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from luffy.config import SEED_SUFFIX, experiment_family
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


def per_seed(frame: pd.DataFrame) -> pd.DataFrame:
    """The per-model table with its experiment and seed as leading columns (the CSV)."""
    out = frame.copy()
    out.insert(0, "experiment", [experiment_family(m) for m in frame.index])
    seeds = [int(m.group("seed")) if (m := SEED_SUFFIX.match(name)) else None for name in frame.index]
    out.insert(1, "seed", pd.array(seeds, dtype="Int64"))
    return out


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


def summary_table(frame: pd.DataFrame, decimals: int) -> str:
    """One row per experiment: the value, or mean +- std over seeds (with a line saying so)."""
    mean, std, count = summarize(frame)
    seeded = bool((count > 1).any())
    rows = []
    for model in mean.index:
        cells = [_number(mean.loc[model, column], decimals) for column in mean.columns]
        if seeded and count[model] > 1:
            cells = [f"{cell} +- {std.loc[model, column]:.{decimals}f}" for cell, column in zip(cells, mean.columns)]
        rows.append([str(model), *cells])
    note = ""
    if seeded:
        note = ("Mean +- standard deviation over seeds (n per row: "
                + ", ".join(f"{name} {n}" for name, n in count.items()) + ").\n\n")
    return note + markdown_table(["Model", *map(str, mean.columns)], rows)


def per_seed_table(frame: pd.DataFrame, decimals: int) -> str:
    """Every evaluated model (each seed) with its experiment and seed."""
    table = per_seed(frame)
    rows = [[str(model), str(row["experiment"]), "" if pd.isna(row["seed"]) else str(row["seed"]),
             *(_number(row[c], decimals) for c in frame.columns)] for model, row in table.iterrows()]
    return markdown_table(["Model", "experiment", "seed", *map(str, frame.columns)], rows)


def to_markdown(frame: pd.DataFrame, title: str, decimals: int) -> str:
    return f"## {title}\n\n" + summary_table(frame, decimals)
