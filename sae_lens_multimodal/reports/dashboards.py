"""Per-feature dashboards for vision and diffusion SAEs, written as static HTML (see :mod:`.html`).

Computing and rendering are separate: :func:`vision_feature_dashboards` / :func:`diffusion_feature_dashboards`
(:mod:`.vision_dashboards`, :mod:`.diffusion_dashboards`) return :class:`FeatureDashboard` records
(:mod:`.dashboard_data`) (plain data: images, activations, labels, steering effects,
per-timestep curves), :func:`dashboard_pages` renders them to HTML pages, and
:func:`write_feature_dashboards` does both and writes the directory atomically.

What a dashboard shows
    * top-activating images with a heatmap of the feature's activation per patch (vision), or the
      generated images it is strongest on, with its spatial map at its peak timestep (diffusion);
    * a histogram of its nonzero activations;
    * vision on a HookedCLIP: both text labels of :mod:`sae_lens_multimodal.analysis.labels` (direct-path
      with its validity, causal) with their scores;
    * steering: the feature clamped to ``clamp_multiplier`` times its largest observed activation at every
      token, and the change of zero-shot class probabilities (vision: on held images; diffusion: of the
      images generated with the feature clamped at chosen timesteps, judged by a CLIP);
    * diffusion: the feature's activation per timestep (mean over prompts and a 10-90% band) and
      generations with and without the feature steered.
"""


from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.reports.dashboard_data import FeatureDashboard, SteeringEffect, TopExample
from sae_lens_multimodal.reports.diffusion_dashboards import diffusion_feature_dashboards
from sae_lens_multimodal.reports.html import (
    Page,
    Raw,
    comparison_grid,
    heatmap_overlay,
    histogram_png,
    image_grid,
    image_tag,
    img_tag,
    link,
    paragraph,
    table,
    timestep_curve_png,
    write_site,
)
from sae_lens_multimodal.reports.vision_dashboards import vision_feature_dashboards

__all__ = [
    "render_dashboard",
    "render_index",
    "dashboard_pages",
    "write_dashboards",
    "write_feature_dashboards",
]


def _shared_vmax(top: Sequence[TopExample]) -> Optional[float]:
    """One colour scale for the heatmaps of a feature's top examples: their largest patch value."""
    maps = [float(np.max(t.heatmap)) for t in top if t.heatmap is not None]
    return max(maps) if maps and max(maps) > 0 else None


def _labels_html(lab: Any) -> str:
    if lab is None:
        return ""
    parts = []
    cols = []
    if lab.direct_path is not None:
        v = "n/a" if lab.validity is None or lab.validity != lab.validity else f"{lab.validity:.2f}"
        cols.append((f"direct-path (validity {v})", lab.direct_path))
    if lab.causal is not None:
        cols.append(("causal", lab.causal))
    depth = max(len(c[1]) for c in cols) if cols else 0
    rows = []
    for r in range(depth):
        row: list[Any] = []
        for _, words in cols:
            row += [words[r][0], float(words[r][1])] if r < len(words) else ["", ""]
        rows.append(row)
    header = []
    for name, _ in cols:
        header += [name, "score"]
    parts.append(table(rows, header))
    if lab.agreement is not None:
        parts.append(paragraph(f"Agreement of the two labels (Pearson over the vocabulary): {lab.agreement:.2f}; "
                               f"top-k overlap {lab.top_k_overlap:.2f}.", "note"))
    parts.append(paragraph("Scores: cosine similarity in the joint space after removing the modality gap. "
                           "Validity: the share of the feature's real effect on the embedding that the direct "
                           "path explains; trust the direct-path label only when it is high.", "note"))
    return "".join(parts)


def _steering_html(effects: Sequence[SteeringEffect]) -> str:
    parts = []
    for e in effects:
        parts.append(paragraph(e.description))
        lines = [f"Top zero-shot prediction changed on {100 * e.changed_fraction:.0f}% of the images."]
        if e.toward_label is not None:
            w, b, a = e.toward_label
            lines.append(f"Probability of classes containing the label '{w}': {b:.3f} \u2192 {a:.3f}.")
        parts.append(paragraph(" ".join(lines)))
        n = max(len(e.gained), len(e.lost))
        rows = [[*(e.gained[i] if i < len(e.gained) else ("", float("nan"))),
                 *(e.lost[i] if i < len(e.lost) else ("", float("nan")))] for i in range(n)]
        parts.append(table(rows, ["gained class", "mean \u0394p", "lost class", "mean \u0394p"]))
        if e.examples:
            ex_rows = [[Raw(image_tag(b, 3, alt="image")), pb, pa] for b, pb, a, pa in e.examples]
            parts.append(table(ex_rows, ["image", "zero-shot (clean)", "zero-shot (clamped)"]))
    return "".join(parts)


def _top_html(d: FeatureDashboard) -> str:
    if not d.top:
        return paragraph("No examples.")
    vmax = _shared_vmax(d.top)
    items = [(heatmap_overlay(t.image, t.heatmap, vmax=vmax) if t.heatmap is not None else t.image, t.caption)
             for t in d.top]
    body = image_grid(items, scale=4)
    if vmax is not None:
        body += paragraph(f"Heatmap colour scale: 0 to {vmax:.3g} (the largest patch activation shown).", "note")
    if any(t.heatmap is not None for t in d.top):
        body += paragraph("The same images without the overlay:", "note")
        body += image_grid([(t.image, "") for t in d.top], scale=2)
    return body


def render_dashboard(d: FeatureDashboard, index_href: str = "index.html", extra_nav: Sequence[tuple[str, str]] = ()) -> str:
    """One feature's page."""
    page = Page(
        f"{d.kind.capitalize()} feature {d.feature}",
        subtitle=f"{d.sae_name} at {d.hook_name}" + (f" \u00b7 {d.short_label}" if d.short_label else ""),
        nav=[(index_href, "\u2190 all features"), *extra_nav],
    )
    unit = "images" if d.kind == "vision" else "prompts"
    tok = "tokens" if d.kind == "vision" else "positions x timesteps"
    summary = [
        ["hook", d.hook_name], ["SAE", d.sae_name], [unit, d.n_samples],
        [f"active on ({unit})", f"{100 * d.sample_frequency:.1f}%"], [f"active on ({tok})", f"{100 * d.token_frequency:.2f}%"],
        ["max activation", d.max_activation],
    ]
    if d.curve is not None and d.curve.half_max_timestep is not None:
        summary.append(["mean reaches half its max at timestep", f"{d.curve.half_max_timestep:g}"])
    if d.curve is not None and d.curve.commit_timestep is not None:
        summary.append(["commits at timestep (stays within 10% of its final value)", f"{d.curve.commit_timestep:g}"])
    page.add("Summary", table(summary, ["", "value"]) + "".join(paragraph(n, "note") for n in d.notes), id="summary")
    if d.labels is not None:
        page.add("Text labels", _labels_html(d.labels), id="labels")
    heading = "Top-activating images (patch heatmaps)" if d.kind == "vision" else "Top generations (spatial heatmaps)"
    page.add(heading, _top_html(d), id="top")
    page.add("Activation histogram", img_tag(histogram_png(d.activations, title=f"nonzero activations ({len(d.activations)})"),
                                             alt="activation histogram", css_class="plot"), id="histogram")
    if d.curve is not None:
        c = d.curve
        page.add("Activation per timestep", img_tag(timestep_curve_png(
            c.timesteps, {f"feature {d.feature}": (c.mean, c.low, c.high)},
            title=f"{c.statistic} per prompt: mean and 10-90% band"), alt="per-timestep curve", css_class="plot"),
            id="timesteps")
    if d.generations is not None:
        cols, rows, row_labels = d.generations
        page.add("Steered generations", comparison_grid(rows, cols, row_labels, scale=4), id="generations")
    if d.steering:
        page.add("Steering effect", _steering_html(d.steering), id="steering")
    return page.to_html()


def render_index(dashboards: Sequence[FeatureDashboard], title: str = "Feature dashboards", prefix: str = "",
                 extra_nav: Sequence[tuple[str, str]] = ()) -> str:
    """The index page: one row per feature with its summary and a link to its page."""
    page = Page(title, subtitle=f"{len(dashboards)} features", nav=list(extra_nav))
    for kind in ("vision", "diffusion"):
        ds = [d for d in dashboards if d.kind == kind]
        if not ds:
            continue
        rows = []
        for d in ds:
            steer = ""
            if d.steering:
                e = d.steering[0]
                steer = ", ".join(f"{w} {v:+.2f}" for w, v in e.gained[:2])
            extra = d.short_label if kind == "vision" else (
                f"commits at t={d.curve.commit_timestep:g}" if d.curve is not None and d.curve.commit_timestep is not None else "")
            thumb = Raw(image_tag(heatmap_overlay(d.top[0].image, d.top[0].heatmap) if d.top and d.top[0].heatmap is not None
                                  else (d.top[0].image if d.top else np.zeros((8, 8, 3), np.uint8)), 2, alt="top image"))
            rows.append([link(prefix + d.file_name, f"feature {d.feature}"), thumb, d.hook_name,
                         f"{100 * d.sample_frequency:.1f}%", d.max_activation, extra, steer])
        page.add(f"{kind.capitalize()} features", table(
            rows, ["feature", "top image", "hook", f"active on ({'images' if kind == 'vision' else 'prompts'})",
                   "max act.", "labels" if kind == "vision" else "timing", "steering: most gained classes"]),
            id=f"{kind}-features")
    return page.to_html()


def dashboard_pages(dashboards: Sequence[FeatureDashboard], *, directory: str = "", title: str = "Feature dashboards",
                    extra_nav: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """Relative path -> HTML for the index (``<directory>/index.html``) and one page per feature."""
    if not dashboards:
        raise ValueError("No dashboards to render.")
    names = [d.file_name for d in dashboards]
    if len(set(names)) != len(names):
        raise ValueError("Two dashboards have the same kind and feature id; their pages would collide.")
    base = f"{directory.rstrip('/')}/" if directory else ""
    depth = "../" * base.count("/")
    nav_inner = [(depth + h, t) for h, t in extra_nav]
    files = {base + "index.html": render_index(dashboards, title, extra_nav=nav_inner)}
    for d in dashboards:
        files[base + d.file_name] = render_dashboard(d, "index.html", extra_nav=nav_inner)
    return files


def write_dashboards(dashboards: Sequence[FeatureDashboard], out_dir: Union[str, os.PathLike],
                     title: str = "Feature dashboards") -> os.PathLike:
    """Write the index and feature pages to ``out_dir`` atomically; returns the index page's path."""
    out = write_site(out_dir, dashboard_pages(dashboards, title=title))
    return out / "index.html"


def write_feature_dashboards(model: Any, sae: Any, inputs: Any, out_dir: Union[str, os.PathLike], *,
                             title: Optional[str] = None, **options: Any) -> os.PathLike:
    """Compute and write dashboards; returns the index page's path.

    * vision: ``model`` a HookedCLIP / HookedViT, ``inputs`` images (see :func:`vision_feature_dashboards`);
    * diffusion: ``model`` a HookedDiffusionPipeline, ``inputs`` prompts (see
      :func:`diffusion_feature_dashboards`).

    ``options`` go to the function for that kind.
    """
    # diffusers: the diffusion package imports it; reports load it only for a diffusion model
    from sae_lens_multimodal.diffusion.pipeline import HookedDiffusionPipeline

    if isinstance(model, HookedDiffusionPipeline):
        dashboards = diffusion_feature_dashboards(model, sae, inputs, **options)
    elif has_parts(model, "vision"):
        dashboards = vision_feature_dashboards(model, sae, inputs, **options)
    else:
        raise TypeError(
            f"write_feature_dashboards needs a HookedCLIP, HookedViT or HookedDiffusionPipeline; got {type(model).__name__}."
        )
    return write_dashboards(dashboards, out_dir, title or f"Feature dashboards: {dashboards[0].hook_name}")
