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

import torch

from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.conversions import (
    ConvertResult,
    UnsupportedModelError,
    VisionFamily,
    register_vision_family,
)
from sae_lens_multimodal.models.conversions._common import _c, fold_layer_scale, ln_state
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


def _is_hf_dinov2(obj: Any) -> bool:
    return is_transformers_class(obj, "dinov2", ("Dinov2Model",)) or is_transformers_class(
        obj, "dinov2_with_registers", ("Dinov2WithRegistersModel",)
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
    emb, layers = model.embeddings, model.encoder.layer
    conv = emb.patch_embeddings.projection
    registers = getattr(emb, "register_tokens", None)
    with_registers = registers is not None
    l0 = layers[0]
    n_heads = l0.attention.num_attention_heads
    lns = [model.layernorm] + [ln for l in layers for ln in (l.norm1, l.norm2)]
    cfg = HookedViTConfig(
        n_layers=len(layers),
        d_model=conv.out_channels,
        n_heads=n_heads,
        d_head=l0.attention.head_dim,
        d_mlp=l0.mlp.fc1.out_features,
        image_size=emb.patch_embeddings.image_size,
        patch_size=conv.kernel_size,
        n_channels=conv.in_channels,
        act_fn=act_fn_name(config.hidden_act, where),
        eps=single_eps(lns, where),
        patch_embed_bias=conv.bias is not None,
        has_cls_token=True,
        n_registers=registers.shape[1] if with_registers else 0,
        n_pos_prefix_tokens=1,
        pos_embed_interpolation="bicubic_antialias" if with_registers else "bicubic",
        has_ln_pre=False,
        has_ln_final=True,
        pool_type="cls",
        head_type="none",
        model_name=getattr(model, "name_or_path", "") or type(model).__name__,
        original_architecture=f"transformers.{type(model).__name__}",
        dtype=conv.weight.dtype,
    )
    d = cfg.d_model
    sd: dict[str, torch.Tensor] = {
        "embed.W_patch": _c(conv.weight),
        "embed.b_patch": conv_bias(conv),
        "embed.cls_token": _c(emb.cls_token.reshape(d)),
        "embed.W_pos": _c(emb.position_embeddings.reshape(-1, d)),
    }
    if with_registers:
        sd["embed.registers"] = _c(registers.reshape(-1, d))
    for i, layer in enumerate(layers):
        p = f"blocks.{i}."
        a = layer.attention
        sd.update(pre_norm_block_state(
            p, layer.norm1, layer.norm2, a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.fc1, layer.mlp.fc2, n_heads
        ))
        fold_layer_scale(sd, p + "attn.W_O", p + "attn.b_O", layer.layer_scale1.lambda1)
        fold_layer_scale(sd, p + "mlp.W_out", p + "mlp.b_out", layer.layer_scale2.lambda1)
    sd.update(ln_state("ln_final.", model.layernorm))
    return cfg, sd, image_preprocess(model, lambda: _default_processor(cfg.image_size[0]))


register_vision_family(
    VisionFamily(
        name="hf_dinov2",
        description="transformers Dinov2Model / Dinov2WithRegistersModel "
        "(hub repo id or local dir with model_type 'dinov2' / 'dinov2_with_registers')",
        matches=_is_hf_dinov2,
        convert=convert_hf_dinov2,
        load=load_hf_dinov2,
        hf_model_types=("dinov2", "dinov2_with_registers"),
    )
)
