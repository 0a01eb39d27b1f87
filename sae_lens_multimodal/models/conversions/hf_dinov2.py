"""transformers DINOv2 -> HookedViT: ``Dinov2Model`` (model_type "dinov2") and ``Dinov2WithRegistersModel``
(model_type "dinov2_with_registers").

Mapping (transformers -> HookedViT):

* ``embeddings.patch_embeddings.projection`` (conv with bias) / ``cls_token`` / ``register_tokens`` /
  ``position_embeddings`` -> ``embed``. Token order ``[CLS, registers..., patches...]``; the position
  embedding covers CLS and patches but not the registers, which transformers inserts after adding it
  (``n_pos_prefix_tokens=1``). ``mask_token`` (pre-training only) is not converted.
* Position embeddings are always resized when the patch grid differs from the config's (real checkpoints
  say ``image_size=518``, patch 14, and are run at 224). transformers' ``interpolate_pos_encoding``
  resizes the patch part with ``F.interpolate(mode="bicubic", align_corners=False)`` in float32: without
  antialiasing in ``Dinov2Model`` (``pos_embed_interpolation="bicubic"``), with ``antialias=True`` in
  ``Dinov2WithRegistersModel`` (``"bicubic_antialias"``).
* ``layer_scale1`` / ``layer_scale2`` are folded into ``W_O, b_O`` / ``W_out, b_out``, so ``hook_attn_out``
  / ``hook_mlp_out`` are exactly what is added to the residual stream. SwiGLU FFNs (``use_swiglu_ffn``,
  the giant models) are refused.
* No ``ln_pre``: transformers' ``hidden_states[0]`` is the embedding output including registers
  (``blocks.0.hook_resid_pre``); ``hidden_states[i + 1]`` is ``blocks.{i}.hook_resid_post``, before the
  final ``layernorm``. ``layernorm`` -> ``ln_final``; ``return_type="tokens"`` is ``last_hidden_state``;
  ``hook_pooled`` / ``hook_out`` is ``pooler_output`` (the normalised CLS). ``layer_norm_eps`` is 1e-6.

Loading by name: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` by model_type (the backbone of a
``...ForImageClassification`` checkpoint; its classifier, on CLS + mean patch, is not converted).
Preprocessing is the checkpoint's own image processor, else ``BitImageProcessor`` at the config's image size
with ImageNet mean/std.
"""

from __future__ import annotations

from typing import Any

from sae_lens_multimodal.models.conversions import ConvertResult, UnsupportedModelError
from sae_lens_multimodal.models.conversions._hf_common import (
    HFBlockNames, hf_vit_tower, image_preprocess, load_checkpoint, read_hf_config, register_transformers_family,
)

_BLOCK = HFBlockNames(
    "norm1", "norm2", "attention", "o_proj", "num_attention_heads",
    layer_scale=("layer_scale1.lambda1", "layer_scale2.lambda1"),
)


def load_hf_dinov2(name_or_dir: str, **kwargs: Any) -> Any:
    """The transformers DINOv2 backbone a hub repo id / local directory holds."""
    import transformers

    config = read_hf_config(name_or_dir, **kwargs)
    with_registers = config.get("model_type") == "dinov2_with_registers"
    cls = transformers.Dinov2WithRegistersModel if with_registers else transformers.Dinov2Model
    model, _ = load_checkpoint(cls, name_or_dir, **kwargs)
    return model


def _default_processor(image_size: int) -> Any:
    from transformers import BitImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return BitImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


def convert_hf_dinov2(model: Any) -> ConvertResult:
    where = f"transformers {type(model).__name__}"
    config = model.config
    if getattr(config, "use_swiglu_ffn", False):
        raise UnsupportedModelError(
            f"{where}: SwiGLU feed-forward layers (use_swiglu_ffn=True, e.g. dinov2-giant) are not supported; "
            "HookedViT blocks have a two-layer MLP. Use a DINOv2 model with use_swiglu_ffn=False (small/base/large)."
        )
    emb = model.embeddings
    registers = getattr(emb, "register_tokens", None)
    cfg, sd = hf_vit_tower(
        model,
        hidden_act=config.hidden_act,
        conv=emb.patch_embeddings.projection,
        image_size=emb.patch_embeddings.image_size,
        pos_embed=emb.position_embeddings,
        cls_token=emb.cls_token,
        registers=registers,
        layers=model.encoder.layer,
        names=_BLOCK,
        ln_final=model.layernorm,
        pool_type="cls",
        pos_embed_interpolation="bicubic_antialias" if registers is not None else "bicubic",
    )
    return cfg, sd, image_preprocess(model, lambda: _default_processor(cfg.image_size[0]))


register_transformers_family(
    "hf_dinov2",
    {"dinov2": ("Dinov2Model",), "dinov2_with_registers": ("Dinov2WithRegistersModel",)},
    ("dinov2", "dinov2_with_registers"), convert_hf_dinov2, load_hf_dinov2,
)
