"""statsutil, the one implementation of each shared statistic, against scipy.stats and planted
structure."""
import numpy as np
import pytest
from scipy import stats

import statsutil as S


def test_pearson_and_spearman_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(300)
    y = 0.5 * x + rng.standard_normal(300)
    y[:20] = np.round(y[:20])                      # some ties for the ranks
    assert S.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert S.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    Z = rng.standard_normal((300, 4))
    Z[:, 2] = 3.0                                   # a constant column has no correlation
    cols = S.pearson(Z, y)
    for j in (0, 1, 3):
        assert cols[j] == pytest.approx(stats.pearsonr(Z[:, j], y).statistic, abs=1e-12)
    assert np.isnan(cols[2]) and np.isnan(S.pearson(np.ones(5), np.arange(5.0)))


def test_bootstrap_interval_agrees_with_scipy_and_covers_the_truth():
    rng = np.random.default_rng(1)
    v = rng.exponential(2.0, 400)
    lo, hi = S.bootstrap_ci(v, np.mean, n_boot=4000, rng=np.random.default_rng(2))
    ref = stats.bootstrap((v,), np.mean, n_resamples=4000, method="percentile", random_state=3).confidence_interval
    assert lo == pytest.approx(ref.low, rel=0.03) and hi == pytest.approx(ref.high, rel=0.03)
    se = v.std(ddof=1) / np.sqrt(len(v))            # the normal-theory width of a mean's interval
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    # a vector statistic gives one interval per component, from the same resamples
    boot = S.bootstrap(v, lambda s: np.array([s.mean(), np.median(s)]), 500, np.random.default_rng(4))
    assert boot.shape == (500, 2)
    again = S.bootstrap(v, np.mean, 500, np.random.default_rng(4))
    assert np.array_equal(boot[:, 0], again)
    lo2, hi2 = S.percentile_interval(boot)
    assert lo2[0] == S.percentile_interval(again)[0] and lo2[1] < np.median(v) < hi2[1]


def test_gaussian_null_keeps_mean_and_covariance():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((3, 3))
    Z = rng.standard_normal((5000, 3)) @ A + np.array([1.0, -2.0, 0.5])
    G = S.gaussian_null(Z, np.random.default_rng(6), size=200000)
    assert G.shape == (200000, 3)
    assert np.allclose(G.mean(0), Z.mean(0), atol=0.02)
    assert np.allclose(np.cov(G, rowvar=False), np.cov(Z, rowvar=False), atol=0.05)
    assert S.gaussian_null(Z, np.random.default_rng(6)).shape == Z.shape
