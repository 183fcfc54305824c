"""evaluate_representations.py at published scale on the CPU: 200,000 steps through the
seed's 7-layer model (seq 1024), all 9 layers, Levina-Bickel on 5,000 points per layer and
the clustering/probe metrics, without UMAP (target 3 minutes on 2 cores). The weights are
random (the cost does not depend on them)."""
import os
import tempfile
import time

import torch
from common import report

import evaluate_representations
import markov_circles_timeseries
from masked_model_gpu import MODEL_TYPE, MaskedTransformer, ModelConfig
from training import save_checkpoint


def main():
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        markov_circles_timeseries.main(["--n-steps", "200000", "--out-dir", data, "--no-plot"])
        cfg = ModelConfig(n_layers=7)
        model = MaskedTransformer(cfg)
        from dataclasses import asdict
        ck = os.path.join(tmp, "run", "best.pt")
        save_checkpoint(ck, {"model_type": MODEL_TYPE, "model_config": asdict(cfg), "model": model.state_dict(),
                             "data": {"data_dir": data, "seq_len": 1024}, "epoch": 0})
        t = time.perf_counter()
        evaluate_representations.main(["--checkpoint", ck, "--no-umap", "--device", "cpu",
                                       "--out-dir", os.path.join(tmp, "o"), "--plots-dir", os.path.join(tmp, "p")])
        seconds = time.perf_counter() - t
    report("evaluate_representations", [{
        "what": "200k steps, 7-layer seq-1024 model, 9 layers, LB 5,000 points, k-means/silhouette/probes, no UMAP",
        "seconds": seconds, "target_s": 180.0, "threads": torch.get_num_threads()}])


if __name__ == "__main__":
    main()
