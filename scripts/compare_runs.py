"""Overlay the validation curves of several runs and tabulate their best and test MSE.

    python scripts/compare_runs.py runs/demo_rope runs/demo_t5 runs/demo_sinusoidal --name pos_encoding_comparison

Writes <name>.csv and <name>.md into --out-dir and <name>.png (validation MSE per epoch, noise
floor dashed) into --plots-dir; runs that recorded the oracle (oracle.py) add its test MSE, the
model's signal MSE and their ratio. --name is a plain file name. Earlier outputs of the same name
stop it unless --force (which replaces them, also a figure an earlier run drew when this one has
--no-plot).
"""
import argparse
import csv
import io
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import safeio  # noqa: E402 - the repository root is on the path from here on

NUMBERS = ("val_mse", "test_mse")                 # metrics.json: required numbers
OPTIONAL = ("noise_floor", "test_oracle_mse", "test_signal_mse", "test_signal_over_oracle", "train_seconds")


def load(run):
    """(rows of training_log.csv as (epoch, val_mse), metrics.json) of a finished run, checked."""
    if not os.path.isdir(run):
        raise safeio.InputError(f"{run} is not a finished run (not a folder)")
    for name in ("training_log.csv", "metrics.json"):
        if not os.path.exists(os.path.join(run, name)):
            raise safeio.InputError(f"{run} is not a finished run ({os.path.join(run, name)} missing)")
    log = os.path.join(run, "training_log.csv")
    raw = safeio.read_bytes(log, "training log")
    try:
        table = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    except (csv.Error, UnicodeDecodeError) as e:
        raise safeio.InputError(f"training log {log} cannot be read as CSV ({safeio.first_line(e, 120)})") from None
    rows = []
    for i, r in enumerate(table, 2):
        try:
            epoch, val = int(r["epoch"]), float(r["val_mse"])
        except (KeyError, TypeError, ValueError):
            raise safeio.InputError(f"training log {log}: row {i} has no integer epoch and number val_mse") from None
        rows.append((epoch, val))
    path = os.path.join(run, "metrics.json")
    m = safeio.read_json(path, "run metrics", kind=dict)
    for k in ("epochs_run", "best_epoch"):
        safeio.check_field(m, k, int, path, lo=0)
    for k in NUMBERS:
        safeio.check_field(m, k, float, path, nullable=True)
    for k in OPTIONAL:
        safeio.check_field(m, k, float, path, required=False, nullable=True, lo=0 if k == "noise_floor" else None)
    return rows, m


def first_epoch_below(rows, level):
    for epoch, val in rows:
        if val <= level:
            return epoch
    return None


def ratio_pct(x, floor):
    return 100 * (x / floor - 1) if floor and x is not None and math.isfinite(x) else None


@safeio.one_line_errors()
def main(argv=None):
    from cliargs import Parser, add_output_flags, non_negative, plots_dir
    from plotting import save_figure
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders with training_log.csv and metrics.json")
    add_output_flags(p, "runs/compare_runs", "where <name>.csv and <name>.md go")
    p.add_argument("--name", default="compare_runs",
                   help="file name of the outputs, without extension (letters, digits and _.,=+@%%-)")
    p.add_argument("--force", action="store_true", help="replace earlier outputs of the same name")
    p.add_argument("--within", type=non_negative(), default=0.10, help="report the first epoch with val <= (1+x) floor")
    args = p.parse_args(argv)
    safeio.plain_name(args.name, "--name")
    base = os.path.join(args.out_dir, args.name)
    figure = os.path.join(plots_dir(args), args.name + ".png")
    safeio.output_dir(args.out_dir, "--out-dir", create=False)
    if not args.no_plot:
        safeio.output_dir(os.path.dirname(figure), "--plots-dir", create=False)
    outputs = safeio.Outputs(f"scripts/compare_runs.py --name {args.name}", args.force)
    earlier = outputs.claim([base + ".csv", base + ".md", figure], remove=False)
    runs = [load(run) for run in args.runs]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    table = []
    floor = None
    for run, (rows, m) in zip(args.runs, runs):
        name = os.path.basename(os.path.normpath(run))
        floor = m.get("noise_floor") or floor
        ax.plot([e for e, _ in rows], [v for _, v in rows], label=name)
        table.append({"run": name, "epochs": m["epochs_run"], "best_epoch": m["best_epoch"],
                      "best_val_mse": m["val_mse"], "test_mse": m["test_mse"],
                      "test_over_floor_pct": ratio_pct(m["test_mse"], floor),
                      f"first_epoch_val_within_{int(100 * args.within)}pct":
                          first_epoch_below(rows, (1 + args.within) * floor) if floor else None,
                      # the Bayes-optimal predictor on the same test windows (runs with the oracle)
                      "test_oracle_mse": m.get("test_oracle_mse"),
                      "test_signal_mse": m.get("test_signal_mse"),
                      "test_signal_over_oracle": m.get("test_signal_over_oracle"),
                      "train_seconds": m.get("train_seconds")})
    if floor:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"noise floor {floor:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    outputs.remove_earlier(earlier)         # only now: a run that fails above leaves the earlier outputs whole
    written = []
    if not args.no_plot:
        os.makedirs(os.path.dirname(figure), exist_ok=True)
        written.append(save_figure(fig, outputs.target(figure), dpi=110))
    plt.close(fig)
    os.makedirs(args.out_dir, exist_ok=True)
    keys = list(table[0])
    safeio.write_csv(outputs.target(base + ".csv"), keys, table)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for t in table:
        md.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in t.values()) + " |")
    safeio.write_text(outputs.target(base + ".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    print("wrote " + ", ".join(written + [base + ".csv", base + ".md"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
