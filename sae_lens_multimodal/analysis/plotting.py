"""Small matplotlib helpers shared by the analysis results' ``plot(path)`` methods.

Figures are drawn with the non-interactive Agg canvas (no display needed) and written atomically: to a
temporary file in the target directory, then renamed, so a crash never leaves half a PNG behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from sae_lens_multimodal.core.atomic import atomic_save

__all__ = ["blank_figure", "new_figure", "save_figure", "heatmap", "to_numpy"]

PathLike = Union[str, os.PathLike]


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def blank_figure(figsize: tuple[float, float], **kwargs: Any) -> Any:
    """An empty figure on an Agg canvas (independent of pyplot's global state and backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def new_figure(nrows: int = 1, ncols: int = 1, figsize: Optional[tuple[float, float]] = None, **kwargs: Any) -> tuple[Any, Any]:
    """A figure and a [nrows, ncols] array of its axes on an Agg canvas."""
    fig = blank_figure(figsize or (4.0 * ncols, 3.2 * nrows), **kwargs)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, e.g. .png) atomically; returns the path."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"{path} has no suffix; give the figure a name such as 'patching.png'.")
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"), suffix=path.suffix)
    return path


def heatmap(
    ax: Any,
    values: Any,
    *,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    title: str = "",
    cbar_label: str = "",
    symmetric: bool = True,
    cmap: Optional[str] = None,
    annotate: bool = False,
    max_ticks: int = 40,
    fmt: str = "{:.2f}",
) -> Any:
    """Draw a 2-D heatmap on ``ax``. ``symmetric``: a diverging map centred on 0 (patching effects)."""
    data = to_numpy(values)
    if data.ndim != 2:
        raise ValueError(f"A heatmap needs a 2-D array; got shape {data.shape}.")
    finite = data[np.isfinite(data)]
    if symmetric:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        lim = lim or 1.0
        im = ax.imshow(data, cmap=cmap or "RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(data, cmap=cmap or "viridis", aspect="auto", interpolation="nearest")
    for labels, set_ticks, set_labels, n in (
        (row_labels, ax.set_yticks, ax.set_yticklabels, data.shape[0]),
        (col_labels, ax.set_xticks, ax.set_xticklabels, data.shape[1]),
    ):
        if labels is None:
            continue
        step = max(1, int(np.ceil(n / max_ticks)))
        idx = list(range(0, n, step))
        set_ticks(idx)
        set_labels([str(labels[i]) for i in idx], fontsize=7)
    if col_labels is not None and max(len(str(c)) for c in col_labels) > 4:
        for label in ax.get_xticklabels():
            label.set_rotation(60)
            label.set_horizontalalignment("right")
    if annotate and data.size <= 400:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if cbar_label:
        cbar.set_label(cbar_label, fontsize=8)
    return im
