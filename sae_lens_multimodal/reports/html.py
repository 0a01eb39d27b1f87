"""Building blocks of self-contained static HTML reports.

Every picture is inlined as a base64 PNG ``data:`` URI and the style sheet is inline, so a page needs no
network, no JavaScript and no files beside it (links between pages of one report are relative). Blocks
return HTML strings; :class:`Page` puts sections together and :func:`write_site` writes a whole report
directory atomically (a half-written report never replaces a complete one).

>>> page = Page("Feature 12")
>>> page.add("Top images", image_grid([(img, "act 3.2")], scale=4))
>>> write_site("report", {"index.html": page.to_html()})
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from sae_lens_multimodal.core.atomic import atomic_directory

__all__ = [
    "ImageLike",
    "REPORT_MARKER",
    "Page",
    "to_uint8_image",
    "png_data_uri",
    "figure_data_uri",
    "img_tag",
    "image_tag",
    "heatmap_overlay",
    "image_grid",
    "comparison_grid",
    "histogram_png",
    "timestep_curve_png",
    "table",
    "Raw",
    "link",
    "paragraph",
    "escape",
    "check_output_dir",
    "write_site",
]

ImageLike = Any  # uint8/float numpy [H, W, 3|1] or [H, W], PIL image, torch tensor [3, H, W] in [0, 1]

#: File that marks a directory as written by :func:`write_site` (so it may be replaced by a new report).
REPORT_MARKER = ".sae-lens-mm-report"

escape = html.escape

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1d1d1f;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em} h3{font-size:1.05em;margin:.8em 0 .3em}
.sub{color:#666;margin-top:0} nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f4f4f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin:.4em 0}
figure{margin:0;text-align:center;font-size:.78em;color:#444;width:min-content;min-width:64px}
img{image-rendering:pixelated} figure img{display:block;border:1px solid #ccc} img.plot{image-rendering:auto}
figcaption{overflow-wrap:break-word}
.cmp td{text-align:center;border:none;padding:2px 6px} .cmp th{background:none;border:none;text-align:center}
.plot{max-width:100%} .note{color:#555;font-size:.9em} .warn{color:#a40}
"""


# --------------------------------------------------------------------------------------------- images
def to_uint8_image(image: ImageLike) -> np.ndarray:
    """An image as uint8 [H, W, 3]: numpy (uint8, or float in [0, 1]; HWC or HW), PIL, or a torch tensor
    [3, H, W] / [H, W, 3] with values in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        arr = np.asarray(image.convert("RGB"))
    else:
        if hasattr(image, "detach"):  # torch
            t = image.detach().cpu().float()
            if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
                t = t.permute(1, 2, 0)
            arr = t.numpy()
        else:
            arr = np.asarray(image)
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.number):
                raise TypeError(f"Cannot read an image from an array of dtype {arr.dtype}.")
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"Float images must have values in [0, 1] (got {lo:.3g}..{hi:.3g}); un-normalise model "
                    "inputs first (x * std + mean) or pass uint8 images."
                )
            arr = np.clip(np.round(np.nan_to_num(arr) * 255), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an image [H, W, 3] (or [3, H, W]); got shape {arr.shape}.")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(image: ImageLike, scale: int = 1) -> str:
    """A ``data:image/png;base64,...`` URI of ``image``, upscaled ``scale`` times by pixel repetition."""
    if int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}.")
    arr = to_uint8_image(image)
    if scale > 1:
        arr = np.repeat(np.repeat(arr, int(scale), axis=0), int(scale), axis=1)
    return "data:image/png;base64," + base64.b64encode(_png_bytes(arr)).decode("ascii")


def figure_data_uri(fig: Any, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(src: str, alt: str = "", css_class: str = "", title: Optional[str] = None,
            size: Optional[tuple[int, int]] = None) -> str:
    """An ``<img>`` element for a data URI (``alt`` and ``title`` escaped); ``size`` = (width, height) in
    CSS pixels."""
    attrs = f' class="{escape(css_class)}"' if css_class else ""
    if title:
        attrs += f' title="{escape(title)}"'
    if size is not None:
        attrs += f' width="{int(size[0])}" height="{int(size[1])}"'
    return f'<img src="{src}" alt="{escape(alt)}"{attrs}>'


def image_tag(image: ImageLike, scale: int = 4, alt: str = "", title: Optional[str] = None) -> str:
    """An ``<img>`` of ``image`` stored at its own resolution and shown ``scale`` times larger, with
    sharp pixels (the browser upscales; the page stays small)."""
    arr = to_uint8_image(image)
    return img_tag(png_data_uri(arr), alt=alt, title=title, size=(arr.shape[1] * scale, arr.shape[0] * scale))


def heatmap_overlay(
    image: ImageLike,
    values: Any,
    *,
    vmax: Optional[float] = None,
    alpha: float = 0.65,
    cmap: str = "inferno",
) -> np.ndarray:
    """``image`` with a per-patch heatmap of ``values`` [grid_h, grid_w] blended over it (uint8 [H, W, 3]).

    Each patch is coloured uniformly over the pixels it covers (nearest upsampling: patches stay
    visible as patches), with opacity growing with the value, so patches where the feature is off show
    the image itself. ``vmax`` sets the top of the colour scale (default: the maximum of ``values``), so
    several images can share one scale.
    """
    from matplotlib import colormaps

    img = to_uint8_image(image)
    v = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be a [grid_h, grid_w] map of patch activations; got shape {v.shape}.")
    h, w = img.shape[:2]
    gh, gw = v.shape
    if h % gh or w % gw:
        raise ValueError(f"A {gh}x{gw} patch grid does not tile a {h}x{w} image evenly.")
    top = float(np.nanmax(v)) if vmax is None else float(vmax)
    norm = np.clip(np.nan_to_num(v) / top, 0, 1) if top > 0 else np.zeros_like(v)
    norm = np.repeat(np.repeat(norm, h // gh, axis=0), w // gw, axis=1)
    colour = colormaps[cmap](norm)[..., :3] * 255
    weight = (alpha * np.sqrt(norm))[..., None]  # sqrt: weak activations stay visible
    out = (1 - weight) * img.astype(np.float64) + weight * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _figure(image: ImageLike, caption: str, scale: int, title: Optional[str] = None) -> str:
    return (f"<figure>{image_tag(image, scale, alt=caption, title=title)}"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def image_grid(items: Sequence[Union[ImageLike, tuple[ImageLike, str]]], *, scale: int = 4) -> str:
    """A wrapping grid of images, each an image or an ``(image, caption)`` pair."""
    cells = []
    for item in items:
        image, caption = item if isinstance(item, tuple) else (item, "")
        cells.append(_figure(image, str(caption), scale))
    return f'<div class="grid">{"".join(cells)}</div>'


def comparison_grid(
    rows: Sequence[Sequence[Union[ImageLike, tuple[ImageLike, str]]]],
    column_labels: Sequence[str],
    row_labels: Optional[Sequence[str]] = None,
    *,
    scale: int = 4,
) -> str:
    """A table of images: one row per example, one column per condition (e.g. clean | steered)."""
    head = ("<th></th>" if row_labels is not None else "") + "".join(f"<th>{escape(c)}</th>" for c in column_labels)
    body = []
    for i, row in enumerate(rows):
        if len(row) != len(column_labels):
            raise ValueError(f"Row {i} has {len(row)} images for {len(column_labels)} columns.")
        cells = "".join(
            "<td>" + _figure(*(item if isinstance(item, tuple) else (item, "")), scale=scale) + "</td>" for item in row
        )
        label = f"<th>{escape(row_labels[i])}</th>" if row_labels is not None else ""
        body.append(f"<tr>{label}{cells}</tr>")
    return f'<table class="cmp"><tr>{head}</tr>{"".join(body)}</table>'


# --------------------------------------------------------------------------------------------- plots
def histogram_png(
    values: Any,
    *,
    title: str = "",
    xlabel: str = "activation",
    bins: int = 40,
    log: bool = True,
    size: tuple[float, float] = (4.2, 2.6),
) -> str:
    """A histogram of ``values`` as a PNG data URI (log counts by default)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    v = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    if v.size:
        counts, edges = np.histogram(v, bins=bins)
        ax.stairs(counts, edges, fill=True, color="#4c72b0")
        if log:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no nonzero activations", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title, fontsize=9)
    return figure_data_uri(fig)


def timestep_curve_png(
    timesteps: Sequence[float],
    curves: Mapping[str, tuple[Any, Any, Any]],
    *,
    title: str = "",
    ylabel: str = "feature activation",
    size: tuple[float, float] = (5.0, 2.8),
) -> str:
    """Per-timestep curves as a PNG data URI: ``curves[label] = (mean, low, high)``, each of length T, drawn
    as a line with a shaded band from ``low`` to ``high``. The x axis runs from noise (high t) to image
    (low t), the order in which the sampler visits the timesteps."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = np.asarray(list(timesteps), dtype=np.float64)
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    for label, (mean, low, high) in curves.items():
        m, lo, hi = (np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64) for a in (mean, low, high))
        if not (m.shape == lo.shape == hi.shape == t.shape):
            raise ValueError(f"Curve {label!r}: mean/low/high must each have one value per timestep ({t.shape[0]}).")
        (line,) = ax.plot(t, m, marker="o", markersize=2.5, label=str(label))
        ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if t.size > 1:
        ax.set_xlim(t.max(), t.min())
    ax.set_xlabel("timestep (noise \u2192 image)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if len(curves) > 1:
        ax.legend(fontsize=7, ncol=2)
    return figure_data_uri(fig)


# --------------------------------------------------------------------------------------------- tables
def _cell(value: Any, digits: int) -> str:
    if isinstance(value, Raw):
        return f"<td>{value.html}</td>"
    if isinstance(value, (float, np.floating)):
        text = "n/a" if value != value else f"{value:.{digits}f}"
        return f'<td class="num">{text}</td>'
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape('' if value is None else str(value))}</td>"


@dataclass(frozen=True)
class Raw:
    """Trusted HTML for a table cell (e.g. a link built with escaped parts); everything else is escaped."""

    html: str


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, digits: int = 3) -> str:
    """An HTML table; strings are escaped, floats printed with ``digits`` decimals, :class:`Raw` cells as is."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"Table row {i} has {len(row)} cells for {len(header)} columns.")
        body.append("<tr>" + "".join(_cell(v, digits) for v in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def link(href: str, text: str) -> Raw:
    """A relative link as a table cell."""
    return Raw(f'<a href="{escape(href)}">{escape(text)}</a>')


# --------------------------------------------------------------------------------------------- pages
@dataclass
class Page:
    """An HTML page: a title, an optional subtitle and navigation links, and sections in order."""

    title: str
    subtitle: str = ""
    nav: list[tuple[str, str]] = field(default_factory=list)  # (href, text)
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, heading, body html)

    def add(self, heading: str, body: str, id: Optional[str] = None) -> "Page":
        """Append a section (``body`` is HTML from the blocks of this module); returns the page."""
        sid = id or "s-" + "".join(c if c.isalnum() else "-" for c in heading.lower()).strip("-")
        if any(s[0] == sid for s in self.sections):
            sid = f"{sid}-{len(self.sections)}"
        self.sections.append((sid, heading, body))
        return self

    def to_html(self) -> str:
        nav = ""
        if self.nav:
            nav = "<nav>" + "".join(f'<a href="{escape(h)}">{escape(t)}</a>' for h, t in self.nav) + "</nav>"
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # Pictures are data: URIs and the style is inline; nothing may be fetched from anywhere.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">",
            f"<title>{escape(self.title)}</title><style>{_CSS}</style></head><body>",
            nav,
            f"<h1>{escape(self.title)}</h1>",
            f'<p class="sub">{escape(self.subtitle)}</p>' if self.subtitle else "",
        ]
        for sid, heading, body in self.sections:
            parts.append(f'<section id="{escape(sid)}"><h2>{escape(heading)}</h2>{body}</section>')
        parts.append("</body></html>")
        return "\n".join(p for p in parts if p)


def paragraph(text: str, css_class: str = "") -> str:
    """A paragraph of escaped text."""
    cls = f' class="{escape(css_class)}"' if css_class else ""
    return f"<p{cls}>{escape(text)}</p>"


# --------------------------------------------------------------------------------------------- writing
def check_output_dir(out_dir: Union[str, os.PathLike]) -> Path:
    """The absolute path of ``out_dir`` if a report may be written there (it does not exist, is empty, or
    holds an earlier report); else FileExistsError. Call it before long work that ends in :func:`write_site`."""
    out = Path(out_dir).resolve()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory; choose another output path.")
        if any(out.iterdir()) and not (out / REPORT_MARKER).is_file():
            raise FileExistsError(
                f"{out} exists, is not empty and was not written by sae-lens-mm reports, so it is not "
                "replaced. Choose a new or empty directory."
            )
    return out


def write_site(out_dir: Union[str, os.PathLike], files: Mapping[str, Union[str, bytes]]) -> Path:
    """Write a report directory atomically: every file goes into a temporary sibling directory, which is
    then renamed to ``out_dir``. A previous report at ``out_dir`` is replaced only once the new one is
    complete; a directory that is not a report (no :data:`REPORT_MARKER` file) and is not empty is never
    replaced. ``files`` maps relative paths (``"index.html"``, ``"features/3.html"``) to contents.
    Returns the absolute path of ``out_dir``."""
    out = check_output_dir(out_dir)
    with atomic_directory(out) as tmp:
        root = tmp.resolve()
        for rel, content in files.items():
            path = (tmp / rel).resolve()
            if root not in path.parents:
                raise ValueError(f"Report file path {rel!r} leaves the report directory.")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        (tmp / REPORT_MARKER).write_text("written by sae_lens_multimodal.reports\n", encoding="utf-8")
    return out
