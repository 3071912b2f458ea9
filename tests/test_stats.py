"""stats: t quantiles, mean and paired-difference t-intervals against hand computations."""
import math

import numpy as np
import pytest

from distillm2_jax import stats

# Student t 0.975 quantiles from printed tables (df -> t).
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 9: 2.2621572,
        10: 2.2281389, 30: 2.0422725, 60: 2.0002978, 120: 1.9799304, 1000: 1.9623391}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_table(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-6)
    assert stats.t_quantile(0.025, df) == pytest.approx(-T975[df], abs=1e-6)


def test_t_quantile_rejects_bad_arguments():
    assert stats.t_quantile(0.5, 7) == 0.0
    for bad in ((0.0, 3), (1.0, 3), (0.9, 0), (0.9, 2.5)):
        with pytest.raises(ValueError):
            stats.t_quantile(*bad)


def test_paired_difference_by_hand():
    # differences 0.1, 0.3, -0.1, 0.2, 0.0: mean 0.1; squared deviations 0, .04, .04, .01, .01
    # -> var 0.10 / 4 = 0.025, sd 0.1581139, se sqrt(0.025 / 5) = 0.0707107;
    # t_{0.975, 4} = 2.7764451 -> half width 0.1963243 -> [-0.0963243, 0.2963243]
    a = [1.1, 1.3, 0.9, 1.2, 1.0]
    b = [1.0, 1.0, 1.0, 1.0, 1.0]
    r = stats.paired_difference(a, b)
    assert r.n == 5 and r.level == 0.95
    assert r.mean == pytest.approx(0.1)
    assert r.sd == pytest.approx(0.1581139, abs=1e-7)
    assert r.se == pytest.approx(0.0707107, abs=1e-7)
    assert r.low == pytest.approx(-0.0963243, abs=1e-6) and r.high == pytest.approx(0.2963243, abs=1e-6)
    assert not r.excludes_zero()
    # the pairing matters: a constant shift of each pair's level changes nothing
    shift = np.array([5.0, -2.0, 0.3, 7.0, 1.0])
    r2 = stats.paired_difference(np.add(a, shift), np.add(b, shift))
    assert (r2.mean, r2.low, r2.high) == pytest.approx((r.mean, r.low, r.high))
    # the sign follows a - b
    assert stats.paired_difference(b, a).high == pytest.approx(-r.low)
    assert stats.paired_difference([2.0, 2.1, 2.2], [1.0, 1.0, 1.0]).excludes_zero()


def test_mean_ci_by_hand():
    # 2, 4, 6: mean 4, sd 2, se 2 / sqrt(3), t_{0.975, 2} = 4.3026527 -> 4 -/+ 4.9682754
    r = stats.mean_ci([2.0, 4.0, 6.0])
    assert (r.mean, r.sd, r.se) == pytest.approx((4.0, 2.0, 2 / math.sqrt(3)))
    assert (r.low, r.high) == pytest.approx((4 - 4.9682754, 4 + 4.9682754), abs=1e-6)
    assert r.to_dict()["n"] == 3
    r90 = stats.mean_ci([2.0, 4.0, 6.0], level=0.9)  # t_{0.95, 2} = 2.9199856
    assert r90.high == pytest.approx(4 + 2.9199856 * 2 / math.sqrt(3), abs=1e-6)


def test_edge_cases():
    one = stats.paired_difference([1.5], [1.0])  # n = 1: the mean, no spread, NaN interval
    assert one.mean == 0.5 and one.n == 1
    assert all(math.isnan(x) for x in (one.sd, one.se, one.low, one.high)) and not one.excludes_zero()
    assert math.isnan(stats.mean_ci([3.0]).low)
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([1.0, 2.0], [1.0])
    same = stats.paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # constant difference: zero width
    assert same.sd == 0.0 and same.low == same.high == pytest.approx(0.5)


def test_paired_bootstrap():
    a, b = [1.1, 1.3, 0.9, 1.2, 1.0], [1.0] * 5
    lo, hi = stats.paired_bootstrap(a, b, resamples=4000, seed=1)
    assert -0.1 <= lo < 0.1 < hi <= 0.3          # inside the range of the differences
    assert (lo, hi) == stats.paired_bootstrap(a, b, resamples=4000, seed=1)  # seeded
    t = stats.paired_difference(a, b)
    assert hi - lo < t.high - t.low               # narrower than the t-interval with 5 seeds
    assert all(math.isnan(x) for x in stats.paired_bootstrap([1.0], [0.0]))
