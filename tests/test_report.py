import json

import pandas as pd
import pytest

from luffy.report.plots import results_bars, training_curves
from luffy.report.tables import collect, per_seed, summarize, to_markdown


def write_eval(root, model, suite, accuracy):
    (root / model).mkdir(parents=True, exist_ok=True)
    (root / model / f"{suite}.json").write_text(json.dumps({"accuracy": accuracy}))


def test_table_layout_average_and_seed_statistics(tmp_path):
    values = {"base": (0.10, 0.02), "luffy-seed0": (0.20, 0.04), "luffy-seed1": (0.30, 0.06)}
    for model, (a, b) in values.items():
        write_eval(tmp_path, model, "id", a)
        write_eval(tmp_path, model, "ood", b)
    table = collect(tmp_path, list(values), ["id", "ood"])
    assert table.loc["luffy-seed1", "Avg"] == pytest.approx(18.0)
    mean, std, count = summarize(table)
    assert list(mean.index) == ["base", "luffy"] and count["luffy"] == 2
    assert mean.loc["luffy", "id"] == pytest.approx(25.0)
    assert std.loc["luffy", "id"] == pytest.approx(pd.Series([20.0, 30.0]).std())
    markdown = to_markdown(table, "T", 1)
    assert "| Model | id | ood | Avg |" in markdown
    assert "| base | 10.0 | 2.0 | 6.0 |" in markdown
    assert "| luffy | 25.0 +- 7.1 | 5.0 +- 1.4 | 15.0 +- 4.2 |" in markdown
    csv = per_seed(table)
    assert csv.loc["luffy-seed1", "experiment"] == "luffy" and csv.loc["luffy-seed1", "seed"] == 1
    results_bars(mean, std, tmp_path / "bars.png", "T")
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_missing_result_is_named(tmp_path):
    write_eval(tmp_path, "base", "id", 0.1)
    with pytest.raises(Exception, match="missing evaluation result .*ood.json"):
        collect(tmp_path, ["base"], ["id", "ood"])


def test_training_curves_average_seeds(tmp_path):
    files = {}
    for seed, reward in ((0, 0.2), (1, 0.4)):
        path = tmp_path / f"m{seed}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "reward/on_policy_mean": reward, "entropy": 0.1}) + "\n"
                                for s in range(3)))
        files[f"luffy-seed{seed}"] = path
    training_curves(files, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
