"""Shared plumbing for the transformers families (``hf_clip``, ``hf_vit``, ``hf_dinov2``, ``hf_siglip``):
recognising transformers classes without importing transformers, loading a checkpoint into the class a
family converts (refusing checkpoints that would leave weights randomly initialised), the image
processor a model ships with, and the parts every family shares: the pre-norm encoder block (whose
attribute names a family gives as :class:`HFBlockNames`) and the whole vision tower, config and state
(:func:`hf_vit_tower`, from the few parts and facts that differ per family)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from sae_lens_multimodal.core.files import IncompleteCheckpointError, check_weight_files, damaged_download_error
from sae_lens_multimodal.models.components import ACT_FNS
from sae_lens_multimodal.models.config import HeadType, HookedViTConfig, PoolType
from sae_lens_multimodal.models.conversions import (
    ConvertResult,
    UnsupportedModelError,
    VisionFamily,
    register_vision_family,
)
from sae_lens_multimodal.models.conversions._common import _c, block_state, ln_state, qkv_to_heads

#: from_pretrained keywords that say where files come from; the image processor is read from the same place.
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder", "proxies")
_SOURCE_KWARGS_ATTR = "_sae_lens_mm_hub_kwargs"


def is_transformers_class(obj: Any, module_prefix: str, names: tuple[str, ...]) -> bool:
    """``obj`` is an instance of one of ``names`` defined in ``transformers.models.<module_prefix>``."""
    cls = type(obj)
    return cls.__module__.startswith(f"transformers.models.{module_prefix}.") and cls.__name__ in names


def register_transformers_family(
    name: str,
    classes: dict[str, tuple[str, ...]],
    model_types: tuple[str, ...],
    convert: Callable[[Any], ConvertResult],
    load: Callable[..., Any],
    tower_note: str = "",
) -> VisionFamily:
    """Register a transformers vision family: it converts instances of ``classes`` (``{module under
    transformers.models: class names}``, recognised without importing transformers) and loads hub repos
    and local directories whose config.json says one of ``model_types``. The description lists both
    (``tower_note``, e.g. " (vision tower)", after the class names)."""
    kinds = " / ".join(repr(t) for t in model_types)
    return register_vision_family(
        VisionFamily(
            name=name,
            description=f"transformers {' / '.join(n for ns in classes.values() for n in ns)}{tower_note} "
            f"(hub repo id or local dir with model_type {kinds})",
            matches=lambda obj: any(is_transformers_class(obj, module, ns) for module, ns in classes.items()),
            convert=convert,
            load=load,
            hf_model_types=model_types,
        )
    )


def act_fn_name(hidden_act: Any, where: str) -> str:
    """A transformers ``hidden_act`` as one of our activation names, or a clear refusal."""
    if not isinstance(hidden_act, str) or hidden_act not in ACT_FNS:
        raise UnsupportedModelError(
            f"{where}: activation {hidden_act!r} is not supported; supported: {sorted(ACT_FNS)}."
        )
    return hidden_act


def single_eps(lns: list[torch.nn.Module], where: str) -> float:
    """The one LayerNorm epsilon the model uses (HookedViT has one ``eps`` for all its LayerNorms)."""
    eps = {float(ln.eps) for ln in lns}
    if len(eps) != 1:
        raise UnsupportedModelError(f"{where}: LayerNorms use different epsilons {sorted(eps)}; HookedViT has one.")
    return eps.pop()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading one tower of a dual encoder: the other tower's
    weights are reported as unexpected, which is intended. Missing weights are checked by the caller."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def read_hf_config(name_or_dir: str, **kwargs: Any) -> dict[str, Any]:
    """config.json of a local directory or hub repo, as a dict (no model is built)."""
    from transformers import PretrainedConfig

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    config, _ = PretrainedConfig.get_config_dict(name_or_dir, **hub)
    return config


def load_checkpoint(
    cls: Any,
    name_or_dir: str,
    allowed_missing: Callable[[str], bool] = lambda key: False,
    **kwargs: Any,
) -> tuple[Any, list[str]]:
    """``cls.from_pretrained(name_or_dir, **kwargs)`` in eval mode.

    Returns the model and the missing weight names ``allowed_missing`` accepted (the caller removes the
    module they belong to). Any other missing or shape-mismatched weight is an error: transformers would
    initialise it randomly and the conversion would be exact to a model that does not exist.
    """
    local = Path(name_or_dir).expanduser() / (kwargs.get("subfolder") or "")
    if local.is_dir():  # transformers fails on a damaged file without naming it: check the weights first
        check_weight_files(local, what=f"transformers checkpoint directory {local}")
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(name_or_dir, output_loading_info=True, **kwargs)
    except Exception as e:  # a damaged file of a cached hub repo: say which repo and how to fetch it again
        damaged = damaged_download_error(e, name_or_dir)
        if damaged is None:
            raise
        raise damaged from None
    missing = sorted(info.get("missing_keys", ()))
    bad = [k for k in missing if not allowed_missing(k)]
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if bad or mismatched:
        raise IncompleteCheckpointError(
            f"Loading {name_or_dir!r} as transformers {cls.__name__} leaves weights randomly initialised "
            f"(missing: {bad[:8]}{'...' if len(bad) > 8 else ''}; shape mismatch: {mismatched[:8]}), so it was "
            f"refused. Either the checkpoint's weights file is incomplete (re-download or re-save it) or it does not "
            f"hold this architecture (load the model yourself and pass the object to HookedViT.from_pretrained)."
        )
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    setattr(model, _SOURCE_KWARGS_ATTR, hub)
    return model.eval(), [k for k in missing if allowed_missing(k)]


class HFImagePreprocess:
    """One PIL image -> (C, H, W) float tensor through a transformers image processor (the model's own
    settings), i.e. ``processor(images=img, return_tensors="pt").pixel_values[0]``."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImagePreprocess({type(self.processor).__name__})"


def image_preprocess(model: Any, default_processor: Callable[[], Any]) -> HFImagePreprocess:
    """The processor saved with the model (preprocessor_config.json next to the checkpoint it was loaded
    from: a local directory or the hub cache, read offline when HF_HUB_OFFLINE is set), else
    ``default_processor()`` (the family's processor class at the config's image size)."""
    processor = None
    source = getattr(model, "name_or_path", "") or ""
    if source:
        from transformers import AutoImageProcessor

        hub = getattr(model, _SOURCE_KWARGS_ATTR, {})
        try:
            with _quiet_transformers():
                processor = AutoImageProcessor.from_pretrained(source, **hub)
        except (OSError, ValueError, KeyError):  # no preprocessor_config.json there (or not reachable)
            processor = None
    return HFImagePreprocess(processor if processor is not None else default_processor())


def conv_bias(conv: torch.nn.Conv2d) -> torch.Tensor:
    """The patch embedding's bias (zeros when it has none), as a new tensor."""
    w = conv.weight
    return conv.bias.detach().clone() if conv.bias is not None else w.new_zeros(w.shape[0]).detach()


@dataclass(frozen=True)
class HFBlockNames:
    """Where one pre-norm encoder block of a transformers family keeps its parts. Every transformers
    family here (CLIP, ViT, DINOv2, SigLIP, both towers) has the same block: separate ``q_proj`` /
    ``k_proj`` / ``v_proj`` Linears and a two-layer ``mlp.fc1`` / ``mlp.fc2``; only these names differ."""

    ln1: str
    ln2: str
    attention: str
    out_proj: str
    #: the attention module's head-count attribute
    n_heads: str
    #: dotted paths of the (attention, MLP) layer-scale vectors, for families that have them (DINOv2)
    layer_scale: Optional[tuple[str, str]] = None


#: CLIP and SigLIP, vision and text towers.
CLIP_STYLE_BLOCK = HFBlockNames("layer_norm1", "layer_norm2", "self_attn", "out_proj", "num_heads")


def clip_style_tower_parts(tower: Any) -> dict[str, Any]:
    """The :func:`hf_vit_tower` arguments that CLIP and SigLIP vision towers keep under the same names
    (SigLIP's vision tower is laid out like CLIP's)."""
    emb = tower.embeddings
    return dict(
        hidden_act=tower.config.hidden_act,
        conv=emb.patch_embedding,
        image_size=emb.image_size,
        pos_embed=emb.position_embedding.weight,
        layers=tower.encoder.layers,
        names=CLIP_STYLE_BLOCK,
    )


def hf_blocks_state(layers: Sequence[torch.nn.Module], names: HFBlockNames, n_heads: int) -> dict[str, torch.Tensor]:
    """``blocks.{i}.*`` of every encoder layer, in our TransformerLens layout."""
    sd: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        attn = getattr(layer, names.attention)
        scale = (None, None)
        if names.layer_scale is not None:
            scale = (attrgetter(names.layer_scale[0])(layer), attrgetter(names.layer_scale[1])(layer))
        sd.update(block_state(
            f"blocks.{i}.", getattr(layer, names.ln1), getattr(layer, names.ln2),
            qkv_to_heads(attn.q_proj, attn.k_proj, attn.v_proj, n_heads), getattr(attn, names.out_proj),
            layer.mlp.fc1, layer.mlp.fc2, n_heads, scale,
        ))
    return sd


def hf_vit_tower(
    model: Any,
    *,
    hidden_act: Any,
    conv: torch.nn.Conv2d,
    image_size: Any,
    pos_embed: torch.Tensor,
    layers: Sequence[torch.nn.Module],
    names: HFBlockNames,
    ln_final: torch.nn.Module,
    pool_type: PoolType,
    cls_token: Optional[torch.Tensor] = None,
    registers: Optional[torch.Tensor] = None,
    ln_pre: Optional[torch.nn.Module] = None,
    head_norms: Sequence[torch.nn.Module] = (),
    final_ln_after_pool: bool = False,
    head_type: HeadType = "none",
    d_out: Optional[int] = None,
    pos_embed_interpolation: Optional[Literal["bicubic", "bicubic_antialias"]] = None,
) -> tuple[HookedViTConfig, dict[str, torch.Tensor]]:
    """The HookedViTConfig and the state of a pre-norm transformers vision tower (CLIP, ViT, DINOv2,
    SigLIP): patch embedding, CLS / register tokens, ``ln_pre``, blocks, final LayerNorm. The family
    converts its own pooling head and output head and adds them to the state.

    The keyword arguments are the parts and facts that differ per family; the rest is read from the
    model. Widths, patch grid and dtype come from ``conv`` and the blocks; every LayerNorm (``head_norms``:
    those in the family's head) must share one epsilon. The position embedding covers the CLS token, when
    there is one, and the patches, never registers. ``cls_token``, ``registers`` and ``pos_embed`` may
    carry leading singleton dimensions."""
    where = f"transformers {type(model).__name__}"
    attn = getattr(layers[0], names.attention)
    norms = [ln_final, *head_norms] + ([ln_pre] if ln_pre is not None else [])
    norms += [getattr(layer, n) for layer in layers for n in (names.ln1, names.ln2)]
    d = conv.out_channels
    cfg = HookedViTConfig(
        n_layers=len(layers),
        d_model=d,
        n_heads=getattr(attn, names.n_heads),
        d_head=attn.head_dim,
        d_mlp=layers[0].mlp.fc1.out_features,
        image_size=image_size,
        patch_size=conv.kernel_size,
        n_channels=conv.in_channels,
        act_fn=act_fn_name(hidden_act, where),
        eps=single_eps(norms, where),
        patch_embed_bias=conv.bias is not None,
        has_cls_token=cls_token is not None,
        n_registers=registers.reshape(-1, d).shape[0] if registers is not None else 0,
        n_pos_prefix_tokens=int(cls_token is not None),
        pos_embed_interpolation=pos_embed_interpolation,
        has_ln_pre=ln_pre is not None,
        has_ln_final=True,
        pool_type=pool_type,
        final_ln_after_pool=final_ln_after_pool,
        head_type=head_type,
        d_out=d_out,
        model_name=getattr(model, "name_or_path", "") or type(model).__name__,
        original_architecture=f"transformers.{type(model).__name__}",
        dtype=conv.weight.dtype,
    )
    sd = {"embed.W_patch": _c(conv.weight), "embed.b_patch": conv_bias(conv)}
    if cls_token is not None:
        sd["embed.cls_token"] = _c(cls_token.reshape(d))
    sd["embed.W_pos"] = _c(pos_embed.reshape(-1, d))
    if registers is not None:
        sd["embed.registers"] = _c(registers.reshape(-1, d))
    if ln_pre is not None:
        sd.update(ln_state("ln_pre.", ln_pre))
    sd.update(hf_blocks_state(layers, names, cfg.n_heads))
    sd.update(ln_state("ln_final.", ln_final))
    return cfg, sd
