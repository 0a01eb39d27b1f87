"""Analysis helpers that adapt TransformerLens / SAELens analysis code to image models."""

from sae_lens_multimodal.analysis.patching import image_patching_index, patching_shape, tokens_per_image

__all__ = ["image_patching_index", "patching_shape", "tokens_per_image"]
