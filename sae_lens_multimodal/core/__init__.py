from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule, is_observed

__all__ = ["MultimodalHookedRootModule", "is_observed"]
