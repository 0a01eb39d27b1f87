"""Static HTML reports: building blocks, per-feature dashboards and a headless browser check (the shapes-world
demo that writes a whole report lives with the world: :mod:`sae_lens_multimodal.world.demo`).

Pages are self-contained (pictures inlined as base64 PNG, inline style, no JavaScript, no network) and
open from disk; report directories are written atomically.
"""

from sae_lens_multimodal.reports.dashboard_data import FeatureDashboard, ZeroShotProbe
from sae_lens_multimodal.reports.dashboards import dashboard_pages, write_dashboards, write_feature_dashboards
from sae_lens_multimodal.reports.diffusion_dashboards import diffusion_feature_dashboards
from sae_lens_multimodal.reports.vision_dashboards import vision_feature_dashboards

# The HTML building blocks (Page, table, image_grid, ...) stay in reports.html; the records a dashboard is made
# of (TopExample, SteeringEffect, TimestepCurve) and clamp_feature_hook in reports.dashboard_data.
__all__ = [
    "FeatureDashboard",
    "ZeroShotProbe",
    "dashboard_pages",
    "diffusion_feature_dashboards",
    "vision_feature_dashboards",
    "write_dashboards",
    "write_feature_dashboards",
]
