"""Static HTML reports: building blocks, per-feature dashboards, the shapes-world demo, and a headless
browser check.

Pages are self-contained (pictures inlined as base64 PNG, inline style, no JavaScript, no network) and
open from disk; report directories are written atomically.
"""

from sae_lens_multimodal.reports.dashboard_data import (
    FeatureDashboard,
    SteeringEffect,
    TimestepCurve,
    TopExample,
    ZeroShotProbe,
    clamp_feature_hook,
)
from sae_lens_multimodal.reports.dashboards import dashboard_pages, write_dashboards, write_feature_dashboards
from sae_lens_multimodal.reports.diffusion_dashboards import diffusion_feature_dashboards
from sae_lens_multimodal.reports.vision_dashboards import vision_feature_dashboards
from sae_lens_multimodal.reports.html import (
    Page,
    comparison_grid,
    heatmap_overlay,
    histogram_png,
    image_grid,
    png_data_uri,
    table,
    timestep_curve_png,
    write_site,
)

__all__ = [
    "FeatureDashboard",
    "SteeringEffect",
    "TimestepCurve",
    "TopExample",
    "ZeroShotProbe",
    "clamp_feature_hook",
    "dashboard_pages",
    "diffusion_feature_dashboards",
    "vision_feature_dashboards",
    "write_dashboards",
    "write_feature_dashboards",
    "Page",
    "comparison_grid",
    "heatmap_overlay",
    "histogram_png",
    "image_grid",
    "png_data_uri",
    "table",
    "timestep_curve_png",
    "write_site",
]
