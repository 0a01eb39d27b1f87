"""transformers ViT -> HookedViT: ``ViTModel`` and ``ViTForImageClassification`` (model_type "vit"; also
DINO v1 and other checkpoints stored as ViTModel).

Mapping (transformers -> HookedViT):

* ``embeddings.patch_embeddings.projection`` (a conv *with* bias: ``patch_embed_bias=True``) /
  ``cls_token`` / ``position_embeddings`` (CLS + patches) -> ``embed``; token order ``[CLS, patches...]``.
  No ``ln_pre``: transformers' ``hidden_states[0]`` is the embedding output (``hook_full_embed`` =
  ``blocks.0.hook_resid_pre``); ``hidden_states[i + 1]`` is ``blocks.{i}.hook_resid_post``, *before* the
  final ``layernorm`` (so ``hidden_states[-1] != last_hidden_state``).
* ``layernorm`` -> ``ln_final`` on all tokens; ``return_type="tokens"`` is ``last_hidden_state``.
* ``ViTModel`` with its pooler (dense + tanh on the normalised CLS) -> ``head_type="linear_tanh"``;
  ``hook_out`` is ``pooler_output``. Without a pooler (``add_pooling_layer=False``, where transformers'
  ``pooler_output`` is None) ``hook_out`` is the normalised CLS token ``last_hidden_state[:, 0]``.
* ``ViTForImageClassification``: ``classifier`` on the normalised CLS -> ``head_type="linear"``;
  ``hook_out`` is ``logits``.
* ``qkv_bias=False`` checkpoints get zero q/k/v biases. ``layer_norm_eps`` is usually 1e-12.
* Position embeddings: transformers refuses other image sizes unless ``interpolate_pos_encoding=True``; so
  does HookedViT (``pos_embed_interpolation=None``). Set ``model.cfg.pos_embed_interpolation = "bicubic"``
  to reproduce ``interpolate_pos_encoding=True``.

Loading by name: the class ``architectures`` names when it is ``ViTForImageClassification``, else
``ViTModel`` (its pooler is dropped when the checkpoint has no pooler weights, instead of being randomly
initialised). Preprocessing is the checkpoint's own image processor, else ``ViTImageProcessor`` at the
config's image size.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_multimodal.models.conversions import ConvertResult, UnsupportedModelError
from sae_lens_multimodal.models.conversions._common import linear_to_matrix
from sae_lens_multimodal.models.conversions._hf_common import (
    HFBlockNames, hf_vit_tower, image_preprocess, load_checkpoint, read_hf_config, register_transformers_family,
)

_CLASSES = ("ViTModel", "ViTForImageClassification")
_BLOCK = HFBlockNames("layernorm_before", "layernorm_after", "attention", "o_proj", "num_attention_heads")


def load_hf_vit(name_or_dir: str, **kwargs: Any) -> Any:
    """The transformers ViT a hub repo id / local directory holds (see module docstring)."""
    import transformers

    config = read_hf_config(name_or_dir, **kwargs)
    if "ViTForImageClassification" in (config.get("architectures") or []):
        model, _ = load_checkpoint(transformers.ViTForImageClassification, name_or_dir, **kwargs)
        return model
    model, missing = load_checkpoint(
        transformers.ViTModel, name_or_dir, allowed_missing=lambda k: k.startswith("pooler."), **kwargs
    )
    if missing:  # checkpoint saved without a pooler: do not convert a randomly initialised one
        model.pooler = None
    return model


def _default_processor(image_size: int) -> Any:
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": image_size, "width": image_size})


def convert_hf_vit(model: Any) -> ConvertResult:
    where = f"transformers {type(model).__name__}"
    if type(model).__name__ == "ViTForImageClassification":
        vit = model.vit
        head = model.classifier if isinstance(model.classifier, torch.nn.Linear) else None
        head_type = "linear" if head is not None else "none"
    else:
        vit = model
        head = vit.pooler.dense if vit.pooler is not None else None
        head_type = "linear_tanh" if head is not None else "none"
        if head is not None and vit.config.pooler_act != "tanh":
            raise UnsupportedModelError(f"{where}: pooler activation {vit.config.pooler_act!r} is not supported (tanh is).")
    emb = vit.embeddings
    cfg, sd = hf_vit_tower(
        model,
        hidden_act=vit.config.hidden_act,
        conv=emb.patch_embeddings.projection,
        image_size=emb.image_size,
        pos_embed=emb.position_embeddings,
        cls_token=emb.cls_token,
        layers=vit.layers,
        names=_BLOCK,
        ln_final=vit.layernorm,
        pool_type="cls",
        head_type=head_type,
        d_out=head.out_features if head is not None else None,
    )
    if head is not None:
        sd["head.W"], sd["head.b"] = linear_to_matrix(head.weight, head.bias)
    return cfg, sd, image_preprocess(model, lambda: _default_processor(cfg.image_size[0]))


register_transformers_family("hf_vit", {"vit": _CLASSES}, ("vit",), convert_hf_vit, load_hf_vit)
