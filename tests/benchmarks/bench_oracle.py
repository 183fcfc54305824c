"""The Bayes-optimal predictor (oracle.py) at the published setting on the CPU: 200,000 steps of
seed 0, validation and test windows of 1024 steps with masked patches of 8-128 (the published
masked-model evaluation), smoothing both blocks (target 30 s on 2 cores); also the next-step
task (warm-up 256) and the belief-state targets evaluate_representations.py needs for a
whole 200k-step series read in windows of 1024 keeping 512 steps each."""
import os
import resource
import tempfile
import time

import numpy as np
from common import report

import markov_circles_timeseries
import oracle
from dataset import load_series, task_datasets


def main():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        markov_circles_timeseries.main(["--n-steps", "200000", "--out-dir", data, "--no-plot"])
        series = load_series(data)
        common = dict(data_dir=data, seq_len=1024, stride=64, val_frac=0.1, test_frac=0.1, seed=0)
        t = time.perf_counter()
        chain = oracle.Chain.from_series(series)
        ds = task_datasets(series, {**common, "mask_ratio": 0.15, "mask_patch_size": 16,
                                    "mask_patch_min": 8, "mask_patch_max": 128}, "masked")
        res = {s: oracle.score_dataset(chain, series, ds[s], "masked") for s in ("val", "test")}
        rows.append({"what": f"masked task, val + test windows of 1024 ({res['val']['n_windows']} + "
                             f"{res['test']['n_windows']}), patches 8-128, {chain.n_states} chain states",
                     "seconds": time.perf_counter() - t, "target_s": 30.0,
                     "oracle_signal_mse": {s: r["oracle_signal_mse"] for s, r in res.items()}})
        t = time.perf_counter()
        ds = task_datasets(series, {**common, "eval_warmup": 256}, "next")
        res = {s: oracle.score_dataset(chain, series, ds[s], "next") for s in ("val", "test")}
        rows.append({"what": "next-step task, val + test windows of 1024, warm-up 256",
                     "seconds": time.perf_counter() - t, "target_s": 30.0,
                     "oracle_signal_mse": {s: r["oracle_signal_mse"] for s, r in res.items()}})
        starts = np.arange(0, series.n_steps - 1024 + 1, 512)
        for causal in (False, True):
            t = time.perf_counter()
            pos_starts = np.repeat(starts, 512)
            offs = np.tile(np.arange(256, 768) if not causal else np.arange(512, 1024), len(starts))
            oracle.beliefs_at(chain, series.X, pos_starts, offs, 1024, causal)
            rows.append({"what": f"belief targets of {len(pos_starts)} positions in {len(starts)} windows of 1024 "
                                 f"({'filtering' if causal else 'smoothing'})",
                         "seconds": time.perf_counter() - t})
    rows[-1]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report("oracle", rows)


if __name__ == "__main__":
    main()
