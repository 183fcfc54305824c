"""Levina-Bickel maximum-likelihood intrinsic dimension, for many k from one neighbour query.

For a point x with neighbour distances T_1(x) <= ... <= T_k(x), the Levina-Bickel (2005)
estimate is

    m_k(x) = [ 1/(k-1) * sum_{j<k} log(T_k(x) / T_j(x)) ]^-1        (unbiased: k-2 instead of k-1)

The global estimate is either the mean of the per-point estimates (Levina & Bickel) or
the inverse of the mean of the per-point inverses (MacKay & Ghahramani 2005). For a
locally uniform sample the sum of log ratios is Gamma(k-1, 1/m), so the inverse-mean with
the k-1 normaliser and the mean of the k-2 ("unbiased") per-point estimates are the two
consistent choices; the default mean of k-1 estimates (the original estimator) is biased
upwards by (k-1)/(k-2). Both are returned, with bootstrap confidence intervals over
points. Note that per-point estimates share neighbours, so these intervals describe the
spread of the estimator over the sample, not independent replications.

The neighbours are found once, at the largest k, with scikit-learn (CPU) or a chunked
torch search (CPU or CUDA); exact duplicate points, whose zero distances would make the
logarithms infinite, are removed first and counted.

Usage:
    python estimate_dimension.py --data-dir data                   # dimension vs k, all points + per circle
    python estimate_dimension.py --data-dir data --k 10 30 100 --points 20000
    python estimate_dimension.py --demo                            # noisy circle demo
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import numpy as np

import safeio
import statsutil
from cliargs import SEED, Parser, add_output_flags, at_least, plots_dir, resolve_device
from plotting import save_figure
from dataset import load_series

DEFAULT_KS = (10, 30, 100)


# ----------------------------------------------------------------------------- neighbours

def _knn_sklearn(X: np.ndarray, k: int, n_jobs: int | None) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors
    nn = NearestNeighbors(n_neighbors=k, n_jobs=n_jobs).fit(X)
    dist, _ = nn.kneighbors()  # without a query: the point itself is excluded
    return dist


def _knn_torch(X: np.ndarray, k: int, device: str, chunk: int) -> np.ndarray:
    """Chunked exact kNN: candidates by the |x|^2 + |y|^2 - 2xy expansion, then the k
    distances recomputed directly in float64 so close pairs keep their precision."""
    import torch
    dev = torch.device(device)
    Y = torch.as_tensor(X, dtype=torch.float32, device=dev)
    sq = (Y * Y).sum(1)
    n = Y.shape[0]
    out = np.empty((n, k), dtype=np.float64)
    X64 = torch.as_tensor(X, dtype=torch.float64, device=dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d2 = sq[s:e, None] + sq[None, :] - 2.0 * (Y[s:e] @ Y.T)
        d2[torch.arange(e - s, device=dev), torch.arange(s, e, device=dev)] = float("inf")
        # a small margin of extra candidates protects against rounding at the k-th place
        m = min(n - 1, k + 8)
        idx = torch.topk(d2, m, dim=1, largest=False).indices
        exact = torch.linalg.vector_norm(X64[idx] - X64[s:e, None, :], dim=2)
        out[s:e] = torch.sort(exact, dim=1).values[:, :k].cpu().numpy()
    return out


def knn_distances(X: np.ndarray, k: int, backend: str = "auto", device: str = "cpu",
                  n_jobs: int | None = -1, chunk: int = 2048) -> np.ndarray:
    """Sorted distances from each point to its k nearest other points, shape (n, k)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array of points, got shape {X.shape}")
    if k >= len(X):
        raise ValueError(f"k={k} needs more than {k} points, got {len(X)}")
    if backend == "auto":
        backend = "torch" if device.startswith("cuda") else "sklearn"
    if backend == "sklearn":
        return _knn_sklearn(X, k, n_jobs)
    if backend == "torch":
        return _knn_torch(X, k, device, chunk)
    raise ValueError(f"unknown backend {backend!r} (auto, sklearn, torch)")


# ----------------------------------------------------------------------------- estimator

@dataclass
class LBResult:
    ks: list[int]
    inv_estimates: np.ndarray          # (n, len(ks)) per-point mean log ratio, S_k(x) / (k-1)
    mle: dict[int, float]              # mean of per-point estimates (Levina-Bickel)
    mg: dict[int, float]               # inverse of mean inverse (MacKay-Ghahramani)
    mle_ci: dict[int, tuple[float, float]]
    mg_ci: dict[int, tuple[float, float]]
    n_points: int
    n_duplicates: int = 0
    ci_level: float = 0.95
    unbiased: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def estimates(self) -> np.ndarray:
        """Per-point estimates m_k(x), shape (n, len(ks)); inf where all k distances tie."""
        with np.errstate(divide="ignore"):
            return _correction(self.ks, self.unbiased) / self.inv_estimates

    def as_dict(self, k: int) -> dict:
        return {"k": k, "mle": self.mle[k], "mle_ci": list(self.mle_ci[k]), "mg": self.mg[k],
                "mg_ci": list(self.mg_ci[k]), "n_points": self.n_points,
                "n_duplicates": self.n_duplicates}

    def to_json(self) -> dict:
        return {"ks": self.ks, "unbiased": self.unbiased, "ci_level": self.ci_level,
                "n_points": self.n_points, "n_duplicates": self.n_duplicates,
                "by_k": [self.as_dict(k) for k in self.ks]}


def _correction(ks, unbiased: bool) -> np.ndarray:
    """Factor turning 1 / (S_k / (k-1)) into the per-point estimate: (k-2)/(k-1) if unbiased."""
    ks = np.asarray(ks, dtype=float)
    return (ks - 2) / (ks - 1) if unbiased else np.ones_like(ks)


def lb_from_distances(dist: np.ndarray, ks) -> np.ndarray:
    """Per-point mean log ratios S_k(x)/(k-1) = 1/m_k(x) for every k in ks, from sorted
    neighbour distances (n, >= max k). One pass of cumulative sums serves all k."""
    ks = [int(k) for k in ks]
    if min(ks) < 3:
        raise ValueError("k must be at least 3")
    if max(ks) > dist.shape[1]:
        raise ValueError(f"k={max(ks)} exceeds the {dist.shape[1]} neighbour distances given")
    if np.any(dist[:, 0] <= 0):
        raise ValueError("zero neighbour distance: remove duplicate points first")
    logd = np.log(dist)
    csum = np.cumsum(logd, axis=1)
    inv = np.empty((dist.shape[0], len(ks)))
    for i, k in enumerate(ks):
        # sum_{j<k} log(T_k / T_j) = (k-1) log T_k - sum_{j<k} log T_j
        s = (k - 1) * logd[:, k - 1] - csum[:, k - 2]
        inv[:, i] = s / (k - 1)
    return inv


def _aggregate(inv: np.ndarray, corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-point estimates and MacKay-Ghahramani inverse-mean, per column."""
    with np.errstate(divide="ignore"):
        est = corr / inv
    finite = np.isfinite(est)
    mle = np.where(finite, est, 0.0).sum(0) / np.maximum(finite.sum(0), 1)
    mg = 1.0 / inv.mean(0)
    return mle, mg


def levina_bickel(X: np.ndarray, ks=DEFAULT_KS, *, n_boot: int = 200, ci: float = 0.95,
                  unbiased: bool = False, seed: int = 0, backend: str = "auto",
                  device: str = "cpu", dedupe: bool = True) -> LBResult:
    """Levina-Bickel dimension of the point cloud X (n, D) at every k in ks."""
    X = np.asarray(X)
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    ks = sorted({int(k) for k in ks})
    n_dup = 0
    dist = knn_distances(X, max(ks), backend=backend, device=device)
    if np.any(dist[:, 0] == 0):
        if not dedupe:
            raise ValueError("the data contain duplicate points (zero distances); pass dedupe=True")
        uniq = np.unique(X, axis=0)
        n_dup = len(X) - len(uniq)
        if len(uniq) <= max(ks):
            raise ValueError(f"only {len(uniq)} distinct point(s) among {len(X)}" +
                             (" (all identical: a constant series has no dimension to estimate)"
                              if len(uniq) == 1 else f"; k={max(ks)} needs more"))
        dist = knn_distances(uniq, max(ks), backend=backend, device=device)
    return lb_summary(dist, ks, n_boot=n_boot, ci=ci, unbiased=unbiased, seed=seed, n_duplicates=n_dup)


def lb_summary(dist: np.ndarray, ks, *, n_boot: int = 200, ci: float = 0.95, unbiased: bool = False,
               seed: int = 0, n_duplicates: int = 0) -> LBResult:
    """Global estimates and bootstrap CIs from sorted neighbour distances (n, >= max k),
    e.g. from knn_distances or from any other metric (periodic boxes, geodesics)."""
    ks = sorted({int(k) for k in ks})
    inv = lb_from_distances(dist, ks)
    corr = _correction(ks, unbiased)
    mle, mg = _aggregate(inv, corr)
    n = len(inv)
    boot = statsutil.bootstrap(inv, lambda s: np.concatenate(_aggregate(s, corr)), n_boot,
                               np.random.default_rng(seed))
    bands = statsutil.percentile_interval(boot, ci) if n_boot else None
    boot_mle, boot_mg = range(len(ks)), range(len(ks), 2 * len(ks))

    def band(cols, i):
        if bands is None:
            return (float("nan"), float("nan"))
        return (float(bands[0][cols[i]]), float(bands[1][cols[i]]))

    return LBResult(
        ks=ks, inv_estimates=inv,
        mle={k: float(mle[i]) for i, k in enumerate(ks)},
        mg={k: float(mg[i]) for i, k in enumerate(ks)},
        mle_ci={k: band(boot_mle, i) for i, k in enumerate(ks)},
        mg_ci={k: band(boot_mg, i) for i, k in enumerate(ks)},
        n_points=n, n_duplicates=n_duplicates, ci_level=ci, unbiased=unbiased)


# ----------------------------------------------------------------------------- CLI helpers

def format_markdown(rows: list[tuple[str, LBResult]], ks) -> str:
    """Markdown table: one row per named result, 'mean [lo, hi]' per k."""
    head = "| set | n | " + " | ".join(f"k={k}" for k in ks) + " |"
    sep = "|---|---|" + "---|" * len(ks)
    lines = [head, sep]
    for name, r in rows:
        cells = " | ".join(f"{r.mle[k]:.2f} [{r.mle_ci[k][0]:.2f}, {r.mle_ci[k][1]:.2f}]" for k in ks)
        lines.append(f"| {name} | {r.n_points} | {cells} |")
    return "\n".join(lines)


def write_rows(path_base: str, rows: list[tuple[str, LBResult]], out=None) -> list[str]:
    """Write results as JSON and CSV (one line per set and k), each atomically."""
    js, cs = (out.target(path_base + e) if out else path_base + e for e in (".json", ".csv"))
    safeio.write_json(js, {name: r.to_json() for name, r in rows})
    safeio.write_csv(cs, ["set", "k", "n_points", "mle", "mle_lo", "mle_hi", "mg", "mg_lo", "mg_hi"],
                     [[name, k, r.n_points, r.mle[k], *r.mle_ci[k], r.mg[k], *r.mg_ci[k]]
                      for name, r in rows for k in r.ks])
    return [js, cs]


def plot_dimension_vs_k(rows: list[tuple[str, LBResult]], path: str, title: str,
                        true_dim: float | None = None) -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows:
        ks = np.array(r.ks)
        m = np.array([r.mle[k] for k in ks])
        lo = np.array([r.mle_ci[k][0] for k in ks])
        hi = np.array([r.mle_ci[k][1] for k in ks])
        lw = 2.5 if name == "all" else 1.0
        line, = ax.plot(ks, m, marker="o", ms=3, lw=lw, label=name)
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2)
    if true_dim is not None:
        ax.axhline(true_dim, color="k", ls="--", lw=1, label=f"true dimension {true_dim:g}")
    ax.set_xscale("log")
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("Levina-Bickel dimension")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=110)


def claim(args, name: str) -> tuple[str, str, safeio.Outputs]:
    """Check the output folders, then claim <out-dir>/<name>.{json,csv} and <plots-dir>/<name>.png:
    an earlier run's stop this one unless --force, which removes them first. Returns (numbers
    base, figure path, the claim)."""
    base, figure = os.path.join(args.out_dir, name), os.path.join(plots_dir(args), name + ".png")
    safeio.output_dir(args.out_dir, create=False)
    if not args.no_plot:
        safeio.output_dir(os.path.dirname(figure), "--plots-dir", create=False)
    out = safeio.Outputs(f"estimate_dimension {name}", args.force)
    out.claim([base + ".json", base + ".csv", figure])  # an OutputsExist is a ValueError
    return base, figure, out


def run_data(args) -> int:
    base, figure, out = claim(args, "dimension_vs_k")
    series = load_series(args.data_dir)
    X = series.signal if args.signal else series.X
    if X is None:
        raise safeio.InputError(f"{args.data_dir} holds no noise-free signal (a recorded series?); drop --signal")
    rng = np.random.default_rng(args.seed)
    if args.points and args.points < len(X):
        idx = np.sort(rng.choice(len(X), args.points, replace=False))
    else:
        idx = np.arange(len(X))
    ks = sorted(set(args.k))
    if max(ks) >= len(idx):
        raise safeio.InputError(f"--k {max(ks)} needs more than {max(ks)} points; the sample has {len(idx)}")
    curve_ks = sorted(set(ks) | {k for k in (5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200) if k <= max(ks)})
    safeio.check_fits(len(idx) * (max(curve_ks) * 40 + X.shape[1] * 16), f"the {max(curve_ks)} nearest neighbours "
                      f"of {len(idx):,} points", "use a smaller --k or --points")
    rows = [("all", levina_bickel(X[idx], curve_ks, n_boot=args.n_boot, unbiased=args.unbiased,
                                  seed=args.seed, device=args.device))]
    if not args.no_per_circle and not series.has_labels:
        print("note: the series has no labels, so there are no per-circle estimates")
    if not args.no_per_circle and series.has_labels:
        st = series.states[idx]
        for c in np.unique(st):
            pts = X[idx][st == c]
            if len(pts) > max(curve_ks) + 1:
                rows.append((f"circle {c}", levina_bickel(pts, curve_ks, n_boot=args.n_boot,
                                                         unbiased=args.unbiased, seed=args.seed,
                                                         device=args.device)))
    what = "noise-free signal" if args.signal else "observations"
    print(f"Levina-Bickel dimension of the {what} in {args.data_dir} (mean of per-point estimates, "
          f"{int(100 * rows[0][1].ci_level)}% bootstrap CI):")
    print(format_markdown(rows, ks))
    print("MacKay-Ghahramani (inverse-mean) estimate, all points: "
          + ", ".join(f"k={k}: {rows[0][1].mg[k]:.2f}" for k in ks))
    safeio.output_dir(args.out_dir)
    written = write_rows(base, rows, out)
    if not args.no_plot:
        safeio.output_dir(os.path.dirname(figure), "--plots-dir")
        written.append(plot_dimension_vs_k(rows, out.target(figure), f"Levina-Bickel dimension of the {what}"))
    print("wrote " + ", ".join(written))
    return 0


def demo_circle(n: int, noise: float, rng: np.random.Generator, ambient: int = 2) -> np.ndarray:
    """n points on the unit circle, with isotropic Gaussian noise in `ambient` dimensions."""
    t = rng.uniform(0, 2 * np.pi, n)
    X = np.zeros((n, ambient))
    X[:, 0], X[:, 1] = np.cos(t), np.sin(t)
    return X + noise * rng.standard_normal((n, ambient))


def run_demo(args) -> int:
    """A noisy circle: near 2 at small k (the noise is 2-D), 1 at larger k (the curve)."""
    import matplotlib.pyplot as plt
    base, figure, out = claim(args, "levina_bickel_demo")
    rng = np.random.default_rng(args.seed)
    ks = [5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200]
    noises = [0.0, 0.01, 0.05, 0.1]
    rows = []
    clouds = []
    for s in noises:
        X = demo_circle(args.demo_points, s, rng)
        clouds.append(X)
        rows.append((f"noise {s:g}", levina_bickel(X, ks, n_boot=args.n_boot, seed=args.seed)))
    print(f"Noisy unit circle, {args.demo_points} points: Levina-Bickel dimension vs k")
    print(format_markdown(rows, [10, 30, 100]))
    safeio.output_dir(args.out_dir)
    written = write_rows(base, rows, out)
    if args.no_plot:
        print("wrote " + ", ".join(written))
        return 0
    fig, axes = plt.subplots(1, len(noises) + 1, figsize=(4 * (len(noises) + 1), 4))
    for ax, X, (name, _) in zip(axes, clouds, rows):
        ax.scatter(X[:, 0], X[:, 1], s=1)
        ax.set_aspect("equal")
        ax.set_title(name)
    ax = axes[-1]
    for name, r in rows:
        ax.plot(r.ks, [r.mle[k] for k in r.ks], marker="o", ms=3, label=name)
    ax.axhline(1, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("LB dimension")
    ax.legend(fontsize=7)
    safeio.output_dir(os.path.dirname(figure), "--plots-dir")
    written.append(save_figure(fig, out.target(figure), dpi=100))
    print("wrote " + ", ".join(written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Levina-Bickel intrinsic dimension of a circles dataset (all points and per "
                    "circle) or of a noisy-circle demo.")
    p.add_argument("--data-dir", default="data", help="folder with data.npz and config.json")
    p.add_argument("--k", type=at_least(2), nargs="+", default=list(DEFAULT_KS),
                   help="neighbourhood sizes to tabulate")
    p.add_argument("--points", type=at_least(0), default=20000, help="random subsample size (0 = all points)")
    p.add_argument("--signal", action="store_true", help="use the noise-free signal instead of the observations")
    p.add_argument("--no-per-circle", action="store_true", help="skip the per-circle estimates")
    p.add_argument("--unbiased", action="store_true", help="per-point estimates with k-2 instead of k-1 (unbiased for a uniform sample)")
    p.add_argument("--n-boot", type=at_least(0), default=200, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda (torch kNN on GPU)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the subsample and the bootstrap")
    add_output_flags(p, "runs/dimension", "where the table's numbers (JSON/CSV) go")
    p.add_argument("--force", action="store_true", help="replace the table, JSON/CSV and figure of an earlier run")
    p.add_argument("--demo", action="store_true", help="run the noisy-circle demo instead")
    p.add_argument("--demo-points", type=at_least(3), default=2000, help="points on the demo's noisy circle")
    return p


@safeio.one_line_errors()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    args.device = resolve_device(args.device)
    return run_demo(args) if args.demo else run_data(args)


if __name__ == "__main__":
    sys.exit(main())
