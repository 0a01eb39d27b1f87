"""sae-lens-multimodal: TransformerLens hooks and SAELens SAEs for vision transformers, CLIP,
diffusion models and vision-language models.

Importing this package registers its model classes, SAE architectures and SAE releases with SAELens
and TransformerLens (idempotently, without network access).
"""

from sae_lens_multimodal._version import __version__
from sae_lens_multimodal.integration import register_with_ecosystem
from sae_lens_multimodal.models import HookedViT, HookedViTConfig

__all__ = ["__version__", "HookedViT", "HookedViTConfig", "register_with_ecosystem"]

register_with_ecosystem()
