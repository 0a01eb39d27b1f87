"""timm VisionTransformer (ViT, DeiT, DeiT-III, CLIP/SigLIP/DINOv2 ViTs in timm form) and
VisionTransformerDistilled (DeiT with a distillation token) -> HookedViT.

Names: ``timm:<model name>[.<tag>]`` (e.g. ``timm:vit_base_patch16_224.augreg_in21k``), ``timm:hf-hub:<org>/<repo>``,
``timm:local-dir:<path>`` and ``timm:<org>/<repo>`` (a hub repo). Weights are pretrained unless
``pretrained=False`` is passed. A hub repo or local directory in timm's layout (``config.json`` with an
``"architecture"`` key) is also recognised by its bare id / path.

Supported: class token or none, register tokens, ``no_embed_class``, no position embedding, ``pre_norm``
(``norm_pre`` -> ``ln_pre``), pooling ``token`` / ``avg`` (with or without ``fc_norm``) / ``map`` (attention
pooling over all tokens) / none, ``qkv_bias``, LayerScale (folded into W_O / W_out), ``dynamic_img_size``
(position embeddings resized bicubically with antialiasing, as timm does), any linear head, and the
distilled head (mean of both heads, as timm's inference path). Anything else is refused by name.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sae_lens_multimodal.core.files import IncompleteCheckpointError, check_weight_files, damaged_download_error
from sae_lens_multimodal.core.names import unknown_name_message
from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.conversions import (
    ConvertResult,
    UnsupportedModelError,
    VisionFamily,
    register_vision_family,
)
from sae_lens_multimodal.models.conversions._common import (
    _c,
    block_state,
    fused_qkv_to_heads,
    linear_to_heads_in,
    linear_to_heads_out,
    linear_to_matrix,
    ln_state,
    mlp_state,
)

__all__ = ["load_timm", "convert_timm"]

_TIMM_VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")


def _is_timm_vit(obj: Any) -> bool:
    """Any timm VisionTransformer (subclasses too, so that unsupported ones get a specific error)."""
    return any(
        c.__name__ == "VisionTransformer" and c.__module__ == "timm.models.vision_transformer"
        for c in type(obj).__mro__
    )


def load_timm(name: str, **kwargs: Any) -> Any:
    """``timm.create_model`` for a name (``pretrained=True`` unless given), in eval mode."""
    import timm

    kwargs.setdefault("pretrained", True)
    if not name.startswith(("hf-hub:", "local-dir:")):
        if "/" in name or "\\" in name:
            # timm wants an explicit source for repo ids and paths; pick the one the name denotes.
            name = f"local-dir:{name}" if Path(name).expanduser().is_dir() else f"hf-hub:{name}"
        else:
            arch = name.split(".", 1)[0]  # "<architecture>.<pretrained tag>"
            if not timm.is_model(arch):
                raise UnsupportedModelError(unknown_name_message(
                    "timm architecture", arch, timm.list_models(),
                    see="Use a name from timm.list_models(), 'hf-hub:<org>/<repo>' or 'local-dir:<path>'."))
    from huggingface_hub.errors import LocalEntryNotFoundError

    if name.startswith("local-dir:") and kwargs.get("pretrained") and Path(name[10:]).expanduser().is_dir():
        # timm fails on a damaged file without naming it: check the weights first
        check_weight_files(Path(name[10:]).expanduser(), what=f"timm model directory {name[10:]}")
    try:
        return timm.create_model(name, **kwargs).eval()
    except RuntimeError as e:  # timm loads strictly; name the checkpoint that lacks weights
        if "Missing key(s)" not in str(e) and "size mismatch" not in str(e):
            raise
        raise IncompleteCheckpointError(
            f"timm checkpoint {name!r} does not hold all the model's weights (or holds them in other shapes): "
            f"{str(e)[:500]} Re-download or re-save it, or check the architecture in its config.json."
        ) from None
    except LocalEntryNotFoundError as e:
        raise LocalEntryNotFoundError(
            f"timm weights for {name!r} are neither in the Hugging Face cache nor downloadable (offline, or no "
            f"network). Download them once online, or pass pretrained=False for random weights. ({e})"
        ) from e
    except Exception as e:  # a damaged file of a cached hub repo (safetensors' own error): name the repo
        damaged = damaged_download_error(e, name.removeprefix("hf-hub:"))
        if damaged is None:
            raise
        raise damaged from None


def _act_fn(act: nn.Module) -> str:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(act, nn.GELU):
        return "gelu_new" if act.approximate == "tanh" else "gelu"
    if isinstance(act, GELU):
        return "gelu"
    if isinstance(act, GELUTanh):
        return "gelu_new"
    if isinstance(act, QuickGELU) or type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    raise UnsupportedModelError(
        f"timm MLP activation {type(act).__name__} is not supported (supported: GELU, GELU-tanh, QuickGELU, SiLU, ReLU)."
    )


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


class _Checker:
    """Collects the LayerNorm eps and activation that HookedViT shares across the whole model."""

    def __init__(self) -> None:
        self.eps: Optional[float] = None
        self.act: Optional[str] = None

    def ln(self, m: nn.Module, where: str) -> nn.Module:
        if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
            raise UnsupportedModelError(
                f"timm ViT {where} is {type(m).__name__}; only LayerNorm is supported (not RmsNorm or other norms)."
            )
        if self.eps is None:
            self.eps = float(m.eps)
        elif float(m.eps) != self.eps:
            raise UnsupportedModelError(f"timm ViT {where} has eps={m.eps} but other LayerNorms use {self.eps}.")
        return m

    def mlp(self, mlp: nn.Module, where: str) -> str:
        from timm.layers import Mlp

        if type(mlp) is not Mlp:
            raise UnsupportedModelError(
                f"timm ViT {where} is {type(mlp).__name__}; only the plain two-layer Mlp is supported "
                "(gated MLPs such as SwiGLU / GluMlp are not)."
            )
        if not _is_identity(mlp.norm):
            raise UnsupportedModelError(f"timm ViT {where} has a norm inside the MLP (scale_mlp_norm); not supported.")
        if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            raise UnsupportedModelError(f"timm ViT {where} uses convolutional MLP layers; not supported.")
        act = _act_fn(mlp.act)
        if self.act is None:
            self.act = act
        elif act != self.act:
            raise UnsupportedModelError(f"timm ViT {where} uses activation {act} but other MLPs use {self.act}.")
        return act


def _check_attention(attn: nn.Module, where: str) -> None:
    from timm.layers import Attention

    if type(attn) is not Attention:
        raise UnsupportedModelError(
            f"timm ViT {where} is {type(attn).__name__}; only timm.layers.Attention is supported "
            "(differential / RoPE attention are not)."
        )
    if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
        raise UnsupportedModelError(f"timm ViT {where} uses qk_norm; HookedViT attention has no q/k norm.")
    if not _is_identity(attn.norm):
        raise UnsupportedModelError(f"timm ViT {where} normalises the attention output (scale_attn_norm); not supported.")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"timm ViT {where} uses gated attention; not supported.")
    if abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
        raise UnsupportedModelError(f"timm ViT {where} uses a non-standard attention scale {attn.scale}.")


def _pool_state(pool: nn.Module, n_heads: int, d_model: int, checker: _Checker) -> dict[str, torch.Tensor]:
    """timm AttentionPoolLatent (``global_pool='map'``) -> HookedViT ``attn_pool.*``."""
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModelError(f"timm attention pool {type(pool).__name__} is not supported ('map' only).")
    if pool.latent_len != 1 or pool.pool != "token" or pool.pos_embed is not None:
        raise UnsupportedModelError(
            "timm attention pooling with several latents, latent averaging or its own position embedding is not supported."
        )
    if not (_is_identity(pool.q_norm) and _is_identity(pool.k_norm)):
        raise UnsupportedModelError("timm attention pooling with qk_norm is not supported.")
    if pool.mlp is None or pool.num_heads != n_heads or pool.out_features != d_model:
        raise UnsupportedModelError(
            "timm attention pooling must keep width d_model, use the blocks' head count and have its MLP."
        )
    latent = pool.latent.detach()[0, 0]
    if _is_identity(pool.q):
        q_w, q_b = torch.eye(d_model, dtype=latent.dtype), None
    else:
        q_w, q_b = pool.q.weight, pool.q.bias
    sd: dict[str, torch.Tensor] = {"attn_pool.probe": _c(latent)}
    sd["attn_pool.attn.W_Q"], sd["attn_pool.attn.b_Q"] = linear_to_heads_in(q_w, q_b, n_heads)
    kv_w, kv_b = pool.kv.weight, pool.kv.bias
    for i, name in enumerate("KV"):
        w = kv_w.chunk(2, dim=0)[i]
        b = kv_b.chunk(2, dim=0)[i] if kv_b is not None else None
        sd[f"attn_pool.attn.W_{name}"], sd[f"attn_pool.attn.b_{name}"] = linear_to_heads_in(w, b, n_heads)
    sd["attn_pool.attn.W_O"], sd["attn_pool.attn.b_O"] = linear_to_heads_out(pool.proj.weight, pool.proj.bias, n_heads)
    sd.update(ln_state("attn_pool.ln.", checker.ln(pool.norm, "attention-pool norm")))
    checker.mlp(pool.mlp, "attention-pool MLP")
    sd.update(mlp_state("attn_pool.mlp.", (pool.mlp.fc1.weight, pool.mlp.fc1.bias), (pool.mlp.fc2.weight, pool.mlp.fc2.bias)))
    return sd


def _preprocess(model: nn.Module):
    from timm.data import create_transform, resolve_model_data_config

    data_cfg = dict(resolve_model_data_config(model))
    img_size = tuple(model.patch_embed.img_size)
    if not model.dynamic_img_size and tuple(data_cfg["input_size"][1:]) != img_size:
        # timm falls back to 224 for a model built at another img_size (or without a pretrained_cfg), which this
        # fixed-size model would refuse: resize to the size it was built for, keeping the rest of timm's config.
        data_cfg["input_size"] = (data_cfg["input_size"][0], *img_size)
    return create_transform(**data_cfg, is_training=False)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        return f"timm.{type(model).__name__}"
    return f"timm:{arch}.{tag}" if tag else f"timm:{arch}"


def convert_timm(model: nn.Module) -> ConvertResult:
    """Exact conversion of a timm VisionTransformer / VisionTransformerDistilled."""
    from timm.layers import LayerScale, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise UnsupportedModelError(
            f"timm model class {type(model).__name__} is not supported; supported timm classes: "
            f"{', '.join(_TIMM_VIT_CLASSES)}."
        )
    distilled = isinstance(model, VisionTransformerDistilled)
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        warnings.warn("the timm model is in training mode with dropout; HookedViT reproduces its eval() outputs.")
    checker = _Checker()

    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise UnsupportedModelError(
            f"timm patch embedding {type(pe).__name__} is not supported (hybrid CNN stems are not); only PatchEmbed."
        )
    if not _is_identity(pe.norm):
        raise UnsupportedModelError("timm ViT normalises the patch embeddings (embed_norm_layer); not supported.")
    if getattr(pe, "dynamic_img_pad", False):
        raise UnsupportedModelError("timm ViT with dynamic_img_pad is not supported (pass images sized to the patch grid).")
    proj = pe.proj
    if not (
        isinstance(proj, nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride) == tuple(pe.patch_size)
        and tuple(proj.padding) == (0, 0) and proj.groups == 1 and tuple(proj.dilation) == (1, 1)
    ):
        raise UnsupportedModelError("timm patch embedding is not a plain non-overlapping patch convolution.")
    if pe.img_size is None:
        raise UnsupportedModelError("timm ViT built without a fixed img_size is not supported.")
    if getattr(model, "attn_pool", None) is not None and model.global_pool != "map":
        raise UnsupportedModelError(f"timm pooling {model.global_pool!r} is not supported.")

    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:
            raise UnsupportedModelError(
                f"timm ViT block {i} is {type(blk).__name__}; only the pre-norm Block is supported "
                "(ResPostBlock / parallel blocks are not)."
            )
        _check_attention(blk.attn, f"blocks.{i}.attn")
        for ls in (blk.ls1, blk.ls2):
            if not (_is_identity(ls) or type(ls) is LayerScale):
                raise UnsupportedModelError(f"timm ViT block {i} layer scale {type(ls).__name__} is not supported.")
    b0 = blocks[0]
    d_model, n_heads, d_head = model.embed_dim, b0.attn.num_heads, b0.attn.head_dim
    d_mlp = b0.mlp.fc1.out_features if hasattr(b0.mlp, "fc1") else 0

    # Pooling and the final norm: timm's `norm` acts on tokens before pooling, `fc_norm` on the pooled vector.
    gp = model.global_pool
    has_norm, has_fc_norm = not _is_identity(model.norm), not _is_identity(model.fc_norm)
    if has_norm and has_fc_norm:
        raise UnsupportedModelError("timm ViT with both a final norm and fc_norm is not supported.")
    if distilled:
        pool = "cls_dist"
    elif gp == "token":
        pool = "cls"
    elif gp == "avg":
        if model.pool_include_prefix and model.num_prefix_tokens:
            raise UnsupportedModelError(
                "timm average pooling that includes the class/register tokens (pool_include_prefix) is not supported."
            )
        pool = "mean"
    elif gp == "":
        pool = "none"
    elif gp == "map":
        if model.num_prefix_tokens and not model.pool_include_prefix:
            raise UnsupportedModelError(
                "timm 'map' pooling over patch tokens only (with class/register tokens present) is not supported."
            )
        if has_fc_norm:
            raise UnsupportedModelError("timm 'map' pooling followed by fc_norm is not supported.")
        pool = "attn"
    else:
        raise UnsupportedModelError(
            f"timm global_pool={gp!r} is not supported (supported: 'token', 'avg', 'map', '')."
        )
    final_ln = model.fc_norm if has_fc_norm else model.norm if has_norm else None
    final_ln_after_pool = has_fc_norm and pool != "none"  # fc_norm on unpooled tokens == norm before pooling

    heads = [model.head] + ([model.head_dist] if distilled else [])
    if all(isinstance(h, nn.Linear) for h in heads):
        head_type, d_out = "linear", model.head.out_features
    elif all(_is_identity(h) for h in heads):
        head_type, d_out = "none", None
    else:
        raise UnsupportedModelError(f"timm head {type(model.head).__name__} is not supported (Linear or none).")

    n_prefix = model.num_prefix_tokens
    n_registers = model.num_reg_tokens
    has_pos = model.pos_embed is not None
    n_pos_prefix = 0 if (model.no_embed_class or not has_pos) else n_prefix
    n_patches = pe.num_patches
    if has_pos and model.pos_embed.shape[1] != n_pos_prefix + n_patches:
        raise UnsupportedModelError(
            f"timm pos_embed has {model.pos_embed.shape[1]} positions, expected {n_pos_prefix + n_patches}."
        )

    # Validate norms and MLPs first so eps / act_fn are known.
    has_ln_pre = not _is_identity(model.norm_pre)
    if has_ln_pre:
        checker.ln(model.norm_pre, "norm_pre")
    for i, blk in enumerate(blocks):
        checker.ln(blk.norm1, f"blocks.{i}.norm1")
        checker.ln(blk.norm2, f"blocks.{i}.norm2")
        checker.mlp(blk.mlp, f"blocks.{i}.mlp")
        if blk.mlp.fc1.out_features != d_mlp or blk.attn.num_heads != n_heads or blk.attn.head_dim != d_head:
            raise UnsupportedModelError("timm ViT blocks of different widths are not supported.")
    if final_ln is not None:
        checker.ln(final_ln, "final norm")
    pool_sd = _pool_state(model.attn_pool, n_heads, d_model, checker) if pool == "attn" else {}
    dtype = proj.weight.dtype

    cfg = HookedViTConfig(
        n_layers=len(blocks),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        image_size=tuple(pe.img_size),
        patch_size=tuple(pe.patch_size),
        n_channels=proj.in_channels,
        act_fn=checker.act or "gelu",
        eps=checker.eps if checker.eps is not None else 1e-6,
        patch_embed_bias=proj.bias is not None,
        has_cls_token=model.cls_token is not None,
        has_dist_token=distilled,
        n_registers=n_registers,
        n_pos_prefix_tokens=n_pos_prefix,
        pos_embed_interpolation="bicubic_antialias" if model.dynamic_img_size else None,
        has_ln_pre=has_ln_pre,
        has_ln_final=final_ln is not None,
        pool_type=pool,
        final_ln_after_pool=final_ln_after_pool,
        head_type=head_type,
        d_out=d_out,
        model_name=_model_name(model),
        original_architecture=f"timm.{type(model).__name__}",
        dtype=dtype,
    )

    sd: dict[str, torch.Tensor] = {
        "embed.W_patch": _c(proj.weight),
        "embed.b_patch": _c(proj.bias) if proj.bias is not None else torch.zeros(d_model, dtype=dtype),
        "embed.W_pos": _c(model.pos_embed[0]) if has_pos else torch.zeros(n_patches, d_model, dtype=dtype),
    }
    if model.cls_token is not None:
        sd["embed.cls_token"] = _c(model.cls_token[0, 0])
    if distilled:
        sd["embed.dist_token"] = _c(model.dist_token[0, 0])
    if n_registers:
        sd["embed.registers"] = _c(model.reg_token[0])
    if has_ln_pre:
        sd.update(ln_state("ln_pre.", model.norm_pre))
    for i, blk in enumerate(blocks):
        attn = blk.attn
        sd.update(block_state(
            f"blocks.{i}.", blk.norm1, blk.norm2, fused_qkv_to_heads(attn.qkv.weight, attn.qkv.bias, n_heads),
            attn.proj, blk.mlp.fc1, blk.mlp.fc2, n_heads,
            (getattr(blk.ls1, "gamma", None), getattr(blk.ls2, "gamma", None)),
        ))
    if final_ln is not None:
        sd.update(ln_state("ln_final.", final_ln))
    sd.update(pool_sd)
    if head_type == "linear":
        sd["head.W"], sd["head.b"] = linear_to_matrix(model.head.weight, model.head.bias)
        if distilled:
            sd["head.W_dist"], sd["head.b_dist"] = linear_to_matrix(model.head_dist.weight, model.head_dist.bias)
    return cfg, sd, _preprocess(model)


register_vision_family(
    VisionFamily(
        name="timm",
        description="timm VisionTransformer / DeiT distilled ('timm:<model>[.<tag>]', 'timm:hf-hub:<repo>', "
        "'timm:local-dir:<path>')",
        matches=_is_timm_vit,
        convert=convert_timm,
        prefix="timm:",
        load=load_timm,
        layout="architecture",  # timm's hub/local layout: config.json with an "architecture" key
    )
)
