"""Speed of Levina-Bickel: 50,000 points in 128-D, k = 10, 30, 100 in one call, with the
bootstrap CIs (target 15 s on 2 CPU cores)."""
import numpy as np
from common import best_of, report

from estimate_dimension import levina_bickel


def main():
    X = np.random.default_rng(0).standard_normal((50_000, 128)).astype(np.float32)
    t = best_of(lambda: levina_bickel(X, [10, 30, 100], n_boot=200), repeats=2)
    report("levina_bickel", [
        {"what": "50,000 x 128-D, k = 10, 30, 100, 200 bootstrap resamples (best of 2)",
         "seconds": t, "target_s": 15.0},
    ])


if __name__ == "__main__":
    main()
