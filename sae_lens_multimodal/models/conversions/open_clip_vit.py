"""open_clip VisionTransformer (CLIP ViTs, incl. QuickGELU variants) -> HookedViT.

Names: ``open-clip:<model>/<pretrained tag>`` (e.g. ``open-clip:ViT-B-32/laion2b_s34b_b79k``),
``open-clip:hf-hub:<org>/<repo>``, ``open-clip:local-dir:<path>``, ``open-clip:<org>/<repo>`` (a hub repo,
as ViT-Prisma writes it) and ``open-clip:<model>`` (random weights, with a warning).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_lens_multimodal.core.files import check_weight_files, require_complete
from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.conversions import (
    ConvertResult,
    UnsupportedModelError,
    VisionFamily,
    register_vision_family,
)
from sae_lens_multimodal.models.conversions._common import _c, ln_state
from sae_lens_multimodal.models.conversions._open_clip_common import check_resblocks, resblocks_state


def _is_open_clip(obj: Any) -> bool:
    return type(obj).__module__.startswith("open_clip") and (
        hasattr(obj, "visual") or type(obj).__name__ == "VisionTransformer"
    )


def load_open_clip(name: str, **kwargs: Any) -> Any:
    """Create the open_clip model a name refers to (the whole CLIP; the vision tower is taken from it).

    A local directory or hub repo whose weights file is missing, truncated or lacks weights is refused
    (open_clip itself only logs a warning and returns a randomly initialised model)."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return _create_checked(name, **kwargs)
    model_name, _, tag = name.partition("/")
    if tag and model_name not in open_clip.list_models():
        return _create_checked(f"hf-hub:{name}", **kwargs)  # "org/repo" without the schema
    if model_name not in open_clip.list_models():
        raise UnsupportedModelError(
            f"Unknown open_clip model {model_name!r}. Use one of open_clip.list_models(), "
            f"'hf-hub:<org>/<repo>' or 'local-dir:<path>'."
        )
    if not tag and "pretrained" not in kwargs:
        warnings.warn(
            f"open-clip:{name} names no pretrained tag, so its weights are random. "
            f"Tags: {open_clip.list_pretrained_tags_by_model(model_name)[:5]}...",
            stacklevel=3,
        )
    kwargs.setdefault("pretrained", tag or None)
    return _strict(lambda: open_clip.create_model(model_name, **kwargs), f"open_clip weights of {name!r}")


def _create_checked(name: str, **kwargs: Any) -> Any:
    """``open_clip.create_model`` for a ``local-dir:`` / ``hf-hub:`` name, once its weights file is known to be
    there and readable."""
    import open_clip

    schema, _, location = name.partition(":")
    if schema == "local-dir":
        directory = Path(location).expanduser()
        what = f"open_clip model directory {directory}"
        if directory.is_dir() and (directory / "open_clip_config.json").is_file():  # else open_clip says what's missing
            check_weight_files(directory, what=what)
    else:
        from open_clip.pretrained import download_pretrained_from_hf

        what = f"open_clip weights of Hugging Face repo {location!r}"
        try:
            weights = download_pretrained_from_hf(location, cache_dir=kwargs.get("cache_dir"))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{what} are neither in the local Hugging Face cache nor downloadable (offline, no network, or the "
                f"repo has no open_clip_model.safetensors / open_clip_pytorch_model.bin), and open_clip would build a "
                f"randomly initialised model instead, so it was refused. Download them once online. ({e})"
            ) from None
        check_weight_files(Path(weights).parent, what=what)
    return _strict(lambda: open_clip.create_model(name, **kwargs), what)


def _strict(create: Callable[[], Any], what: str) -> Any:
    """Run an open_clip constructor; its strict state-dict load failing (missing keys, wrong shapes) becomes an
    error naming the checkpoint."""
    try:
        return create()
    except RuntimeError as e:
        if "Missing key(s)" in str(e) or "size mismatch" in str(e):
            require_complete(re.findall(r'"([^"]+)"', str(e).split("Unexpected key(s)")[0]) or ["(see below)"],
                             what=what, fix=f"Re-download or re-save the checkpoint. open_clip said: {str(e)[:500]}")
        raise


def _preprocess(visual: Any):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(visual, "preprocess_cfg", None) or {"size": visual.image_size}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def convert_open_clip(model: Any) -> ConvertResult:
    from open_clip.transformer import QuickGELU, VisionTransformer

    visual = model.visual if hasattr(model, "visual") else model
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"open_clip vision tower {type(visual).__name__} is not a VisionTransformer "
            "(ResNet and timm towers are not supported; use the timm model directly for timm towers)."
        )
    if visual.attn_pool is not None:
        raise UnsupportedModelError("open_clip attentional pooling (CoCa) is not supported.")
    blocks = visual.transformer.resblocks
    check_resblocks(blocks)
    if not isinstance(visual.patch_dropout, torch.nn.Identity) and visual.training:
        warnings.warn("patch dropout is active in the source model (training mode); HookedViT has none.")
    b0 = blocks[0]
    d_model = visual.conv1.out_channels
    n_heads = b0.attn.num_heads
    has_ln_pre = not isinstance(visual.ln_pre, torch.nn.Identity)
    pool = {"tok": "cls", "avg": "mean", "none": "none"}[visual.pool_type]
    cfg = HookedViTConfig(
        n_layers=len(blocks),
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=b0.mlp.c_fc.out_features,
        image_size=visual.image_size,
        patch_size=visual.patch_size,
        n_channels=visual.conv1.in_channels,
        act_fn="quick_gelu" if isinstance(b0.mlp.gelu, QuickGELU) else "gelu",
        eps=b0.ln_1.eps,
        has_ln_pre=has_ln_pre,
        has_ln_final=True,
        pool_type=pool,
        final_ln_after_pool=bool(visual.final_ln_after_pool) and pool != "none",
        head_type="linear" if visual.proj is not None else "none",
        d_out=visual.proj.shape[1] if visual.proj is not None else None,
        original_architecture="open_clip.VisionTransformer",
        model_name=getattr(model, "name", None) or "open_clip",
        dtype=visual.conv1.weight.dtype,
    )
    sd: dict[str, torch.Tensor] = {
        "embed.W_patch": _c(visual.conv1.weight),
        "embed.b_patch": torch.zeros(d_model, dtype=cfg.dtype),
        "embed.cls_token": _c(visual.class_embedding),
        "embed.W_pos": _c(visual.positional_embedding),
    }
    if has_ln_pre:
        sd.update(ln_state("ln_pre.", visual.ln_pre))
    sd.update(resblocks_state(blocks, n_heads))
    sd.update(ln_state("ln_final.", visual.ln_post))
    if visual.proj is not None:
        sd["head.W"] = _c(visual.proj)
        sd["head.b"] = torch.zeros(visual.proj.shape[1], dtype=cfg.dtype)
    return cfg, sd, _preprocess(visual)


register_vision_family(
    VisionFamily(
        name="open_clip",
        description="open_clip CLIP / VisionTransformer ('open-clip:<model>/<tag>', 'open-clip:hf-hub:<repo>')",
        matches=_is_open_clip,
        convert=convert_open_clip,
        prefix="open-clip:",
        load=load_open_clip,
        layout="open_clip_config.json",
    )
)
