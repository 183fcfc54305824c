"""Geometry of training trajectories and of SGD's non-commutativity.

Trajectory PCA: the snapshots (n, P) of a parameter block, centred; r90 is the number of
principal components holding 90% of the variance, the effective rank exp(entropy) of the
variance shares. Null: a random walk with the same step sizes in isotropic random
directions of the same P dimensions (a random walk alone concentrates variance in its
first components, so a low r90 means something only beside it).

SGD commutator: from parameters theta, one SGD step on minibatch A then B gives theta_AB,
the other order theta_BA. Their difference is formed from gradient differences in float64,
  delta = eta [(g_A(theta - eta g_B) - g_A(theta)) - (g_B(theta - eta g_A) - g_B(theta))],
which avoids cancelling two nearly equal parameter vectors; for a quadratic loss it is
exactly eta^2 (H_B g_A - H_A g_B). D = ||delta|| / (||eta g_A|| ||eta g_B||) is the raw
commutator, D_rel = ||delta|| / ||eta (g_A + g_B)|| its size relative to the two-step update.
Projection: rho = ||P delta|| / ||delta|| onto a K-dimensional subspace (for a random
subspace of P dimensions, rho is about sqrt(K / P)); the perpendicular fraction is
sqrt(1 - rho^2).
"""
from __future__ import annotations

import numpy as np
import torch


def _gram_eig(traj: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred snapshots X (n, P) with n << P: the eigenpairs of the n x n Gram matrix X X^T
    (float64, largest first) are the squared singular values and left singular vectors of
    X, at a fraction of a thin SVD's cost."""
    X = np.asarray(traj, np.float64)
    X = X - X.mean(0)
    w, V = np.linalg.eigh(X @ X.T)
    order = np.argsort(w)[::-1]
    return X, np.clip(w[order], 0, None), V[:, order]


def variance_shares(traj: np.ndarray) -> np.ndarray:
    s = _gram_eig(traj)[1]
    return s / s.sum()


def r_at(shares: np.ndarray, level: float = 0.9) -> int:
    return int(np.searchsorted(np.cumsum(shares), level - 1e-12) + 1)


def effective_rank(shares: np.ndarray) -> float:
    p = shares[shares > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def random_walk_like(traj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random walk with the trajectory's step sizes, in random directions."""
    steps = np.linalg.norm(np.diff(traj, axis=0), axis=1)
    dirs = rng.standard_normal((len(steps), traj.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.vstack([np.zeros(traj.shape[1]), np.cumsum(dirs * steps[:, None], axis=0)])


def trajectory_pca(traj: np.ndarray, rng: np.random.Generator, n_null: int = 20) -> dict:
    sh = variance_shares(traj)
    null = [variance_shares(random_walk_like(traj, rng)) for _ in range(n_null)]
    r_null = np.array([r_at(s) for s in null])
    e_null = np.array([effective_rank(s) for s in null])
    return {"r90": r_at(sh), "effective_rank": effective_rank(sh), "shares": sh[:10].tolist(),
            "null_r90_mean": float(r_null.mean()), "null_r90_range": [int(r_null.min()), int(r_null.max())],
            "null_effective_rank_mean": float(e_null.mean())}


def execution_basis(traj: np.ndarray, k: int) -> np.ndarray:
    """(P, k) orthonormal top principal directions of a trajectory."""
    X, _, V = _gram_eig(traj)
    return np.linalg.qr(X.T @ V[:, :k])[0]


def rho(delta: np.ndarray, basis: np.ndarray) -> float:
    return float(np.linalg.norm(basis.T @ delta) / np.linalg.norm(delta))


def random_basis(P: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((P, k)))[0]


def live_mask(traj: np.ndarray) -> np.ndarray:
    """Coordinates that moved at all during training (frozen or gradient-free ones would
    dilute a random baseline)."""
    return np.ptp(traj, axis=0) > 0


def random_live_basis(live: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    B = np.zeros((len(live), k))
    B[live] = random_basis(int(live.sum()), k, rng)
    return B


def block_matched_basis(basis: np.ndarray, blocks: list[slice], rng: np.random.Generator) -> np.ndarray:
    """Random directions with the same share of each basis vector in every parameter block
    (a random subspace that puts its weight where the execution subspace does)."""
    V = np.zeros_like(basis)
    for b in blocks:
        R = rng.standard_normal((b.stop - b.start, basis.shape[1]))
        V[b] = R / np.linalg.norm(R, axis=0) * np.linalg.norm(basis[b], axis=0)
    return np.linalg.qr(V)[0]


def project_commutators(deltas: np.ndarray, traj: np.ndarray, blocks: list[slice], k: int,
                        rng: np.random.Generator, n_random: int = 4) -> dict[str, np.ndarray]:
    """rho of every commutator (rows of deltas, (n, P)) onto the execution subspace of the
    whole trajectory (top k principal directions of traj (n_snap, P)) and onto baselines:
    random k-dim subspaces of the live coordinates, block-matched random subspaces, and the
    union of each block's own top-k trajectory directions beside random k-dim subspaces per
    block. Random baselines are averaged over n_random draws."""
    norms = np.linalg.norm(deltas, axis=1)
    norms[norms == 0] = np.inf

    def rho_of(B):                                     # (n,)
        return np.linalg.norm(deltas @ B, axis=1) / norms

    U = execution_basis(traj, k)
    live = live_mask(traj)
    out = {"rho_exec": rho_of(U),
           "rho_random": np.mean([rho_of(random_live_basis(live, k, rng)) for _ in range(n_random)], 0),
           "rho_block_matched": np.mean([rho_of(block_matched_basis(U, blocks, rng)) for _ in range(n_random)], 0)}
    sq_exec = np.zeros(len(deltas))
    sq_rand = np.zeros(len(deltas))
    for b in blocks:
        Ub = execution_basis(traj[:, b], k)
        sq_exec += np.linalg.norm(deltas[:, b] @ Ub, axis=1) ** 2
        sq_rand += np.mean([np.linalg.norm(deltas[:, b] @ random_live_basis(live[b], k, rng), axis=1) ** 2
                            for _ in range(n_random)], 0)
    out["rho_exec_blocks"] = np.sqrt(sq_exec) / norms
    out["rho_random_blocks"] = np.sqrt(sq_rand) / norms
    out["perp_exec"] = np.sqrt(np.clip(1 - out["rho_exec"] ** 2, 0, None))
    return out


def commutator(loss_fn, params: list[torch.Tensor], batch_a, batch_b, eta: float) -> dict:
    """loss_fn(params, batch) -> scalar; params float64 tensors (not modified)."""
    def grad(ps, batch):
        ps = [p.detach().requires_grad_(True) for p in ps]
        return [g.detach() for g in torch.autograd.grad(loss_fn(ps, batch), ps, allow_unused=False)]

    ga, gb = grad(params, batch_a), grad(params, batch_b)
    ga_b = grad([p - eta * g for p, g in zip(params, gb)], batch_a)      # g_A(theta - eta g_B)
    gb_a = grad([p - eta * g for p, g in zip(params, ga)], batch_b)      # g_B(theta - eta g_A)
    delta = [eta * ((x - y) - (u - v)) for x, y, u, v in zip(ga_b, ga, gb_a, gb)]
    flat = torch.cat([d.flatten() for d in delta])
    na = eta * torch.sqrt(sum((g ** 2).sum() for g in ga))
    nb = eta * torch.sqrt(sum((g ** 2).sum() for g in gb))
    nab = eta * torch.sqrt(sum(((x + y) ** 2).sum() for x, y in zip(ga, gb)))
    n = flat.norm()
    return {"delta": delta, "norm": float(n), "D": float(n / (na * nb)), "D_rel": float(n / nab),
            "step_a": float(na), "step_b": float(nb)}
