"""Synthetic Markov-switching circles: a 20-D time series with syllable-like structure.

A point runs around one of ``n_circles`` circles, all centred at the origin of an
``ambient_dim``-dimensional space, each lying in its own random 2-D plane. Each circle
has its own fixed angular velocity (periods evenly spaced from 40 to 400 steps). The
point stays on a circle for a dwell time drawn from N(400, 100) and rounded to a whole
number of laps, so every visit enters and leaves a circle at that circle's fixed entry
angle; it then jumps to another circle according to a sparse Markov transition matrix
(a ring i -> i +- 1 plus a few long-range shortcuts, no self-transitions). Isotropic
Gaussian noise (std 2.83, SNR about 2.5 by power) is added to every observation.

``--subspace-dim k`` places every circle plane inside one shared random k-dimensional
subspace, which controls how much the circles overlap geometrically (k = 2: all
circles coplanar).

Three independent random streams (geometry, transitions, noise) are derived from
``--seed``, so the noise never changes the circles, and a shorter series is an exact
prefix of a longer one with the same seed.

Usage:
    python markov_circles_timeseries.py                       # 100k steps, with UMAP
    python markov_circles_timeseries.py --no-umap             # data + figures, fast
    python markov_circles_timeseries.py --n-steps 200000 --subspace-dim 4

Writes ``<out-dir>/data.npz`` and ``<out-dir>/config.json``, and figures in
``<plots-dir>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from circles import Process, sample
from cliargs import SEED, Parser, add_output_flags, at_least, between, int_between, plots_dir
from dataset import MAX_PERIOD, data_outputs, incomplete_write, save_data_folder
from safeio import InputError, OutputsExist, check_fits, one_line_errors, output_dir, read_json
from plotting import draw_state_strip, save_figure, state_colors  # noqa: F401 (also re-exported for old imports)
from estimate_dimension import levina_bickel

FORMAT_VERSION = 1


@dataclass
class CirclesConfig:
    n_steps: int = 100_000
    n_circles: int = 10
    ambient_dim: int = 20
    subspace_dim: int | None = None  # None: planes span the whole ambient space
    radius_mean: float = 20.0
    radius_std: float = 2.0
    period_min: int = 40
    period_max: int = 400
    dwell_mean: float = 400.0
    dwell_std: float = 100.0
    n_shortcuts: int = 1  # long-range shortcuts per circle on top of the ring
    noise_std: float = 2.83
    seed: int = 0
    format_version: int = field(default=FORMAT_VERSION)

    def validate(self) -> None:
        if self.n_steps < 1:
            raise ValueError(f"--n-steps must be positive, got {self.n_steps}")
        if self.n_circles < 2:
            raise ValueError(f"--n-circles must be at least 2 (transitions need another circle), got {self.n_circles}")
        if self.ambient_dim < 2:
            raise ValueError(f"--ambient-dim must be at least 2, got {self.ambient_dim}")
        k = self.subspace_dim
        if k is not None and not 2 <= k <= self.ambient_dim:
            raise ValueError(
                f"--subspace-dim must lie in [2, ambient_dim={self.ambient_dim}], got {k}")
        if not 1 <= self.period_min <= self.period_max:
            raise ValueError("periods must satisfy 1 <= period_min <= period_max")
        if self.noise_std < 0:
            raise ValueError(f"--noise-std must be >= 0, got {self.noise_std}")
        if self.n_shortcuts < 0:
            raise ValueError("--n-shortcuts must be >= 0")
        if self.n_circles > 1000 or self.period_max > MAX_PERIOD:
            raise ValueError(f"at most 1000 circles and periods of at most {MAX_PERIOD} steps")


# ----------------------------------------------------------------------------- streams

def rng_streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators for the three sources of randomness."""
    children = np.random.SeedSequence(seed).spawn(4)
    return {name: np.random.default_rng(s)
            for name, s in zip(("geometry", "transitions", "noise", "plots"), children)}


# ----------------------------------------------------------------------------- geometry

def random_orthonormal(rng: np.random.Generator, dim: int, k: int) -> np.ndarray:
    """A (dim, k) matrix with orthonormal columns, uniformly distributed (Haar)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, k)))
    return q * np.sign(np.diag(r))  # fix the sign ambiguity of QR -> Haar measure


def circle_planes(rng: np.random.Generator, cfg: CirclesConfig) -> np.ndarray:
    """Orthonormal bases of the circle planes, shape (n_circles, 2, ambient_dim)."""
    k = cfg.subspace_dim or cfg.ambient_dim
    shared = random_orthonormal(rng, cfg.ambient_dim, k)  # (D, k)
    planes = np.empty((cfg.n_circles, 2, cfg.ambient_dim))
    for c in range(cfg.n_circles):
        planes[c] = (shared @ random_orthonormal(rng, k, 2)).T
    return planes


def circle_periods(cfg: CirclesConfig) -> np.ndarray:
    """Whole-step periods evenly spaced from period_min to period_max."""
    return np.rint(np.linspace(cfg.period_min, cfg.period_max, cfg.n_circles)).astype(np.int64)


def transition_matrix(rng: np.random.Generator, cfg: CirclesConfig) -> np.ndarray:
    """Sparse row-stochastic matrix: ring neighbours plus long-range shortcuts, zero diagonal.

    Ring edges get weights U(0.5, 1.5); each circle adds ``n_shortcuts`` edges to circles
    that are neither itself nor a ring neighbour, with weights U(0.2, 0.6).
    """
    n = cfg.n_circles
    W = np.zeros((n, n))
    for i in range(n):
        for j in ((i - 1) % n, (i + 1) % n):
            if j != i:
                W[i, j] = rng.uniform(0.5, 1.5)
        far = [j for j in range(n) if j != i and W[i, j] == 0 and j not in ((i - 1) % n, (i + 1) % n)]
        for j in rng.permutation(far)[: cfg.n_shortcuts] if far else []:
            W[i, j] = rng.uniform(0.2, 0.6)
    np.fill_diagonal(W, 0.0)
    return W / W.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- sequence

def geometry(cfg: CirclesConfig, rng: np.random.Generator) -> Process:
    """The process of a configuration, drawn from the geometry stream."""
    planes = circle_planes(rng, cfg)
    radii_raw = rng.normal(cfg.radius_mean, cfg.radius_std, cfg.n_circles)
    radii = np.clip(radii_raw, 0.5 * cfg.radius_mean, 1.5 * cfg.radius_mean)
    entry_angles = rng.uniform(0.0, 2 * np.pi, cfg.n_circles)
    P = transition_matrix(rng, cfg)
    return Process(planes=planes, radii=radii, entry_angles=entry_angles, periods=circle_periods(cfg),
                   transition_matrix=P, dwell_mean=cfg.dwell_mean, dwell_std=cfg.dwell_std, noise_std=cfg.noise_std)


def generate(cfg: CirclesConfig) -> dict[str, np.ndarray]:
    """Generate the series. Returns arrays; nothing is written."""
    cfg.validate()
    rngs = rng_streams(cfg.seed)
    proc = geometry(cfg, rngs["geometry"])
    data = sample(proc, cfg.n_steps, rngs["transitions"], rngs["noise"])
    if not np.all(np.abs(data["X"]) < np.finfo(np.float32).max):
        raise ValueError("the radii and noise give values beyond float32's range; use a smaller --radius-mean "
                         "or --noise-std")
    return {**data, "transition_matrix": proc.transition_matrix, "radii": proc.radii,
            "entry_angles": proc.entry_angles, "periods": proc.periods, "planes": proc.planes}


def summary(data: dict[str, np.ndarray], cfg: CirclesConfig) -> dict:
    """Realised statistics: SNR, and per circle radius, period, share, visits, dwell."""
    signal_power = float(np.mean(data["signal"].astype(np.float64) ** 2))
    noise_var = cfg.noise_std ** 2
    rows = []
    n = len(data["states"])
    for c in range(cfg.n_circles):
        d = data["visit_dwells"][data["visit_states"] == c]
        rows.append({
            "circle": c,
            "radius": float(data["radii"][c]),
            "period": int(data["periods"][c]),
            "share": float(np.mean(data["states"] == c)),
            "visits": int(len(d)),
            "dwell_mean": float(d.mean()) if len(d) else float("nan"),
            "dwell_std": float(d.std()) if len(d) else float("nan"),
        })
    return {
        "n_steps": n,
        "n_visits": int(len(data["visit_states"])),
        "signal_power_per_dim": signal_power,
        "noise_var": noise_var,
        "snr": signal_power / noise_var if noise_var > 0 else float("inf"),
        "circles": rows,
    }


def format_table(stats: dict) -> str:
    lines = ["circle  radius  period   share  visits  dwell mean  dwell std"]
    for r in stats["circles"]:
        lines.append(f"{r['circle']:6d}  {r['radius']:6.2f}  {r['period']:6d}  {r['share']:6.3f}  "
                     f"{r['visits']:6d}  {r['dwell_mean']:10.1f}  {r['dwell_std']:9.1f}")
    lines.append(f"{stats['n_steps']} steps, {stats['n_visits']} visits, "
                 f"SNR {stats['snr']:.2f} (signal power/dim {stats['signal_power_per_dim']:.2f}, "
                 f"noise var {stats['noise_var']:.2f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- I/O

def folder_config(cfg: CirclesConfig, stats: dict) -> dict:
    """What config.json holds: the generator's parameters and the realised noise level and SNR."""
    config = asdict(cfg)
    config.update(noise_var=cfg.noise_std ** 2, snr=stats["snr"],
                  subspace_dim_effective=cfg.subspace_dim or cfg.ambient_dim,
                  generator="markov_circles_timeseries.py")
    return config


def save(out_dir: str, data: dict[str, np.ndarray], cfg: CirclesConfig, stats: dict, out=None) -> None:
    """Write data.npz and config.json (atomically, marked as one write: dataset.save_data_folder)."""
    out = out or data_outputs(out_dir, True)
    save_data_folder(out_dir, data, folder_config(cfg, stats), out)


def memory_needed(cfg: CirclesConfig) -> int:
    """Bytes `generate` holds at its peak (observations, signal, angles, noise; transition matrix)."""
    return cfg.n_steps * (cfg.ambient_dim * 40 + 48) + cfg.n_circles ** 2 * 16 + cfg.n_circles * cfg.ambient_dim * 32


# ----------------------------------------------------------------------------- figures

def plot_sample_windows(data, cfg, plots_dir, rng, n_windows=3, length=1000, out=None) -> list[str]:
    import matplotlib.pyplot as plt
    X, states = data["X"], data["states"]
    length = min(length, len(X))
    paths = []
    for w in range(n_windows):
        start = int(rng.integers(0, len(X) - length + 1))
        fig, (a0, a1) = plt.subplots(2, 1, figsize=(12, 5), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 8], "hspace": 0.05})
        draw_state_strip(a0, states[start:start + length], cfg.n_circles, extent_x=(start, start + length))
        a0.set_title(f"Sample window {w}: steps {start}-{start + length} (strip: active circle)")
        lim = np.percentile(np.abs(X), 99)
        im = a1.imshow(X[start:start + length].T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest", extent=(start, start + length, cfg.ambient_dim - 0.5, -0.5))
        a1.set_ylabel("ambient dimension")
        a1.set_xlabel("time step")
        fig.colorbar(im, ax=[a0, a1], fraction=0.02, pad=0.01)
        p = os.path.join(plots_dir, f"sample_window_{w}.png")
        paths.append(save_figure(fig, out.target(p) if out else p, dpi=110, tight=False, bbox_inches="tight"))
    return paths


def plot_overview(data, cfg, stats, plots_dir, emb=None, emb_idx=None, out=None) -> str:
    import matplotlib.pyplot as plt
    n_rows = 3 if emb is not None else 2
    fig = plt.figure(figsize=(14, 4.2 * n_rows))
    gs = fig.add_gridspec(n_rows, 2)
    ax = fig.add_subplot(gs[0, :])
    m = min(len(data["states"]), 10_000)
    ax.plot(np.arange(m), data["states"][:m], lw=0.8, drawstyle="steps-post")
    ax.set_xlabel("time step")
    ax.set_ylabel("circle")
    ax.set_title(f"State sequence (first {m} of {len(data['states'])} steps)")
    ax = fig.add_subplot(gs[1, 0])
    im = ax.imshow(data["transition_matrix"], cmap="viridis")
    ax.set_title("Transition matrix P[i -> j]")
    ax.set_xlabel("to circle")
    ax.set_ylabel("from circle")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(gs[1, 1])
    circles = np.arange(cfg.n_circles)
    ax.bar(circles, data["periods"], color=state_colors(cfg.n_circles))
    ax2 = ax.twinx()
    ax2.plot(circles, [r["share"] for r in stats["circles"]], "ko-", ms=4)
    ax.set_xlabel("circle")
    ax.set_ylabel("period (steps)")
    ax2.set_ylabel("share of steps (black)")
    ax.set_title("Periods and occupancy")
    if emb is not None:
        st = data["states"][emb_idx]
        ax = fig.add_subplot(gs[2, 0])
        ax.scatter(emb[:, 0], emb[:, 1], c=[state_colors(cfg.n_circles)[s] for s in st], s=2)
        ax.set_title("UMAP of raw data, coloured by circle")
        ax = fig.add_subplot(gs[2, 1])
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=emb_idx, s=2, cmap="viridis")
        fig.colorbar(sc, ax=ax, fraction=0.046, label="time step")
        ax.set_title("UMAP of raw data, coloured by time")
    p = os.path.join(plots_dir, "overview.png")
    return save_figure(fig, out.target(p) if out else p, dpi=100)


def umap_raw(data, cfg, plots_dir, rng, n_points, n_neighbors, out=None) -> tuple[dict, np.ndarray, np.ndarray, str]:
    """UMAP of a random subsample of the raw series and Levina-Bickel of the 2-D embedding."""
    import matplotlib.pyplot as plt
    import umap

    X = data["X"]
    idx = np.sort(rng.choice(len(X), size=min(n_points, len(X)), replace=False))
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, n_jobs=1, random_state=int(rng.integers(2**31 - 1)))
    emb = reducer.fit_transform(X[idx])
    ks = [k for k in (10, 30, 100) if k < len(idx)]
    lb = levina_bickel(emb, ks, n_boot=200, seed=int(rng.integers(2**31 - 1)))
    result = {"n_points": int(len(idx)), "subspace_dim": cfg.subspace_dim or cfg.ambient_dim,
              "lb_umap_2d": {str(k): lb.as_dict(k) for k in ks}}
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.scatter(emb[:, 0], emb[:, 1], c=[state_colors(cfg.n_circles)[s] for s in data["states"][idx]], s=2)
    title = ", ".join(f"k={k}: {lb.mle[k]:.2f}" for k in ks)
    ax.set_title(f"UMAP of raw data (subspace_dim={cfg.subspace_dim or cfg.ambient_dim})\n"
                 f"Levina-Bickel of 2-D embedding: {title}")
    ax.set_xticks([])
    ax.set_yticks([])
    p = os.path.join(plots_dir, f"umap_subspace_{cfg.subspace_dim or cfg.ambient_dim}.png")
    return result, emb, idx, save_figure(fig, out.target(p) if out else p, dpi=110, tight=False, bbox_inches="tight")


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Generate the Markov-switching circles time series (data.npz + config.json) "
                    "and its figures.")
    p.add_argument("--n-steps", type=at_least(1), default=100_000, help="length of the series")
    p.add_argument("--n-circles", type=int_between(2, 1000), default=10, help="number of circles (Markov states)")
    p.add_argument("--ambient-dim", type=at_least(2), default=20, help="dimension of the observations")
    p.add_argument("--subspace-dim", type=at_least(2), default=None,
                   help="put all circle planes in one shared random subspace of this dimension "
                        "(2 = coplanar, ambient-dim = no shared subspace; default: ambient-dim)")
    p.add_argument("--noise-std", type=between(0, 1e6), default=2.83, help="std of the isotropic Gaussian noise")
    p.add_argument("--radius-mean", type=between(0, 1e6, open_lo=True), default=20.0,
                   help="mean circle radius (radii are clipped to [0.5, 1.5] x this)")
    p.add_argument("--radius-std", type=between(0, 1e6), default=2.0, help="std of the circle radii")
    p.add_argument("--period-min", type=int_between(1, MAX_PERIOD), default=40, help="shortest period (steps per lap)")
    p.add_argument("--period-max", type=int_between(1, MAX_PERIOD), default=400, help="longest period (steps per lap)")
    p.add_argument("--dwell-mean", type=between(0, 1e9, open_lo=True), default=400.0,
                   help="mean time on a circle before rounding to whole laps (steps)")
    p.add_argument("--dwell-std", type=between(0, 1e9), default=100.0, help="std of the time on a circle")
    p.add_argument("--n-shortcuts", type=at_least(0), default=1, help="long-range transitions per circle")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the geometry, transitions and noise")
    add_output_flags(p, "data", "the data folder: data.npz, config.json and the figures' numbers (JSON)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP of the raw data (faster)")
    p.add_argument("--umap-points", type=at_least(10), default=5000, help="points in the raw-data UMAP")
    p.add_argument("--umap-neighbors", type=at_least(2), default=30, help="UMAP's n_neighbors")
    p.add_argument("--force", action="store_true",
                   help="replace an existing data folder of another configuration (data.npz, config.json, the "
                        "summary and figure numbers, the figures this command drew before; nothing else)")
    return p


def config_from_args(args) -> CirclesConfig:
    return CirclesConfig(
        n_steps=args.n_steps, n_circles=args.n_circles, ambient_dim=args.ambient_dim,
        subspace_dim=args.subspace_dim, radius_mean=args.radius_mean, radius_std=args.radius_std,
        period_min=args.period_min, period_max=args.period_max, dwell_mean=args.dwell_mean,
        dwell_std=args.dwell_std, n_shortcuts=args.n_shortcuts, noise_std=args.noise_std, seed=args.seed)


def same_configuration(out_dir: str, cfg: CirclesConfig) -> bool:
    """Whether out_dir's config.json was written for exactly this configuration (its data.npz is
    then regenerated identically, so no --force is needed)."""
    try:
        prev = read_json(os.path.join(out_dir, "config.json"), "data config", kind=dict)
    except InputError:
        return False
    return all(prev.get(k) == v for k, v in asdict(cfg).items())


def figure_names(cfg: CirclesConfig, umap: bool) -> list[str]:
    return ([f"sample_window_{w}.png" for w in range(3)] + ["overview.png"]
            + ([f"umap_subspace_{cfg.subspace_dim or cfg.ambient_dim}.png"] if umap else []))


@one_line_errors()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    cfg.validate()
    check_fits(memory_needed(cfg), f"a series of {cfg.n_steps:,} steps x {cfg.ambient_dim} dimensions",
               "use a smaller --n-steps or --ambient-dim")
    figures = plots_dir(args)
    output_dir(args.out_dir, create=False)
    if not args.no_plot:
        output_dir(figures, "--plots-dir", create=False)
    summary_path = os.path.join(args.out_dir, "circles_summary.json")
    umap_json = os.path.join(args.out_dir, f"umap_subspace_{cfg.subspace_dim or cfg.ambient_dim}.json")
    target = os.path.join(args.out_dir, "data.npz")
    same = os.path.exists(target) and same_configuration(args.out_dir, cfg)
    if not same and not args.force and incomplete_write(args.out_dir):
        print(f"note: {args.out_dir} was left unfinished by a killed write; writing it again")
        same = True
    try:  # the figures are claimed even with --no-plot: --force then removes the old ones
        out = data_outputs(args.out_dir, args.force or same,
                           also=[summary_path, umap_json] + [os.path.join(figures, f) for f in figure_names(cfg, True)])
    except OutputsExist as e:
        raise OutputsExist(f"{target if os.path.exists(target) else e.args[0].split(' exists')[0]} exists and was "
                           f"written for a different configuration (or by another command); pass --force to replace "
                           f"the data folder or choose another --out-dir") from None
    t0 = time.perf_counter()
    data = generate(cfg)
    t_gen = time.perf_counter() - t0
    stats = summary(data, cfg)
    output_dir(args.out_dir)
    save(args.out_dir, data, cfg, stats, out)
    print(format_table(stats))
    out.write_json(summary_path, stats)
    print(f"generated {cfg.n_steps} steps in {t_gen:.2f} s; wrote {target}, "
          f"{os.path.join(args.out_dir, 'config.json')} and {summary_path}")
    if args.no_plot:
        return 0

    import matplotlib
    matplotlib.use("Agg")
    output_dir(figures, "--plots-dir")
    rng = rng_streams(cfg.seed)["plots"]
    written = plot_sample_windows(data, cfg, figures, rng, out=out)
    emb = idx = None
    if not args.no_umap:
        result, emb, idx, p = umap_raw(data, cfg, figures, rng, args.umap_points, args.umap_neighbors, out=out)
        written.append(p)
        for k, v in result["lb_umap_2d"].items():
            print(f"Levina-Bickel of the 2-D UMAP, k={k}: {v['mle']:.2f} "
                  f"[{v['mle_ci'][0]:.2f}, {v['mle_ci'][1]:.2f}]")
        written.append(out.write_json(umap_json, result))
    written.append(plot_overview(data, cfg, stats, figures, emb, idx, out=out))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
