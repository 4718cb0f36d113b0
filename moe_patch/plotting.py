"""matplotlib, optional, for the PNGs moe-patch writes (routing heatmaps, offload utilisation).

One place that imports it (a one-line error naming the install when it is missing) and one that writes
a figure (atomically, like every output: a full disk or a kill leaves no half-written image).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .atomic import make_parent, write_bytes
from .errors import MoEPatchError


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display), or a one-line error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MoEPatchError("plotting needs matplotlib: pip install matplotlib") from exc
    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` to PNG and write it to ``path`` atomically; the figure is closed either way."""
    plt = pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    path = Path(path)
    make_parent(path)
    write_bytes(path, buffer.getvalue())
    return path
