"""transformers CLIP vision towers -> HookedViT: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and
``CLIPModel`` (its vision tower and ``visual_projection``; the text tower is not converted).

Mapping (transformers -> HookedViT):

* ``embeddings.patch_embedding`` (no bias) / ``class_embedding`` / ``position_embedding`` (CLS + patches)
  -> ``embed``; token order ``[CLS, patches...]``.
* ``pre_layrnorm`` -> ``ln_pre`` (``has_ln_pre``). transformers' ``hidden_states[0]`` is ``pre_layrnorm``'s
  output, i.e. our ``blocks.0.hook_resid_pre``; ``hidden_states[i + 1]`` is ``blocks.{i}.hook_resid_post``.
* ``post_layernorm`` -> ``ln_final`` with ``final_ln_after_pool=True``: transformers normalises only the
  pooled CLS token, so ``ln_final.hook_normalized`` is [batch, d_model] and ``hook_pooled`` is
  ``pooler_output``. ``last_hidden_state`` is *not* normalised, and neither is ``return_type="tokens"``:
  it returns the last block's residual output, which equals ``last_hidden_state``.
* ``visual_projection`` (no bias) -> ``head`` (``head_type="linear"``): ``hook_out`` is ``image_embeds``
  (``CLIPVisionModelWithProjection``) / ``get_image_features`` (``CLIPModel``), before CLIP's L2
  normalisation. For ``CLIPVisionModel`` there is no head and ``hook_out`` is ``pooler_output``.
* Position embeddings: transformers refuses other image sizes unless ``interpolate_pos_encoding=True``; so
  does HookedViT (``pos_embed_interpolation=None``). Set ``model.cfg.pos_embed_interpolation = "bicubic"``
  to reproduce ``interpolate_pos_encoding=True``.

Loading by name (hub repo id or local directory with ``model_type`` "clip" or "clip_vision_model"): a
``CLIPModel`` checkpoint is loaded as ``CLIPVisionModelWithProjection`` (same vision weights and projection;
the text tower is never built), a vision-only checkpoint as ``CLIPVisionModelWithProjection`` when its
``architectures`` says so, else as ``CLIPVisionModel``.
Preprocessing is the checkpoint's own image processor (preprocessor_config.json), else
``CLIPImageProcessor`` at the config's image size.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sae_lens_multimodal.models.conversions import ConvertResult
from sae_lens_multimodal.models.conversions._common import linear_to_matrix
from sae_lens_multimodal.models.conversions._hf_common import (
    clip_style_tower_parts, hf_vit_tower, image_preprocess, load_checkpoint, read_hf_config,
    register_transformers_family,
)

_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")


def load_hf_clip(name_or_dir: str, **kwargs: Any) -> Any:
    """The transformers CLIP vision model a hub repo id / local directory holds (see module docstring)."""
    import transformers

    config = read_hf_config(name_or_dir, **kwargs)
    archs = config.get("architectures") or []
    if config.get("model_type") == "clip_vision_model" and "CLIPVisionModelWithProjection" not in archs:
        cls = transformers.CLIPVisionModel
    else:  # CLIPModel / CLIPVisionModelWithProjection checkpoints: vision tower + projection
        cls = transformers.CLIPVisionModelWithProjection
    model, _ = load_checkpoint(cls, name_or_dir, **kwargs)
    return model


def _tower_and_projection(model: Any) -> tuple[Any, Optional[torch.nn.Linear]]:
    if type(model).__name__ == "CLIPVisionModel":
        return model, None
    return model.vision_model, model.visual_projection


def _default_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def convert_hf_clip(model: Any) -> ConvertResult:
    tower, projection = _tower_and_projection(model)
    cfg, sd = hf_vit_tower(
        model,
        **clip_style_tower_parts(tower),
        cls_token=tower.embeddings.class_embedding,
        ln_pre=tower.pre_layrnorm,
        ln_final=tower.post_layernorm,
        pool_type="cls",
        final_ln_after_pool=True,
        head_type="linear" if projection is not None else "none",
        d_out=projection.out_features if projection is not None else None,
    )
    if projection is not None:
        sd["head.W"], sd["head.b"] = linear_to_matrix(projection.weight, projection.bias)
    return cfg, sd, image_preprocess(model, lambda: _default_processor(cfg.image_size[0]))


register_transformers_family(
    "hf_clip", {"clip": _CLASSES}, ("clip", "clip_vision_model"), convert_hf_clip, load_hf_clip, " (vision tower)"
)
