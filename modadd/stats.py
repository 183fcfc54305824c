"""Summaries over seeds (or pairs) shared by the modadd stages."""
from __future__ import annotations

import numpy as np

import statsutil


def finite(values) -> np.ndarray:
    v = np.asarray(values, float).ravel()
    return v[np.isfinite(v)]


def mean_std(values) -> dict:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    v = finite(values)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def median_ci(values, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the median of the finite values (e.g. over one seed's
    commutator pairs), statsutil's bootstrap."""
    v = finite(values)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    return list(statsutil.bootstrap_ci(v, np.median, n_boot, 0.95, np.random.default_rng(seed)))
