"""Steering with SAE features and raw directions (one API for ViT / CLIP and diffusion models), and
steerability: how far clamping a feature moves a CLIP's text-space probabilities. See docs/steering.md.

>>> from sae_lens_multimodal.steering import FeatureSteer, steer
>>> with steer(model, FeatureSteer(sae, 17, "clamp", value=8.0, positions="patches")):
...     logits = model(images, texts)
"""

from sae_lens_multimodal.core.positions import token_mask
from sae_lens_multimodal.steering.core import steer
from sae_lens_multimodal.steering.ground_truth import (
    factor_text_embeddings,
    label_accuracy,
    shapes_ground_truth,
    shapes_steerability,
)
from sae_lens_multimodal.steering.hooks import steering_hooks
from sae_lens_multimodal.steering.specs import DirectionSteer, FeatureSteer
from sae_lens_multimodal.steering.steerability import steerability

# Result records (SteerabilityResult, LabelAccuracy, GroundTruthReport) and constants (MODES, BASELINES) stay
# in their modules.
__all__ = [
    "FeatureSteer",
    "DirectionSteer",
    "steer",
    "steering_hooks",
    "token_mask",
    "steerability",
    "factor_text_embeddings",
    "label_accuracy",
    "shapes_ground_truth",
    "shapes_steerability",
]
