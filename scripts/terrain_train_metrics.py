"""Headline numbers of one `python -m terrain.modulate --train` run, as {job_dir}/metrics.json
for sweep.py's commands line (numbers are scalars, objects of numbers are curves).

    python scripts/terrain_train_metrics.py JOB_DIR

The run's modulate_train_*.json is read with every field this script uses checked (one line
naming the file and the field otherwise). metrics.json is written atomically and strictly (a NaN
becomes null, named in "nonfinite"). It replaces a metrics.json this script wrote before (the
numbers are a function of the run's file); any other metrics.json in JOB_DIR needs --force.
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import safeio  # noqa: E402 - the repository root is on the path from here on

KEY = "scripts/terrain_train_metrics.py"
EPOCH = ("epoch", "wup_pearson", "loss", "near_minus_far", "preservation")


def metrics(res: dict) -> dict:
    last = res["epochs"][-1]
    es = res.get("early_stop")
    out = {"heldout_pearson": last["wup_pearson"],
           "heldout_gain": last["wup_pearson"] - res["unmodulated"]["wup_pearson"],
           "control_pearson": res["control"]["wup_pearson"],
           "gain_over_control": last["wup_pearson"] - res["control"]["wup_pearson"],
           "near_minus_far": last["near_minus_far"], "preservation": last["preservation"],
           "steps": res["steps"], "final_loss": last["loss"],
           "pearson_per_epoch": {str(e["epoch"]): e["wup_pearson"] for e in res["epochs"]}}
    if "cv_health" in res:
        out["cv_modulated"] = res["cv_health"]["cv"]
    if es is not None:
        out["stopped_early"] = float(es["stopped_at_step"] is not None)
    return out


def check(res: dict, path: str) -> dict:
    """The fields metrics() reads, each checked (numbers may be null: a NaN the writer named)."""
    epochs = safeio.check_field(res, "epochs", list, path)
    if not epochs:
        raise safeio.InputError(f"{path}: the field 'epochs' is empty (the run trained no epoch)")
    for i, e in enumerate(epochs):
        if not isinstance(e, dict):
            raise safeio.InputError(f"{path}: epochs[{i}] is not an object")
        for k in EPOCH:
            safeio.check_field(e, k, (int, float), f"{path} epochs[{i}]", nullable=k != "epoch")
    for k in ("unmodulated", "control"):
        safeio.check_field(safeio.check_field(res, k, dict, path), "wup_pearson", (int, float), f"{path} {k}",
                           nullable=True)
    safeio.check_field(res, "steps", int, path, lo=0)
    if safeio.check_field(res, "cv_health", dict, path, required=False) is not None:
        safeio.check_field(res["cv_health"], "cv", (int, float), f"{path} cv_health", nullable=True)
    if safeio.check_field(res, "early_stop", dict, path, required=False, nullable=True) is not None:
        safeio.check_field(res["early_stop"], "stopped_at_step", int, f"{path} early_stop", nullable=True)
    return res


def _nan(x):
    return float("nan") if x is None else x


def nulls_as_nan(res: dict) -> dict:
    """metrics() on nulls read back as NaN (safeio writes a NaN as null), so a difference stays NaN."""
    out = dict(res, epochs=[{k: _nan(v) for k, v in e.items()} for e in res["epochs"]])
    for k in ("unmodulated", "control"):
        out[k] = dict(res[k], wup_pearson=_nan(res[k]["wup_pearson"]))
    if "cv_health" in res:
        out["cv_health"] = dict(res["cv_health"], cv=_nan(res["cv_health"]["cv"]))
    return out


@safeio.one_line_errors()
def main(argv=None) -> int:
    from cliargs import Parser
    p = Parser(prog="python scripts/terrain_train_metrics.py", description=__doc__.split("\n\n")[0])
    p.add_argument("job_dir", help="the folder of one terrain.modulate --train run (one modulate_train_*.json)")
    p.add_argument("--force", action="store_true", help="replace a metrics.json this script did not write")
    args = p.parse_args(argv)
    if not os.path.isdir(args.job_dir):
        raise safeio.InputError(f"{args.job_dir} is not a folder; give the folder of a terrain.modulate --train run")
    found = sorted(glob.glob(os.path.join(glob.escape(args.job_dir), "modulate_train_*.json")))
    if len(found) != 1:
        raise safeio.InputError(f"{args.job_dir} holds {len(found)} modulate_train_*.json files, expected one")
    out = metrics(nulls_as_nan(check(safeio.read_json(found[0], "terrain.modulate result", kind=dict), found[0])))
    path = os.path.join(args.job_dir, "metrics.json")
    safeio.check_writable_file(path, "JOB_DIR/metrics.json")
    mine = {os.path.abspath(q) for q in safeio.recorded(KEY, args.job_dir)}
    outputs = safeio.Outputs(KEY, True)
    if os.path.lexists(path) and os.path.abspath(path) not in mine and not args.force:
        raise safeio.OutputsExist(f"{path} exists and was not written by this script; pass --force to replace it")
    outputs.write_json(path, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
