"""How far a quantisation type moves the weight battery's statistics of a float model, beside how far it
moves them for Gaussian matrices of the same shapes and RMS (the quantised null against the float null).

    python scripts/quant_shift.py runs/terrain/weights_minilm.json runs/terrain/weights_q4_1_minilm.json ...
    python scripts/quant_shift.py FLOAT.json QUANT.json [QUANT2.json ...] --out-dir results/terrain_smollm2

Per role and statistic: the float model's value, the quantised model's, their difference, and what the
quantisation does to the Gaussian null: the same Gaussian draws before and after it (paired). A shift close to the null's shift is
what the storage does to any matrix; the rest is how this model's weights meet the format. Writes
quant_shift.json and quant_shift.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import safeio  # noqa: E402
from cliargs import Parser  # noqa: E402
from terrain.weights import summary_rows  # noqa: E402

STATS = (("stable_rank", "stable rank"), ("pr_sigma2", "PR(sigma^2)"), ("hoyer", "Hoyer"),
         ("frac_below_0.1_rms", "share below 0.1 RMS"), ("frac_below_0.01_rms", "share below 0.01 RMS"))


def shifts(float_res: dict, quant_res: dict) -> list[dict]:
    """Rows (role, statistic, float, quantised, shift, null shift) for the roles both battery results have."""
    f = {r["role"]: r for r in summary_rows(float_res)}
    q = {r["role"]: r for r in summary_rows(quant_res)}
    null_key = {"stable_rank": "stable_rank_null", "pr_sigma2": "pr_sigma2_null", "hoyer": "hoyer_null",
                "frac_below_0.1_rms": "frac_below_0.1_rms_null", "frac_below_0.01_rms": "frac_below_0.01_rms_null"}
    out = []
    for role in [r for r in f if r in q]:
        for key, label in STATS:
            fv, qv = f[role].get(key), q[role].get(key)
            # the null's shift on the same Gaussian draws before and after the quantisation (paired); a
            # battery written before the pairing: against the float model's own (independent) null
            qn = q[role].get(f"{key}_qnull")
            fn = q[role].get(f"{key}_qnull_float", f[role].get(null_key.get(key, "")))
            out.append({"role": role, "statistic": label, "float": fv, "quantized": qv,
                        "shift": None if fv is None or qv is None else qv - fv,
                        "relative_shift": None if not fv or qv is None else (qv - fv) / abs(fv),
                        "null_float": fn, "null_quantized": qn,
                        "null_shift": None if fn is None or qn is None else qn - fn})
    return out


def markdown(rows: list[dict], qtype: str) -> str:
    def f(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"
    lines = [f"### {qtype}", "", "| role | statistic | float | quantised | shift | null shift |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['role']} | {r['statistic']} | {f(r['float'])} | {f(r['quantized'])} | {f(r['shift'])} | "
              f"{f(r['null_shift'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def build_parser():
    p = Parser(description="Shift of each weight-battery statistic from a float model to its quantised battery "
                           "(terrain.weights --quantize TYPE), beside the shift of the Gaussian null.")
    p.add_argument("float_json", help="weights_<model>.json of the float model")
    p.add_argument("quant_json", nargs="+", help="weights_<type>_<model>.json of the same model quantised")
    p.add_argument("--out-dir", required=True, help="where quant_shift.json and quant_shift.md go")
    p.add_argument("--force", action="store_true", help="replace earlier quant_shift files")
    return p


@safeio.one_line_errors()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    base = safeio.read_json(args.float_json, "battery result", kind=dict)
    paths = [os.path.join(args.out_dir, f) for f in ("quant_shift.json", "quant_shift.md")]
    safeio.output_dir(args.out_dir, create=False)
    out = safeio.Outputs("quant_shift", args.force)
    earlier = out.claim(paths, remove=False)     # removed only once the inputs have been read
    res, md = {"float": args.float_json, "types": {}}, []
    for path in args.quant_json:
        q = safeio.read_json(path, "battery result", kind=dict)
        qtype = q.get("quantize") or "?"
        res["types"][qtype] = {"file": path, "rows": shifts(base, q)}
        md.append(markdown(res["types"][qtype]["rows"], qtype))
    out.remove_earlier(earlier)
    safeio.output_dir(args.out_dir)
    out.write_json(paths[0], res)
    safeio.write_text(out.target(paths[1]), "\n".join(md))
    print("\n".join(md))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
