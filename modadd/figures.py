"""Figure and output helpers shared by the modadd stages (headless matplotlib).

A stage writes its numbers, <name>.json, into its --out-dir (a run folder by default) and its
figure, <name>.png, into its --plots-dir (default plots/<name of the out-dir>, cliargs' one rule).
It claims both before any work (`claim`: nothing overwritten without --force) and writes them
atomically when it is done (`emit`), recording them under its key so that a later --force run
removes exactly what it wrote.
"""
from __future__ import annotations

import os

import safeio
from cliargs import default_plots_dir
from plotting import save_figure

save = save_figure  # the stages' figure writer: one for the whole project


def subplots(ncols: int, figsize=(13, 4.2)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=figsize)


def stage_files(out_dir: str, name: str, plots: bool = True, plots_dir: str | None = None) -> list[str]:
    """What emit writes for a stage called name: <name>.json in out_dir and, with plots, <name>.png
    in plots_dir (default: the default --plots-dir of out_dir). A stage claims the full list (plots
    True) whatever its --no-plot, so a rerun without figures leaves no figure of an earlier run behind."""
    figure = os.path.join(plots_dir or default_plots_dir(out_dir), name + ".png")
    return [os.path.join(out_dir, name + ".json")] + ([figure] if plots else [])


def remove_temporaries(paths: list[str]) -> list[str]:
    """What a writer killed while writing one of paths left beside it (safeio.remove_stale_temporaries)."""
    return safeio.remove_stale_temporaries(paths)


def stage_key(name: str) -> str:
    """The key a stage records its outputs under (safeio.Outputs): the command that writes them."""
    return f"python -m modadd.{name}"


def claim(out_dir: str, name: str, key: str, plots_dir: str | None, no_plot: bool,
          force: bool) -> tuple[safeio.Outputs, list[str]]:
    """Before any work: the output folders can be written (one line otherwise), and nothing the
    stage writes (or wrote there before, recorded under its key) exists unless force. Returns the
    claim and the earlier files, which emit removes when the new ones are written."""
    files = stage_files(out_dir, name, True, plots_dir)
    safeio.output_dir(out_dir, "--out-dir", create=False)
    if not no_plot:
        safeio.output_dir(os.path.dirname(files[1]), "--plots-dir", create=False)
    outputs = safeio.Outputs(key, force)
    return outputs, outputs.claim(files, remove=False)


def emit(res: dict, out_dir: str, name: str, table, plot, no_plot: bool = False, plots_dir: str | None = None,
         claimed: tuple[safeio.Outputs, list[str]] | None = None) -> int:
    """The end of every stage's main: print the table, remove the stage's earlier outputs (claimed),
    write <name>.json in out_dir (strict JSON, atomically) and, unless no_plot, <name>.png in
    plots_dir (default: out_dir's default). Returns the exit status 0."""
    print(table(res))
    path, figure = stage_files(out_dir, name, True, plots_dir)
    outputs, earlier = claimed or (safeio.Outputs(stage_key(name), True), [])
    outputs.remove_earlier(earlier)
    remove_temporaries([path, figure])
    os.makedirs(out_dir, exist_ok=True)
    outputs.write_json(path, res, indent=None)
    print(f"wrote {path}")
    if not no_plot:
        os.makedirs(os.path.dirname(figure), exist_ok=True)
        print(f"wrote {plot(res, outputs.target(figure))}")
    return 0
