"""Geometric statistics of weight matrices and point clouds, each with its random null.

Spectra (of singular values sigma; "variance" means sigma^2):
    participation_ratio, stable_rank, entropy_effective_rank, components_for_variance,
    condition_number, spectral_summary
Simplex volumes (k-simplices of k+1 points; k = 4 is the "pentachoron"):
    cayley_menger_volume, gram_volume (batched, float64), sample_simplex_volumes,
    coefficient_of_variation (+ bootstrap CI), gaussian_volume_cv (exact null)
Cosines, distances, groups and sparsity:
    cosine_stats, distance_stats, centroid_similarity, space_alignment, sparsity, hoyer
Nulls:
    random_like (a Gaussian matrix of the same shape and RMS), with_null (a statistic beside
    its value on such matrices), so every number can be read against chance.
Degenerate input: nonfinite_report describes a matrix holding NaN or inf (which is then not
analysed); statistics of directions (cosines) are computed on the rows of nonzero norm and say
how many rows they left out ("rows_left_out": {"zero_norm": k}).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

import statsutil
from scipy.special import gammaln

VARIANCE_LEVELS = (0.8, 0.9, 0.95, 0.99)


# ----------------------------------------------------------------------------- spectra

def singular_values(M: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(M, dtype=np.float64), compute_uv=False)


def participation_ratio(eigenvalues: np.ndarray) -> float:
    """(sum lambda)^2 / sum lambda^2 of non-negative eigenvalues (e.g. covariance eigenvalues
    or sigma^2): n for a flat spectrum, 1 for a single direction."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    s2 = np.sum(lam ** 2)
    return float(np.sum(lam) ** 2 / s2) if s2 > 0 else 0.0


def stable_rank(sigma: np.ndarray) -> float:
    """||M||_F^2 / ||M||_2^2 = sum sigma^2 / max sigma^2."""
    s = np.asarray(sigma, dtype=np.float64)
    return float(np.sum(s ** 2) / np.max(s) ** 2) if s.size and s.max() > 0 else 0.0


def entropy_effective_rank(sigma: np.ndarray) -> float:
    """exp of the Shannon entropy of sigma / sum sigma (Roy & Vetterli 2007)."""
    s = np.asarray(sigma, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def components_for_variance(sigma: np.ndarray, levels=VARIANCE_LEVELS) -> dict[float, int]:
    """Smallest number of components whose sigma^2 holds each fraction of the total variance
    (0 for a zero matrix, which has no variance to hold)."""
    v = np.sort(np.asarray(sigma, dtype=np.float64) ** 2)[::-1]
    if not v.sum() > 0:
        return {lv: 0 for lv in levels}
    c = np.cumsum(v) / v.sum()
    return {lv: int(np.searchsorted(c, lv - 1e-12) + 1) for lv in levels}


def condition_number(sigma: np.ndarray, rtol: float = 1e-12) -> float:
    """sigma_max / sigma_min; inf when sigma_min is below rtol * sigma_max (numerically singular)."""
    s = np.asarray(sigma, dtype=np.float64)
    if not s.size or s.min() <= rtol * s.max():
        return float("inf")
    return float(s.max() / s.min())


def spectral_summary(M: np.ndarray) -> dict:
    return spectral_summary_of(singular_values(M))


def spectral_summary_of(s: np.ndarray) -> dict:
    """The spectral statistics of a matrix from its singular values."""
    return {"participation_ratio_sigma2": participation_ratio(s ** 2), "stable_rank": stable_rank(s),
            "entropy_effective_rank": entropy_effective_rank(s), "condition_number": condition_number(s),
            **{f"n_components_{int(100 * k)}pct_var_sigma2": v for k, v in components_for_variance(s).items()}}


# ----------------------------------------------------------------------------- simplices

def cayley_menger_volume(P: np.ndarray) -> np.ndarray:
    """Volumes of simplices from their vertices, P (..., k+1, d), by the Cayley-Menger determinant.

    V^2 = (-1)^(k+1) / (2^k (k!)^2) det(CM), CM the squared-distance matrix bordered by ones.
    Computed in float64; tiny negative V^2 from rounding are set to 0.
    """
    P = np.asarray(P, dtype=np.float64)
    k = P.shape[-2] - 1
    D2 = np.sum((P[..., :, None, :] - P[..., None, :, :]) ** 2, axis=-1)
    CM = np.ones(P.shape[:-2] + (k + 2, k + 2))
    CM[..., 0, 0] = 0.0
    CM[..., 1:, 1:] = D2
    v2 = (-1) ** (k + 1) * np.linalg.det(CM) / (2 ** k * math.factorial(k) ** 2)
    return np.sqrt(np.clip(v2, 0.0, None))


def gram_volume(P: np.ndarray) -> np.ndarray:
    """Volumes from the Gram matrix of the edges from the first vertex: sqrt(det(E^T E)) / k!."""
    P = np.asarray(P, dtype=np.float64)
    E = P[..., 1:, :] - P[..., :1, :]
    G = E @ np.swapaxes(E, -1, -2)
    k = E.shape[-2]
    return np.sqrt(np.clip(np.linalg.det(G), 0.0, None)) / math.factorial(k)


def sample_simplex_volumes(X: np.ndarray, k: int = 4, n_samples: int = 1000,
                           rng: np.random.Generator | None = None, method: str = "gram") -> np.ndarray:
    """Volumes of n_samples k-simplices whose k+1 vertices are distinct random rows of X."""
    rng = rng or np.random.default_rng(0)
    X = np.asarray(X, dtype=np.float64)
    if len(X) < k + 1:
        raise ValueError(f"a {k}-simplex needs {k + 1} points, got {len(X)}")
    idx = np.stack([rng.choice(len(X), size=k + 1, replace=False) for _ in range(n_samples)])
    fn = gram_volume if method == "gram" else cayley_menger_volume
    return fn(X[idx])


def coefficient_of_variation(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    m = v.mean()
    return float(v.std(ddof=1) / m) if m > 0 else float("nan")


def bootstrap_ci(v: np.ndarray, stat: Callable = coefficient_of_variation, n_boot: int = 1000,
                 ci: float = 0.95, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """statsutil's percentile bootstrap, with the coefficient of variation as the default statistic."""
    return statsutil.bootstrap_ci(v, stat, n_boot, ci, rng)


def gaussian_volume_cv(k: int, d: int) -> float:
    """Exact CV of the volume of a k-simplex with iid N(0, I_d) vertices (k <= d).

    By Miles (1971) the squared volume is a constant times a product of independent
    chi-square variables with d, d-1, ..., d-k+1 degrees of freedom, so
    CV^2 = prod_i E[chi2_nu] / E[chi_nu]^2 - 1 with E[chi_nu] = sqrt(2) G((nu+1)/2) / G(nu/2).
    """
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d, got k={k}, d={d}")
    log_ratio = 0.0
    for nu in range(d - k + 1, d + 1):
        log_mean_chi = 0.5 * math.log(2) + gammaln((nu + 1) / 2) - gammaln(nu / 2)
        log_ratio += math.log(nu) - 2 * log_mean_chi
    return math.sqrt(math.expm1(log_ratio))


# ----------------------------------------------------------------------------- cosines, sparsity

def unit(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def random_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of n_pairs random pairs of distinct rows out of n."""
    i = rng.integers(0, n, n_pairs)
    j = rng.integers(0, n - 1, n_pairs)
    return i, j + (j >= i)


def nonfinite_report(W: np.ndarray) -> dict | None:
    """None for a finite array; else what a matrix holding NaN or inf is reported as (it is not
    analysed): {"nonfinite": True, "n_nonfinite": k, "n_rows_nonfinite": r, "shape": [...]}."""
    bad = ~np.isfinite(np.asarray(W))
    k = int(bad.sum())
    if not k:
        return None
    rows = int(bad.reshape(bad.shape[0], -1).any(1).sum()) if bad.ndim > 1 else int(bool(k))
    return {"nonfinite": True, "n_nonfinite": k, "n_rows_nonfinite": rows, "shape": list(np.shape(W))}


def nonzero_rows(X: np.ndarray) -> tuple[np.ndarray, dict]:
    """(mask of the rows of nonzero norm, {"zero_norm": k} or {}): a direction, and so a cosine,
    is defined for those rows only."""
    ok = np.linalg.norm(np.asarray(X, dtype=np.float64), axis=1) > 0
    k = int((~ok).sum())
    return ok, ({"zero_norm": k} if k else {})


def cosine_stats(X: np.ndarray, n_pairs: int = 20000, rng: np.random.Generator | None = None) -> dict:
    """Cosines of random distinct row pairs: mean, std, mean |cos|; anisotropy = squared norm of
    the mean unit vector (the expected cosine of two random rows, 0 for an isotropic cloud).
    Rows of zero norm have no direction: they are left out and counted ("rows_left_out")."""
    rng = rng or np.random.default_rng(0)
    X = np.asarray(X, dtype=np.float64)
    ok, left = nonzero_rows(X)
    if left:
        X = X[ok]
    if len(X) < 2:
        raise ValueError(f"cosines need two rows of nonzero norm, got {len(X)}")
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    i, j = random_pairs(len(U), n_pairs, rng)
    c = np.sum(U[i] * U[j], axis=1)
    mu = U.mean(0)
    out = {"mean": float(c.mean()), "std": float(c.std()), "mean_abs": float(np.abs(c).mean()),
           "anisotropy": float(mu @ mu)}
    if left:
        out["rows_left_out"] = left
    return out


def distance_stats(X: np.ndarray, n_pairs: int = 20000, rng: np.random.Generator | None = None,
                   bins: int = 40) -> dict:
    """Euclidean distances of random distinct row pairs: mean, std, relative spread std/mean
    (how concentrated distances are), 5/50/95% quantiles and a histogram. With the same rng
    state as cosine_stats it draws the same pairs, so on unit rows d^2 = 2 - 2 cos pair by pair."""
    rng = rng or np.random.default_rng(0)
    X = np.asarray(X, dtype=np.float64)
    i, j = random_pairs(len(X), n_pairs, rng)
    d = np.linalg.norm(X[i] - X[j], axis=1)
    counts, edges = np.histogram(d, bins=bins)
    rel = float(d.std() / d.mean()) if d.mean() > 0 else float("nan")  # all rows equal: undefined (named)
    return {"mean": float(d.mean()), "std": float(d.std()), "relative_std": rel,
            "q05": float(np.quantile(d, 0.05)), "median": float(np.median(d)), "q95": float(np.quantile(d, 0.95)),
            "mean_squared": float(np.mean(d ** 2)), "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def centroid_similarity(X: np.ndarray, groups: dict[str, np.ndarray], pool: np.ndarray, n_null: int = 200,
                        rng: np.random.Generator | None = None) -> dict:
    """Cosine between the centroids (mean unit vector) of every two groups of rows, beside a
    null of random sets of the same sizes drawn from `pool`: per cell the null's mean and std
    and z = (value - null mean) / null std. The diagonal is 1 by definition."""
    rng = rng or np.random.default_rng(0)
    U = unit(np.asarray(X, dtype=np.float64))
    names = list(groups)
    sizes = [len(groups[n]) for n in names]

    def cos_matrix(sets):
        C = np.stack([U[np.asarray(s)].mean(0) for s in sets])
        C = C / np.linalg.norm(C, axis=1, keepdims=True)
        return C @ C.T

    value = cos_matrix([groups[n] for n in names])
    null = np.stack([cos_matrix([rng.choice(pool, size=k, replace=False) for k in sizes]) for _ in range(n_null)])
    mean, std = null.mean(0), null.std(0)
    z = np.where(std > 0, (value - mean) / np.where(std > 0, std, 1), 0.0)
    off = ~np.eye(len(names), dtype=bool)
    return {"names": names, "sizes": sizes, "matrix": value.tolist(), "null_mean": mean.tolist(),
            "null_std": std.tolist(), "z": z.tolist(), "mean_off_diagonal": float(value[off].mean()),
            "null_mean_off_diagonal": float(mean[off].mean())}


def space_alignment(A: np.ndarray, B: np.ndarray, n_null: int = 5, rng: np.random.Generator | None = None) -> dict:
    """How alike two representations of the same rows are (e.g. a model's input embedding and
    its output head): per-row cosine, the participation ratio of each spectrum, orthogonal
    Procrustes R^2 (after centring and scaling to unit norm: 1 when B is a rotation of A) and
    linear CKA, each beside a null with the row correspondence shuffled."""
    rng = rng or np.random.default_rng(0)
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.shape != B.shape:
        raise ValueError(f"the two spaces differ in shape: {A.shape} vs {B.shape}")
    ok = (np.linalg.norm(A, axis=1) > 0) & (np.linalg.norm(B, axis=1) > 0)  # a row cosine needs both directions
    if ok.sum() < 2:
        raise ValueError(f"the two spaces share {int(ok.sum())} rows of nonzero norm; row cosines need 2")
    row_cos = np.sum(unit(A[ok]) * unit(B[ok]), axis=1)
    Ac, Bc = A - A.mean(0), B - B.mean(0)
    if not (np.linalg.norm(Ac) > 0 and np.linalg.norm(Bc) > 0):
        raise ValueError("a space whose rows are all equal has no spread to align")
    Ac, Bc = Ac / np.linalg.norm(Ac), Bc / np.linalg.norm(Bc)
    GA, GB = Ac.T @ Ac, Bc.T @ Bc

    def procrustes_cka(Bp):
        M = Ac.T @ Bp
        return (float(2 * np.linalg.svd(M, compute_uv=False).sum() - 1),
                float(np.sum(M ** 2) / (np.linalg.norm(GA) * np.linalg.norm(GB))))

    r2, cka = procrustes_cka(Bc)
    nulls = [procrustes_cka(Bc[rng.permutation(len(Bc))]) for _ in range(n_null)]
    Bo = B[ok]
    shuffled_cos = np.sum(unit(A[ok]) * unit(Bo)[rng.permutation(len(Bo))], axis=1)
    left = {"rows_left_out": {"zero_norm": int((~ok).sum())}} if not ok.all() else {}
    return {"identical": bool(np.array_equal(A, B)), **left,
            "row_cosine": {"mean": float(row_cos.mean()), "q05": float(np.quantile(row_cos, 0.05)),
                           "median": float(np.median(row_cos)), "q95": float(np.quantile(row_cos, 0.95)),
                           "null_shuffled_mean": float(shuffled_cos.mean())},
            "participation_ratio": [participation_ratio(np.linalg.eigvalsh(GA)),
                                    participation_ratio(np.linalg.eigvalsh(GB))],
            "procrustes_r2": r2, "null_procrustes_r2": float(np.mean([n[0] for n in nulls])),
            "cka": cka, "null_cka": float(np.mean([n[1] for n in nulls]))}


def hoyer(w: np.ndarray) -> float:
    """Hoyer sparsity (sqrt(n) - L1/L2) / (sqrt(n) - 1): 0 for a constant vector, 1 for one-hot."""
    w = np.abs(np.asarray(w, dtype=np.float64).ravel())
    n = w.size
    l2 = np.sqrt(np.sum(w ** 2))
    if n < 2 or l2 == 0:
        return float("nan")
    return float((math.sqrt(n) - w.sum() / l2) / (math.sqrt(n) - 1))


def sparsity(W: np.ndarray, absolute=(0.1, 0.01), relative=(0.01, 0.1, 0.5), chunk: int = 1 << 22) -> dict:
    """Fractions of entries below absolute thresholds (which track the initialisation scale)
    and below fractions of the matrix's own RMS (scale-free), and the Hoyer measure. Computed
    in float64 chunk by chunk, so a big float32 matrix is never copied whole."""
    w = np.asarray(W).ravel()
    n = w.size

    def chunks():
        for a in range(0, n, chunk):
            yield np.abs(w[a:a + chunk].astype(np.float64))
    l1 = l2sq = 0.0
    below = dict.fromkeys(absolute, 0)
    for c in chunks():
        l1 += float(c.sum())
        l2sq += float(c @ c)
        for t in absolute:
            below[t] += int(np.count_nonzero(c < t))
    rms = math.sqrt(l2sq / n) if n else 0.0
    rel = dict.fromkeys(relative, 0)
    for c in chunks():
        for t in relative:
            rel[t] += int(np.count_nonzero(c < t * rms))
    out = {f"frac_abs_below_{t:g}": below[t] / n for t in absolute}
    out.update({f"frac_below_{t:g}_rms": rel[t] / n for t in relative})
    l2 = math.sqrt(l2sq)
    out["hoyer"] = float((math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)) if n >= 2 and l2 > 0 else float("nan")
    out["rms"] = rms
    return out


# ----------------------------------------------------------------------------- nulls

def random_like(M: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian matrix of M's shape with M's RMS (the scale of a random initialisation)."""
    M = np.asarray(M, dtype=np.float64)
    return rng.standard_normal(M.shape) * math.sqrt(np.mean(M ** 2))


def with_null(stat: Callable[[np.ndarray], float], M: np.ndarray, n_null: int = 5,
              rng: np.random.Generator | None = None) -> dict:
    """The statistic of M beside its mean and spread over n_null random_like matrices, and z."""
    rng = rng or np.random.default_rng(0)
    value = float(stat(M))
    null = np.array([stat(random_like(M, rng)) for _ in range(n_null)], dtype=np.float64)
    sd = null.std(ddof=1) if n_null > 1 else float("nan")
    return {"value": value, "null_mean": float(null.mean()), "null_std": float(sd),
            "z": float((value - null.mean()) / sd) if sd and sd > 0 else float("nan")}
