"""terrain on the offline MiniLM: the weight battery (`python -m terrain.weights`), from
loading the model to the figure, with 3 null matrices per statistic. The issue's target is
60 s on 2 cores for the battery and the embedding/activation probes together; the probes
(terrain.embeddings, terrain.layers) are not built yet, so this measures the battery."""
import os
import tempfile
import time

from common import report

from terrain.weights import main as weights


def main():
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        weights(["--out-dir", os.path.join(tmp, "w")])
        s = time.perf_counter() - t
    report("terrain", [{"what": "MiniLM weight battery (load, all statistics with nulls, figure)", "seconds": s,
                        "target_s": 60.0}])


if __name__ == "__main__":
    main()
