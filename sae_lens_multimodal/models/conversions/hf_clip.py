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

from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.conversions import ConvertResult, VisionFamily, register_vision_family
from sae_lens_multimodal.models.conversions._common import _c, linear_to_matrix, ln_state
from sae_lens_multimodal.models.conversions._hf_common import (
    act_fn_name,
    conv_bias,
    image_preprocess,
    is_transformers_class,
    load_checkpoint,
    pre_norm_block_state,
    read_hf_config,
    single_eps,
)

_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")


def _is_hf_clip(obj: Any) -> bool:
    return is_transformers_class(obj, "clip", _CLASSES)


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
    emb, layers = tower.embeddings, tower.encoder.layers
    conv = emb.patch_embedding
    where = f"transformers {type(model).__name__}"
    l0 = layers[0]
    n_heads = l0.self_attn.num_heads
    lns = [tower.pre_layrnorm, tower.post_layernorm] + [ln for l in layers for ln in (l.layer_norm1, l.layer_norm2)]
    cfg = HookedViTConfig(
        n_layers=len(layers),
        d_model=conv.out_channels,
        n_heads=n_heads,
        d_head=l0.self_attn.head_dim,
        d_mlp=l0.mlp.fc1.out_features,
        image_size=emb.image_size,
        patch_size=conv.kernel_size,
        n_channels=conv.in_channels,
        act_fn=act_fn_name(tower.config.hidden_act, where),
        eps=single_eps(lns, where),
        patch_embed_bias=conv.bias is not None,
        has_cls_token=True,
        n_pos_prefix_tokens=1,
        pos_embed_interpolation=None,
        has_ln_pre=True,
        has_ln_final=True,
        pool_type="cls",
        final_ln_after_pool=True,
        head_type="linear" if projection is not None else "none",
        d_out=projection.out_features if projection is not None else None,
        model_name=getattr(model, "name_or_path", "") or type(model).__name__,
        original_architecture=f"transformers.{type(model).__name__}",
        dtype=conv.weight.dtype,
    )
    sd: dict[str, torch.Tensor] = {
        "embed.W_patch": _c(conv.weight),
        "embed.b_patch": conv_bias(conv),
        "embed.cls_token": _c(emb.class_embedding),
        "embed.W_pos": _c(emb.position_embedding.weight),
    }
    sd.update(ln_state("ln_pre.", tower.pre_layrnorm))
    for i, layer in enumerate(layers):
        a = layer.self_attn
        sd.update(pre_norm_block_state(
            f"blocks.{i}.", layer.layer_norm1, layer.layer_norm2,
            a.q_proj, a.k_proj, a.v_proj, a.out_proj, layer.mlp.fc1, layer.mlp.fc2, n_heads,
        ))
    sd.update(ln_state("ln_final.", tower.post_layernorm))
    if projection is not None:
        sd["head.W"], sd["head.b"] = linear_to_matrix(projection.weight, projection.bias)
    return cfg, sd, image_preprocess(model, lambda: _default_processor(cfg.image_size[0]))


register_vision_family(
    VisionFamily(
        name="hf_clip",
        description="transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel (vision tower) "
        "(hub repo id or local dir with model_type 'clip' / 'clip_vision_model')",
        matches=_is_hf_clip,
        convert=convert_hf_clip,
        load=load_hf_clip,
        hf_model_types=("clip", "clip_vision_model"),
    )
)
