"""Paired differences with a 95 % t interval over seeds (experiments.intervals)."""

import math
import statistics

import pytest

from experiments.intervals import T_975, by_seed, paired_interval, t_quantile_975


def test_t_quantiles_match_student_t():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 31), 31, 40, 60, 120, 1000):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_t_quantiles_known_values():
    # standard table values: t(0.975) for 1, 2, 10 degrees of freedom; the normal 1.96 far out
    assert (T_975[0], T_975[1], T_975[9]) == (12.7062, 4.3027, 2.2281)
    assert t_quantile_975(10**6) == pytest.approx(1.959966, abs=1e-5)


def test_paired_interval_over_the_seeds_both_have():
    variant = {"1": 10.0, "2": 13.0, "3": 11.0, "4": 99.0}  # seed 4 has no baseline run: left out
    base = {"1": 8.0, "2": 10.0, "3": 10.5}
    interval = paired_interval(variant, base)
    d = [2.0, 3.0, 0.5]
    half = 4.3027 * statistics.stdev(d) / math.sqrt(3)
    assert interval.seeds == 3 and interval.difference == pytest.approx(statistics.fmean(d))
    mean = statistics.fmean(d)
    assert (interval.low, interval.high) == pytest.approx((mean - half, mean + half))
    assert interval.half_width == pytest.approx(half) and interval.excludes_zero is False  # 1.83 ± 3.14
    shifted = paired_interval({seed: value + 5 for seed, value in variant.items()}, base)
    assert shifted.excludes_zero and shifted.low > 0
    lower = paired_interval(base, {seed: value + 5 for seed, value in variant.items()})
    assert lower.excludes_zero and lower.high < 0


def test_one_seed_has_no_interval_and_no_shared_seed_no_difference():
    one = paired_interval({"1": 3.0}, {"1": 1.0, "2": 5.0})
    assert (one.difference, one.low, one.high, one.seeds, one.excludes_zero) == (2.0, None, None, 1, False)
    assert paired_interval({"1": 3.0}, {"2": 1.0}) is None


def test_by_seed_keeps_the_runs_that_logged_the_metric():
    runs = [{"a": 1.0}, {"b": 2.0}, {"a": 3.0}]
    assert by_seed(runs, ["1", "2", "3"], "a") == {"1": 1.0, "3": 3.0}
