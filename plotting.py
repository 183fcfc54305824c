"""Figure helpers shared by the circles scripts: circle colours and the state strip.

Only numpy at import time; matplotlib is imported when a figure is drawn.
"""
from __future__ import annotations

import numpy as np


def state_colors(n: int):
    import matplotlib.pyplot as plt
    if n <= 10:  # tab10 with its grey swapped out: grey marks masked steps in the figures
        cols = [plt.get_cmap("tab10")(i) for i in range(10)]
        cols[7] = (0.0, 0.0, 0.5, 1.0)
        return cols[:n]
    cmap = plt.get_cmap("hsv")
    return [cmap(i / n) for i in range(n)]


def draw_state_strip(ax, states: np.ndarray, n_states: int, mask: np.ndarray | None = None,
                     extent_x: tuple[float, float] | None = None) -> None:
    """Coloured strip of circle labels; masked steps (if given) drawn grey. n_states 0 (a series
    without labels) leaves the strip empty."""
    from matplotlib.colors import ListedColormap
    if n_states == 0:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
        return
    cols = state_colors(n_states) + [(0.6, 0.6, 0.6, 1.0)]
    s = states.copy()
    if mask is not None:
        s = np.where(mask, n_states, s)
    x0, x1 = extent_x if extent_x else (0, len(states))
    ax.imshow(s[None, :], aspect="auto", cmap=ListedColormap(cols), vmin=-0.5, vmax=n_states + 0.5,
              interpolation="nearest", extent=(x0, x1, 0, 1))
    ax.set_yticks([])


def save_figure(fig, path: str, dpi: int = 120, tight: bool = True, bbox_inches: str | None = None) -> str:
    """The one way every command writes a figure: lay it out, write it atomically (a kill leaves the
    earlier file or none, never half a PNG), close it; returns the path."""
    import os

    import matplotlib.pyplot as plt

    from safeio import atomic_path
    if tight:
        fig.tight_layout()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches, format=fmt)
    finally:
        plt.close(fig)
    return path
