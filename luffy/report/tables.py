"""The results table in the paper's layout: rows = models, columns = suites, then Avg.

With seeds (``<experiment>-seed<N>``), the Markdown table shows mean +- standard deviation
over each experiment's seeds; the CSV keeps every seed's values.
"""

from __future__ import annotations

import math
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


def to_markdown(frame: pd.DataFrame, title: str, decimals: int) -> str:
    mean, std, count = summarize(frame)
    columns = list(mean.columns)
    seeded = bool((count > 1).any())
    lines = [f"## {title}", ""]
    if seeded:
        lines += [f"Mean +- standard deviation over seeds (n per row: "
                  + ", ".join(f"{name} {n}" for name, n in count.items()) + ").", ""]
    lines += ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model in mean.index:
        cells = []
        for column in columns:
            value = mean.loc[model, column]
            cell = "-" if math.isnan(value) else f"{value:.{decimals}f}"
            if seeded and count[model] > 1:
                cell += f" +- {std.loc[model, column]:.{decimals}f}"
            cells.append(cell)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
