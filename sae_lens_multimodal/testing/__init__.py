"""Tiny randomly initialised models with the real block structure, built offline, for tests and examples."""

from sae_lens_multimodal.testing.vlm import tiny_random_llava

__all__ = ["tiny_random_llava"]
