"""Headline numbers of one `python -m terrain.modulate --train` run, as {job_dir}/metrics.json
for sweep.py's commands line (numbers are scalars, objects of numbers are curves).

    python scripts/terrain_train_metrics.py JOB_DIR
"""
import glob
import json
import os
import sys


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    found = sorted(glob.glob(os.path.join(argv[0], "modulate_train_*.json")))
    if len(found) != 1:
        print(f"error: {argv[0]} holds {len(found)} modulate_train_*.json files, expected one", file=sys.stderr)
        return 2
    with open(found[0]) as f:
        out = metrics(json.load(f))
    tmp = os.path.join(argv[0], "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, os.path.join(argv[0], "metrics.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
