"""Steering with SAE features and raw directions (one API for ViT / CLIP and diffusion models), and
steerability: how far clamping a feature moves a CLIP's text-space predictions. See docs/steering.md."""

from sae_lens_multimodal.steering.core import MODES, DirectionSteer, FeatureSteer, Steer, steer, steering_hooks

__all__ = ["MODES", "FeatureSteer", "DirectionSteer", "Steer", "steer", "steering_hooks"]
