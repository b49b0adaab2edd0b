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


def write_samples(root, model, suite, correct_per_problem):
    """Per-sample file and summary JSON of one suite (accuracy = mean over samples)."""
    rows = [{"problem_id": p, "sample_index": i, "correct": c}
            for p, flags in enumerate(correct_per_problem) for i, c in enumerate(flags)]
    (root / model).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / model / f"{suite}.parquet")
    accuracy = sum(c for flags in correct_per_problem for c in flags) / len(rows)
    write_eval(root, model, suite, accuracy)


PAPER_MATH = ["aime24", "aime25", "amc", "math500", "minerva", "olympiad"]
TITLES = {"aime24": "AIME24", "aime25": "AIME25", "amc": "AMC", "math500": "MATH-500", "minerva": "Minerva",
          "olympiad": "Olympiad", "arc_c": "ARC-c", "gpqa": "GPQA-diamond", "mmlu_pro": "MMLU-Pro"}


def test_paper_layout_math_and_ood_tables_with_reported_rows(tmp_path):
    from luffy.report.tables import paper_layout

    suites = PAPER_MATH + ["arc_c", "gpqa", "mmlu_pro"]
    meta = {s: {"group": "ood" if s in ("arc_c", "gpqa", "mmlu_pro") else "math", "title": TITLES[s],
                "benchmark": s} for s in suites}
    for s in suites:
        write_samples(tmp_path, "base", s, [[True, False], [False, False]])  # 25%
    body, frames, intervals = paper_layout(tmp_path, ["base"], suites, meta, decimals=1, show_published=True)
    assert "### Math reasoning" in body and "### Out of distribution" in body
    assert "| Model | AIME24 | AIME25 | AMC | MATH-500 | Minerva | Olympiad | Avg |" in body
    assert "| base | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 |" in body
    assert "| LUFFY (reported) | 29.5 | 23.2 | 66.1 | 88.4 | 33.8 | 56.4 | 49.6 |" in body
    assert "| Model | ARC-c | GPQA-diamond | MMLU-Pro | Avg |" in body
    assert "| LUFFY (reported) | 80.5 | 39.9 | 53.0 | 57.8 |" in body
    assert set(frames) == {"math", "ood"} and frames["ood"].loc["base", "Avg"] == pytest.approx(25.0)
    low, high = intervals["math"].loc["base", "Avg_ci_low"], intervals["math"].loc["base", "Avg_ci_high"]
    assert 0.0 <= low <= 25.0 <= high <= 50.0  # per-problem accuracies 0.5 and 0: resampled means in [0, 50]
    # a subset of the paper's suites: reported values per column, but no reported Avg
    body, _, _ = paper_layout(tmp_path, ["base"], ["aime24", "amc"], meta, decimals=1, show_published=True)
    assert "| LUFFY (reported) | 29.5 | 66.1 | - |" in body
    # suites that are not the paper's: no reported rows
    body, _, _ = paper_layout(tmp_path, ["base"], ["aime24"], {}, decimals=1, show_published=True)
    assert "(reported)" not in body and "### " not in body
    body, _, _ = paper_layout(tmp_path, ["base"], suites, meta, decimals=1, show_published=False)
    assert "(reported)" not in body


def test_paired_comparisons_over_seeds_match_scipy(tmp_path):
    """'a vs b': per-seed differences of runs that share a seed, their mean +- std and the
    paired t-test p (scipy's ttest_rel on the same numbers); base seeds pair like experiments."""
    from scipy import stats

    from luffy.report.tables import comparison_table, paired_differences

    luffy, grpo, base = [20.0, 24.0, 19.0, 23.0], [18.0, 21.0, 18.5, 19.0], [10.0, 12.0, 9.0, 11.0]
    frame = pd.DataFrame({"id": base + luffy + grpo + [30.0]},
                         index=[f"base-seed{s}" for s in range(4)] + [f"luffy-seed{s}" for s in range(4)]
                         + [f"grpo-seed{s}" for s in range(4)] + ["sft"])
    frame["Avg"] = frame["id"]
    a, b, diffs = paired_differences(frame, "luffy vs grpo")
    assert (a, b) == ("luffy", "grpo") and diffs["id"].tolist() == [2.0, 3.0, 0.5, 4.0]
    table = comparison_table(frame, ["luffy vs grpo", "luffy vs base", "luffy vs sft"], 1)
    p = stats.ttest_rel(luffy, grpo).pvalue
    assert f"| luffy - grpo | +2.4 +- 1.5 (p {p:.3f}) | +2.4 +- 1.5 (p {p:.3f}) | 4 |" in table
    assert f"(p {stats.ttest_rel(luffy, base).pvalue:.3f})" in table
    assert "| luffy - sft | needs 2+ seeds of both |  | 0 |" in table  # sft ran once: nothing to pair


def test_teacher_token_table_by_family(tmp_path):
    from luffy.report.tables import teacher_table

    files = {}
    for model, prob in (("base-seed0", 0.2), ("base-seed1", 0.3), ("luffy-seed0", 0.6), ("luffy-seed1", 0.8)):
        files[model] = tmp_path / f"{model}.json"
        files[model].write_text(json.dumps({"traces": 64, "tokens": 1000, "token_prob_mean": prob,
                                            "share_below_0.1": 1 - prob}))
    table = teacher_table(files)
    assert "first 64 training traces" in table
    assert "| base | 0.250 +- 0.071 | 0.750 +- 0.071 | 2 |" in table
    assert "| luffy | 0.700 +- 0.141 | 0.300 +- 0.141 | 2 |" in table


def test_external_models_are_marked_with_their_source(tmp_path):
    """A model from elsewhere (its evaluation records ``external``) gets '(external)' in every
    table, its source in a note and in the CSV's external_source column."""
    from luffy.report.tables import external_sources, paper_layout, per_seed_table

    write_samples(tmp_path, "base", "toy_id", [[True, False], [False, False]])
    write_samples(tmp_path, "qwen", "toy_id", [[True, True], [True, False]])
    record = json.loads((tmp_path / "qwen" / "toy_id.json").read_text())
    record["external"] = {"name": "qwen", "source": "hub:Qwen/Qwen2.5-Math-7B-Instruct@main", "commit": "abc123"}
    (tmp_path / "qwen" / "toy_id.json").write_text(json.dumps(record))
    external = external_sources(tmp_path, ["base", "qwen"], ["toy_id"])
    assert external == {"qwen": "hub:Qwen/Qwen2.5-Math-7B-Instruct@main (commit abc123)"}
    body, frames, _ = paper_layout(tmp_path, ["base", "qwen"], ["toy_id"], {}, decimals=1, show_published=False)
    assert "| base | 25.0 | 25.0 |" in body and "| qwen (external) | 75.0 | 75.0 |" in body
    assert body.count("qwen (external)") == 2  # the accuracy table and the intervals
    assert "qwen: hub:Qwen/Qwen2.5-Math-7B-Instruct@main (commit abc123)." in body
    assert "| qwen (external) | qwen |  | 75.0 | 75.0 |" in per_seed_table(frames["math"], 1, external)
    assert list(per_seed(frames["math"], external)["external_source"]) == ["", external["qwen"]]
