"""sae-lens-multimodal: TransformerLens hooks and SAELens SAEs for vision, CLIP, diffusion and VLMs.

Importing this package registers its models and SAE releases with SAELens / TransformerLens
(idempotently, without network access).
"""

from sae_lens_multimodal._version import __version__
from sae_lens_multimodal.models import HookedViT, HookedViTConfig

__all__ = ["__version__", "HookedViT", "HookedViTConfig"]
