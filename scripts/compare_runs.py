"""Overlay the validation curves of several runs and tabulate their best and test MSE.

    python scripts/compare_runs.py runs/demo_rope runs/demo_t5 runs/demo_sinusoidal --name pos_encoding_comparison

Writes <name>.csv and <name>.md into --out-dir and <name>.png (validation MSE per epoch, noise
floor dashed) into --plots-dir; runs that recorded the oracle (oracle.py) add its test MSE, the
model's signal MSE and their ratio. Earlier outputs of the same name stop it unless --force.
"""
import argparse
import csv
import json
import os
import sys


def load(run):
    with open(os.path.join(run, "training_log.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    return rows, metrics


def first_epoch_below(rows, level):
    for r in rows:
        if float(r["val_mse"]) <= level:
            return int(r["epoch"])
    return None


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cliargs import OutputsExist, Parser, add_output_flags, claim_outputs, non_negative, plots_dir
    from plotting import save_figure
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders with training_log.csv and metrics.json")
    add_output_flags(p, "runs/compare_runs", "where <name>.csv and <name>.md go")
    p.add_argument("--name", default="compare_runs", help="file name of the outputs, without extension")
    p.add_argument("--force", action="store_true", help="replace earlier outputs of the same name")
    p.add_argument("--within", type=non_negative(), default=0.10, help="report the first epoch with val <= (1+x) floor")
    args = p.parse_args(argv)
    base = os.path.join(args.out_dir, args.name)
    figure = os.path.join(plots_dir(args), args.name + ".png")
    try:
        claim_outputs([base + ".csv", base + ".md", figure], args.force)
    except OutputsExist as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    table = []
    floor = None
    for run in args.runs:
        try:
            rows, m = load(run)
        except FileNotFoundError as e:
            print(f"error: {run} is not a finished run ({e.filename} missing)", file=sys.stderr)
            return 2
        name = os.path.basename(os.path.normpath(run))
        floor = m.get("noise_floor") or floor
        ax.plot([int(r["epoch"]) for r in rows], [float(r["val_mse"]) for r in rows], label=name)
        table.append({"run": name, "epochs": m["epochs_run"], "best_epoch": m["best_epoch"],
                      "best_val_mse": m["val_mse"], "test_mse": m["test_mse"],
                      "test_over_floor_pct": 100 * (m["test_mse"] / floor - 1) if floor else None,
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
    written = []
    if not args.no_plot:
        os.makedirs(os.path.dirname(figure), exist_ok=True)
        written.append(save_figure(fig, figure, dpi=110))
    plt.close(fig)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    keys = list(table[0])
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for t in table:
        md.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in t.values()) + " |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print("wrote " + ", ".join(written + [base + ".csv", base + ".md"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
