"""Speed of the circles generator: 200,000 steps (target 0.5 s) and the whole CLI with
--no-umap, data + all figures (target 10 s), on the machine at hand."""
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, best_of, report

from markov_circles_timeseries import CirclesConfig, generate


def main():
    gen = best_of(lambda: generate(CirclesConfig(n_steps=200_000)), repeats=5)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "markov_circles_timeseries.py"), "--n-steps",
                        "200000", "--no-umap", "--out-dir", os.path.join(tmp, "d"), "--plots-dir",
                        os.path.join(tmp, "p")], check=True, stdout=subprocess.DEVNULL)
        cli = time.perf_counter() - t
    report("generator", [
        {"what": "generate 200,000 steps (best of 5)", "seconds": gen, "target_s": 0.5},
        {"what": "CLI --n-steps 200000 --no-umap (data + figures, incl. interpreter start)",
         "seconds": cli, "target_s": 10.0},
    ])


if __name__ == "__main__":
    main()
