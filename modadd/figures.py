"""Figure helpers shared by the modadd stages (headless matplotlib)."""
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
