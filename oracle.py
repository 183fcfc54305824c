"""The Bayes-optimal predictor of the circles generator: exact inference in its hidden semi-Markov chain.

The generator's hidden state at a step is (circle c, steps k since the visit to c began). A
visit lasts a whole number of laps m >= 1 of the circle's period P_c, with
P(m) = P(round(d / P_c) = m), d ~ N(dwell_mean, dwell_std) (m = 1 also takes every d below
1.5 P_c); at the end of a visit the next circle is drawn from the transition matrix. The
observation is the circle's point at phase k mod P_c plus isotropic Gaussian noise. All of
it is read from a data folder (data.npz + config.json), so the chain is the generator's own.

The chain is expanded over states (c, k), k < M_c P_c, where M_c is the largest lap count
with probability above 1e-15 (the dropped tail is below double precision). A step moves
k -> k + 1 except at the end of lap m, where the visit ends with the discrete hazard
P(m) / P(laps >= m) and the chain enters (c', 0). Forward filtering, the one-step
predictive, and forward-backward smoothing with missing (masked) steps are computed
exactly, vectorised over windows, in time linear in the window length and the number of
states. A window's first state follows the chain's stationary law (time-stationary renewal:
the embedded jump chain's stationary visit law times the dwell survival), which is what a
window drawn far into the series sees; ``prior="start"`` instead starts a fresh visit of a
uniformly drawn circle, as the generator does at step 0.

The oracle sees exactly what a model sees: one window, with masked steps unobserved (masked
task) or the steps before the scored one (next-step task). Its MSE against the noisy data is
the best any predictor can reach on those windows; against the noise-free signal ("signal
MSE") it is the reference a model's signal MSE is divided by.

Usage:
    python oracle.py --checkpoint runs/masked_rope/best.pt          # the windows that run is scored on
    python oracle.py --data-dir data --task masked --seq-len 512 --mask-patch-min 8 --mask-patch-max 128
    python oracle.py --data-dir data --task next --seq-len 512 --eval-warmup 128
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

import safeio
from cliargs import SEED, at_least, between, Parser, positive

GENERATOR_ARRAYS = ("planes", "radii", "entry_angles", "periods", "transition_matrix")
GENERATOR_CONFIG = ("dwell_mean", "dwell_std")
TAIL = 1e-15           # lap counts beyond this survival probability are dropped
MIN_NOISE_STD = 1e-3   # noise-free data: the likelihood is taken with this std (float32 data)
MAX_STATES_PER_CIRCLE = 5_000_000  # (circle, steps into the visit) states of one circle the oracle expands


class OracleError(ValueError):
    """A data folder or a window set the oracle cannot score; the message names the fix."""


def _sf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr
    return ndtr(-z)


def laps_pmf(period: int, dwell_mean: float, dwell_std: float) -> np.ndarray:
    """P(laps = m) for m = 1..M, as the generator draws it: max(1, rint(N(mean, std) / period))."""
    if dwell_std <= 0:
        m = max(1, int(np.rint(dwell_mean / period)))
        pmf = np.zeros(m)
        pmf[-1] = 1.0
        return pmf
    m_hi = max(2, int(math.ceil((dwell_mean + 12 * dwell_std) / period)) + 2)
    if m_hi * period > MAX_STATES_PER_CIRCLE:
        raise OracleError(f"a circle of period {period} with dwell mean {dwell_mean:g} and std {dwell_std:g} gives "
                          f"{m_hi * period:,} hidden states, more than the {MAX_STATES_PER_CIRCLE:,} the oracle holds")
    edges = (np.arange(1, m_hi + 1) + 0.5) * period        # laps = m  <=>  d in [(m - .5) P, (m + .5) P)
    surv = _sf((edges - dwell_mean) / dwell_std)            # P(laps > m), m = 1..m_hi
    pmf = np.concatenate(([1.0 - surv[0]], surv[:-1] - surv[1:]))
    at_least = np.concatenate(([1.0], surv[:-1]))          # P(laps >= m)
    keep = int(np.nonzero(at_least > TAIL)[0][-1]) + 1
    pmf = pmf[:keep]
    return pmf / pmf.sum()


def stationary_visits(A: np.ndarray) -> np.ndarray:
    """Stationary law of the embedded jump chain (left eigenvector of A for eigenvalue 1)."""
    n = len(A)
    M = np.vstack([A.T - np.eye(n), np.ones((1, n))])
    b = np.zeros(n + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(M, b, rcond=None)[0]
    pi = np.clip(pi, 0, None)
    return pi / pi.sum()


@dataclass
class Chain:
    """The expanded chain over (circle, steps into the visit) and its observation model."""
    periods: np.ndarray        # (C,)
    points: np.ndarray         # (U, D) noise-free observation of (circle, phase); U = sum of periods
    point_circle: np.ndarray   # (U,)
    point_angle: np.ndarray    # (U,) angle on its circle
    A: np.ndarray              # (C, C) transition matrix
    noise_var: float           # per-dimension noise variance of the data
    lik_var: float             # variance used in the likelihood (noise_var, floored)
    offsets: np.ndarray        # (C + 1,) first state index of each circle
    point_of: np.ndarray       # (S,) point index of each state
    keep: np.ndarray           # (S,) probability of staying in the visit after this step
    end_idx: np.ndarray        # (E,) states where a visit can end (lap ends)
    end_haz: np.ndarray        # (E,) hazard there
    end_circle: np.ndarray     # (E,)
    stationary: np.ndarray     # (S,)
    start: np.ndarray          # (S,) fresh visit of a uniform circle

    @property
    def n_states(self) -> int:
        return len(self.keep)

    @property
    def n_circles(self) -> int:
        return len(self.periods)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parameters(cls, *, planes, radii, entry_angles, periods, transition_matrix, noise_var,
                        dwell_mean, dwell_std) -> "Chain":
        periods = np.asarray(periods, dtype=np.int64)
        C = len(periods)
        A = np.asarray(transition_matrix, dtype=np.float64)
        pts, pc, pa, offsets, point_of, keep, ends, hz, ec, stat = [], [], [], [0], [], [], [], [], [], []
        pi_v = stationary_visits(A)
        u0 = 0
        for c in range(C):
            P = int(periods[c])
            ang = np.mod(entry_angles[c] + 2 * np.pi * np.arange(P) / P, 2 * np.pi)
            pts.append(radii[c] * (np.cos(ang)[:, None] * planes[c][0] + np.sin(ang)[:, None] * planes[c][1]))
            pc.append(np.full(P, c))
            pa.append(ang)
            pmf = laps_pmf(P, dwell_mean, dwell_std)
            M = len(pmf)
            at_least = np.concatenate(([1.0], 1.0 - np.cumsum(pmf)[:-1]))
            haz = np.where(at_least > 0, pmf / np.maximum(at_least, 1e-300), 1.0)
            haz[-1] = 1.0
            K = M * P
            k = np.arange(K)
            point_of.append(u0 + k % P)
            kc = np.ones(K)
            lap_end = k[k % P == P - 1]
            kc[lap_end] = 1.0 - haz
            keep.append(kc)
            ends.append(offsets[-1] + lap_end)
            hz.append(haz)
            ec.append(np.full(M, c))
            stat.append(pi_v[c] * np.repeat(at_least, P))
            offsets.append(offsets[-1] + K)
            u0 += P
        offsets = np.asarray(offsets)
        stationary = np.concatenate(stat)
        start = np.zeros(offsets[-1])
        start[offsets[:-1]] = 1.0 / C
        keep = np.concatenate(keep)
        keep[np.isclose(keep, 0.0, atol=1e-300)] = 0.0
        return cls(periods=periods, points=np.concatenate(pts), point_circle=np.concatenate(pc),
                   point_angle=np.concatenate(pa), A=A, noise_var=float(noise_var),
                   lik_var=max(float(noise_var), MIN_NOISE_STD ** 2), offsets=offsets,
                   point_of=np.concatenate(point_of), keep=keep, end_idx=np.concatenate(ends),
                   end_haz=np.concatenate(hz), end_circle=np.concatenate(ec),
                   stationary=stationary / stationary.sum(), start=start)

    @classmethod
    def from_series(cls, series) -> "Chain":
        """The chain of a data folder loaded with dataset.load_series; one line when it cannot be built."""
        missing = [k for k in GENERATOR_ARRAYS if k not in series.extra]
        missing += [k for k in GENERATOR_CONFIG if k not in series.config]
        if series.noise_var is None:
            missing.append("noise_std")
        if missing:
            raise OracleError(
                f"{series.data_dir} has no generator parameters ({', '.join(missing)} missing), so there is no "
                f"Bayes-optimal reference for it; the oracle needs a folder written by markov_circles_timeseries.py")
        e = series.extra
        C, D = len(e["periods"]), e["planes"].shape[-1]
        safeio.check_fits(8 * (int(np.sum(e["periods"])) * (D + 8) + C * C), "the oracle's chain",
                          "the data folder's process is too large for the exact oracle")
        return cls.from_parameters(planes=e["planes"], radii=e["radii"], entry_angles=e["entry_angles"],
                                   periods=e["periods"], transition_matrix=e["transition_matrix"],
                                   noise_var=series.noise_var, dwell_mean=float(series.config["dwell_mean"]),
                                   dwell_std=float(series.config["dwell_std"]))

    def prior(self, kind: str = "stationary") -> np.ndarray:
        if kind == "stationary":
            return self.stationary
        if kind == "start":
            return self.start
        raise ValueError(f"unknown prior {kind!r} (stationary or start)")

    # ------------------------------------------------------------------ one step
    def advance(self, a: np.ndarray) -> np.ndarray:
        """Push state probabilities (B, S) one step through the chain."""
        out = np.empty_like(a)
        out[:, 0] = 0.0
        np.multiply(a[:, :-1], self.keep[:-1], out=out[:, 1:])
        enter = (a[:, self.end_idx] * self.end_haz) @ self._end_to_circle
        out[:, self.offsets[:-1]] += enter @ self.A
        return out

    def retreat(self, b: np.ndarray) -> np.ndarray:
        """The transpose of advance, for backward messages (B, S)."""
        out = np.empty_like(b)
        out[:, -1] = 0.0
        np.multiply(b[:, 1:], self.keep[:-1], out=out[:, :-1])
        enter = b[:, self.offsets[:-1]] @ self.A.T          # (B, C): value of leaving circle c
        out[:, self.end_idx] += self.end_haz * enter[:, self.end_circle]
        return out

    @property
    def _end_to_circle(self) -> np.ndarray:
        m = getattr(self, "_etc", None)
        if m is None:
            m = np.zeros((len(self.end_idx), self.n_circles))
            m[np.arange(len(self.end_idx)), self.end_circle] = 1.0
            self._etc = m
        return m

    def point_likelihood(self, x: np.ndarray) -> np.ndarray:
        """exp(log-likelihood - its max) of observations x (B, D) at every point: (B, U)."""
        ll = (x @ self.points.T - 0.5 * self._point_sq) / self.lik_var
        ll -= ll.max(axis=1, keepdims=True)
        return np.exp(ll)

    @property
    def _point_sq(self) -> np.ndarray:
        v = getattr(self, "_psq", None)
        if v is None:
            v = self._psq = (self.points ** 2).sum(1)
        return v

    def to_points(self, a: np.ndarray) -> np.ndarray:
        """State probabilities (B, S) summed per (circle, phase) point: (B, U)."""
        G = getattr(self, "_G", None)
        if G is None:
            from scipy.sparse import csr_matrix
            S = self.n_states
            G = self._G = csr_matrix((np.ones(S), (self.point_of, np.arange(S))), shape=(len(self.points), S))
        return np.asarray(G @ a.T).T

    def _condition(self, a: np.ndarray, lik_u: np.ndarray, rows: np.ndarray, x: np.ndarray) -> None:
        """Multiply rows of a by their likelihood and renormalise, in place (log domain on underflow)."""
        z = a[rows] * lik_u[:, self.point_of]
        s = z.sum(1)
        bad = ~(s > 0)
        if bad.any():  # every state with prior mass is far less likely than the best point
            ll = (x[bad] @ self.points.T - 0.5 * self._point_sq) / self.lik_var
            with np.errstate(divide="ignore"):
                la = np.log(a[rows[bad]]) + ll[:, self.point_of]
            la -= la.max(1, keepdims=True)
            z[bad] = np.exp(la)
            s[bad] = z[bad].sum(1)
        a[rows] = z / s[:, None]

    # ------------------------------------------------------------------ inference over windows
    def filter_expanded(self, X: np.ndarray, observed: np.ndarray | None = None, prior: str = "stationary",
                        on_step=None) -> None:
        """Forward filtering on the expanded chain (the reference for `filter`): on_step(t,
        predicted, filtered) gets the state probabilities (B, S) before and after observing step t."""
        B, L, _ = X.shape
        observed = np.ones((B, L), bool) if observed is None else observed
        a = np.tile(self.prior(prior), (B, 1))
        for t in range(L):
            if t:
                a = self.advance(a)
            pred = a.copy() if on_step else None
            rows = np.nonzero(observed[:, t])[0]
            if len(rows):
                self._condition(a, self.point_likelihood(X[rows, t]), rows, X[rows, t])
            if on_step:
                on_step(t, pred, a)

    def smooth_expanded(self, X: np.ndarray, observed: np.ndarray, prior: str = "stationary") -> np.ndarray:
        """Smoothing on the expanded chain (the reference for `smooth`): (B, L, U)."""
        B, L, _ = X.shape
        S = self.n_states
        alpha = np.empty((L, B, S))
        liks = [None] * L

        def keep_alpha(t, _pred, a):
            alpha[t] = a

        self.filter_expanded(X, observed, prior, keep_alpha)
        post = np.empty((B, L, len(self.points)))
        b = np.ones((B, S))
        for t in range(L - 1, -1, -1):
            g = self.to_points(alpha[t] * b)
            post[:, t] = g / g.sum(1, keepdims=True)
            if t == 0:
                break
            rows = np.nonzero(observed[:, t])[0]
            if len(rows):
                liks[t] = self.point_likelihood(X[rows, t])
                b[rows] *= liks[t][:, self.point_of]
            b = self.retreat(b)
            b /= b.max(1, keepdims=True)
        return post

    # ------------------------------------------------------------------ lap-factorised inference
    # Inside a lap the chain only rotates, so the probability of (circle c, lap m, phase f)
    # factorises as a[c, f] * p[c, column, m], where the column (f - t) mod P_c is the phase
    # the point had at time 0: every state of one column moves together and only the
    # column at the lap's last phase changes its law over laps at a step (the visit may end
    # there). A step then costs O(U + C M) instead of O(S) = O(U M), with U the points, M the
    # most laps; the expanded chain (filter_expanded, smooth_expanded) is the reference.

    @property
    def _lap(self) -> dict:
        L = getattr(self, "_lapc", None)
        if L is None:
            C, P = self.n_circles, self.periods
            counts = np.bincount(self.end_circle, minlength=C)
            Mmax, Pmax = int(counts.max()), int(P.max())
            H = np.ones((C, Mmax))
            for c in range(C):
                H[c, :counts[c]] = self.end_haz[self.end_circle == c]
            at_least = np.concatenate([np.ones((C, 1)), np.cumprod(1 - H, axis=1)[:, :-1]], 1)
            first = np.concatenate(([0], np.cumsum(P)[:-1]))
            phase = np.arange(len(self.points)) - first[self.point_circle]
            prev_idx = first[self.point_circle] + (phase - 1) % P[self.point_circle]
            next_idx = first[self.point_circle] + (phase + 1) % P[self.point_circle]
            pi_v = stationary_visits(self.A)
            elaps = at_least.sum(1)
            a_stat = (pi_v * elaps)[self.point_circle]
            p_stat = at_least / elaps[:, None]
            a_start = np.zeros(len(self.points))
            a_start[first] = 1.0 / C
            p_start = np.zeros((C, Mmax))
            p_start[:, 0] = 1.0
            L = self._lapc = dict(H=H, Mmax=Mmax, Pmax=Pmax, first=first, last=first + P - 1, phase=phase,
                                  prev=prev_idx, next=next_idx, ar=np.arange(C),
                                  prior={"stationary": (a_stat / a_stat.sum(), p_stat), "start": (a_start, p_start)})
        return L

    def _lap_columns(self, t: int) -> np.ndarray:
        """Per circle, the column at the lap's last phase at time t."""
        return (self.periods - 1 - t) % self.periods

    def _lap_init(self, B: int, prior: str) -> tuple[np.ndarray, np.ndarray]:
        lap = self._lap
        if prior not in lap["prior"]:
            raise ValueError(f"unknown prior {prior!r} (stationary or start)")
        a0, p0 = lap["prior"][prior]
        a = np.tile(a0, (B, 1))
        p = np.broadcast_to(p0[None, :, None, :], (B, self.n_circles, lap["Pmax"], lap["Mmax"])).copy()
        return a, p

    def _lap_advance(self, a: np.ndarray, p: np.ndarray, t: int, saved: list | None = None) -> np.ndarray:
        """Move (a, p) from time t to t + 1; p is updated in place, the new a is returned.
        saved: receives the lap laws of the columns that change (for the backward pass)."""
        lap = self._lap
        H, ar = lap["H"], lap["ar"]
        cols = self._lap_columns(t)
        pc = p[:, ar, cols]                                   # (B, C, M)
        if saved is not None:
            saved.append(pc)
        exit_frac = (pc * H).sum(-1)                          # (B, C)
        a_last = a[:, lap["last"]]
        enter = (a_last * exit_frac) @ self.A                 # (B, C)
        new_p = np.zeros_like(pc)
        new_p[..., 1:] = pc[..., :-1] * (1 - H[:, :-1]) * a_last[..., None]
        new_p[..., 0] += enter
        total = a_last * (1 - exit_frac) + enter
        np.divide(new_p, total[..., None], out=new_p, where=total[..., None] > 0)
        p[:, ar, cols] = new_p
        out = a[:, lap["prev"]]
        out[:, lap["first"]] = total
        return out

    def _lap_condition(self, a: np.ndarray, X_t: np.ndarray, rows: np.ndarray) -> None:
        """Multiply rows of a by the likelihood of their observation and renormalise, in place."""
        if not len(rows):
            return
        ll = (X_t[rows] @ self.points.T - 0.5 * self._point_sq) / self.lik_var
        ll -= ll.max(1, keepdims=True)
        z = a[rows] * np.exp(ll)
        s = z.sum(1)
        bad = ~(s > 0)
        if bad.any():  # every point with mass is far less likely than the best point: log domain
            with np.errstate(divide="ignore"):
                la = np.log(a[rows[bad]]) + ll[bad]
            la -= la.max(1, keepdims=True)
            z[bad] = np.exp(la)
            s[bad] = z[bad].sum(1)
        a[rows] = z / s[:, None]

    def filter(self, X: np.ndarray, observed: np.ndarray | None = None, prior: str = "stationary",
               on_step=None, extra_step: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Forward filtering over windows X (B, L, D). on_step(t, predicted, filtered) is called with
        the point probabilities (B, U) before and after observing step t; extra_step adds a call
        on_step(L, predicted, None) with the prediction one step past the window. Returns the
        final factorised state (a, p), which `forecast` continues."""
        B, L, _ = X.shape
        observed = np.ones((B, L), bool) if observed is None else observed
        a, p = self._lap_init(B, prior)
        for t in range(L):
            if t:
                a = self._lap_advance(a, p, t - 1)
            pred = a.copy() if on_step else None
            self._lap_condition(a, X[:, t], np.nonzero(observed[:, t])[0])
            if on_step:
                on_step(t, pred, a)
        if extra_step and on_step:
            on_step(L, self._lap_advance(a, p.copy(), L - 1), None)
        return a, p

    def smooth(self, X: np.ndarray, observed: np.ndarray, prior: str = "stationary") -> np.ndarray:
        """Smoothing posteriors per (circle, phase) point: (B, L, U), given the observed steps only."""
        lap = self._lap
        H, ar, first, last = lap["H"], lap["ar"], lap["first"], lap["last"]
        B, L, _ = X.shape
        U = len(self.points)
        a_hist = np.empty((L, B, U))
        saved: list = []
        a, p = self._lap_init(B, prior)
        for t in range(L):
            if t:
                a = self._lap_advance(a, p, t - 1, saved)
            self._lap_condition(a, X[:, t], np.nonzero(observed[:, t])[0])
            a_hist[t] = a
        # backward: beta(c, m, f) = b[c, f] * q[c, column, m]; d = sum over laps of p * q per column
        q = np.ones_like(p)
        d = p.sum(-1)                                         # (B, C, Pmax) at t = L - 1
        b = np.ones((B, U))
        post = np.empty((B, L, U))
        circle = self.point_circle
        for t in range(L - 1, -1, -1):
            col = (lap["phase"] - t) % self.periods[circle]
            g = a_hist[t] * b * d[:, circle, col]
            post[:, t] = g / g.sum(1, keepdims=True)
            if t == 0:
                break
            # step t -> t - 1: the message of time t enters through the likelihood of step t
            w = b.copy()
            rows = np.nonzero(observed[:, t])[0]
            if len(rows):
                ll = (X[rows, t] @ self.points.T - 0.5 * self._point_sq) / self.lik_var
                w[rows] *= np.exp(ll - ll.max(1, keepdims=True))
            cols = self._lap_columns(t - 1)
            qc = q[:, ar, cols]                               # laws of the columns now at phase 0
            w0 = w[:, first]                                  # (B, C)
            leave = (w0 * qc[..., 0]) @ self.A.T              # value of ending the visit of each circle
            new_q = np.zeros_like(qc)
            new_q[..., :-1] = (1 - H[:, :-1]) * qc[..., 1:] * w0[..., None]
            new_q += H * leave[..., None]
            scale = new_q.max(-1)
            np.divide(new_q, scale[..., None], out=new_q, where=scale[..., None] > 0)
            q[:, ar, cols] = new_q
            b = w[:, lap["next"]]
            b[:, last] = scale
            b /= b.max(1, keepdims=True)
            d[:, ar, cols] = (saved[t - 1] * new_q).sum(-1)
        return post

    def summarise(self, post_u: np.ndarray) -> dict:
        """Mean observation, circle probabilities and mean (cos, sin) of the angle from point posteriors (..., U)."""
        C = self.n_circles
        onehot = np.eye(C)[self.point_circle]
        return {"mean": post_u @ self.points, "circle": post_u @ onehot,
                "cos": post_u @ np.cos(self.point_angle), "sin": post_u @ np.sin(self.point_angle)}


# ----------------------------------------------------------------------------- predictions over windows

def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def window_batch(chain: Chain, length: int, memory_mb: float = 512.0) -> int:
    """Windows smoothed together so the stored forward messages (point laws, and lap laws of
    the changing columns) and the posteriors stay within memory_mb."""
    per_step = 2 * len(chain.points) + chain.n_circles * chain._lap["Mmax"]
    return max(1, int(memory_mb * 2 ** 20 // (8 * length * per_step)))


def masked_predictions(chain: Chain, X: np.ndarray, masks: np.ndarray, prior: str = "stationary",
                       memory_mb: float = 512.0, progress: bool = False, circle_max: np.ndarray | None = None
                       ) -> np.ndarray:
    """Posterior mean of every step of windows X (B, L, D) given their unmasked steps: (B, L, D).
    circle_max (B, L), when given, receives the largest posterior circle probability of each step."""
    out = np.empty(X.shape, dtype=np.float64)
    size = window_batch(chain, X.shape[1], memory_mb)
    onehot = np.eye(chain.n_circles)[chain.point_circle]
    for sl in _progress(list(_batches(len(X), size)), progress, "oracle (smoothing)"):
        post = chain.smooth(X[sl].astype(np.float64), ~masks[sl], prior)
        out[sl] = post @ chain.points
        if circle_max is not None:
            circle_max[sl] = (post @ onehot).max(-1)
    return out


def next_step_predictions(chain: Chain, X: np.ndarray, prior: str = "stationary", batch: int = 64,
                          progress: bool = False, circle_max: np.ndarray | None = None) -> np.ndarray:
    """E[x_t | x_0..x_{t-1}] of every step of windows X (B, L, D) (step 0: the prior mean): (B, L, D).
    circle_max (B, L), when given, receives the largest predictive circle probability of each step."""
    out = np.empty(X.shape, dtype=np.float64)
    onehot = np.eye(chain.n_circles)[chain.point_circle]
    for sl in _progress(list(_batches(len(X), batch)), progress, "oracle (filtering)"):
        def record(t, pred, _a, sl=sl):
            out[sl, t] = pred @ chain.points
            if circle_max is not None:
                circle_max[sl, t] = (pred @ onehot).max(-1)
        chain.filter(X[sl].astype(np.float64), None, prior, record)
    return out


def beliefs(chain: Chain, X: np.ndarray, causal: bool, prior: str = "stationary", memory_mb: float = 512.0,
            progress: bool = False) -> dict:
    """The posterior belief per step of windows X (B, L, D) with every step observed: filtering
    (causal=True: given steps up to and including t) or smoothing (given the whole window).
    Returns circle probabilities (B, L, C), mean cos/sin of the angle (B, L), the posterior mean
    of the signal (B, L, D) and, for causal=True, the one-step predictive mean of x_{t+1} (B, L, D)."""
    B, L, D = X.shape
    if causal:
        U = len(chain.points)
        post = np.empty((B, L, U))
        nxt = np.empty((B, L, D))
        for sl in _progress(list(_batches(B, 64)), progress, "oracle beliefs (filtering)"):
            def record(t, pred, a, sl=sl):
                if t:  # the prediction of step t is the predictive mean recorded at t - 1
                    nxt[sl, t - 1] = pred @ chain.points
                if a is not None:
                    post[sl, t] = a
            chain.filter(X[sl].astype(np.float64), None, prior, record, extra_step=True)
        out = chain.summarise(post)
        out["next_mean"] = nxt
        return out
    parts = []
    for sl in _progress(list(_batches(B, window_batch(chain, L, memory_mb))), progress, "oracle beliefs (smoothing)"):
        parts.append(chain.summarise(chain.smooth(X[sl].astype(np.float64), np.ones((sl.stop - sl.start, L), bool),
                                                  prior)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def forecast(chain: Chain, seed: np.ndarray, n: int, prior: str = "stationary") -> np.ndarray:
    """E[x_{T+j} | seed window x_0..x_{T-1}] for j = 0..n-1: the Bayes-optimal open-loop
    continuation, to set beside a model's generation from the same seed: (n, D)."""
    T = len(seed)
    a, p = chain.filter(seed[None].astype(np.float64), None, prior)
    out = np.empty((n, chain.points.shape[1]))
    for j in range(n):
        a = chain._lap_advance(a, p, T - 1 + j)
        out[j] = (a @ chain.points)[0]
    return out


def rollout(chain: Chain, seed: np.ndarray, n: int, temperature: float = 0.0, sample_state: bool = False,
            rng: np.random.Generator | None = None, prior: str = "stationary") -> np.ndarray:
    """The Bayes-optimal predictor generating closed-loop, the way a model generates: from the
    filtered seed window, each step's prediction is fed back as the next observation and conditioned
    on. The prediction is the predictive mean (sample_state False: what a model trained on squared
    error outputs), or a noise-free point drawn from the predictive law over (circle, phase) points
    (sample_state True), plus N(0, temperature^2) noise per dimension. With sample_state and the
    temperature at the data's noise standard deviation this is an exact sample of the process
    continuing the seed; with neither it shows what feeding back a mean does to the process. (n, D)."""
    if rng is None:
        rng = np.random.default_rng(0)
    T = len(seed)
    a, p = chain.filter(seed[None].astype(np.float64), None, prior)
    D = chain.points.shape[1]
    out = np.empty((n, D))
    row = np.zeros(1, np.int64)
    for j in range(n):
        a = chain._lap_advance(a, p, T - 1 + j)
        if sample_state:
            w = np.clip(a[0], 0, None)
            x = chain.points[rng.choice(len(w), p=w / w.sum())].copy()
        else:
            x = a[0] @ chain.points
        if temperature > 0:
            x = x + temperature * rng.standard_normal(D)
        out[j] = x
        chain._lap_condition(a, x[None], row)
    return out


# ----------------------------------------------------------------------------- a series against the process

def decode(chain: Chain, X: np.ndarray, prior: str = "stationary") -> tuple[np.ndarray, np.ndarray]:
    """Filtered circle per step (argmax of the filtering posterior) and its probability, of one series (T, D)."""
    circ = np.empty(len(X), dtype=np.int64)
    conf = np.empty(len(X))

    def record(t, _pred, a):
        c = a @ np.eye(chain.n_circles)[chain.point_circle]
        circ[t], conf[t] = c[0].argmax(), c[0].max()

    chain.filter(X[None].astype(np.float64), None, prior, record)
    return circ, conf


def runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, length) of each maximal run of equal labels."""
    if len(labels) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate(([0], cut))
    return labels[starts], np.diff(np.concatenate((starts, [len(labels)])))


def dwell_cdf(chain: Chain, circle: int, d: np.ndarray, dwell_mean: float, dwell_std: float) -> np.ndarray:
    """P(dwell <= d) on a circle under the generator (dwell = laps x period)."""
    P = int(chain.periods[circle])
    cdf = np.cumsum(laps_pmf(P, dwell_mean, dwell_std))
    laps = np.floor(np.asarray(d) / P).astype(int)
    return np.where(laps < 1, 0.0, cdf[np.clip(laps, 1, len(cdf)) - 1])


def process_statistics(chain: Chain, X: np.ndarray, dwell_mean: float, dwell_std: float) -> dict:
    """Decode a series with the oracle's filter and compare its process with the generator's.

    Dwell: KS distance between the decoded complete visits (first and last run dropped) and the
    generator's dwell law of the same circles; transitions: total variation per row of the
    decoded transition matrix against the true row (rows with at least one decoded exit),
    averaged with the exits as weights; occupancy: total variation against the stationary
    share; angular speed: the least-squares slope of the unwrapped angle in each circle's own
    plane over each decoded visit (visits weighted by length), as a ratio to the true 2 pi / period."""
    circ, conf = decode(chain, X)
    lab, length = runs(circ)
    C = chain.n_circles
    out: dict = {"n_steps": int(len(X)), "mean_confidence": float(conf.mean()), "n_visits": int(len(lab))}
    full_lab, full_len = lab[1:-1], length[1:-1]
    if len(full_len):
        v = np.unique(full_len)  # dwells are whole steps: compare both one-sided limits at each value
        le = np.searchsorted(np.sort(full_len), v, side="right") / len(full_len)
        lt = np.searchsorted(np.sort(full_len), v, side="left") / len(full_len)
        model_le = np.mean([dwell_cdf(chain, c, v, dwell_mean, dwell_std) for c in full_lab], axis=0)
        model_lt = np.mean([dwell_cdf(chain, c, v - 1, dwell_mean, dwell_std) for c in full_lab], axis=0)
        out["dwell_ks"] = float(max(np.abs(le - model_le).max(), np.abs(lt - model_lt).max()))
        out["dwell_mean"] = float(full_len.mean())
    else:
        out["dwell_ks"], out["dwell_mean"] = None, None
    counts = np.zeros((C, C))
    np.add.at(counts, (lab[:-1], lab[1:]), 1)
    exits = counts.sum(1)
    rows = exits > 0
    if rows.any():
        tv = 0.5 * np.abs(counts[rows] / exits[rows, None] - chain.A[rows]).sum(1)
        out["transition_tv"] = float((tv * exits[rows]).sum() / exits[rows].sum())
        out["transition_tv_per_row"] = {int(c): float(v) for c, v in zip(np.flatnonzero(rows), tv)}
    else:
        out["transition_tv"], out["transition_tv_per_row"] = None, {}
    share = np.bincount(circ, minlength=C) / len(circ)
    stat_share = np.add.reduceat(chain.stationary, chain.offsets[:-1])
    out["occupancy"] = share.tolist()
    out["occupancy_tv"] = float(0.5 * np.abs(share - stat_share).sum())
    speed = {}
    e = chain.point_circle
    starts = np.concatenate(([0], np.cumsum(length)[:-1]))
    for c in range(C):
        first = chain.points[e == c][0]
        u = first / np.linalg.norm(first)
        second = chain.points[e == c][1 % int(chain.periods[c])]
        v = second - (second @ u) * u
        v /= max(np.linalg.norm(v), 1e-12)
        num = den = 0.0
        for s0, n in zip(starts[lab == c], length[lab == c]):
            if n < 4:
                continue
            seg = X[s0:s0 + n]
            ang = np.unwrap(np.arctan2(seg @ v, seg @ u))
            num += n * np.polyfit(np.arange(n), ang, 1)[0]  # least-squares angle per step, weighted by length
            den += n
        if den:
            speed[int(c)] = float(num / den / (2 * np.pi / chain.periods[c]))
    out["angular_speed_ratio"] = speed
    out["angular_speed_ratio_median"] = float(np.median(list(speed.values()))) if speed else None
    return out


def beliefs_at(chain: Chain, X: np.ndarray, starts: np.ndarray, offsets: np.ndarray, window: int, causal: bool,
               memory_mb: float = 256.0, progress: bool = False) -> dict:
    """The belief of each requested step given exactly the window a model saw it in: step
    starts[i] + offsets[i] of series X (T, D), in the window [starts[i], starts[i] + window).
    Returns the arrays of `beliefs`, one row per request."""
    uniq, inv = np.unique(starts, return_inverse=True)
    per = window_batch(chain, window, memory_mb)
    out: dict = {}
    for sl in _progress(list(_batches(len(uniq), per)), progress, "oracle beliefs"):
        Xw = X[uniq[sl, None] + np.arange(window)]
        b = beliefs(chain, Xw, causal, memory_mb=memory_mb)
        rows = np.flatnonzero((inv >= sl.start) & (inv < sl.stop))
        for k, v in b.items():
            if k not in out:
                out[k] = np.empty((len(starts),) + v.shape[2:])
            out[k][rows] = v[inv[rows] - sl.start, offsets[rows]]
    return out


def _progress(items, enabled: bool, desc: str):
    if not enabled or len(items) < 2:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False)


# ----------------------------------------------------------------------------- scoring a model's windows

def window_arrays(dataset, series) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(X, signal, masks) of every window of a dataset.WindowDataset, in its order."""
    L = dataset.seq_len
    idx = dataset.starts[:, None] + np.arange(L)
    X = series.X[idx]
    signal = series.signal[idx] if series.signal is not None else None
    masks = np.stack([dataset.mask(i) for i in range(len(dataset))]) if len(dataset) else np.zeros((0, L), bool)
    return X, signal, masks


def scored_steps(task: str, dataset, masks: np.ndarray) -> np.ndarray:
    """Which steps of each window a model is scored on: the masked ones, or those after the warm-up."""
    if task == "masked":
        return masks
    if task == "next":
        w = int(getattr(dataset, "eval_warmup", 0))
        s = np.zeros_like(masks)
        s[:, max(w, 1):] = True
        return s
    raise ValueError(f"unknown task {task!r} (masked or next)")


def mse_on(pred: np.ndarray, target: np.ndarray, scored: np.ndarray) -> float:
    """Mean squared error per element over the scored steps of every window."""
    n = scored.sum() * target.shape[-1]
    if n == 0:
        return float("nan")
    return float((((pred - target) ** 2).sum(-1) * scored).sum() / n)


CERTAIN = 0.99  # a step is "certain" when the oracle gives one circle at least this probability


def score_dataset(chain: Chain, series, dataset, task: str, progress: bool = False,
                  memory_mb: float = 512.0, steps: dict | None = None) -> dict:
    """The oracle's MSE (against the data and the signal) on exactly the steps a model is scored on,
    and, with the signal, split between the steps where the oracle is certain of the circle
    (posterior probability >= CERTAIN) and the others. steps, when given, receives the per-step
    arrays (scored, certain, the oracle's squared signal error summed over dimensions) so that a
    model's error can be split the same way (split_by_certainty)."""
    X, signal, masks = window_arrays(dataset, series)
    if task == "masked" and not masks.any():
        raise OracleError("these windows have no masked steps; the masked task needs a mask configuration")
    cmax = np.empty(masks.shape)
    if task == "masked":
        pred = masked_predictions(chain, X, masks, memory_mb=memory_mb, progress=progress, circle_max=cmax)
    else:
        pred = next_step_predictions(chain, X, progress=progress, circle_max=cmax)
    scored = scored_steps(task, dataset, masks)
    out = {"oracle_mse": mse_on(pred, X, scored), "n_windows": int(len(X)), "n_scored_steps": int(scored.sum())}
    if signal is not None:
        out["oracle_signal_mse"] = mse_on(pred, signal, scored)
        err = ((pred - signal) ** 2).sum(-1)
        certain = cmax >= CERTAIN
        split = split_by_certainty(err, scored, certain, X.shape[-1])
        out["oracle_by_certainty"] = split
        if steps is not None:
            steps.update(scored=scored, certain=certain, oracle_sq_err=err, dim=X.shape[-1])
    return out


def split_by_certainty(sq_err: np.ndarray, scored: np.ndarray, certain: np.ndarray, dim: int) -> dict:
    """A signal MSE split over the scored steps where the oracle is certain of the circle and the
    others: the share of certain steps and the MSE per element on each part (None where a part is
    empty). share * certain + (1 - share) * uncertain is the total."""
    parts = {"certain": scored & certain, "uncertain": scored & ~certain}
    n = int(scored.sum())
    out = {"certain_share": float(parts["certain"].sum() / n) if n else None, "threshold": CERTAIN}
    for name, m in parts.items():
        k = int(m.sum())
        out[f"n_{name}"] = k
        out[f"signal_mse_{name}"] = float(sq_err[m].sum() / (k * dim)) if k else None
    return out


def reference(series, datasets: dict, task: str, progress: bool = True,
              steps: dict | None = None) -> tuple[dict | None, str | None]:
    """Oracle scores per split ({'val': {...}, 'test': {...}}), or (None, one-line reason).
    steps, when given, receives each split's per-step arrays (see score_dataset)."""
    try:
        chain = Chain.from_series(series)
    except OracleError as e:
        return None, f"no oracle: {e}"
    out = {}
    for split in ("val", "test"):
        if datasets.get(split) is not None:
            st = {} if steps is not None else None
            out[split] = score_dataset(chain, series, datasets[split], task, progress=progress, steps=st)
            if st:
                steps[split] = st
    return out, None


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Score the Bayes-optimal predictor of the circles generator on the windows and masks a "
                    "model is scored on. Give --checkpoint to take every data flag from a training run, or the "
                    "flags themselves.")
    p.add_argument("--checkpoint", default=None,
                   help="a best.pt/last.pt of masked_model_gpu.py or mamba_next.py: its task, data folder, "
                        "windows and masks are used (flags below then only override --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder with data.npz + config.json (default: data, or the "
                                                    "checkpoint's)")
    p.add_argument("--task", choices=("masked", "next"), default="masked",
                   help="masked: posterior mean of masked steps given the rest of the window; next: "
                        "E[x_t | earlier steps of the window] after the warm-up")
    p.add_argument("--split", choices=("val", "test", "both"), default="both", help="which held-out block")
    p.add_argument("--seq-len", type=at_least(2), default=512, help="window length (steps)")
    p.add_argument("--val-frac", type=between(0, 1, open_lo=True, open_hi=True), default=0.1,
                   help="share of the series in the validation block")
    p.add_argument("--test-frac", type=between(0, 1, open_hi=True), default=0.1,
                   help="share of the series in the test block")
    p.add_argument("--seed", type=SEED, default=0, help="the run's seed (fixes the evaluation masks)")
    p.add_argument("--mask-ratio", type=between(0, 1, open_lo=True, open_hi=True), default=0.15,
                   help="masked task: fraction of steps masked")
    p.add_argument("--mask-patch-size", type=at_least(1), default=16, help="masked task: fixed patch length")
    p.add_argument("--mask-patch-min", type=at_least(1), default=None, help="masked task: stochastic patch minimum")
    p.add_argument("--mask-patch-max", type=at_least(1), default=None, help="masked task: stochastic patch maximum")
    p.add_argument("--eval-warmup", type=at_least(0), default=None,
                   help="next task: steps of context before the first scored step (default: seq-len // 4)")
    p.add_argument("--memory-mb", type=positive(), default=512.0, help="memory for the stored forward messages")
    p.add_argument("--out-dir", default=None, help="also write the scores as oracle.json into this folder "
                   "(default: print them only)")
    p.add_argument("--force", action="store_true", help="overwrite an existing oracle.json in --out-dir")
    return p


def _data_args_from(args, given: set[str]) -> tuple[str, dict, str | None]:
    if args.checkpoint:
        from checkpoints import TrainingError, load_checkpoint
        try:
            ckpt = load_checkpoint(args.checkpoint)
        except TrainingError as e:
            raise OracleError(str(e)) from None
        task = {"masked_transformer": "masked", "mamba_next": "next"}.get(ckpt.get("model_type"))
        if task is None:
            raise OracleError(f"{args.checkpoint} is a {ckpt.get('model_type')!r} checkpoint; the oracle scores "
                              f"masked_model_gpu.py and mamba_next.py runs")
        data = dict(ckpt["data"])
        if "data_dir" in given:
            data["data_dir"] = args.data_dir
        return task, data, (None if "data_dir" in given else ckpt.get("data_generation"))
    data = {k: getattr(args, k) for k in ("seq_len", "val_frac", "test_frac", "seed", "mask_ratio",
                                          "mask_patch_size", "mask_patch_min", "mask_patch_max")}
    data["data_dir"] = args.data_dir or "data"
    data["stride"] = data["seq_len"]
    w = args.eval_warmup
    data["eval_warmup"] = data["seq_len"] // 4 if w is None else w
    return args.task, data, None


@safeio.one_line_errors(OracleError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
    out = os.path.join(args.out_dir, "oracle.json") if args.out_dir else None
    claim = safeio.Outputs("oracle", args.force)
    if out:
        safeio.output_dir(args.out_dir, create=False)
        claim.claim([out], remove=False)
    task, data, generation = _data_args_from(args, given)
    from dataset import load_series, task_datasets
    series = load_series(data["data_dir"])
    if generation and series.config.get("generation") != generation:
        raise OracleError(f"{data['data_dir']} was written again since {args.checkpoint} was trained on it; pass "
                          f"--data-dir to score these windows anyway, or regenerate the original data")
    chain = Chain.from_series(series)
    ds = task_datasets(series, data, task)
    splits = ("val", "test") if args.split == "both" else (args.split,)
    res = {"task": task, "data": data, "n_states": chain.n_states, "noise_floor": series.noise_var}
    for split in splits:
        if ds.get(split) is None:
            raise OracleError(f"there is no {split} block (--test-frac 0?)")
        t0 = time.perf_counter()
        r = score_dataset(chain, series, ds[split], task, progress=True, memory_mb=args.memory_mb)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        res[split] = r
        sig = f", signal MSE {r['oracle_signal_mse']:.4f}" if "oracle_signal_mse" in r else ""
        print(f"{split:4s}: oracle MSE {r['oracle_mse']:.4f} (noise floor {series.noise_var:.3f}){sig}  "
              f"[{r['n_windows']} windows, {r['n_scored_steps']} scored steps, {r['seconds']} s]")
    if out:
        safeio.output_dir(args.out_dir)
        claim.write_json(out, res)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
