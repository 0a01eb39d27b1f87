"""sae-lens-multimodal: TransformerLens hooks and SAELens SAEs for vision transformers, CLIP,
diffusion models and vision-language models.

Importing this package registers its model classes, SAE architectures and SAE releases with SAELens
and TransformerLens (idempotently, without network access): at once when SAELens is already imported,
otherwise as soon as it is (see ``integration.register_when_sae_lens_loads``). The package itself imports
neither torch nor SAELens, so that ``sae-lens-mm --help`` starts at once; every name below loads on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from sae_lens_multimodal._version import __version__
from sae_lens_multimodal.integration import register_when_sae_lens_loads, register_with_ecosystem

# Every model, SAE and tool loads on first use (they need torch, and some diffusers or transformers).
_LAZY = {
    "HookedViT": "sae_lens_multimodal.models",
    "HookedViTConfig": "sae_lens_multimodal.models",
    "HookedCLIP": "sae_lens_multimodal.models.hooked_clip",
    "HookedText": "sae_lens_multimodal.models.hooked_text",
    "HookedTextConfig": "sae_lens_multimodal.models.hooked_text",
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

__all__ = ["__version__", "register_with_ecosystem", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # ``sae_lens_multimodal.models.X`` after a bare ``import sae_lens_multimodal`` (the subpackages
        # are no longer imported by the package itself)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sae_lens_multimodal' has no attribute {name!r}")


register_when_sae_lens_loads()
