"""transformers SigLIP vision towers -> HookedViT: ``SiglipVisionModel`` and ``SiglipModel`` (its vision
tower; the text tower is not converted). model_type "siglip" / "siglip_vision_model". (SigLIP 2 is a
different model type and is not handled here.)

Mapping (transformers -> HookedViT):

* ``embeddings.patch_embedding`` (conv with bias) / ``position_embedding`` (patches only) -> ``embed``.
  No CLS token and no ``ln_pre`` (``has_cls_token=False``, ``n_pos_prefix_tokens=0``): tokens are the
  patches in row-major order. transformers' ``hidden_states[0]`` is the embedding output
  (``blocks.0.hook_resid_pre``); ``hidden_states[i + 1]`` is ``blocks.{i}.hook_resid_post``, before
  ``post_layernorm``.
* ``post_layernorm`` (on all tokens) -> ``ln_final``; ``return_type="tokens"`` is ``last_hidden_state``.
* The multihead-attention-pooling head (``head``: a learned ``probe`` attending over all tokens with a
  ``torch.nn.MultiheadAttention``, then ``x + mlp(layernorm(x))``) -> ``attn_pool``
  (``pool_type="attn"``): ``attn_pool.probe``, ``attn_pool.attn`` (W_Q/W_K/W_V from ``in_proj``, W_O from
  ``out_proj``; ``attn_pool.attn.hook_pattern`` [batch, head, 1, pos] is the probe's attention),
  ``attn_pool.ln``, ``attn_pool.mlp``. ``hook_pooled`` / ``hook_out`` is ``pooler_output``
  (``SiglipModel.get_image_features``). Without a head (``vision_use_head=False``) ``pool_type="none"``
  and ``hook_out`` is ``last_hidden_state``.
* Activation ``gelu_pytorch_tanh``; ``layer_norm_eps`` 1e-6.
* Position embeddings: transformers refuses other image sizes unless ``interpolate_pos_encoding=True``; so
  does HookedViT (``pos_embed_interpolation=None``). Set ``model.cfg.pos_embed_interpolation = "bicubic"``
  to reproduce ``interpolate_pos_encoding=True``.

Loading by name: always ``SiglipVisionModel`` (from a ``SiglipModel`` checkpoint only the vision weights are
read; the text tower is never built). Preprocessing is the checkpoint's own image processor, else
``SiglipImageProcessor`` at the config's image size.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_multimodal.models.conversions import ConvertResult, UnsupportedModelError
from sae_lens_multimodal.models.conversions._common import (
    _c,
    fused_qkv_to_heads,
    linear_to_heads_out,
    ln_state,
    mlp_state,
)
from sae_lens_multimodal.models.conversions._hf_common import (
    clip_style_tower_parts, hf_vit_tower, image_preprocess, load_checkpoint, register_transformers_family,
)

_CLASSES = ("SiglipVisionModel", "SiglipModel")


def load_hf_siglip(name_or_dir: str, **kwargs: Any) -> Any:
    """The SigLIP vision tower a hub repo id / local directory holds, as a ``SiglipVisionModel``."""
    import transformers

    model, _ = load_checkpoint(transformers.SiglipVisionModel, name_or_dir, **kwargs)
    return model


def _default_processor(image_size: int) -> Any:
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def _map_head_state(head: Any, n_heads: int) -> dict[str, torch.Tensor]:
    mha = head.attention
    where = "transformers SigLIP attention-pooling head"
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedModelError(f"{where}: only a plain nn.MultiheadAttention (shared q/k/v width, no bias_k/v, "
                                    "no add_zero_attn) is supported.")
    if mha.num_heads != n_heads:
        raise UnsupportedModelError(f"{where}: {mha.num_heads} pooling heads != {n_heads} encoder heads.")
    sd = {"attn_pool.probe": _c(head.probe.reshape(-1))}
    sd.update({f"attn_pool.attn.{k}": v for k, v in fused_qkv_to_heads(mha.in_proj_weight, mha.in_proj_bias, n_heads).items()})
    sd["attn_pool.attn.W_O"], sd["attn_pool.attn.b_O"] = linear_to_heads_out(mha.out_proj.weight, mha.out_proj.bias, n_heads)
    sd.update(ln_state("attn_pool.ln.", head.layernorm))
    sd.update(mlp_state("attn_pool.mlp.", (head.mlp.fc1.weight, head.mlp.fc1.bias), (head.mlp.fc2.weight, head.mlp.fc2.bias)))
    return sd


def convert_hf_siglip(model: Any) -> ConvertResult:
    where = f"transformers {type(model).__name__}"
    tower = model.vision_model if type(model).__name__ == "SiglipModel" else model
    head = tower.head if getattr(tower, "use_head", False) else None
    if head is not None and head.mlp.fc1.out_features != tower.encoder.layers[0].mlp.fc1.out_features:
        raise UnsupportedModelError(f"{where}: the pooling head's MLP width differs from the blocks'.")
    cfg, sd = hf_vit_tower(
        model,
        **clip_style_tower_parts(tower),
        ln_final=tower.post_layernorm,
        head_norms=[head.layernorm] if head is not None else [],
        pool_type="attn" if head is not None else "none",
    )
    if head is not None:
        sd.update(_map_head_state(head, cfg.n_heads))
    return cfg, sd, image_preprocess(model, lambda: _default_processor(cfg.image_size[0]))


register_transformers_family(
    "hf_siglip", {"siglip": _CLASSES}, ("siglip", "siglip_vision_model"), convert_hf_siglip, load_hf_siglip,
    " (vision tower)",
)
