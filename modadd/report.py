"""Multi-seed figures 1-6 and a verdict on each finding against its null.

    python -m modadd.report runs/code [--curriculum runs/cur --mlp runs/mlp] [--out-dir runs/modadd_report]

ROOT is a folder written by python -m modadd.sweep: seed runs in ROOT/s<seed> (metrics.csv,
commutators.csv, bubbling.json, sae.json) and trajectory_pca.json, alignment.json over all
seeds. --curriculum gives a sweep with --schedule curriculum (its forgetting is computed
here, with ROOT's runs as the mixed control); --mlp a sweep of standard (attention + MLP)
models for the architecture comparison.

Figures (mean or median over seeds with their spread):
  fig1_intrinsic_dim       r90 and effective rank per layer and matrix, random-walk null
  fig2_entropy_bubbling    read-out entropy and accuracy over training, top-k accuracy
  fig3_commutator_raw      D and D_rel over training, with the training loss
  fig4_comm_ratio          rho onto the execution subspace / rho onto random and
                           block-matched subspaces, over training
  fig5_comm_decomposition  squared commutator inside / outside the execution subspace, and
                           every rho beside its baselines
  fig6_sae_ablation        accuracy drop from ablating the chosen SAE latents vs random ones
Statistics: per seed the median over commutator pairs (with its 95% bootstrap interval over
pairs in report.json), then the mean over seeds with a 95% Student-t interval over seeds,
the same summary as python sweep.py aggregate gives (statsutil.seed_ci). Writes report.json and
report.md (the verdict table) into --out-dir, the figures into --plots-dir (default
plots/modadd_report). Earlier outputs stop it unless --force, which removes every file it can
write (also figures this run's data would not give, so none of another run survives) once
everything is read and checked, just before the new files are written.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

import numpy as np

import safeio
from cliargs import Parser, add_output_flags, default_plots_dir
from modadd.figures import remove_temporaries, save, stage_key, subplots
from modadd.runs import REPORT_FIELDS, load_config, read_csv as read_columns, read_metrics
from modadd.stats import median_ci
from statsutil import seed_ci, spearman  # seed_ci: the over-seed interval of sweep.py's aggregation
from modadd import forgetting, trajectory
from training import TrainingError

RHOS = ("final_rho_exec", "final_rho_random", "final_rho_block_matched", "final_rho_exec_blocks",
        "final_rho_random_blocks")
FIGURES = ("fig1_intrinsic_dim", "fig2_entropy_bubbling", "fig3_commutator_raw", "fig4_comm_ratio",
           "fig5_comm_decomposition", "fig6_sae_ablation", "forgetting")    # <name>.png, as far as the data allow


def outputs(out_dir: str, plots_dir: str | None = None) -> list[str]:
    """Every file this command can write (numbers in out_dir, figures in plots_dir or out_dir's
    default figures folder), whichever figures the data allow."""
    figures = plots_dir or default_plots_dir(out_dir)
    return ([os.path.join(out_dir, f) for f in ("report.json", "report.md")]
            + [os.path.join(figures, f + ".png") for f in FIGURES])


KEY = stage_key("report")


def read_csv(path: str) -> dict[str, np.ndarray]:
    """A numeric CSV as columns (runs.read_csv: one line naming the file, column and row otherwise)."""
    return read_columns(path)


def read_commutators(path: str) -> dict[str, np.ndarray]:
    """commutators.csv of a run, with the columns the statistics read."""
    c = read_columns(path, "commutators file")
    need = ["step", "D", "D_rel"] + (list(RHOS) if "final_rho_exec" in c else [])
    missing = [k for k in need if k not in c]
    if missing:
        raise safeio.InputError(f"commutators file {path} has no {missing[0]} column; train the run again")
    return c


def seed_dirs(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise safeio.InputError(f"{root} is not a folder; give a folder written by python -m modadd.sweep")
    dirs = sorted((os.path.join(root, n) for n in os.listdir(root) if re.fullmatch(r"s[0-9]{1,12}", n)
                   and os.path.isdir(os.path.join(root, n)) and os.path.exists(os.path.join(root, n, "metrics.csv"))),
                  key=lambda d: int(os.path.basename(d)[1:]))
    if not dirs:
        raise safeio.InputError(f"{root}: no seed runs (s<seed>/metrics.csv); write them with python -m modadd.sweep")
    return dirs


def load_json(path: str) -> dict | None:
    """A stage's JSON (None when it is not there), read with one-line errors naming the file."""
    if not os.path.exists(path):
        return None
    return safeio.read_json(path, "stage output", kind=dict)


# what the report reads of each stage's JSON: {key: schema} (further keys allowed), ("map", schema): an
# object with any keys, ("list", schema): a list; NUM: a number or null (a NaN written by safeio), read as NaN
NUM, INT, STR = "number", "integer", "string"
STAT = {"mean": NUM, "std": NUM}
SCHEMAS = {
    "python -m modadd.trajectory": {"summary": ("map", {"r90": STAT, "effective_rank": STAT, "null_r90_mean": STAT,
                                                        "null_effective_rank_mean": STAT})},
    "python -m modadd.alignment": {"summary": ("map", {"adjacent": STAT, "null_adjacent": STAT}),
                                   "random_subspace_overlap": NUM},
    "python -m modadd.bubbling": {"per_m": ("map", {"topk_accuracy": {k: NUM for k in ("1", "2", "4", "8", "all")}})},
    "python -m modadd.sae": {"variable": STR, "layer": INT, "snapshots": ("list", {
        "step": NUM, "kinds": ("map", {"drop": {k: NUM for k in ("chosen_error_kept", "random_error_kept",
                                                                 "reconstruction")}, "quality": {"fvu": NUM}})})},
}


def check_layout(obj, schema, where: str):
    """obj checked against a schema (SCHEMAS), with null numbers read as NaN; one line naming where otherwise."""
    def bad(what):
        return safeio.InputError(f"{where}: {what}; it does not have the layout its stage writes (run the stage "
                                 f"again with --force)")

    def walk(x, sch, at):
        if sch == NUM:
            if x is None:
                return math.nan
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise bad(f"{at or 'the value'} is {x!r:.40}, not a number")
            return float(x)
        if sch == INT or sch == STR:
            if not isinstance(x, int if sch == INT else str) or isinstance(x, bool):
                raise bad(f"{at} is {x!r:.40}, not an {sch}" if sch == INT else f"{at} is not a string")
            return x
        if isinstance(sch, tuple):
            kind, sub = sch
            if not isinstance(x, dict if kind == "map" else list) or not x:
                raise bad(f"{at} is not a non-empty {'object' if kind == 'map' else 'list'}")
            if kind == "map":
                return {k: walk(v, sub, f"{at}.{k}") for k, v in x.items()}
            return [walk(v, sub, f"{at}[{i}]") for i, v in enumerate(x)]
        if not isinstance(x, dict):
            raise bad(f"{at or 'the file'} is not an object")
        missing = [k for k in sch if k not in x]
        if missing:
            raise bad(f"{at + '.' if at else ''}{missing[0]} is missing")
        return {**x, **{k: walk(x[k], sub, f"{at}.{k}" if at else k) for k, sub in sch.items()}}
    return walk(obj, schema, "")


def load_stage(path: str, writer: str) -> dict | None:
    """A stage's JSON with what the report reads of it checked (None when it is not there)."""
    obj = load_json(path)
    if obj is None:
        return None
    obj = check_layout(obj, SCHEMAS[writer], path)
    if writer == "python -m modadd.trajectory" and not all(re.fullmatch(r"L[0-9]{1,6}\.W_[QKVO]", k)
                                                           for k in obj["summary"]):
        raise safeio.InputError(f"{path}: its summary keys are not L<layer>.W_<Q|K|V|O>; run {writer} again "
                                f"with --force")
    if writer == "python -m modadd.alignment":     # every statistic of a row is a mean +- std
        for m, r in obj["summary"].items():
            obj["summary"][m] = {k: check_layout(v, STAT, f"{path} summary.{m}.{k}") for k, v in r.items()}
    return obj


def finite_spearman(a, b) -> float:
    """Spearman's rho over the pairs where both are finite (nan with 3 or fewer)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return spearman(a[ok], b[ok]) if ok.sum() > 3 else float("nan")


def commutator_stats(runs: list[dict]) -> dict:
    """runs: per seed {'comm': commutators.csv columns, 'metrics': metrics.csv columns}."""
    per_seed = []
    for r in runs:
        c, M = r["comm"], r["metrics"]
        if "train_loss" not in M or len(M["step"]) < 2:
            raise safeio.InputError(f"{r.get('dir', 'a run')}: its metrics.csv has no train_loss column or fewer than "
                                    f"two evaluations; train the run again")
        s = {k: float(np.nanmedian(c[k])) for k in ("D", "D_rel", *RHOS) if k in c}
        if "final_rho_exec" in c:
            s["ratio_random"] = float(np.nanmedian(c["final_rho_exec"] / c["final_rho_random"]))
            s["ratio_block_matched"] = float(np.nanmedian(c["final_rho_exec"] / c["final_rho_block_matched"]))
            s["ratio_blocks"] = float(np.nanmedian(c["final_rho_exec_blocks"] / c["final_rho_random_blocks"]))
            s["share_inside"] = float(np.nanmedian(c["final_rho_exec"] ** 2))
        series = {"D": c["D"], "D_rel": c["D_rel"]}
        if "final_rho_exec" in c:
            series.update(ratio_random=c["final_rho_exec"] / c["final_rho_random"],
                          ratio_block_matched=c["final_rho_exec"] / c["final_rho_block_matched"])
        s["ci_over_pairs"] = {k: median_ci(v) for k, v in series.items()}
        # loss change around each measurement: does a commutator spike go with a loss jump?
        loss = np.interp(c["step"], M["step"][1:], M["train_loss"][1:])
        s["spearman_D_loss_change"] = finite_spearman(c["D"][1:], np.abs(np.diff(loss)))
        s["spearman_D_loss"] = finite_spearman(c["D"], loss)
        per_seed.append(s)
    keys = sorted({k for s in per_seed for k in s if k != "ci_over_pairs"})
    return {"per_seed": per_seed, "summary": {k: seed_ci([s.get(k, np.nan) for s in per_seed]) for k in keys}}


def band(ax, x, Y, label, color, median=False):
    Y = np.asarray(Y, float)
    if median:
        mid, lo, hi = np.nanmedian(Y, 0), np.nanquantile(Y, 0.25, 0), np.nanquantile(Y, 0.75, 0)
    else:
        mid = np.nanmean(Y, 0)
        sd = np.nanstd(Y, 0)
        lo, hi = mid - sd, mid + sd
    ax.plot(x, mid, color=color, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2)


def fig2(runs, bubbling, path):
    fig, ax = subplots(3, figsize=(16, 4.3))
    M0 = runs[0]["metrics"]
    steps = M0["step"]
    ent = sorted(k for k in M0 if k.startswith("entropy_L"))
    for i, k in enumerate(ent):
        band(ax[0], steps, [r["metrics"][k] for r in runs], k.replace("entropy_", "layer "), f"C{i}")
    T = runs[0]["config"]["T"]
    ax[0].axhline(np.log(T), color="k", ls=":", label="uniform (log T)")
    ax[0].set_title("read-out attention entropy (fixed probes)", fontsize=10)
    accs = sorted(k for k in M0 if k.startswith("acc_m"))
    for i, k in enumerate(accs):
        band(ax[1], steps, [r["metrics"][k] for r in runs], k.replace("acc_", ""), f"C{i}")
    ax[1].set_title("held-out accuracy per m", fontsize=10)
    for a in ax[:2]:
        a.set_xlabel("step")
        a.legend(fontsize=7)
    if bubbling:
        labels = ["1", "2", "4", "8", "all"]
        for i, m in enumerate(bubbling[0]["per_m"]):
            A = np.array([[b["per_m"][m]["topk_accuracy"][k] for k in labels] for b in bubbling])
            ax[2].errorbar(labels, A.mean(0), yerr=A.std(0), fmt="o-", capsize=3, label=f"m = {m}", color=f"C{i}")
        ax[2].set_xlabel("keys kept per attention row (every layer)")
        ax[2].set_title("accuracy with top-k attention", fontsize=10)
        ax[2].legend(fontsize=7)
    return save(fig, path)


def fig3(runs, path):
    fig, ax = subplots(2, figsize=(13, 4.3))
    for j, key in enumerate(("D", "D_rel")):
        for r in runs:
            ax[j].plot(r["comm"]["step"], r["comm"][key], color="C0", alpha=0.15, lw=0.8)
        band(ax[j], runs[0]["comm"]["step"], [r["comm"][key] for r in runs], "median over seeds (band: IQR)", "C0",
             median=True)
        ax[j].set_yscale("log")
        ax[j].set_xlabel("step")
        tw = ax[j].twinx()
        band(tw, runs[0]["metrics"]["step"][1:], [r["metrics"]["train_loss"][1:] for r in runs], "training loss",
             "C3")
        tw.set_ylabel("training loss", color="C3")
        ax[j].legend(fontsize=7, loc="upper right")
    ax[0].set_title("raw commutator D = |theta_AB - theta_BA| / (|eta g_A| |eta g_B|)", fontsize=10)
    ax[1].set_title("dimensionless D_rel = |theta_AB - theta_BA| / |eta (g_A + g_B)|", fontsize=10)
    return save(fig, path)


def fig4(runs, path):
    fig, ax = subplots(1, figsize=(8, 4.3))
    steps = runs[0]["comm"]["step"]
    for i, (den, lab) in enumerate((("final_rho_random", "random subspace (live coordinates)"),
                                    ("final_rho_block_matched", "block-matched random subspace"),
                                    ("final_rho_random_blocks", "per-block: random k per block"))):
        num = "final_rho_exec_blocks" if den == "final_rho_random_blocks" else "final_rho_exec"
        band(ax, steps, [r["comm"][num] / r["comm"][den] for r in runs], f"rho_exec / rho onto {lab}", f"C{i}",
             median=True)
    ax.axhline(1, color="k", ls=":", label="no more than chance")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("commutator in the execution subspace relative to chance (median, IQR over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


def fig5(runs, stats, path):
    fig, ax = subplots(2, figsize=(13, 4.3))
    steps = runs[0]["comm"]["step"]
    band(ax[0], steps, [r["comm"]["final_rho_exec"] ** 2 for r in runs], "inside the execution subspace", "C0",
         median=True)
    band(ax[0], steps, [r["comm"]["final_rho_random"] ** 2 for r in runs], "inside a random subspace (same k)",
         "0.5", median=True)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_title("share of |theta_AB - theta_BA|^2 (attention part); the rest is perpendicular", fontsize=10)
    ax[0].legend(fontsize=7)
    S = stats["summary"]
    names = [k for k in RHOS if k in S]
    x = np.arange(len(names))
    ax[1].bar(x, [S[k]["mean"] for k in names], yerr=[[S[k]["mean"] - S[k]["lo"] for k in names],
                                                       [S[k]["hi"] - S[k]["mean"] for k in names]],
              capsize=4, color=["C0", "0.6", "0.6", "C1", "0.8"])
    labels = {"final_rho_exec": "execution\n(top k)", "final_rho_random": "random k\n(live coords)",
              "final_rho_block_matched": "random k\nblock-matched", "final_rho_exec_blocks": "per-block\nexecution",
              "final_rho_random_blocks": "per-block\nrandom"}
    ax[1].set_xticks(x, [labels[k] for k in names], fontsize=8)
    ax[1].set_yscale("log")
    ax[1].set_title("rho (median over pairs; mean over seeds, 95% CI)", fontsize=10)
    return save(fig, path)


def fig6(sae, path):
    kinds = list(sae[0]["snapshots"][0]["kinds"])
    fig, ax = subplots(len(kinds), figsize=(6.5 * len(kinds), 4.3))
    ax = np.atleast_1d(ax)
    steps = [s["step"] for s in sae[0]["snapshots"]]
    for a, kind in zip(ax, kinds):
        for i, (key, lab) in enumerate((("chosen_error_kept", f"chosen latents (|r| with {sae[0]['variable']})"),
                                        ("random_error_kept", "random live latents"),
                                        ("reconstruction", "SAE reconstruction alone"))):
            Y = np.array([[s["kinds"][kind]["drop"][key] for s in r["snapshots"]] for r in sae])
            a.errorbar(steps, Y.mean(0), yerr=Y.std(0), fmt="o-", capsize=3, label=lab,
                       color=("C3", "0.4", "C0")[i])
        a.axhline(0, color="k", lw=0.5)
        a.set_xlabel("training step of the snapshot")
        a.set_ylabel("accuracy drop (mean over m)")
        a.set_title(f"{kind} SAE on the residual after {sae[0]['layer']} blocks ({len(sae)} seeds, +- std)",
                    fontsize=10)
        a.legend(fontsize=7)
    return save(fig, path)


def sae_stats(sae: list[dict]) -> dict:
    out = {}
    for kind in sae[0]["snapshots"][0]["kinds"]:
        rows = []
        for i, s in enumerate(sae[0]["snapshots"]):
            d = lambda k: [r["snapshots"][i]["kinds"][kind]["drop"][k] for r in sae]  # noqa: E731
            excess = np.array(d("chosen_error_kept")) - np.array(d("random_error_kept"))
            rows.append({"step": s["step"], "chosen": seed_ci(d("chosen_error_kept")),
                         "random": seed_ci(d("random_error_kept")), "excess": seed_ci(excess),
                         "reconstruction": seed_ci(d("reconstruction")),
                         "fvu": seed_ci([r["snapshots"][i]["kinds"][kind]["quality"]["fvu"] for r in sae])})
        out[kind] = rows
    return out


def verdicts(rep: dict) -> list[dict]:
    v = []
    tp = rep.get("trajectory")
    if tp:
        r90 = [s["r90"]["mean"] for s in tp["summary"].values()]
        null = [s["null_r90_mean"]["mean"] for s in tp["summary"].values()]
        v.append({"finding": "attention trajectories collapse to 2-3 dimensions",
                  "measured": f"r90 {np.mean(r90):.1f} (blocks {min(r90):.1f}-{max(r90):.1f})",
                  "null": f"random walk, same steps: {np.mean(null):.1f}",
                  "verdict": ("holds against the null" if np.mean(r90) <= 3 else
                              f"below the null, but at {np.mean(r90):.1f} dimensions rather than 2-3")
                  if np.mean(r90) < np.mean(null) - 1 else "no lower than a random walk with the same steps"})
    al = rep.get("alignment")
    if al and al["summary"]:
        S = al["summary"]
        adj = np.mean([S[m]["adjacent"]["mean"] for m in S])
        nadj = np.mean([S[m]["null_adjacent"]["mean"] for m in S])
        if np.isfinite(adj):
            v.append({"finding": "one fixed execution subspace (stable over training)",
                      "measured": f"overlap of adjacent time windows {adj:.2g}",
                      "null": f"random walk {nadj:.2g}",
                      "verdict": "holds" if adj > 0.5 else "does not hold: the directions turn over during training"})
        if all("seeds" in S[m] for m in S):
            sd = np.mean([S[m]["seeds"]["mean"] for m in S])
            v.append({"finding": "the subspace is shared across seeds (weight space)",
                      "measured": f"overlap between seeds {sd:.2g}",
                      "null": f"random subspaces {al['random_subspace_overlap']:.1e}",
                      "verdict": "holds" if sd > 0.5 else "does not hold (different initialisations)"})
    c = rep.get("commutators", {}).get("summary")
    if c and "ratio_random" in c:
        rr, rb = c["ratio_random"], c["ratio_block_matched"]
        v.append({"finding": "SGD commutators are large in the full space",
                  "measured": f"median D {c['D']['mean']:.3g} [{c['D']['lo']:.3g}, {c['D']['hi']:.3g}], "
                              f"D_rel {c['D_rel']['mean']:.2g}",
                  "null": "D_rel = 0 for commuting steps",
                  "verdict": "holds in D; relative to the update itself the commutator is small"
                  if c["D_rel"]["mean"] < 0.1 else "holds"})
        v.append({"finding": "commutators are negligible inside the execution subspace",
                  "measured": f"rho_exec {c['final_rho_exec']['mean']:.3g}; rho_exec / rho_random "
                              f"{rr['mean']:.2f} [{rr['lo']:.2f}, {rr['hi']:.2f}], / block-matched "
                              f"{rb['mean']:.2f} [{rb['lo']:.2f}, {rb['hi']:.2f}]",
                  "null": f"random k-dim subspace rho {c['final_rho_random']['mean']:.3g}",
                  "verdict": "holds against the null" if rr["hi"] < 1 and rb["hi"] < 1 else
                  "small only because any k-dim subspace is small: the execution subspace holds MORE commutator "
                  "than chance" if rr["lo"] > 1 else "no different from chance"})
        sp = c["spearman_D_loss_change"]
        v.append({"finding": "commutator spikes correlate only weakly with loss fluctuations",
                  "measured": f"Spearman(D, abs. loss change) {sp['mean']:.2f} [{sp['lo']:.2f}, {sp['hi']:.2f}]",
                  "null": "0", "verdict": "holds" if abs(sp["mean"]) < 0.3 else "does not hold"})
    s = rep.get("sae")
    if s:
        for kind, rows in s.items():
            ex = [r["excess"]["mean"] for r in rows]
            sig = [r["excess"]["lo"] > 0 for r in rows]
            v.append({"finding": f"ablating task-correlated SAE latents ({kind}) hurts, most mid-training",
                      "measured": "drop beyond random latents by step: " + ", ".join(
                          f"{r['step']}: {r['excess']['mean']:+.3f}" for r in rows),
                      "null": "random live latents (same number)",
                      "verdict": (f"above the random-latent null at {sum(sig)} of {len(sig)} snapshots; largest at "
                                  f"step {rows[int(np.argmax(ex))]['step']}") if any(sig)
                      else "not above the random-latent null"})
    f = rep.get("forgetting")
    if f:
        fg = {m: x["forgetting"]["mean"] for m, x in f["summary"].items()}
        worst = max(fg, key=fg.get)
        v.append({"finding": "strict curriculum forgets small m",
                  "measured": "forgetting (accuracy at stage end - final): " + ", ".join(
                      f"m={m} {x:+.3f}" for m, x in fg.items()),
                  "null": "mixed schedule, same steps: final " + ", ".join(
                      f"m={m} {x['control_final']['mean']:.2f}" for m, x in f["summary"].items()
                      if "control_final" in x),
                  "verdict": f"holds (most for m = {worst})" if fg[worst] > 0.05 else "does not hold"})
    mlp = rep.get("mlp_trajectory")
    if mlp and tp:
        a = np.mean([s["r90"]["mean"] for s in tp["summary"].values()])
        b = np.mean([s["r90"]["mean"] for s in mlp["summary"].values()])
        bn = np.mean([s["null_r90_mean"]["mean"] for s in mlp["summary"].values()])
        v.append({"finding": "MLP blocks make the attention trajectory higher-dimensional",
                  "measured": f"r90 attention-only {a:.1f} vs standard {b:.1f}", "null": f"random walk {bn:.1f}",
                  "verdict": "holds" if b > a + 0.5 else "does not hold"})
    return v


def load_root(root: str) -> list[dict]:
    """Every seed run of a sweep folder, each file checked; the seeds must be runs of one configuration."""
    runs = []
    for d in seed_dirs(root):
        c = load_config(d, REPORT_FIELDS)
        r = {"dir": d, "config": c, "metrics": read_metrics(d, c)}
        if os.path.exists(os.path.join(d, "commutators.csv")):
            r["comm"] = read_commutators(os.path.join(d, "commutators.csv"))
        r["bubbling"] = load_stage(os.path.join(d, "bubbling.json"), "python -m modadd.bubbling")
        r["sae"] = load_stage(os.path.join(d, "sae.json"), "python -m modadd.sae")
        runs.append(r)
    first = runs[0]
    for r in runs[1:]:
        differ = [k for k in REPORT_FIELDS if r["config"][k] != first["config"][k]]
        if differ or sorted(r["metrics"]) != sorted(first["metrics"]) or \
                len(r["metrics"]["step"]) != len(first["metrics"]["step"]):
            raise safeio.InputError(f"{r['dir']}: not a run of the configuration of {first['dir']} ("
                                    f"{'its ' + differ[0] + ' differs' if differ else 'its metrics.csv differs'}); "
                                    f"a report covers the seeds of one configuration")
        if ("comm" in r) != ("comm" in first) or ("comm" in r and (
                sorted(r["comm"]) != sorted(first["comm"]) or len(r["comm"]["step"]) != len(first["comm"]["step"]))):
            raise safeio.InputError(f"{r['dir']}: its commutators.csv differs in shape from {first['dir']}'s")
    for name, get in (("bubbling.json", lambda b: sorted(b["per_m"])),
                      ("sae.json", lambda s: (len(s["snapshots"]), sorted(s["snapshots"][0]["kinds"]),
                                              [sorted(x["kinds"]) for x in s["snapshots"]]))):
        have = [r for r in runs if r[name[:-5]]]
        if any(get(r[name[:-5]]) != get(have[0][name[:-5]]) for r in have[1:]):
            raise safeio.InputError(f"the {name} files of {root}'s seeds differ in shape (marker range, snapshots "
                                    f"or SAE kinds); run that stage again on every seed with --force")
    return runs


def build(root: str, out_dir: str, curriculum: str | None = None, mlp: str | None = None,
          geometry: str | None = None, plot: bool = True, plots_dir: str | None = None,
          claimed: tuple[safeio.Outputs, list[str]] | None = None) -> dict:
    """Read and check everything, compute the statistics and verdicts, then (and only then) remove the
    report's earlier outputs (claimed) and write report.json, report.md and the figures."""
    figures = plots_dir or default_plots_dir(out_dir)
    draws = []          # (draw, its arguments, file name): drawn once everything is computed

    def figure(draw, *a):
        if plot:
            draws.append((draw, a[:-1], a[-1]))
    runs = load_root(root)
    rep = {"root": root, "n_seeds": len(runs), "config": runs[0]["config"], "figures": []}
    fin = {k: seed_ci([r["metrics"][k][-1] for r in runs]) for k in runs[0]["metrics"] if k.startswith("acc_m")}
    rep["final_accuracy"] = fin
    geometry = geometry or root
    rep["geometry_from"] = geometry
    tp = load_stage(os.path.join(geometry, "trajectory_pca.json"), "python -m modadd.trajectory")
    if tp:
        rep["trajectory"] = {"summary": tp["summary"]}
        figure(trajectory.plot, tp, "fig1_intrinsic_dim.png")
    al = load_stage(os.path.join(geometry, "alignment.json"), "python -m modadd.alignment")
    if al:
        rep["alignment"] = {"summary": al["summary"], "random_subspace_overlap": al["random_subspace_overlap"]}
    bub = [r["bubbling"] for r in runs if r["bubbling"]]
    figure(fig2, runs, bub, "fig2_entropy_bubbling.png")
    if bub:
        rep["bubbling"] = {m: {k: seed_ci([b["per_m"][m]["topk_accuracy"][k] for b in bub])
                               for k in bub[0]["per_m"][m]["topk_accuracy"]} for m in bub[0]["per_m"]}
    cr = [r for r in runs if "comm" in r]
    if cr:
        rep["commutators"] = commutator_stats(cr)
        figure(fig3, cr, "fig3_commutator_raw.png")
        if "final_rho_exec" in cr[0]["comm"]:
            figure(fig4, cr, "fig4_comm_ratio.png")
            figure(fig5, cr, rep["commutators"], "fig5_comm_decomposition.png")
    sae = [r["sae"] for r in runs if r["sae"]]
    if sae:
        rep["sae"] = sae_stats(sae)
        figure(fig6, sae, "fig6_sae_ablation.png")
    if curriculum:
        f = forgetting.analyse(seed_dirs(curriculum), [r["dir"] for r in runs])
        rep["forgetting"] = {"summary": f["summary"], "runs": f["runs"]}
        figure(forgetting.plot, f, "forgetting.png")
    if mlp:
        m = load_stage(os.path.join(mlp, "trajectory_pca.json"), "python -m modadd.trajectory")
        if m is None:
            raise safeio.InputError(f"{mlp}/trajectory_pca.json not found (run the sweep's trajectory stage)")
        rep["mlp_trajectory"] = {"summary": m["summary"]}
        mlp_runs = load_root(mlp)
        rep["mlp_final_accuracy"] = {k: seed_ci([r["metrics"][k][-1] for r in mlp_runs]) for k in runs[0]["metrics"]
                                     if k.startswith("acc_m") and k in mlp_runs[0]["metrics"]}
    rep["verdicts"] = verdicts(rep)
    outputs, earlier = claimed or (safeio.Outputs(KEY, True), [])
    outputs.remove_earlier(earlier)
    remove_temporaries(outputs.paths or [])
    os.makedirs(out_dir, exist_ok=True)
    for draw, args, name in draws:
        os.makedirs(figures, exist_ok=True)
        rep["figures"].append(draw(*args, outputs.target(os.path.join(figures, name))))
    outputs.write_json(os.path.join(out_dir, "report.json"), rep, indent=1)
    safeio.write_text(outputs.target(os.path.join(out_dir, "report.md")), format_markdown(rep))
    return rep


def format_markdown(rep: dict) -> str:
    c = rep["config"]
    lines = [f"{rep['n_seeds']} seeds, preset {c['preset']} ({'standard' if c['mlp'] else 'attention-only'}, "
             f"T {c['T']}, C {c['C']}, m {c['m_min']}-{c['m_max']}, {c['optimizer']} lr {c['lr']}, "
             f"{c['steps']} steps, {c['schedule']})", "",
             *([f"trajectory PCA and alignment from {rep['geometry_from']}", ""]
               if rep["geometry_from"] != rep["root"] else []),
             "final held-out accuracy: " + ", ".join(
                 f"{k.replace('acc_', '')} {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                 for k, v in rep["final_accuracy"].items()), "",
             "| finding (seed) | measured (mean over seeds [95% CI]) | null | verdict |", "|---|---|---|---|"]
    lines += [f"| {v['finding']} | {v['measured']} | {v['null']} | {v['verdict']} |" for v in rep["verdicts"]]
    return "\n".join(lines) + "\n"


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.report", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("root", help="a sweep folder (seed runs in ROOT/s<seed>)")
    p.add_argument("--curriculum", default=None, help="a sweep folder of curriculum runs")
    p.add_argument("--mlp", default=None, help="a sweep folder of standard (attention + MLP) runs")
    p.add_argument("--geometry", default=None,
                   help="folder with trajectory_pca.json and alignment.json (default ROOT), e.g. from other runs "
                        "of the same configuration whose snapshots are at hand")
    add_output_flags(p, "runs/modadd_report", "where report.json and report.md go")
    p.add_argument("--force", action="store_true",
                   help="replace this command's earlier outputs (removed when the new ones are written)")
    return p


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    paths = outputs(args.out_dir, args.plots_dir)
    safeio.output_dir(args.out_dir, "--out-dir", create=False)
    if not args.no_plot:
        safeio.output_dir(os.path.dirname(paths[-1]), "--plots-dir", create=False)
    found = safeio.Outputs(KEY, args.force)
    claimed = (found, found.claim(paths, remove=False))
    rep = build(args.root, args.out_dir, args.curriculum, args.mlp, args.geometry, plot=not args.no_plot,
                plots_dir=args.plots_dir, claimed=claimed)
    print(format_markdown(rep))
    print("wrote " + ", ".join(rep["figures"] + [os.path.join(args.out_dir, "report.json"),
                                                  os.path.join(args.out_dir, "report.md")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
