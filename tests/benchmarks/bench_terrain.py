"""terrain on the offline MiniLM: the weight battery, the embedding probes and the layer
evolution, each from loading the model to its figure (target: 60 s together on 2 cores)."""
import os
import tempfile
import time

from common import report

from terrain.embeddings import main as embeddings
from terrain.layers import main as layers
from terrain.weights import main as weights


def main():
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("weights", weights), ("embeddings", embeddings), ("layers", layers)):
            t = time.perf_counter()
            fn(["--out-dir", os.path.join(tmp, name)])
            s = time.perf_counter() - t
            total += s
            rows.append({"what": f"terrain.{name} on MiniLM", "seconds": s})
    rows.append({"what": "battery + probes together", "seconds": total, "target_s": 60.0})
    report("terrain", rows)


if __name__ == "__main__":
    main()
