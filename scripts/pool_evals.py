"""Pool a circles checkpoint's scores over several evaluations against the oracle: the same model scored on
the held-out masks of several seeds (`masked_model_gpu.py --eval CKPT --eval-mask-seed K`), or on a longer
held-out block (`--data-dir` of a longer draw of the same process).

A masked model's ratio to the oracle on one block and one set of masks is dominated by the few masked
patches that straddle a visit boundary, where the oracle itself is unsure: with no such patch the oracle's
error is ~0 and the ratio explodes, with one it is set by a dozen steps. Pooling sums the squared errors of
every scored step over the evaluations (each evaluation weighted by its scored steps), for the model and
the oracle alike, and splits them where the oracle is certain of the circle and where it is not.

    python scripts/pool_evals.py --group "masked 60 min, last=runs/sweeps/fresh_best60_masked/fresh-best60/s0/heldout200k_last_m*" \\
        --out-dir results/circles_fresh/heldout

Writes pooled.json and pooled.md to --out-dir. `--paired A,B` also compares two recipes seed by seed:
groups named A-s<seed> and B-s<seed> (the seeds both have) give the per-seed difference B - A of the
pooled signal MSE, with its mean, 95% t interval over seeds and paired t-test p.
"""
import glob
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import safeio  # noqa: E402
from cliargs import Parser  # noqa: E402

OUTPUTS = ("pooled.json", "pooled.md")


def _n(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def pool(files: list[str]) -> dict:
    """Per split: the model's and the oracle's signal MSE over every scored step of every evaluation, their
    ratio, the same where the oracle is certain and where it is not, and each evaluation's own ratio."""
    out = {"n_evaluations": len(files), "evaluations": files}
    evals = [safeio.read_json(f, "evaluation metrics", kind=dict) for f in files]
    for split in ("val", "test"):
        tot = {"n": 0, "n_unc": 0, "m": 0.0, "o": 0.0, "mc": 0.0, "oc": 0.0, "mu": 0.0, "ou": 0.0}
        ratios = []
        for f, e in zip(files, evals):
            s, orc = e.get(f"{split}_signal_by_certainty"), (e.get("oracle") or {}).get(split) or {}
            o = orc.get("oracle_by_certainty")
            m_mse, o_mse = _n(e.get(f"{split}_signal_mse")), _n(orc.get("oracle_signal_mse"))
            if not isinstance(s, dict) or not isinstance(o, dict) or m_mse is None or o_mse is None:
                raise safeio.InputError(f"{f}: no {split} signal MSE split by the oracle's certainty (an "
                                        f"evaluation of a circles checkpoint with the oracle)")
            nc, nu = int(s["n_certain"]), int(s["n_uncertain"])
            if (nc, nu) != (int(o["n_certain"]), int(o["n_uncertain"])):
                raise safeio.InputError(f"{f}: the model and the oracle are scored on different steps")
            n = nc + nu
            for k, count in (("certain", nc), ("uncertain", nu)):
                if count and (_n(s.get(f"signal_mse_{k}")) is None or _n(o.get(f"signal_mse_{k}")) is None):
                    raise safeio.InputError(f"{f}: {count} {k} {split} steps without their signal MSE")
            tot["n"] += n
            tot["n_unc"] += nu
            tot["m"] += m_mse * n
            tot["o"] += o_mse * n
            tot["mc"] += (s["signal_mse_certain"] or 0) * nc
            tot["oc"] += (o["signal_mse_certain"] or 0) * nc
            tot["mu"] += (s["signal_mse_uncertain"] or 0) * nu
            tot["ou"] += (o["signal_mse_uncertain"] or 0) * nu
            ratios.append(m_mse / o_mse if o_mse > 0 else None)
        n, nu, nc = tot["n"], tot["n_unc"], tot["n"] - tot["n_unc"]
        if not n:
            raise safeio.InputError(f"no {split} step is scored in {', '.join(files)}")
        out[split] = {"n_scored_steps": n, "n_uncertain_steps": nu,
                      "signal_mse": tot["m"] / n, "oracle_signal_mse": tot["o"] / n,
                      "signal_over_oracle": tot["m"] / tot["o"] if tot["o"] > 0 else None,
                      "signal_mse_certain": tot["mc"] / nc if nc else None,
                      "oracle_signal_mse_certain": tot["oc"] / nc if nc else None,
                      "signal_mse_uncertain": tot["mu"] / nu if nu else None,
                      "oracle_signal_mse_uncertain": tot["ou"] / nu if nu else None,
                      "excess_share_uncertain": ((tot["mu"] - tot["ou"]) / (tot["m"] - tot["o"])
                                                 if tot["m"] != tot["o"] else None),
                      "ratio_per_evaluation": ratios}
    return out


def paired(groups: dict, a: str, b: str) -> dict:
    """B - A of the pooled validation and test signal MSE, seed by seed (groups A-s<seed>, B-s<seed>)."""
    from scipy import stats

    from statsutil import seed_ci

    def seeds(prefix):
        out = {}
        for name in groups:
            head, sep, tail = name.rpartition("-s")
            if sep and head == prefix and tail.isdigit():
                out[int(tail)] = name
        return out
    sa, sb = seeds(a), seeds(b)
    common = sorted(set(sa) & set(sb))
    if len(common) < 2:
        raise safeio.InputError(f"--paired {a},{b}: groups {a}-s<seed> and {b}-s<seed> share {len(common)} seed(s); "
                                f"give at least 2")
    res = {"a": a, "b": b, "seeds": common}
    for split in ("val", "test"):
        d = [groups[sb[k]][split]["signal_mse"] - groups[sa[k]][split]["signal_mse"] for k in common]
        p = float(stats.ttest_1samp(d, 0.0).pvalue) if len(set(d)) > 1 else float("nan")
        res[split] = {"differences": d, **seed_ci(d), "p": p, "b_lower_in": sum(x < 0 for x in d),
                      "a_signal_over_oracle": [groups[sa[k]][split]["signal_over_oracle"] for k in common],
                      "b_signal_over_oracle": [groups[sb[k]][split]["signal_over_oracle"] for k in common]}
    return res


def markdown(res: dict) -> str:
    def f(x, p=3):
        return "—" if x is None else f"{x:.{p}f}"
    lines = ["| checkpoint | split | evaluations | scored steps (uncertain) | signal MSE / oracle's, pooled | model; oracle "
             "| where the oracle is certain: model; oracle | where it is not: model; oracle | ratio per evaluation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, g in res["groups"].items():
        for split in ("val", "test"):
            d = g[split]
            per = ", ".join("—" if r is None else f"{r:.2f}" for r in d["ratio_per_evaluation"])
            lines.append(f"| {name} | {split} | {g['n_evaluations']} | {d['n_scored_steps']:,} ({d['n_uncertain_steps']}) "
                         f"| **{f(d['signal_over_oracle'], 2)}** | {f(d['signal_mse'])}; {f(d['oracle_signal_mse'])} "
                         f"| {f(d['signal_mse_certain'], 4)}; {f(d['oracle_signal_mse_certain'], 4)} "
                         f"| {f(d['signal_mse_uncertain'], 2)}; {f(d['oracle_signal_mse_uncertain'], 2)} | {per} |")
    for pr in res.get("paired", []):
        lines += ["", f"Paired on seeds {', '.join(map(str, pr['seeds']))}: pooled signal MSE of {pr['b']} minus {pr['a']}", "",
                  "| split | mean [95% t interval] | p | lower in | ratio to the oracle per seed, A; B |", "|---|---|---|---|---|"]
        for split in ("val", "test"):
            d = pr[split]
            ra = ", ".join(f"{x:.2f}" for x in d["a_signal_over_oracle"])
            rb = ", ".join(f"{x:.2f}" for x in d["b_signal_over_oracle"])
            lines.append(f"| {split} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {d['p']:.3f} "
                         f"| {d['b_lower_in']} of {d['n']} | {ra}; {rb} |")
    return "\n".join(lines) + "\n"


def build_parser() -> Parser:
    p = Parser(description="Pool a circles checkpoint's scores against the oracle over several evaluations "
                           "(mask seeds, longer held-out blocks).")
    p.add_argument("--group", action="append", required=True, metavar="NAME=GLOB",
                   help="a name and a glob of evaluation folders (each with eval_metrics.json) or of the files "
                        "themselves; repeatable, one table row per group and split")
    p.add_argument("--paired", action="append", default=[], metavar="A,B",
                   help="compare recipe B with A seed by seed, from groups named A-s<seed> and B-s<seed> (repeatable)")
    p.add_argument("--out-dir", required=True, help="where pooled.json and pooled.md go")
    p.add_argument("--force", action="store_true", help="replace earlier outputs of this script there")
    return p


@safeio.one_line_errors()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    groups = {}
    for item in args.group:
        name, sep, pattern = item.partition("=")
        if not sep or not name.strip() or not pattern:
            raise safeio.InputError(f"--group {item!r}: give NAME=GLOB")
        if name in groups:
            raise safeio.InputError(f"--group {name!r} is given twice")
        files = sorted(p if p.endswith(".json") else os.path.join(p, "eval_metrics.json") for p in glob.glob(pattern))
        files = [p for p in files if os.path.isfile(p)]
        if not files:
            raise safeio.InputError(f"--group {item!r}: no eval_metrics.json matches")
        groups[name] = files
    safeio.output_dir(args.out_dir, create=False)
    paths = [os.path.join(args.out_dir, f) for f in OUTPUTS]
    out = safeio.Outputs("scripts/pool_evals.py", args.force)
    earlier = out.claim(paths, remove=False)
    res = {"groups": {name: pool(files) for name, files in groups.items()}}
    pairs = []
    for item in args.paired:
        a, sep, b = item.partition(",")
        if not sep or not a or not b:
            raise safeio.InputError(f"--paired {item!r}: give A,B")
        pairs.append(paired(res["groups"], a, b))
    if pairs:
        res["paired"] = pairs
    out.remove_earlier(earlier)
    safeio.output_dir(args.out_dir)
    out.write_json(paths[0], res)
    safeio.write_text(out.target(paths[1]), markdown(res))
    for name, g in res["groups"].items():
        print(f"{name}: " + "; ".join(f"{s} {g[s]['signal_over_oracle']:.2f}x the oracle over {g['n_evaluations']} "
                                      f"evaluations" for s in ("val", "test") if g[s]["signal_over_oracle"]))
    print(f"wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
