"""The loop every terrain stage runs: for each --model, compute, print, write JSON and figure."""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable

import cliargs
from terrain.models import DEFAULT_MODEL, DTYPES, TerrainError


def model_tag(name: str | None) -> str:
    """A file-name-safe tag for a model id or path, distinct for distinct names: a name that
    had to be changed (characters replaced, or cut to its last 50) gets 8 hex digits of its hash."""
    import hashlib
    name = name or DEFAULT_MODEL
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    if safe == name and len(safe) <= 60:
        return safe
    return f"{safe[-50:]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


NUMBER_SUFFIXES = (".json", "_stability.csv")  # what a stage writes per model into --out-dir
FIGURE_SUFFIX = ".png"                          # ... and into --plots-dir
OUT_DIR = "runs/terrain"                        # the stages' --out-dir; figures default to plots/terrain


def add_output_flags(p) -> None:
    """--out-dir, --plots-dir, --no-plot and --force: what every terrain stage takes about its outputs."""
    cliargs.add_output_flags(p, OUT_DIR, "where the numbers (JSON/CSV) go")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs for these models (without it, existing ones stop the run)")


def stage_paths(args, name: str) -> tuple[str, str]:
    """(numbers base in --out-dir, figure path in --plots-dir) of one stage's output called name."""
    return os.path.join(args.out_dir, name), os.path.join(cliargs.plots_dir(args), name + FIGURE_SUFFIX)


def claim_outputs(args, names: list[str]) -> None:
    """Refuse when a stage's outputs called names exist already (numbers or figures); with --force,
    remove them first (so no stale file survives beside the new ones)."""
    paths = []
    for name in names:
        base, figure = stage_paths(args, name)
        paths += [base + s for s in NUMBER_SUFFIXES] + [figure]
    try:
        cliargs.claim_outputs(paths, args.force)
    except cliargs.OutputsExist as e:
        raise TerrainError(str(e)) from None


def run_for_models(args, prefix: str, compute: Callable[[str], dict], summarize: Callable[[dict], str],
                   plot: Callable[[dict, str], str]) -> tuple[int, list, list]:
    """For each of args.model: compute, print the summary, write <prefix>_<model>.json into --out-dir
    and, unless --no-plot, the figure into --plots-dir. Returns (exit code, results, written paths);
    a TerrainError stops with one line on stderr. Earlier outputs stop the run unless --force."""
    import matplotlib
    matplotlib.use("Agg")
    results, written = [], []
    try:
        names = [f"{prefix}_{model_tag(n)}" for n in dict.fromkeys(args.model)]
        claim_outputs(args, names)
        os.makedirs(args.out_dir, exist_ok=True)
        for model in args.model:
            res = compute(model)
            results.append(res)
            print(summarize(res))
            base, figure = stage_paths(args, f"{prefix}_{model_tag(model)}")
            with open(base + ".json", "w") as f:
                json.dump(res, f)
            written.append(base + ".json")
            if not args.no_plot:
                os.makedirs(os.path.dirname(figure), exist_ok=True)
                written.append(plot(res, figure))
    except TerrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, results, written
    return 0, results, written


def add_device_flag(p) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the linear algebra / forward passes run: auto = cuda when available, else cpu")


def resolve_device(name: str) -> str:
    """cliargs.resolve_device; a missing CUDA device is a TerrainError."""
    try:
        return cliargs.resolve_device(name)
    except ValueError as e:
        raise TerrainError(str(e)) from None


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar on stderr when it is a terminal (tqdm decides), plain iteration otherwise."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None, mininterval=1)


def add_model_flags(p) -> None:
    """--dtype and --device of the stages that run a model's forward pass."""
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype the weights are loaded in (bfloat16 halves the memory of a big model)")
    add_device_flag(p)
