"""Trajectory PCA of a training run's attention matrices, against a random-walk null.

    python -m modadd.trajectory runs/modadd_code_s0 [runs/modadd_code_s1 ...]

For every layer and matrix (W_Q, W_K, W_V, W_O) of each run: r90 (principal components for
90% of the trajectory's variance) and the effective rank, beside the same numbers for
random walks with the run's step sizes in random directions. With several runs (seeds), the
table gives the mean and standard deviation over runs. Writes trajectory_pca.json in
the first run's folder (or --out-dir) and trajectory_pca.png in --plots-dir (default plots/<that
folder's name>); earlier ones stop it unless --force (which replaces them).
"""
from __future__ import annotations

import sys

import numpy as np

import safeio
from cliargs import SEED, Parser, add_output_flags, at_least
from modadd.figures import claim, emit, save, stage_files, stage_key, subplots
from modadd.geometry import trajectory_pca
from modadd.runs import MATS, load_snapshots
from modadd.stats import mean_std
from training import TrainingError

NAME = "trajectory_pca"
KEY = stage_key("trajectory")


def outputs(out_dir: str, plots: bool = True, plots_dir: str | None = None) -> list[str]:
    """Every file this stage writes for out_dir (plots False: those of a --no-plot run)."""
    return stage_files(out_dir, NAME, plots, plots_dir)


def analyse(run_dirs: list[str], n_null: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    per_run = []
    for d in run_dirs:
        snaps = load_snapshots(d)
        if per_run and sorted(f"L{l}.{m}" for l, m in snaps) != sorted(per_run[0]):
            raise safeio.InputError(f"{d}: its attention blocks differ from {run_dirs[0]}'s")
        per_run.append({f"L{l}.{m}": trajectory_pca(t, rng, n_null) for (l, m), t in sorted(snaps.items())})
    keys = list(per_run[0])
    summary = {}
    for k in keys:
        vals = {s: np.array([r[k][s] for r in per_run], float) for s in
                ("r90", "effective_rank", "null_r90_mean", "null_effective_rank_mean")}
        summary[k] = {s: mean_std(v) for s, v in vals.items()}
    return {"runs": run_dirs, "per_run": per_run, "summary": summary}


def format_table(res: dict) -> str:
    lines = [f"trajectory PCA over {len(res['runs'])} run(s): mean (+- std over runs)",
             "| layer.matrix | r90 | random-walk r90 | effective rank | random-walk effective rank |",
             "|---|---|---|---|---|"]
    for k, s in res["summary"].items():
        lines.append(f"| {k} | {s['r90']['mean']:.1f} +- {s['r90']['std']:.1f} | {s['null_r90_mean']['mean']:.1f} | "
                     f"{s['effective_rank']['mean']:.2f} +- {s['effective_rank']['std']:.2f} | "
                     f"{s['null_effective_rank_mean']['mean']:.2f} |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    keys = list(res["summary"])
    layers = sorted({int(k.split(".")[0][1:]) for k in keys})
    fig, ax = subplots(2)
    S = res["summary"]
    for j, stat, null in ((0, "r90", "null_r90_mean"), (1, "effective_rank", "null_effective_rank_mean")):
        for i, m in enumerate(MATS):
            ls = [l for l in layers if f"L{l}.{m}" in S]
            if ls:
                ax[j].errorbar(np.array(ls) + 0.08 * (i - 1.5), [S[f"L{l}.{m}"][stat]["mean"] for l in ls],
                               yerr=[S[f"L{l}.{m}"][stat]["std"] for l in ls], fmt="o-", capsize=3, label=m)
        ax[j].plot(layers, [np.mean([S[k][null]["mean"] for k in keys if k.startswith(f"L{l}.")]) for l in layers],
                   "k--", label="random walk, same steps")
        ax[j].set_xlabel("layer")
        ax[j].set_title(stat.replace("_", " ") + " of the weight trajectory")
        ax[j].legend(fontsize=8)
    return save(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.trajectory", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by python -m modadd.train")
    p.add_argument("--n-null", type=at_least(1), default=20, help="random walks per block")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random-walk null")
    add_output_flags(p, None, "where trajectory_pca.json goes (default: the first run)")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs (removed when the new ones are written)")
    return p


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.runs[0] if args.out_dir is None else args.out_dir
    claimed = claim(out, NAME, KEY, args.plots_dir, args.no_plot, args.force)
    res = analyse(args.runs, args.n_null, args.seed)
    return emit(res, out, NAME, format_table, plot, args.no_plot, args.plots_dir, claimed)


if __name__ == "__main__":
    sys.exit(main())
