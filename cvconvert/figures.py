"""Matplotlib figures written atomically (headless: the Agg backend), shared by attack and bench."""

from __future__ import annotations

from pathlib import Path

from .modeldir import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: Path | str, dpi: int = 110) -> None:
    """Write fig as PNG via a temporary file and rename (never a half-written image), then close it."""
    plt = pyplot()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
