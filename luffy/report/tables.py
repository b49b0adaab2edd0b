"""The results table in the paper's layout: rows = models, columns = suites, then Avg."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from luffy.data.schema import DataError
from luffy.io import read_json


def collect(eval_dir: str | Path, models: list[str], suites: list[str]) -> pd.DataFrame:
    """Accuracy (percent) per model and suite, plus the unweighted average over suites."""
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


def to_markdown(frame: pd.DataFrame, title: str, decimals: int) -> str:
    columns = list(frame.columns)
    lines = [f"## {title}", "", "| Model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for model, row in frame.iterrows():
        cells = ["-" if math.isnan(v) else f"{v:.{decimals}f}" for v in row]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
