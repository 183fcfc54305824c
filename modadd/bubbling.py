"""Attention bubbling: how concentrated the read-out attention is, and whether the model
still works when every attention row keeps only its top-k keys.

    python -m modadd.bubbling runs/modadd_code_s0

From a run folder (model.pt, metrics.csv): per m on fresh held-out examples, the read-out
row's entropy per layer (beside log T, the entropy of uniform attention), the mass on its
top 1, 2 and 4 keys, and accuracy with attention restricted to the top-k keys of every row
(k = 1, 2, 4, 8, all) in every layer. A figure shows the read-out entropy over training
(metrics.csv) and the top-k accuracy. Writes bubbling.json in the run folder (or --out-dir)
and bubbling.png in --plots-dir (default plots/<run name>); earlier ones stop it unless --force.
"""
from __future__ import annotations

import math
import os
import sys

import torch

import safeio
from cliargs import SEED, Parser, add_output_flags, at_least
from modadd.figures import claim, emit, save, stage_files, stage_key, subplots
from modadd.model import accuracy, set_topk
from modadd.runs import load_run, read_metrics
from modadd.task import sample
from training import TrainingError

NAME = "bubbling"
KEY = stage_key(NAME)


def outputs(out_dir: str, plots: bool = True, plots_dir: str | None = None) -> list[str]:
    """Every file this stage writes for out_dir (plots False: those of a --no-plot run)."""
    return stage_files(out_dir, NAME, plots, plots_dir)


def analyse(run_dir: str, n: int = 2000, ks=(1, 2, 4, 8), seed: int = 7) -> dict:
    model, task, c = load_run(run_dir)
    cfg = model.cfg    # read-out attention of every layer is kept: n x heads x T x T per layer, and its sort
    safeio.check_fits(4 * n * (cfg.n_heads * task.T ** 2 * (cfg.n_layers + 3) + 8 * task.T * cfg.d_model),
                      f"--n {n} examples per m", "use a smaller --n")
    gen = torch.Generator().manual_seed(seed)
    out = {"run": run_dir, "T": task.T, "uniform_entropy": math.log(task.T), "per_m": {}}
    for m in range(c["m_min"], c["m_max"] + 1):
        x, y = sample(task, m, n, gen)[:2]
        keep = {}
        with torch.no_grad():
            model(x, keep)
        rows = [a[:, :, -1, :] for a in keep["attn"]]              # (B, heads, T) per layer
        ent = [float((-(p * p.clamp_min(1e-12).log()).sum(-1)).mean()) for p in rows]
        top = {k: [float(p.sort(-1, descending=True).values[..., :k].sum(-1).mean()) for p in rows] for k in (1, 2, 4)}
        accs = {}
        for k in list(ks) + [None]:
            set_topk(model, k)
            accs["all" if k is None else str(k)] = accuracy(model, x, y)[0]
        set_topk(model, None)
        out["per_m"][str(m)] = {"readout_entropy": ent, "top_mass": {str(k): v for k, v in top.items()},
                                "topk_accuracy": accs}
    if os.path.exists(os.path.join(run_dir, "metrics.csv")):
        M = read_metrics(run_dir, {})
        out["entropy_history"] = {"step": [int(s) for s in M["step"]],
                                  **{k: v.tolist() for k, v in M.items() if k.startswith("entropy_L")}}
    return out


def format_table(res: dict) -> str:
    lines = [f"{res['run']}: read-out attention (uniform entropy log T = {res['uniform_entropy']:.2f})",
             "| m | entropy per layer | top-1 mass per layer | accuracy: top-1 / 2 / 4 / 8 / all keys |",
             "|---|---|---|---|"]
    for m, r in res["per_m"].items():
        a = r["topk_accuracy"]
        lines.append(f"| {m} | {' '.join(f'{e:.2f}' for e in r['readout_entropy'])} | "
                     f"{' '.join(f'{v:.2f}' for v in r['top_mass']['1'])} | "
                     f"{' / '.join(f'{a[k]:.2f}' for k in ('1', '2', '4', '8', 'all'))} |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    fig, ax = subplots(2)
    h = res.get("entropy_history")
    if h:
        for k in sorted(x for x in h if x.startswith("entropy_L")):
            ax[0].plot(h["step"], h[k], label=k.replace("entropy_", "layer "))
        ax[0].axhline(res["uniform_entropy"], color="k", ls=":", label="uniform")
        ax[0].set_xlabel("step")
        ax[0].set_title("read-out attention entropy over training (fixed probes)")
        ax[0].legend(fontsize=8)
    labels = ["1", "2", "4", "8", "all"]
    for m, r in res["per_m"].items():
        ax[1].plot(labels, [r["topk_accuracy"][k] for k in labels], "o-", label=f"m = {m}")
    ax[1].set_xlabel("keys kept per attention row")
    ax[1].set_ylabel("held-out accuracy")
    ax[1].set_title("accuracy with top-k attention")
    ax[1].legend(fontsize=8)
    return save(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.bubbling", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder written by python -m modadd.train")
    p.add_argument("--n", type=at_least(1), default=2000, help="held-out examples per m")
    p.add_argument("--seed", type=SEED, default=0,
                   help="seed of the evaluated examples (the recorded results used 7)")
    add_output_flags(p, None, "where bubbling.json goes (default: the run folder)")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs (removed when the new ones are written)")
    return p


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.run if args.out_dir is None else args.out_dir
    claimed = claim(out, NAME, KEY, args.plots_dir, args.no_plot, args.force)
    res = analyse(args.run, args.n, seed=args.seed)
    return emit(res, out, NAME, format_table, plot, args.no_plot, args.plots_dir, claimed)


if __name__ == "__main__":
    sys.exit(main())
