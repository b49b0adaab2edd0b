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


def test_bootstrap_interval_matches_the_binomial_spread():
    import numpy as np

    from luffy.evaluate.metrics import bootstrap_interval, per_problem_accuracy

    accuracies = np.array([1.0] * 300 + [0.0] * 700)  # p = 0.3 over 1000 problems
    low, high = bootstrap_interval([accuracies], resamples=4000)
    half = 1.96 * (0.3 * 0.7 / 1000) ** 0.5  # the normal approximation: +-0.0284
    assert low == pytest.approx(0.3 - half, abs=0.006) and high == pytest.approx(0.3 + half, abs=0.006)
    # constant suites have no spread; the average of two suites is the mean of their accuracies
    assert bootstrap_interval([np.ones(5), np.zeros(7)]) == (0.5, 0.5)
    assert list(per_problem_accuracy(samples([[True, False], [True, True]]))) == [0.5, 1.0]
    m = suite_metrics(samples([[True, False, False, False], [True, True, False, False]]))
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
    with pytest.raises(ValueError):
        bootstrap_interval([np.array([])])
