"""Hooked models: one module per model kind, one registry of source families (``conversions``)."""

from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.hooked_vit import HookedViT, ViTActivationCache

__all__ = ["HookedViT", "HookedViTConfig", "ViTActivationCache"]
