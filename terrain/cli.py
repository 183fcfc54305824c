"""The loop every terrain stage runs: for each --model, compute, print, write JSON and figure."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable

from terrain.models import DEFAULT_MODEL, TerrainError


def model_tag(name: str | None) -> str:
    """A file-name-safe tag for a model id or path."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or DEFAULT_MODEL).strip("_")[-60:]


def run_for_models(models: list[str], out_dir: str, prefix: str, compute: Callable[[str], dict],
                   summarize: Callable[[dict], str], plot: Callable[[dict, str], str]) -> tuple[int, list, list]:
    """Returns (exit code, results, written paths); a TerrainError stops with one line on stderr."""
    import matplotlib
    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    results, written = [], []
    try:
        for name in models:
            res = compute(name)
            results.append(res)
            print(summarize(res))
            base = os.path.join(out_dir, f"{prefix}_{model_tag(name)}")
            with open(base + ".json", "w") as f:
                json.dump(res, f)
            written += [base + ".json", plot(res, base + ".png")]
    except TerrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, results, written
    return 0, results, written


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """tight_layout, write, close; returns the path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
