"""Geometric field modulator: multiplicative gates on the residual stream from simplex experts.

For each chosen block and each expert k (default 1, 2, 4: edge, triangle, pentachoron) the
active part of the residual stream (all but a preserved null-space fraction of the
dimensions) deforms a regular k-simplex template; the Cayley-Menger geometry of the
deformed simplex (squared edge lengths and, for k >= 2, squared volume, each relative to
the template) drives a gate g_k in (0, 1) per active dimension and a validity v_k in (0, 1).
The stream's active part is multiplied by prod_k [(1 - a_lk v_k) + a_lk v_k g_k], with
a_lk = clamp(sigmoid(logit_lk), alpha_min, alpha_max); the null-space dimensions pass
untouched. Fixes against the original version: the validity head now scales each expert's
gate (it was computed and unused); the k = 1 expert is no longer constant (a LayerNorm over
[d^2, vol^2], which are equal for an edge, erased its signal; features are now relative
to the template instead); the template is an exact regular simplex (tested: equal edges,
the analytic volume). `cv_health` measures the 4-simplex volume CV of representations in
their full dimension (not a truncated 8-D slice), beside the exact Gaussian value.
"""
from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import torch
import torch.nn as nn

from terrain import metrics as M
from terrain.hooks import HookedModulator


def regular_simplex(k: int, dim: int) -> torch.Tensor:
    """(k + 1, dim) vertices of a regular k-simplex with unit edges, centred at the origin."""
    if dim < k:
        raise ValueError(f"a {k}-simplex needs at least {k} dimensions, got {dim}")
    E = np.eye(k + 1) / np.sqrt(2.0)                   # unit edges in R^(k+1)
    E -= E.mean(0)
    _, _, vt = np.linalg.svd(E, full_matrices=False)
    V = E @ vt[:k].T                                   # coordinates in the k-D hyperplane
    out = np.zeros((k + 1, dim))
    out[:, :k] = V
    return torch.tensor(out, dtype=torch.float32)


def regular_simplex_volume(k: int, edge: float = 1.0) -> float:
    return edge ** k * math.sqrt(k + 1) / (math.factorial(k) * 2 ** (k / 2))


def cayley_menger(verts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared pairwise distances (..., n_pairs) and squared volume (...) of simplices (..., k+1, e)."""
    nv = verts.shape[-2]
    k = nv - 1
    g = verts @ verts.transpose(-1, -2)
    n = torch.diagonal(g, dim1=-2, dim2=-1)
    d2 = (n.unsqueeze(-1) + n.unsqueeze(-2) - 2 * g).clamp_min(0)
    i, j = zip(*combinations(range(nv), 2))
    cm = torch.ones(*d2.shape[:-2], nv + 1, nv + 1, dtype=verts.dtype, device=verts.device)
    cm[..., 0, 0] = 0
    cm[..., 1:, 1:] = d2
    vol2 = (-1) ** (k + 1) / (2 ** k * math.factorial(k) ** 2) * torch.linalg.det(cm)
    return d2[..., list(i), list(j)], vol2


class SimplexExpert(nn.Module):
    def __init__(self, k: int, in_dim: int, gate_dim: int, edim: int = 8, deform_scale: float = 0.05):
        super().__init__()
        self.k, self.deform_scale = k, deform_scale
        self.register_buffer("template", regular_simplex(k, edim))
        d2, vol2 = cayley_menger(self.template)
        self.register_buffer("d2_ref", d2)
        self.register_buffer("vol2_ref", vol2)
        self.n_features = len(d2) + (1 if k >= 2 else 0)     # an edge's volume is its length: no extra feature
        self.to_deform = nn.Linear(in_dim, (k + 1) * edim)
        self.gate = nn.Linear(self.n_features, gate_dim)
        self.validity = nn.Linear(self.n_features, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        deform = self.to_deform(x).unflatten(-1, (self.k + 1, self.template.shape[1]))
        d2, vol2 = cayley_menger(self.template + self.deform_scale * deform)
        f = [(d2 / self.d2_ref - 1) / self.deform_scale]
        if self.k >= 2:
            f.append(((vol2 / self.vol2_ref - 1) / self.deform_scale).unsqueeze(-1))
        return torch.cat(f, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return torch.sigmoid(self.gate(f)), torch.sigmoid(self.validity(f))


class FieldModulator(HookedModulator):
    def __init__(self, d_model: int, n_layers: int, ks=(1, 2, 4), edim: int = 8, alpha: float = 0.01,
                 alpha_min: float = 0.001, alpha_max: float = 0.35, null_fraction: float = 0.25,
                 deform_scale: float = 0.05, seed: int = 0):
        super().__init__()
        self.ks, self.alpha_min, self.alpha_max = tuple(ks), alpha_min, alpha_max
        n_null = int(d_model * null_fraction)
        active = torch.ones(d_model, dtype=torch.bool)
        if n_null:
            active[torch.randperm(d_model, generator=torch.Generator().manual_seed(seed))[:n_null]] = False
        self.register_buffer("active", active)
        n_active = int(active.sum())
        self.experts = nn.ModuleList([SimplexExpert(k, n_active, n_active, edim, deform_scale) for k in self.ks])
        self.alpha_logit = nn.Parameter(torch.full((n_layers, len(self.ks)), math.log(alpha / (1 - alpha))))

    def n_slots(self) -> int:
        return self.alpha_logit.shape[0]

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit).clamp(self.alpha_min, self.alpha_max)

    def gates(self, h: torch.Tensor, layer: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = h[..., self.active].float()  # the experts run in float32 whatever the model's dtype
        total = torch.ones_like(x)
        validities = []
        for e, (expert, a) in enumerate(zip(self.experts, self.alpha[layer])):
            g, v = expert(x)
            total = total * ((1 - a * v) + a * v * g)
            validities.append(v.squeeze(-1))
        return total, validities

    def transform(self, h: torch.Tensor, k: int) -> torch.Tensor:
        total, _ = self.gates(h, k)
        out = h.clone()
        out[..., self.active] = h[..., self.active] * total.to(h.dtype)
        return out


def parameter_count(d_model: int = 512, n_layers: int = 6, **kw) -> int:
    return sum(p.numel() for p in FieldModulator(d_model, n_layers, **kw).parameters())


def cv_health(X: np.ndarray, n_simplices: int = 2000, seed: int = 0) -> dict:
    """4-simplex volume CV of representations in their full dimension, with the exact Gaussian value."""
    rng = np.random.default_rng(seed)
    vol = M.sample_simplex_volumes(np.asarray(X, np.float64), 4, n_simplices, rng)
    return {"cv": M.coefficient_of_variation(vol), "ci": list(M.bootstrap_ci(vol, n_boot=200, rng=rng)),
            "gaussian_cv": M.gaussian_volume_cv(4, X.shape[1])}


if __name__ == "__main__":
    import sys
    print("terrain/field.py is a library: train the field modulator with\n"
          "  python -m terrain.modulate --train --modulator field [--model NAME ...]\n"
          "(see python -m terrain.modulate --help)", file=sys.stdout if "-h" in sys.argv or "--help" in sys.argv
          else sys.stderr)
    sys.exit(0 if "-h" in sys.argv or "--help" in sys.argv else 2)
