"""Steering with SAE features and raw directions (one API for ViT / CLIP and diffusion models), and
steerability: how far clamping a feature moves a CLIP's text-space probabilities. See docs/steering.md.

>>> from sae_lens_multimodal.steering import FeatureSteer, steer
>>> with steer(model, FeatureSteer(sae, 17, "clamp", value=8.0, positions="patches")):
...     logits = model(images, texts)
"""

from sae_lens_multimodal.steering.core import (
    MODES,
    DirectionSteer,
    FeatureSteer,
    Steer,
    steer,
    steering_hooks,
    token_mask,
)
from sae_lens_multimodal.steering.ground_truth import (
    GroundTruthReport,
    LabelAccuracy,
    factor_text_embeddings,
    label_accuracy,
    shapes_ground_truth,
    shapes_steerability,
)
from sae_lens_multimodal.steering.steerability import BASELINES, SteerabilityResult, steerability

__all__ = [
    "token_mask",
    "MODES",
    "FeatureSteer",
    "DirectionSteer",
    "Steer",
    "steer",
    "steering_hooks",
    "BASELINES",
    "SteerabilityResult",
    "steerability",
    "GroundTruthReport",
    "LabelAccuracy",
    "factor_text_embeddings",
    "label_accuracy",
    "shapes_ground_truth",
    "shapes_steerability",
]
