"""Summaries over seeds (or pairs) shared by the modadd stages."""
from __future__ import annotations

import numpy as np


def finite(values) -> np.ndarray:
    v = np.asarray(values, float).ravel()
    return v[np.isfinite(v)]


def mean_std(values) -> dict:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    v = finite(values)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def bootstrap(values, stat=np.mean, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """stat over n_boot resamples (with replacement) of the finite values."""
    v = finite(values)
    return stat(v[np.random.default_rng(seed).integers(len(v), size=(n_boot, len(v)))], axis=1)


def median_ci(values, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the median (e.g. over one seed's commutator pairs)."""
    if len(finite(values)) < 2:
        return [float("nan"), float("nan")]
    meds = bootstrap(values, np.median, n_boot, seed)
    return [float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))]
