"""Subspace alignment of training trajectories: do the top-k directions in which the
attention matrices move stay the same across time windows, layers and seeds?

    python -m modadd.alignment runs/modadd_code_s0 [runs/modadd_code_s1 ...] [--k 3 --windows 3]

The top-k principal directions of a trajectory (snapshots centred) span a k-dimensional
subspace. Two subspaces are compared by their principal angles; the overlap is the mean
squared cosine, ||U1^T U2||_F^2 / k: 1 for the same subspace, about k / P for random ones of
P dimensions. Every overlap stands beside the same number for random walks with the run's
step sizes (per block, in random directions), so that a high overlap means shared
directions and not the shape every random walk has.

  windows  each block's subspace in consecutive time windows, against the whole-run one
           (and between adjacent windows); also the share of each window's movement that
           lies in the whole-run execution subspace
  layers   the same matrix (W_Q, ...) in two layers (the residual basis is shared, so
           their coordinates are comparable)
  seeds    the same block in two runs (needs several runs; with different initialisations
           a weight-space overlap near the null is expected even when the dimension agrees)

Writes alignment.json in the first run's folder (or --out-dir) and alignment.png in --plots-dir
(default plots/<that folder's name>); earlier ones stop it unless --force (which replaces them).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

import safeio
from cliargs import SEED, Parser, add_output_flags, at_least
from modadd.figures import claim, emit, save, stage_files, stage_key, subplots
from modadd.geometry import execution_basis, random_walk_like
from modadd.runs import MATS, load_snapshots
from modadd.stats import mean_std
from training import TrainingError

NAME = "alignment"
KEY = stage_key(NAME)


def outputs(out_dir: str, plots: bool = True, plots_dir: str | None = None) -> list[str]:
    """Every file this stage writes for out_dir (plots False: those of a --no-plot run)."""
    return stage_files(out_dir, NAME, plots, plots_dir)


def overlap(U1: np.ndarray, U2: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between two orthonormal bases."""
    return float(np.linalg.norm(U1.T @ U2) ** 2 / min(U1.shape[1], U2.shape[1]))


def principal_cosines(U1: np.ndarray, U2: np.ndarray) -> np.ndarray:
    return np.clip(np.linalg.svd(U1.T @ U2, compute_uv=False), 0, 1)


def window_slices(n: int, w: int) -> list[slice]:
    edges = np.linspace(0, n, w + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def captured(traj: np.ndarray, U: np.ndarray) -> float:
    """Share of a trajectory's (centred) variance inside span(U)."""
    X = traj - traj.mean(0)
    tot = (X ** 2).sum()
    return float(((X @ U) ** 2).sum() / tot) if tot > 0 else float("nan")


def window_stats(traj: np.ndarray, k: int, w: int) -> dict:
    U = execution_basis(traj, k)
    ws = [s for s in window_slices(len(traj), w) if s.stop - s.start > k]
    Us = [execution_basis(traj[s], k) for s in ws]
    return {"to_whole": [overlap(u, U) for u in Us],
            "adjacent": [overlap(a, b) for a, b in zip(Us[:-1], Us[1:])],
            "captured": [captured(traj[s], U) for s in ws]}


def analyse(run_dirs: list[str], k: int = 3, windows: int = 3, n_null: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    runs = [load_snapshots(d) for d in run_dirs]
    keys = sorted(runs[0])
    for d, r in zip(run_dirs[1:], runs[1:]):
        if sorted(r) != keys or any(r[key].shape[1] != runs[0][key].shape[1] for key in keys):
            raise ValueError(f"{d}: its attention blocks differ from {run_dirs[0]}'s")
    biggest = max(8 * a.size for a in runs[0].values())          # float64 random walks kept per block
    safeio.check_fits(biggest * (n_null + 3), f"--n-null {n_null} random walks per block",
                      "use a smaller --n-null")
    per_run, bases, null_bases = [], [], []
    for snaps in runs:
        row, B, NB = {}, {}, {}
        for key in keys:
            t = snaps[key]
            walks = [random_walk_like(t, rng) for _ in range(n_null)]
            w_real = window_stats(t, k, windows)
            w_null = [window_stats(x, k, windows) for x in walks]
            row[f"L{key[0]}.{key[1]}"] = {
                **w_real, **{f"null_{s}": np.mean([x[s] for x in w_null], 0).tolist() for s in w_real}}
            B[key] = execution_basis(t, k)
            NB[key] = execution_basis(walks[0], k)
        per_run.append(row)
        bases.append(B)
        null_bases.append(NB)
    layers = sorted({key[0] for key in keys})
    P = runs[0][keys[0]].shape[1]
    out = {"runs": run_dirs, "k": k, "windows": windows, "random_subspace_overlap": k / P, "per_run": per_run}
    lay = {}
    for m in MATS:
        pairs = [(a, b) for a, b in itertools.combinations(layers, 2) if (a, m) in bases[0] and (b, m) in bases[0]]
        if pairs:
            lay[m] = {"pairs": [f"L{a}-L{b}" for a, b in pairs],
                      "overlap": [[overlap(B[(a, m)], B[(b, m)]) for a, b in pairs] for B in bases],
                      "null": [[overlap(B[(a, m)], B[(b, m)]) for a, b in pairs] for B in null_bases]}
    out["layers"] = lay
    if len(runs) > 1:
        out["seeds"] = {f"L{key[0]}.{key[1]}": {
            "overlap": [overlap(bases[i][key], bases[j][key]) for i, j in itertools.combinations(range(len(runs)), 2)],
            "null": [overlap(null_bases[i][key], null_bases[j][key])
                     for i, j in itertools.combinations(range(len(runs)), 2)]} for key in keys}
    out["summary"] = summarise(out)
    return out


def summarise(res: dict) -> dict:
    """Mean and spread per matrix type (over layers, windows and runs)."""
    s = {}
    for m in MATS:
        blocks = [b for b in res["per_run"][0] if b.endswith(m)]
        if not blocks:
            continue
        row = {}
        for stat in ("to_whole", "adjacent", "captured"):
            row[stat] = mean_std([r[b][stat] for r in res["per_run"] for b in blocks])
            row["null_" + stat] = mean_std([r[b]["null_" + stat] for r in res["per_run"] for b in blocks])
        if m in res["layers"]:
            row["layers"] = mean_std(res["layers"][m]["overlap"])
            row["null_layers"] = mean_std(res["layers"][m]["null"])
        if "seeds" in res:
            row["seeds"] = mean_std([res["seeds"][b]["overlap"] for b in blocks])
            row["null_seeds"] = mean_std([res["seeds"][b]["null"] for b in blocks])
        s[m] = row
    return s


def _g(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def format_table(res: dict) -> str:
    S = res["summary"]
    cols = [("adjacent", "adjacent windows"), ("to_whole", "window vs whole run"),
            ("captured", "window movement in whole-run subspace"), ("layers", "between layers"),
            ("seeds", "between seeds")]
    cols = [(c, t) for c, t in cols if all(c in S[m] for m in S)]
    lines = [f"subspace overlap (mean cos^2 of principal angles, k = {res['k']}; random subspaces "
             f"{res['random_subspace_overlap']:.1e}): run | random-walk null, mean +- std",
             "| matrix | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, r in S.items():
        lines.append(f"| {m} | " + " | ".join(
            f"{_g(r[c]['mean'])} +- {_g(r[c]['std'])} \\| {_g(r['null_' + c]['mean'])}" for c, _ in cols) + " |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    S = res["summary"]
    cols = [c for c in ("adjacent", "captured", "layers", "seeds") if all(c in S[m] for m in S)]
    fig, ax = subplots(len(cols), figsize=(4.2 * len(cols), 4))
    ax = np.atleast_1d(ax)
    titles = {"adjacent": "adjacent time windows", "captured": "window movement in whole-run subspace",
              "layers": "same matrix, two layers", "seeds": "same block, two seeds"}
    x = np.arange(len(S))
    for a, c in zip(ax, cols):
        a.bar(x - 0.2, [S[m][c]["mean"] for m in S], 0.4, yerr=[S[m][c]["std"] for m in S], capsize=3, label="run")
        a.bar(x + 0.2, [S[m]["null_" + c]["mean"] for m in S], 0.4, yerr=[S[m]["null_" + c]["std"] for m in S],
              capsize=3, color="0.7", label="random walk, same steps")
        a.set_xticks(x, list(S))
        a.set_yscale("log")
        a.set_ylim(res["random_subspace_overlap"] / 3, 1.5)
        a.axhline(res["random_subspace_overlap"], color="k", ls=":", lw=1, label="random subspaces (k/P)")
        a.set_title(titles[c], fontsize=10)
        a.set_ylabel("overlap" if c != "captured" else "variance share")
    ax[0].legend(fontsize=8)
    return save(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.alignment", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", help="run folders written by python -m modadd.train")
    p.add_argument("--k", type=at_least(1), default=3, help="subspace dimension (the execution subspace's)")
    p.add_argument("--windows", type=at_least(2), default=3,
                   help="consecutive time windows (at least 2: windows are compared with each other)")
    p.add_argument("--n-null", type=at_least(1), default=3, help="random walks per block")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random-walk null")
    add_output_flags(p, None, "where alignment.json goes (default: the first run)")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs (removed when the new ones are written)")
    return p


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.runs[0] if args.out_dir is None else args.out_dir
    claimed = claim(out, NAME, KEY, args.plots_dir, args.no_plot, args.force)
    res = analyse(args.runs, args.k, args.windows, args.n_null, args.seed)
    return emit(res, out, NAME, format_table, plot, args.no_plot, args.plots_dir, claimed)


if __name__ == "__main__":
    sys.exit(main())
