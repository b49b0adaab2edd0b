"""Plots: training curves per experiment and a bar chart of the results table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from luffy.algo import metrics as names  # noqa: E402
from luffy.config import experiment_family  # noqa: E402
from luffy.io import atomic_path, read_jsonl  # noqa: E402

CURVES = (
    (names.REWARD_ON_POLICY, "on-policy reward"),
    (names.GROUP_SOLVED, "groups with a solved on-policy member"),
    (names.ENTROPY, "mean token entropy"),
    (names.OFF_PROB, "teacher-token probability"),
    (names.SHAPED_WEIGHT, "shaped weight on teacher tokens"),
    (names.LOSS_SFT, "SFT loss"),
)


def _smooth(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1).mean()


def training_curves(metrics_files: dict[str, str | Path], out: str | Path, smooth: int = 5) -> None:
    """One panel per metric (those present in any run), one line per experiment (the mean
    over its seeds, step by step)."""
    by_family: dict[str, list[pd.DataFrame]] = {}
    for name, path in metrics_files.items():
        by_family.setdefault(experiment_family(name), []).append(pd.DataFrame(read_jsonl(path)))
    runs = {family: pd.concat(frames).groupby("step", as_index=False).mean(numeric_only=True)
            for family, frames in by_family.items()}
    present = [(key, label) for key, label in CURVES
               if any(key in run and run[key].notna().any() for run in runs.values())]
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # one colour per experiment in every panel
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4.2 * max(1, len(present)), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        for name, run in runs.items():
            if key in run and run[key].notna().any():
                ax.plot(run["step"], _smooth(run[key], smooth), color=colors[name])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(f"step (moving average of {smooth})")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[name], label=name) for name in runs]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    _save(fig, out)


def results_bars(mean: pd.DataFrame, std: pd.DataFrame, out: str | Path, title: str) -> None:
    """Grouped bars per suite (and Avg), one bar per model; error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(mean.columns), 3.6))
    mean.T.plot.bar(ax=ax, rot=0, yerr=std.T, capsize=2)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def _save(fig, out: str | Path) -> None:
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
