"""VLMActivationCache: a HookedVLM's activation cache, with per-part views."""

from __future__ import annotations

from transformer_lens.ActivationCache import ActivationCache

from sae_lens_multimodal.models.hooked_vit import ViTActivationCache

__all__ = ["VLMActivationCache"]


class VLMActivationCache(ActivationCache):
    """A TransformerLens ActivationCache over a HookedVLM, keyed by full names (``vision.blocks.0...``).

    ``cache.vision`` is the vision tower's cache with bare HookedViT names (a ``ViTActivationCache``) and
    ``cache.lm`` the language model's with bare TransformerLens names, on which helpers that read
    ``model.cfg`` (``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack``...) work.
    """

    def _part(self, part: str) -> ActivationCache:
        prefix = part + "."
        sub = {k[len(prefix):]: v for k, v in self.cache_dict.items() if k.startswith(prefix)}
        cls = ViTActivationCache if part == "vision" else ActivationCache
        return cls(sub, getattr(self.model, part), has_batch_dim=self.has_batch_dim)

    @property
    def vision(self) -> ActivationCache:
        return self._part("vision")

    @property
    def lm(self) -> ActivationCache:
        return self._part("lm")
