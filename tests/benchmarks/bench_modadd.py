"""modadd: the `code` preset (T 16, C 8, m 1-4, 5 attention-only layers, d 128, AdamW, batch
128) for 20,000 steps with snapshots and SGD commutators every 500 steps (target: 25 minutes
on 2 cores, measurement at most 20% of it). --steps N times a shorter run."""
import argparse
import tempfile

from common import report

from modadd.train import PRESETS, run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20_000)
    args = p.parse_args()
    cfg = dict(PRESETS["code"], steps=args.steps, mlp=False, d_ff=512, schedule="mixed", value_distractors=True,
               readout_token=False, n_noise=8, seed=0, preset="code", eval_every=500, eval_size=2000, exec_k=3,
               commutator_every=500)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(cfg, tmp, progress=False)
    f = res["final"]
    acc = ", ".join(f"m={m} {f[f'acc_m{m}']:.2f}" for m in range(1, 5))
    rows = [{"what": f"code preset, {args.steps} steps with snapshots + commutators every 500 (held-out accuracy "
                     f"{acc})", "seconds": res["seconds"],
             **({"target_s": 1500.0} if args.steps == 20_000 else {})},
            {"what": f"of which measurement (commutators): {100 * res['measurement_seconds'] / res['seconds']:.1f}%",
             "seconds": res["measurement_seconds"]}]
    report("modadd" if args.steps == 20_000 else f"modadd_{args.steps}", rows)


if __name__ == "__main__":
    main()
