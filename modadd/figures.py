"""Figure and output helpers shared by the modadd stages (headless matplotlib).

A stage writes its numbers, <name>.json, into its --out-dir (a run folder by default) and its
figure, <name>.png, into its --plots-dir (default plots/<name of the out-dir>, cliargs' one rule).
"""
from __future__ import annotations

import json
import os

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


def emit(res: dict, out_dir: str, name: str, table, plot, no_plot: bool = False, plots_dir: str | None = None) -> int:
    """The end of every stage's main: print the table, write <name>.json in out_dir and, unless
    no_plot, <name>.png in plots_dir (default: out_dir's default). Returns the exit status 0."""
    print(table(res))
    path, figure = stage_files(out_dir, name, True, plots_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f)
    print(f"wrote {path}")
    if not no_plot:
        os.makedirs(os.path.dirname(figure), exist_ok=True)
        print(f"wrote {plot(res, figure)}")
    return 0
