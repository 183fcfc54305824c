"""The loop every terrain stage runs: for each --model, compute, print, write JSON and figure."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable

from terrain.models import DEFAULT_MODEL, TerrainError


def model_tag(name: str | None) -> str:
    """A file-name-safe tag for a model id or path, distinct for distinct names: a name that
    had to be changed (characters replaced, or cut to its last 50) gets 8 hex digits of its hash."""
    import hashlib
    name = name or DEFAULT_MODEL
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    if safe == name and len(safe) <= 60:
        return safe
    return f"{safe[-50:]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


OUTPUT_SUFFIXES = (".json", ".png", "_stability.csv")  # what a stage writes per model


def add_force_flag(p) -> None:
    """--force and --no-plot: what every terrain stage takes about its outputs."""
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs for these models (without it, existing ones stop the run)")
    p.add_argument("--no-plot", action="store_true", help="write the numbers (JSON/CSV) only, no figures")


def claim_outputs(bases: list[str], force: bool) -> None:
    """Refuse when a stage's outputs for these models exist already; with force, remove them first
    (so no stale file survives beside the new ones)."""
    existing = [b + s for b in bases for s in OUTPUT_SUFFIXES if os.path.exists(b + s)]
    if existing and not force:
        raise TerrainError(f"{existing[0]} exists ({len(existing)} earlier output file(s)); pass --force to "
                           f"replace them or choose another --out-dir")
    for path in existing:
        os.remove(path)


def run_for_models(models: list[str], out_dir: str, prefix: str, compute: Callable[[str], dict],
                   summarize: Callable[[dict], str], plot: Callable[[dict, str], str],
                   force: bool = False, no_plot: bool = False) -> tuple[int, list, list]:
    """Returns (exit code, results, written paths); a TerrainError stops with one line on stderr.
    Earlier outputs of the same stage and models stop the run unless force; no_plot: no figures."""
    import matplotlib
    matplotlib.use("Agg")
    results, written = [], []
    try:
        claim_outputs([os.path.join(out_dir, f"{prefix}_{model_tag(n)}") for n in dict.fromkeys(models)], force)
        os.makedirs(out_dir, exist_ok=True)
        for name in models:
            res = compute(name)
            results.append(res)
            print(summarize(res))
            base = os.path.join(out_dir, f"{prefix}_{model_tag(name)}")
            with open(base + ".json", "w") as f:
                json.dump(res, f)
            written += [base + ".json"] + ([] if no_plot else [plot(res, base + ".png")])
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


def add_device_flag(p) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the linear algebra / forward passes run: auto = cuda when available, else cpu")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is available, else 'cpu'; 'cuda' without one is an error."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TerrainError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return name


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar on stderr when it is a terminal (tqdm decides), plain iteration otherwise."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None, mininterval=1)


def add_model_flags(p) -> None:
    """--dtype and --device of the stages that run a model's forward pass."""
    from terrain.models import DTYPES
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype the weights are loaded in (bfloat16 halves the memory of a big model)")
    add_device_flag(p)
