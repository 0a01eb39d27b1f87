"""sae-lens-multimodal: TransformerLens hooks and SAELens SAEs for vision transformers, CLIP,
diffusion models and vision-language models.

Importing this package registers its model classes, SAE architectures and SAE releases with SAELens
and TransformerLens (idempotently, without network access).
"""

from __future__ import annotations

import importlib
from typing import Any

from sae_lens_multimodal._version import __version__
from sae_lens_multimodal.integration import register_with_ecosystem
from sae_lens_multimodal.models import HookedViT, HookedViTConfig
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.models.hooked_text import HookedText, HookedTextConfig

# Heavier subpackages (diffusers, the VLM wrapper, steering, reports) load on first use.
_LAZY = {
    "HookedUNet": "sae_lens_multimodal.diffusion",
    "HookedDiT": "sae_lens_multimodal.diffusion",
    "HookedDiffusionPipeline": "sae_lens_multimodal.diffusion",
    "DiffusionCache": "sae_lens_multimodal.diffusion",
    "current_timestep": "sae_lens_multimodal.core.denoising",
    "current_branch": "sae_lens_multimodal.core.denoising",
    "HookedVLM": "sae_lens_multimodal.models.vlm",
    "load_model": "sae_lens_multimodal.models.loading",
    "list_releases": "sae_lens_multimodal.pretrained",
    "TimestepBucketedSAE": "sae_lens_multimodal.saes",
    "TimestepConditionedSAE": "sae_lens_multimodal.saes",
    "timestep_context": "sae_lens_multimodal.core.denoising",
    "ImageActivationStore": "sae_lens_multimodal.training",
    "DiffusionActivationStore": "sae_lens_multimodal.training",
    "cache_activations": "sae_lens_multimodal.training",
    "train_sae": "sae_lens_multimodal.training",
    "evaluate_sae": "sae_lens_multimodal.training",
    "FeatureSteer": "sae_lens_multimodal.steering",
    "DirectionSteer": "sae_lens_multimodal.steering",
    "steer": "sae_lens_multimodal.steering",
    "steering_hooks": "sae_lens_multimodal.steering",
    "steerability": "sae_lens_multimodal.steering",
    "SteerabilityResult": "sae_lens_multimodal.steering.steerability",
    "write_feature_dashboards": "sae_lens_multimodal.reports",
}

__all__ = [
    "__version__",
    "HookedViT",
    "HookedViTConfig",
    "HookedCLIP",
    "HookedText",
    "HookedTextConfig",
    "register_with_ecosystem",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_lens_multimodal' has no attribute {name!r}")


register_with_ecosystem()
