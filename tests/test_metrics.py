from math import comb

import pandas as pd
import pytest

from luffy.evaluate.metrics import ks_for, pass_at_k, suite_metrics


def samples(correct_per_problem):
    rows = [{"problem_id": p, "sample_index": i, "correct": c}
            for p, flags in enumerate(correct_per_problem) for i, c in enumerate(flags)]
    return pd.DataFrame(rows)


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - comb(3, 2) / comb(4, 2))  # 0.5
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_suite_metrics_avg_and_pass():
    m = suite_metrics(samples([[True, False, False, False], [True, True, False, False]]))
    assert m["n"] == 4 and m["problems"] == 2
    assert m["avg@4"] == pytest.approx(3 / 8) == m["accuracy"]
    assert m["pass@1"] == pytest.approx(3 / 8)
    assert m["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert m["pass@4"] == 1.0
    assert ks_for(4) == [1, 2, 4] and ks_for(1) == [1] and ks_for(6) == [1, 2, 4, 6]


def test_unequal_sample_counts_are_an_error():
    with pytest.raises(ValueError, match="different sample counts"):
        suite_metrics(samples([[True], [True, False]]))
