"""TransformerLens-style hooks in diffusers denoisers and a per-timestep caching/intervening pipeline.

Public names: :class:`HookedUNet`, :class:`HookedDiT`, :class:`HookedDiffusionPipeline`,
:class:`DiffusionCache`, and the denoising-state accessors :func:`current_timestep`,
:func:`current_branch`, :func:`current_denoising_state` (defined in :mod:`sae_lens_multimodal.core.denoising`).
Hook names: docs/hooks-diffusion.md.
"""

from sae_lens_multimodal.core.denoising import (  # re-exported: the diffusion-facing names
    DenoisingState,
    current_branch,
    current_denoising_state,
    current_timestep,
)
from sae_lens_multimodal.diffusion.cache import DiffusionCache
from sae_lens_multimodal.diffusion.hooked import HookedDiT, HookedUNet
from sae_lens_multimodal.diffusion.pipeline import DenoisingLoop, HookedDiffusionPipeline
from sae_lens_multimodal.diffusion.pipeline_classes import register_pipeline_class

__all__ = [
    "HookedUNet",
    "HookedDiT",
    "HookedDiffusionPipeline",
    "DiffusionCache",
    "DenoisingLoop",
    "DenoisingState",
    "current_timestep",
    "current_branch",
    "current_denoising_state",
    "register_pipeline_class",
]
