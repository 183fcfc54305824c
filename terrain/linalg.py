"""Exact linear algebra for the weight battery at any model size, and nulls without Monte Carlo.

Spectra: the singular values of W (out x in) are the square roots of the eigenvalues of the
smaller Gram matrix (W W^T or W^T W), formed and diagonalised in float64 (torch: MKL on the
CPU, cuSOLVER on a GPU; on the CPU the Gram matrix is a BLAS syrk). For a 4096 x 10240 matrix
this is ~4x faster than svdvals and exact to float64 rounding of the Gram matrix. The top-r singular subspace on the residual-stream side
comes from the same Gram matrix: a full eigendecomposition when it is small, and otherwise
Chebyshev-filtered subspace iteration, whose Ritz values are checked against the exact
eigenvalues (falling back to the full eigendecomposition if they disagree).

Attention forms: F_h = Q_h^T K_h (Q_h, K_h of shape head_dim x d) has rank <= head_dim, and
every statistic the battery reports of it is a function of the 2 head_dim x 2 head_dim Gram
matrix G = X X^T of X = [Q_h; K_h]:
    ||F||_F^2 = tr(G_qq G_kk),   tr(F F) = tr(G_kq G_kq),   ||F - F^T||^2 = 2 ||F||^2 - 2 tr(F F),
    the nonzero eigenvalues of (F + F^T) / 2 = X^T M X, M = [[0, I/2], [I/2, 0]], are those of
    G^(1/2) M G^(1/2).
For random Q, K (iid Gaussian) G is Wishart(d, I), which Bartlett's decomposition samples in
O(head_dim^2): the head null at any d costs nothing.

Nulls of a Gaussian matrix of the same shape and RMS (n x p, m = min, ratio c = m / max):
    PR(sigma^2): E(sum l)^2 / E sum l^2 = (np + 2) / (n + p + 1)       (exact moments)
    stable rank: np / E l_max, E l_max from the Tracy-Widom centring (Johnstone 2001)
    entropy effective rank: m E[sqrt x] exp(-E[sqrt x log sqrt x] / E[sqrt x]) under Marchenko-Pastur
    Hoyer: (1 - sqrt(2/pi)) sqrt(N) / (sqrt(N) - 1);  fraction of |w| below t RMS: erf(t / sqrt 2).
tests/test_terrain_linalg.py checks each against Monte Carlo where both apply.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

TW1_MEAN = -1.2065335745820  # mean of the Tracy-Widom law for real matrices (beta = 1)
DENSE_EIGH_MAX = 1024         # Gram matrices up to this size get a full eigendecomposition


def _torch(device: str = "cpu"):
    import torch
    return torch, torch.device(device)


def gram_side(shape: tuple[int, int]) -> str:
    """'out' when W W^T (out x out) is the smaller Gram matrix, else 'in'."""
    return "out" if shape[0] <= shape[1] else "in"


def gram(W, device: str = "cpu"):
    """The smaller Gram matrix of W in float64, as a torch tensor on `device`. On the CPU by a
    symmetric rank-k update (BLAS syrk, half the flops of a product) on W's transposed view."""
    torch, dev = _torch(device)
    if dev.type != "cpu":
        A = torch.as_tensor(W).to(dev, torch.float64)
        return A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    from scipy.linalg.blas import dsyrk
    A = np.asarray(W, dtype=np.float64).T  # Fortran-ordered view of a C-ordered W: no copy
    if not A.flags.f_contiguous:
        A = np.asfortranarray(A)
    G = dsyrk(1.0, A, trans=1 if W.shape[0] <= W.shape[1] else 0)  # upper triangle of W W^T or W^T W
    G = np.triu(G)
    G += np.triu(G, 1).T
    return torch.from_numpy(G)


def chebyshev_top_eigvecs(G, lam_desc: np.ndarray, r: int, degree: int = 24, rounds: int = 12,
                          rtol: float = 1e-9, seed: int = 0):
    """Top-r eigenvectors of the symmetric PSD torch matrix G whose eigenvalues (descending,
    float64) are known: subspace iteration on a block of r + 32 vectors with a Chebyshev filter
    that damps [lambda_min, lambda_(b+1)] (applied in float32), then Rayleigh-Ritz in float64.
    Returns (V, converged), V of shape
    (n, r); converged means every top-r Ritz value matches the exact eigenvalue to rtol * lambda_max
    and every residual ||G v - lambda v|| is below sqrt(rtol) * lambda_max."""
    import torch
    n = G.shape[0]
    b = min(n, r + 32)
    G32 = G.to(torch.float32)
    lo, hi, top = float(lam_desc[-1]), float(lam_desc[min(b, n - 1)]), float(lam_desc[0])
    c, e = (hi + lo) / 2, max((hi - lo) / 2, 1e-300)
    # The filter grows the lambda_max component by exp(degree * gap) over the lambda_r one. In
    # float32 that ratio must stay below ~1e4 or the lower wanted vectors drown in rounding: a
    # spiked spectrum (trained weights) gets float64 and a degree that keeps it below 1e12.
    gap = math.acosh(max((top - c) / e, 1.0)) - math.acosh(max((float(lam_desc[r - 1]) - c) / e, 1.0))
    if gap * degree > math.log(1e4):
        G32 = G
        degree = int(min(degree, max(2, math.log(1e12) / gap)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64).to(G.device))[0]
    scale = top or 1.0
    for _ in range(rounds):
        # scaled Chebyshev recurrence (Zhou & Saad 2007): ~1 at lambda_max, <= |T_m| damped on [lo, hi]
        sig = e / (top - c) if top > c else 1.0
        tau = 2 / sig
        X32 = X.to(G32.dtype)
        Y0, Y1 = X32, (G32 @ X32 - c * X32) * (sig / e)
        for _ in range(degree - 1):
            sig_new = 1 / (tau - sig)
            Y0, Y1 = Y1, (G32 @ Y1 - c * Y1) * (2 * sig_new / e) - (sig * sig_new) * Y0
            sig = sig_new
        X = torch.linalg.qr(Y1.to(torch.float64))[0]
        H = X.T @ G @ X
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        X = X @ S.flip(1)
        theta = theta.flip(0)[:r].cpu().numpy()
        V = X[:, :r]
        res = (G @ V - V * torch.as_tensor(theta, dtype=G.dtype, device=G.device)).norm(dim=0).max().item()
        if np.max(np.abs(theta - lam_desc[:r])) <= rtol * scale and res <= math.sqrt(rtol) * scale:
            return V, True
    return V, False


def spectrum_and_subspace(W, r: int = 0, side: str = "in", device: str = "cpu") -> tuple[np.ndarray, np.ndarray | None, str]:
    """(singular values descending, top-r singular vectors on `side` of W or None, method).

    side 'in': right singular vectors (columns in the input space, shape (in, r)); 'out': left
    ones (out, r). Vectors on the side of the smaller Gram matrix come from its eigenvectors;
    those on the other side as W^T u / sigma (or W v / sigma)."""
    if device == "cpu" and min(W.shape) <= DENSE_EIGH_MAX:
        return _small_spectrum_and_subspace(np.asarray(W, dtype=np.float64), r, side)
    torch, dev = _torch(device)
    G = gram(W, device)
    n = G.shape[0]
    method = "eigvalsh"
    if r and n <= DENSE_EIGH_MAX:
        lam, U = torch.linalg.eigh(G)
        lam, U = lam.flip(0), U.flip(1)[:, :r]
        method = "eigh"
    else:
        lam = torch.linalg.eigvalsh(G).flip(0)
        U = None
    lam_np = np.clip(lam.cpu().numpy(), 0, None)
    sigma = np.sqrt(lam_np)
    if not r:
        return sigma, None, method
    if U is None:
        U, ok = chebyshev_top_eigvecs(G, lam_np, r)
        method = "eigvalsh+chebyshev"
        if not ok:
            U = torch.linalg.eigh(G)[1].flip(1)[:, :r]
            method = "eigh (chebyshev did not converge)"
    gside = gram_side(tuple(W.shape))
    if side == gside:
        V = U
    else:  # map to the other side: W^T u / s (gram on 'out') or W v / s (gram on 'in')
        A = torch.as_tensor(W).to(dev, torch.float64)
        s = torch.as_tensor(sigma[:r], dtype=torch.float64, device=dev).clamp_min(1e-300)
        V = (A.T @ U if gside == "out" else A @ U) / s
    return sigma, V.cpu().numpy(), method


def _small_spectrum_and_subspace(A: np.ndarray, r: int, side: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The same for a small matrix, in numpy alone (mixing numpy's and torch's thread pools on
    many small calls costs more than the calls)."""
    out_side = A.shape[0] <= A.shape[1]
    G = A @ A.T if out_side else A.T @ A
    if not r:
        return np.sqrt(np.clip(np.linalg.eigvalsh(G)[::-1], 0, None)), None, "eigvalsh"
    lam, U = np.linalg.eigh(G)
    sigma = np.sqrt(np.clip(lam[::-1], 0, None))
    U = U[:, ::-1][:, :r]
    if side != ("out" if out_side else "in"):
        U = (A.T @ U if out_side else A @ U) / np.maximum(sigma[:r], 1e-300)
    return sigma, U, "eigh"


# ----------------------------------------------------------------------------- attention forms

def head_grams(Wq: np.ndarray, Wk: np.ndarray, n_heads: int, head_dim: int, n_kv_heads: int,
               device: str = "cpu") -> np.ndarray:
    """G_h = X_h X_h^T for X_h = [Q_h; K_(h // group)], shape (heads, 2 head_dim, 2 head_dim), float64."""
    torch, dev = _torch(device)
    q = torch.as_tensor(Wq).to(dev, torch.float64).reshape(n_heads, head_dim, -1)
    k = torch.as_tensor(Wk).to(dev, torch.float64).reshape(n_kv_heads, head_dim, -1)
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=0)
    X = torch.cat([q, k], dim=1)
    return (X @ X.transpose(1, 2)).cpu().numpy()


def form_stats_from_grams(G: np.ndarray) -> dict:
    """Asymmetry ||F - F^T|| / ||F|| and positive share of the eigenvalue mass of (F + F^T) / 2
    for each head's form F = Q^T K, from its Gram matrices G (heads, 2dh, 2dh) alone."""
    dh = G.shape[-1] // 2
    Gqq, Gkk, Gkq = G[:, :dh, :dh], G[:, dh:, dh:], G[:, dh:, :dh]
    f2 = np.einsum("hij,hji->h", Gqq, Gkk)
    tff = np.einsum("hij,hji->h", Gkq, Gkq)
    with np.errstate(invalid="ignore", divide="ignore"):
        asym = np.sqrt(np.clip(2 * (f2 - tff), 0, None)) / np.sqrt(f2)
    lam, V = np.linalg.eigh(G)
    root = np.einsum("hij,hj,hkj->hik", V, np.sqrt(np.clip(lam, 0, None)), V)
    M = np.zeros_like(G[0])
    M[:dh, dh:] = M[dh:, :dh] = 0.5 * np.eye(dh)
    mu = np.linalg.eigvalsh(root @ M @ root)
    tot = np.abs(mu).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = np.where(tot > 0, np.clip(mu, 0, None).sum(1) / tot, np.nan)
    return {"asymmetry": asym.tolist(), "positive_share": pos.tolist()}


def wishart_identity(k: int, dof: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws of a k x k Wishart(dof, I) matrix by Bartlett's decomposition (dof >= k): the
    Gram matrix of k iid N(0, I_dof) rows, at O(k^2) cost whatever dof is."""
    L = np.zeros((n, k, k))
    i, j = np.tril_indices(k, -1)
    L[:, i, j] = rng.standard_normal((n, i.size))
    L[:, np.arange(k), np.arange(k)] = np.sqrt(rng.chisquare(dof - np.arange(k), size=(n, k)))
    return L @ L.transpose(0, 2, 1)


def gram_of_gaussian_rows(k: int, dof: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gram matrices of k iid N(0, I_dof) rows: Bartlett when dof >= k, else formed directly."""
    if dof >= k:
        return wishart_identity(k, dof, n, rng)
    X = rng.standard_normal((n, k, dof))
    return X @ X.transpose(0, 2, 1)


# ----------------------------------------------------------------------------- Gaussian nulls

def null_participation_ratio(n: int, p: int) -> float:
    """(E sum l)^2-type ratio for l the eigenvalues of W W^T, W n x p iid Gaussian:
    E (sum l)^2 / E sum l^2 = np (np + 2) / (np (n + p + 1))."""
    return (n * p + 2) / (n + p + 1)


def null_lambda_max(n: int, p: int) -> float:
    """E of the largest eigenvalue of W W^T for W n x p with unit-variance entries: Johnstone's
    centring and scaling with the mean of Tracy-Widom(1)."""
    a, b = math.sqrt(max(n, p) - 1), math.sqrt(min(n, p))
    return (a + b) ** 2 + (a + b) * (1 / a + 1 / b) ** (1 / 3) * TW1_MEAN


def null_stable_rank(n: int, p: int) -> float:
    return n * p / null_lambda_max(n, p)


@lru_cache(maxsize=256)
def _mp_moments(c: float) -> tuple[float, float]:
    """E[sqrt x] and E[sqrt x log sqrt x] under Marchenko-Pastur with ratio c <= 1 (mean 1)."""
    from scipy.integrate import quad
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2

    def dens(x):  # density of the eigenvalues of (1/M) W W^T, W m x M, c = m / M
        return math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * c * x)

    # x = a + (b - a) sin^2(t) removes the square-root edges (and the 1/sqrt x pole at c = 1)
    def integrand(t, f):
        x = a + (b - a) * math.sin(t) ** 2
        jac = 2 * (b - a) * math.sin(t) * math.cos(t)
        return f(x) * dens(x) * jac if x > 0 else 0.0

    m1 = quad(integrand, 0, math.pi / 2, args=(math.sqrt,), limit=200)[0]
    m2 = quad(integrand, 0, math.pi / 2, args=(lambda x: math.sqrt(x) * 0.5 * math.log(x),), limit=200)[0]
    return m1, m2


def null_entropy_effective_rank(n: int, p: int) -> float:
    m, M_ = min(n, p), max(n, p)
    m1, m2 = _mp_moments(round(m / M_, 6))
    return m * m1 * math.exp(-m2 / m1)


def null_hoyer(N: int) -> float:
    return (1 - math.sqrt(2 / math.pi)) * math.sqrt(N) / (math.sqrt(N) - 1)


def null_frac_below_rms(t: float) -> float:
    return math.erf(t / math.sqrt(2))


def analytic_matrix_null(shape: tuple[int, int]) -> dict:
    """The Gaussian null of every matrix statistic the battery compares, without sampling."""
    n, p = shape
    return {"stable_rank": null_stable_rank(n, p), "participation_ratio_sigma2": null_participation_ratio(n, p),
            "entropy_effective_rank": null_entropy_effective_rank(n, p), "hoyer": null_hoyer(n * p),
            "frac_below_0.1_rms": null_frac_below_rms(0.1), "method": "analytic"}
