"""Curriculum forgetting: does accuracy on small m decay once the curriculum moves on?

    python -m modadd.forgetting runs/cur_s0 runs/cur_s1 ... [--control runs/mixed_s0 ...]

Runs trained with --schedule curriculum (equal stages m = m_min .. m_max, one optimizer
throughout). For every m: held-out accuracy at the end of its own stage, its best over
the rest of training, at the end of training, and the forgetting = end of own stage -
end of training (mean and std over runs). Mixed-schedule runs of the same length given as
--control show whether the capacity to solve all m at once is there. Writes
forgetting.json in the first run's folder (or --out-dir) and forgetting.png in --plots-dir (default
plots/<that folder's name>); earlier ones stop it unless --force (which replaces them).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import safeio
from cliargs import Parser, add_output_flags
from modadd.figures import claim, emit, save, stage_files, stage_key, subplots
from modadd.runs import CURRICULUM_FIELDS, load_config, read_metrics
from modadd.stats import mean_std
from training import TrainingError

NAME = "forgetting"
KEY = stage_key(NAME)


def outputs(out_dir: str, plots: bool = True, plots_dir: str | None = None) -> list[str]:
    """Every file this stage writes for out_dir (plots False: those of a --no-plot run)."""
    return stage_files(out_dir, NAME, plots, plots_dir)


def load_metrics(run_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, metrics.csv columns) of a run, both checked (runs.load_config, runs.read_metrics)."""
    c = load_config(run_dir, CURRICULUM_FIELDS)
    return c, read_metrics(run_dir, c)


def stage_ends(c: dict) -> dict[int, int]:
    """Last step of each m's curriculum stage (same rule as task.m_schedule)."""
    n = c["m_max"] - c["m_min"] + 1
    ends = {}
    for m in range(c["m_min"], c["m_max"] + 1):
        j = m - c["m_min"] + 1
        ends[m] = -(-j * c["steps"] // n)          # first step index of the next stage = ceil(j * steps / n)
    return ends


def per_run(run_dir: str) -> dict:
    c, M = load_metrics(run_dir)
    steps = M["step"]
    out = {"schedule": c["schedule"], "steps": c["steps"], "per_m": {}}
    ends = stage_ends(c)
    for m in range(c["m_min"], c["m_max"] + 1):
        acc = M[f"acc_m{m}"]
        i_end = int(np.searchsorted(steps, ends[m], side="right") - 1)   # last evaluation within the stage
        out["per_m"][str(m)] = {"stage_end_step": int(steps[i_end]), "at_stage_end": float(acc[i_end]),
                                "best_after": float(acc[i_end:].max()), "final": float(acc[-1]),
                                "forgetting": float(acc[i_end] - acc[-1])}
    out["curve"] = {"step": steps.tolist(), **{f"acc_m{m}": M[f"acc_m{m}"].tolist()
                                               for m in range(c["m_min"], c["m_max"] + 1)}}
    return out


def analyse(run_dirs: list[str], controls: list[str] | None = None) -> dict:
    runs = [per_run(d) for d in run_dirs]
    if any(r["schedule"] != "curriculum" for r in runs):
        raise ValueError("forgetting needs runs trained with --schedule curriculum (give mixed runs as --control)")
    ctrl = [per_run(d) for d in controls or []]
    ms = list(runs[0]["per_m"])
    for d, r in zip(list(run_dirs[1:]) + list(controls or []), runs[1:] + ctrl):
        if list(r["per_m"]) != ms or len(r["curve"]["step"]) != len(runs[0]["curve"]["step"]):
            raise safeio.InputError(f"{d}: its marker range or evaluation steps differ from {run_dirs[0]}'s; "
                                    f"compare runs of one configuration")
    summary = {}
    for m in ms:
        s = {}
        for stat in ("at_stage_end", "best_after", "final", "forgetting"):
            s[stat] = mean_std([r["per_m"][m][stat] for r in runs])
        if ctrl:
            s["control_final"] = mean_std([r["per_m"][m]["final"] for r in ctrl])
        summary[m] = s
    return {"runs": run_dirs, "controls": controls or [], "per_run": runs, "control_runs": ctrl, "summary": summary}


def format_table(res: dict) -> str:
    ctrl = bool(res["controls"])
    lines = [f"curriculum forgetting over {len(res['runs'])} run(s): mean +- std",
             "| m | stage ends at step | accuracy at stage end | best afterwards | final | forgetting |"
             + (" mixed control, final |" if ctrl else ""), "|---" * (6 + ctrl) + "|"]
    for m, s in res["summary"].items():
        step = res["per_run"][0]["per_m"][m]["stage_end_step"]
        f = lambda k: f"{s[k]['mean']:.3f} +- {s[k]['std']:.3f}"  # noqa: E731
        lines.append(f"| {m} | {step} | {f('at_stage_end')} | {f('best_after')} | {f('final')} | {f('forgetting')} |"
                     + (f" {f('control_final')} |" if ctrl else ""))
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    fig, ax = subplots(1, figsize=(8, 4.5))
    steps = np.array(res["per_run"][0]["curve"]["step"])
    for i, m in enumerate(res["summary"]):
        A = np.array([r["curve"][f"acc_m{m}"] for r in res["per_run"]])
        mu, sd = A.mean(0), A.std(0)
        line, = ax.plot(steps, mu, label=f"m = {m} (curriculum)", color=f"C{i}")
        ax.fill_between(steps, mu - sd, mu + sd, color=f"C{i}", alpha=0.2)
        ax.axvline(res["per_run"][0]["per_m"][m]["stage_end_step"], color="0.6", ls=":", lw=1)
        if res["control_runs"]:
            C = np.array([r["curve"][f"acc_m{m}"] for r in res["control_runs"]])
            ax.plot(res["control_runs"][0]["curve"]["step"], C.mean(0), ls="--", color=f"C{i}", alpha=0.8,
                    label=f"m = {m} (mixed control)")
    ax.set_xlabel("step (dotted: ends of the curriculum stages)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"curriculum m = 1 -> {len(res['summary'])}: accuracy per m over training "
                 f"({len(res['runs'])} run(s), band = std)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.forgetting", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", help="curriculum run folders")
    p.add_argument("--control", nargs="*", default=[], help="mixed-schedule run folders of the same length")
    add_output_flags(p, None, "where forgetting.json goes (default: the first run)")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs (removed when the new ones are written)")
    return p


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = args.runs[0] if args.out_dir is None else args.out_dir
    claimed = claim(out, NAME, KEY, args.plots_dir, args.no_plot, args.force)
    res = analyse(args.runs, args.control)
    return emit(res, out, NAME, format_table, plot, args.no_plot, args.plots_dir, claimed)


if __name__ == "__main__":
    sys.exit(main())
