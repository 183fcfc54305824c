"""The Markov-switching circles process itself: its parameters, a trajectory drawn from them, and
fresh draws of the same process (a shared module: the generator script and training import it).

A process is its geometry (circle planes, radii, entry angles, whole-step periods, the transition
matrix) and its laws (dwell time mean and std before rounding to whole laps, noise std). A
trajectory of it needs two random streams: the visits (next circle, dwell) and the noise.

The generator draws the geometry and a trajectory from three streams of its seed (geometry,
transitions, noise). A fresh draw k of a data folder's process keeps the folder's geometry and
laws and takes its transitions and noise from two streams keyed by (seed, k), which the folder's
own series never uses: draw k is the same on every run and machine, differs from every other
draw and from the folder's own series, and a training run that uses draw k in epoch k sees a new
trajectory every epoch, never the validation or test steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAW_STREAM = 1000  # spawn-key prefix of fresh draws: the folder's own streams are children 0..3 of its seed


@dataclass
class Process:
    planes: np.ndarray            # (C, 2, D) orthonormal bases of the circle planes
    radii: np.ndarray             # (C,)
    entry_angles: np.ndarray      # (C,) angle at which every visit enters its circle
    periods: np.ndarray           # (C,) steps per lap
    transition_matrix: np.ndarray  # (C, C) row-stochastic, zero diagonal
    dwell_mean: float
    dwell_std: float
    noise_std: float

    @property
    def n_circles(self) -> int:
        return len(self.periods)

    @property
    def dim(self) -> int:
        return self.planes.shape[-1]

    @classmethod
    def from_series(cls, series) -> "Process":
        """The process of a generated data folder (dataset.load_series has checked its arrays and
        fields); a recorded series has none, which is one line (ValueError) naming the fix."""
        arrays = ("planes", "radii", "entry_angles", "periods", "transition_matrix")
        missing = [k for k in arrays if k not in series.extra]
        missing += [k for k in ("dwell_mean", "dwell_std") if k not in series.config]
        if missing or series.noise_var is None:
            raise ValueError(f"{series.data_dir} holds no process to draw from (a recorded series, or a folder without "
                             f"{', '.join(missing) or 'noise_std'}); --train-data fresh needs a folder written by "
                             f"markov_circles_timeseries.py, use --train-data fixed")
        e, c = series.extra, series.config
        return cls(planes=e["planes"], radii=e["radii"], entry_angles=e["entry_angles"], periods=e["periods"],
                   transition_matrix=e["transition_matrix"], dwell_mean=float(c["dwell_mean"]),
                   dwell_std=float(c["dwell_std"]), noise_std=float(series.noise_var) ** 0.5)


def sample_visits(rng: np.random.Generator, n_steps: int, P: np.ndarray, periods: np.ndarray,
                  dwell_mean: float, dwell_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Markov chain of visits covering n_steps: (state per visit, dwell steps per visit).

    The first visit starts on a uniformly drawn circle. Each visit consumes a fixed amount of
    the stream (one dwell draw and one next-state draw), so the visits of a shorter series are
    a prefix of a longer one."""
    n = len(periods)
    cum = np.cumsum(P, axis=1)
    states, dwells = [], []
    state = int(rng.integers(n))
    total = 0
    while total < n_steps:
        dwell = rng.normal(dwell_mean, dwell_std)
        laps = max(1, int(np.rint(dwell / periods[state])))
        states.append(state)
        dwells.append(laps * int(periods[state]))
        total += dwells[-1]
        u = rng.random()
        state = int(min(np.searchsorted(cum[state], u, side="right"), n - 1))
    return np.asarray(states, dtype=np.int64), np.asarray(dwells, dtype=np.int64)


def sample(process: Process, n_steps: int, transitions: np.random.Generator,
           noise: np.random.Generator) -> dict[str, np.ndarray]:
    """A trajectory of n_steps: observations X, the noise-free signal, circle and angle per step,
    and the visits (start, circle, dwell; the last one cut at n_steps)."""
    p = process
    visit_states, visit_dwells = sample_visits(transitions, n_steps, p.transition_matrix, p.periods,
                                               p.dwell_mean, p.dwell_std)
    states = np.repeat(visit_states, visit_dwells)[:n_steps]
    starts = np.concatenate(([0], np.cumsum(visit_dwells)[:-1]))
    step_in_visit = np.arange(n_steps) - np.repeat(starts, visit_dwells)[:n_steps]
    thetas = np.mod(p.entry_angles[states] + 2 * np.pi * step_in_visit / p.periods[states], 2 * np.pi)
    r = p.radii[states][:, None]
    signal = r * (np.cos(thetas)[:, None] * p.planes[states, 0] + np.sin(thetas)[:, None] * p.planes[states, 1])
    X = signal + noise.standard_normal((n_steps, p.dim)) * p.noise_std
    keep = starts < n_steps
    return {"X": X.astype(np.float32), "signal": signal.astype(np.float32), "states": states.astype(np.int64),
            "thetas": thetas, "visit_starts": starts[keep], "visit_states": visit_states[keep],
            "visit_dwells": np.minimum(visit_dwells[keep], n_steps - starts[keep])}


def draw_streams(seed: int, k: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The (transitions, noise) generators of fresh draw k of a folder generated with `seed`."""
    if k < 0:
        raise ValueError(f"draw index must be >= 0, got {k}")
    t, n = np.random.SeedSequence(seed, spawn_key=(DRAW_STREAM, k)).spawn(2)
    return np.random.default_rng(t), np.random.default_rng(n)


def fresh_draw(process: Process, seed: int, k: int, n_steps: int) -> dict[str, np.ndarray]:
    """Draw k of the process: the same geometry and laws, a new trajectory and new noise."""
    return sample(process, n_steps, *draw_streams(seed, k))
