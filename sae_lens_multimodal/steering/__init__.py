"""Steering with SAE features and raw directions (one API for ViT / CLIP and diffusion models), and
steerability: how far clamping a feature moves a CLIP's text-space probabilities. See docs/steering.md.

>>> from sae_lens_multimodal.steering import FeatureSteer, steer
>>> with steer(model, FeatureSteer(sae, 17, "clamp", value=8.0, positions="patches")):
...     logits = model(images, texts)
"""

from sae_lens_multimodal.core.positions import token_mask
from sae_lens_multimodal.steering.core import steer
from sae_lens_multimodal.steering.hooks import steering_hooks
from sae_lens_multimodal.steering.specs import DirectionSteer, FeatureSteer
from sae_lens_multimodal.steering.steerability import steerability

# Result records (SteerabilityResult) and constants (MODES, BASELINES) stay in their modules. The shapes-world
# ground-truth checks (label_accuracy, shapes_steerability, shapes_ground_truth) live with the world:
# sae_lens_multimodal.world.feature_checks.
__all__ = [
    "FeatureSteer",
    "DirectionSteer",
    "steer",
    "steering_hooks",
    "token_mask",
    "steerability",
]
