"""Statistics shared by every line of experiments, one implementation each: bootstrap intervals,
the over-seed mean with its Student-t interval, the same-covariance Gaussian null, and Pearson /
Spearman correlations.

Only numpy at import time (scipy's rankdata when a Spearman correlation is asked for). The
tests compare each with scipy.stats (pearsonr, spearmanr, bootstrap).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


# ----------------------------------------------------------------------------- bootstrap

def bootstrap(values, stat: Callable, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """stat of n_boot resamples (with replacement, same size) of values along the first axis:
    an array (n_boot,) for a scalar statistic, (n_boot, ...) for a vector one. The resamples are
    drawn one after another from rng, so a caller's later draws do not depend on n_boot's layout."""
    v = np.asarray(values)
    n = len(v)
    return np.array([stat(v[rng.integers(0, n, n)]) for _ in range(n_boot)])


def percentile_interval(samples: np.ndarray, ci: float = 0.95) -> tuple:
    """The central ci interval of bootstrap samples (per column for a 2-D array)."""
    lo, hi = np.percentile(samples, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2], axis=0)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 1000, ci: float = 0.95,
                 rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of a scalar statistic (rng default: seed 0)."""
    return percentile_interval(bootstrap(values, stat, n_boot, rng or np.random.default_rng(0)), ci)


# ----------------------------------------------------------------------------- over seeds

def seed_ci(values) -> dict:
    """Mean over seeds with a 95% Student-t interval (the right width for 3-10 seeds, where a
    bootstrap over seeds is too narrow); NaN values (a seed that never reached a threshold)
    are left out and counted in n."""
    from scipy import stats
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": sd, "lo": mean - half, "hi": mean + half, "n": n}


# ----------------------------------------------------------------------------- nulls

def gaussian_null(Z: np.ndarray, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """A Gaussian sample with the mean and covariance of the rows of Z (size rows, default len(Z)):
    the null of a geometric statistic that second moments alone would give."""
    Z = np.asarray(Z, dtype=np.float64)
    cov = np.atleast_2d(np.cov(Z, rowvar=False))
    return rng.multivariate_normal(Z.mean(0), cov, size=len(Z) if size is None else size, method="eigh")


# ----------------------------------------------------------------------------- correlations

def pearson(x, y):
    """Pearson r of y with x, or with every column of a 2-D x (an array then); nan where either
    is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(0), y - y.mean()
    prod = (xc * yc[:, None]).sum(0) if x.ndim == 2 else xc @ yc
    den = np.sqrt((xc ** 2).sum(0) * (yc @ yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, prod / np.where(den > 0, den, 1), np.nan)
    return r if x.ndim == 2 else float(r)


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson r of the ranks (ties get their mean rank)."""
    from scipy.stats import rankdata
    return pearson(rankdata(x), rankdata(y))
