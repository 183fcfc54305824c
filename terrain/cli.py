"""The loop every terrain stage runs: for each --model, compute, print, write JSON and figure.

Outputs: the folders are checked before any work (safeio.output_dir); the files of one stage for
one model are claimed under the key terrain.<stage>:<model tag> (safeio.Outputs), so an earlier
output stops the run without --force, and --force removes exactly that stage's files for that
model (the declared names and what the same key recorded in the folders before), never a glob.
Each file is recorded before it is written and written atomically (JSON strictly: a NaN or
infinity becomes null and is named in "nonfinite"), so a killed run leaves whole files: a rerun
continues where nothing was written, or says which file exists and that --force replaces it.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

import cliargs
import safeio
from terrain.models import DEFAULT_MODEL, DTYPES, TerrainError


def model_tag(name: str | None) -> str:
    """A file-name-safe tag for a model id or path, distinct for distinct names: a name that
    had to be changed (characters replaced, or cut to its last 50) gets 8 hex digits of its hash."""
    import hashlib
    name = name or DEFAULT_MODEL
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    if safe == name and len(safe) <= 60 and safe not in (".", ".."):
        return safe
    return f"{safe[-50:]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


NUMBER_SUFFIXES = (".json", "_stability.csv")  # what a stage writes per model into --out-dir
FIGURE_SUFFIX = ".png"                          # ... and into --plots-dir
OUT_DIR = "runs/terrain"                        # the stages' --out-dir; figures default to plots/terrain
MAX_TEXT_BYTES = 64 * 2 ** 20                   # --sentences-file, --prompts-file


def add_output_flags(p) -> None:
    """--out-dir, --plots-dir, --no-plot and --force: what every terrain stage takes about its outputs."""
    cliargs.add_output_flags(p, OUT_DIR, "where the numbers (JSON/CSV) go")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs for these models (the files it wrote for them, "
                        "nothing else; without it, existing ones stop the run)")


def stage_paths(args, name: str) -> tuple[str, str]:
    """(numbers base in --out-dir, figure path in --plots-dir) of one stage's output called name."""
    return os.path.join(args.out_dir, name), os.path.join(cliargs.plots_dir(args), name + FIGURE_SUFFIX)


def check_output_dirs(args) -> None:
    """One line, before any work, for an --out-dir or --plots-dir that is a file, lies below a
    file or cannot be written (the folders are made when the first file is written)."""
    safeio.output_dir(args.out_dir, "--out-dir", create=False)
    if not getattr(args, "no_plot", False):
        safeio.output_dir(cliargs.plots_dir(args), "--plots-dir", create=False)


class StageOutputs:
    """The files of one stage for one name (a model's tag, or two models' for a projection):
    <prefix>_<tag>.json and _stability.csv in --out-dir, <prefix>_<tag>.png in --plots-dir, claimed
    under the key terrain.<prefix>:<tag>."""

    def __init__(self, args, prefix: str, tag: str):
        self.base, self.figure = stage_paths(args, f"{prefix}_{tag}")
        self.key = f"terrain.{prefix}:{tag}"
        self.outputs = safeio.Outputs(self.key, args.force)
        self.paths = [self.base + s for s in NUMBER_SUFFIXES] + [self.figure]
        self.found: list[str] = []

    def claim(self) -> None:
        """Refuse (OutputsExist, naming --force) when an earlier output exists; with --force the
        earlier ones are removed by replace_earlier, once the new results are computed. Temporary
        files a killed run left beside these outputs are removed once the claim holds."""
        self.found = self.outputs.claim(self.paths, remove=False)
        safeio.remove_stale_temporaries(self.paths)

    def replace_earlier(self) -> None:
        if self.found:
            self.outputs.remove_earlier(self.found)
            self.found = []

    def target(self, path: str) -> str:
        """Record path under the key (before it is written), return it."""
        return self.outputs.target(path)

    def write_json(self, res: dict) -> str:
        return self.outputs.write_json(self.base + ".json", res, indent=None)

    def draw(self, plot: Callable[[dict, str], str], res) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(self.figure)), exist_ok=True)
        return plot(res, self.target(self.figure))


def claim_outputs(args, prefix: str, tags: list[str]) -> list[StageOutputs]:
    """Check the output folders and claim a stage's outputs for each tag (see StageOutputs)."""
    check_output_dirs(args)
    outs = [StageOutputs(args, prefix, t) for t in dict.fromkeys(tags)]
    for o in outs:
        o.claim()
    return outs


def error_line(e: BaseException) -> str | None:
    """The one line for an error that is the user's to fix (a TerrainError, or what safeio.error_line
    knows: bad inputs, unreadable paths, allocations), None for a bug."""
    if isinstance(e, TerrainError):
        return safeio.first_line(e, 2000)
    return safeio.error_line(e)


def not_analysed_line(res: dict) -> str:
    return f"{res.get('model', res.get('source', '?'))}: not analysed: {res['not_analysed']}"


def run_for_models(args, prefix: str, compute: Callable[[str], dict], summarize: Callable[[dict], str],
                   plot: Callable[[dict, str], str], tables: Callable | None = None,
                   comparison: Callable[[list, str], str] | None = None) -> tuple[int, list, list]:
    """For each of args.model: compute, print the summary, write <prefix>_<model>.json into --out-dir
    (tables(res, base, target) -> paths writes more files beside it) and, unless --no-plot or the
    result says it was not analysed, the figure into --plots-dir; with several models,
    comparison(results, path) draws <prefix>_comparison.png. Returns (exit code, results, written
    paths); a bad input stops with one line on stderr (exit code 2). Earlier outputs stop the run
    unless --force, which replaces them once the model's new results are computed."""
    import matplotlib
    matplotlib.use("Agg")
    results, written = [], []
    try:
        tags = {m: model_tag(m) for m in args.model}
        outs = {t: o for t, o in zip(dict.fromkeys(tags.values()), claim_outputs(args, prefix, list(tags.values())))}
        both = None
        if comparison is not None and len(args.model) > 1 and not args.no_plot:
            both = claim_outputs(args, prefix, ["comparison"])[0]
        for model in args.model:
            res = compute(model)
            results.append(res)
            print(not_analysed_line(res) if res.get("not_analysed") else summarize(res))
            out = outs[tags[model]]
            out.replace_earlier()
            written.append(out.write_json(res))
            if tables is not None:
                written += tables(res, out.base, out.target)
            if not args.no_plot and not res.get("not_analysed"):
                written.append(out.draw(plot, res))
        if both is not None:
            both.replace_earlier()
            written.append(both.draw(comparison, results))
    except Exception as e:  # noqa: BLE001 - sorted by error_line: the user's to fix, or a bug (re-raised)
        line = error_line(e)
        if line is None or os.environ.get("SHOW_TRACEBACK"):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2, results, written
    return 0, results, written


def read_lines(path: str, flag: str) -> list[str]:
    """The non-empty lines of a text file a flag names (stripped), or one line when it is missing,
    a folder, too big, not UTF-8 text, holds NUL bytes (a binary file) or no line at all."""
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise TerrainError(f"{flag} {path} is not a regular file (a pipe or a device?); give a text file")
    try:
        raw = safeio.read_bytes(path, flag, MAX_TEXT_BYTES)
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TerrainError(f"{flag} {path} is not UTF-8 text (a binary file?)") from None
    except safeio.InputError as e:
        raise TerrainError(str(e)) from None
    if "\0" in text:
        raise TerrainError(f"{flag} {path} holds NUL bytes: a binary file, not lines of text")
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if not lines:
        raise TerrainError(f"{flag} {path} holds no text (one item per line)")
    return lines


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
