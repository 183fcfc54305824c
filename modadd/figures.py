"""Figure and output helpers shared by the modadd stages (headless matplotlib)."""
from __future__ import annotations


def subplots(ncols: int, figsize=(13, 4.2)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=figsize)


def save(fig, path: str, dpi: int = 120) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def stage_files(out_dir: str, name: str, plots: bool = True) -> list[str]:
    """What emit writes for a stage called name: <name>.json and, with plots, <name>.png in
    out_dir. A stage claims the full list (plots True) whatever its --no-plot, so a rerun
    without figures leaves no figure of an earlier run behind."""
    import os
    return [os.path.join(out_dir, name + ext) for ext in (".json", ".png") if plots or ext == ".json"]


def emit(res: dict, out_dir: str, name: str, table, plot, no_plot: bool = False) -> int:
    """The end of every stage's main: print the table, write <name>.json and, unless
    no_plot, <name>.png in out_dir. Returns the exit status 0."""
    import json
    import os
    print(table(res))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w") as f:
        json.dump(res, f)
    print(f"wrote {path}")
    if not no_plot:
        print(f"wrote {plot(res, os.path.join(out_dir, name + '.png'))}")
    return 0
