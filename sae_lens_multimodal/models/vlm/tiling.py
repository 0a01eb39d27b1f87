"""LLaVA-NeXT tiling: image crops -> packed image features (crop grid, unpadding, newline tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from sae_lens_multimodal.models.vlm.model import HookedVLM

__all__ = ["encode_images_next"]


def encode_images_next(model: HookedVLM, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor]) -> torch.Tensor:
    """LLaVA-NeXT's image features [n_image_tokens_total, d_text] from crops [n_images, n_crops, C, H, W]
    (or the crops already concatenated) and ``image_sizes`` [n_images, 2]."""
    # optional heavy dependency: transformers' own LLaVA-NeXT packing
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns it next to pixel_values).")
    grid = model.cfg.image_grid_pinpoints
    n_crops = [
        image_size_to_num_patches(image_size=s, grid_pinpoints=grid, patch_size=model.vision.cfg.image_size[0])
        for s in image_sizes
    ]
    if pixel_values.ndim == 5:
        pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_crops)], dim=0)
    elif pixel_values.ndim != 4:
        raise ValueError(f"LLaVA-NeXT pixel_values must have 4 or 5 dimensions, got {tuple(pixel_values.shape)}.")
    feats = model.projector(model.vision_features(pixel_values))
    # transformers' own packing (crop grid, unpadding, newline tokens); it reads only .config from model.
    shim = _ConfigShim(_next_config(model))
    packed, _ = LlavaNextModel.pack_image_features(
        shim, list(torch.split(feats, n_crops, dim=0)), image_sizes,
        vision_feature_select_strategy=model.cfg.vision_feature_select_strategy, image_newline=model.image_newline,
    )
    return torch.cat(packed, dim=0)


class _ConfigShim:
    def __init__(self, config: Any):
        self.config = config


def _next_config(model: HookedVLM) -> Any:
    from transformers import LlavaNextConfig  # optional heavy dependency

    cached = model.__dict__.get("_next_config_obj")
    if cached is None:
        cached = LlavaNextConfig.from_dict(model.cfg.extra["hf_config"])
        model.__dict__["_next_config_obj"] = cached
    return cached
