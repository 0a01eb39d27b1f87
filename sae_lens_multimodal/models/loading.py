"""One loader for every hooked model kind: :func:`load_model` takes a name and returns the hooked model.

>>> load_model("shapes-clip")                              # HookedCLIP (a registered name says its kind)
>>> load_model("open-clip:ViT-B-32/laion2b_s34b_b79k")     # HookedCLIP
>>> load_model("timm:vit_small_patch16_224")               # HookedViT
>>> load_model("path/to/llava-1.5-7b-hf")                  # HookedVLM (config.json model_type llava)
>>> load_model("shapes-diffusion")                         # HookedDiffusionPipeline (model_index.json)
>>> load_model("open-clip:ViT-B-32/laion2b_s34b_b79k", kind="vision")   # only its vision tower, a HookedViT

The kinds are :data:`~sae_lens_multimodal.core.sae_metadata.MODEL_KINDS`: ``"vision"`` (a vision
transformer alone, :class:`HookedViT`), ``"clip"`` (image and text towers, :class:`HookedCLIP`), ``"vlm"``
(:class:`HookedVLM`) and ``"diffusion"`` (:class:`HookedDiffusionPipeline`); ``"vit"`` is the old spelling of
``"vision"``. :func:`detect_model_kind` tells the kind from the name alone, reading only small JSON files
(registered names carry their kind; ``open-clip:`` names are CLIPs and ``timm:`` names vision models; a
local directory or a cached hub repo is read: ``model_index.json`` is a diffusers pipeline, the
``model_type`` of ``config.json`` tells a CLIP / SigLIP, a LLaVA or another vision model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from sae_lens_multimodal.core.names import unknown_name_message
from sae_lens_multimodal.core.sae_metadata import MODEL_KINDS, normalize_model_kind, record_model_names
from sae_lens_multimodal.diffusion.pipeline import HookedDiffusionPipeline
from sae_lens_multimodal.models.conversions import UnsupportedModelError, _hub_json, _read_json
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.models.hooked_vit import HookedViT
from sae_lens_multimodal.models.registry import (
    MODEL_REGISTRY,
    UnknownModelError,
    list_models,
    load_model_providers,
    model_name_aliases,
    resolve_model_name,
)
from sae_lens_multimodal.models.vlm import HookedVLM

__all__ = ["load_model", "detect_model_kind", "model_kind_of"]

#: name prefix of a library -> the kind every model it loads is (open_clip builds CLIPs; timm vision models)
_PREFIX_KINDS = {"open-clip:": "clip", "timm:": "vision"}
#: transformers ``model_type`` values that are not a vision tower alone
_MODEL_TYPE_KINDS = {"clip": "clip", "siglip": "clip", "llava": "vlm", "llava_next": "vlm"}
#: file endings of a single weights file, which is never a loadable model name on its own
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _kind_from_files(get_json: Callable[[str], Optional[dict]]) -> Optional[str]:
    if get_json("model_index.json") is not None:
        return "diffusion"
    config = get_json("config.json") or {}
    model_type = config.get("model_type")
    if model_type:
        return _MODEL_TYPE_KINDS.get(model_type, "vision")
    if get_json("open_clip_config.json") is not None:
        return "clip"
    return None


def detect_model_kind(name: Union[str, os.PathLike]) -> Optional[str]:
    """The kind (one of MODEL_KINDS) ``name`` loads as, or None when the name gives no clue (e.g. a hub
    repo that is neither in the local cache nor reachable). A path to a directory that does not exist, or
    to a single weights file, raises FileNotFoundError."""
    name = str(name)
    load_model_providers(name)
    entry = MODEL_REGISTRY.get(name)
    if entry is not None and entry.kind:
        return normalize_model_kind(entry.kind, source=f"the registry entry of {name!r}")
    source = resolve_model_name(name)
    for prefix, kind in _PREFIX_KINDS.items():
        if source.startswith(prefix):
            return kind
    path = Path(source).expanduser()
    if path.is_dir():
        return _kind_from_files(lambda f: _read_json(path / f))
    if source.startswith(("/", ".", "~")) or path.suffix in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(
            f"No model directory at {source!r}. Pass a registered name (e.g. shapes-clip), a Hugging Face repo "
            "id, a library-prefixed name (open-clip:..., timm:...) or an existing directory."
        )
    if "/" in source and ":" not in source:
        return _kind_from_files(lambda f: _hub_json(source, f))
    return None


def model_kind_of(model: Any) -> str:
    """The kind (one of MODEL_KINDS) of a hooked model, from the parts its hook contract names."""
    parts = set(model.parts()) if hasattr(model, "parts") else set()
    if "denoiser" in parts:
        return "diffusion"
    if "language_model" in parts:
        return "vlm"
    if {"vision", "text"} <= parts:
        return "clip"
    if parts == {"vision"}:
        return "vision"
    raise TypeError(f"{type(model).__name__} is not one of the model kinds {MODEL_KINDS} (its parts: {sorted(parts)}).")


def load_model(
    name: Union[str, os.PathLike],
    kind: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    progress_bar: bool = False,
    **source_kwargs: Any,
) -> Any:
    """The hooked model ``name`` refers to, as ``kind`` (detected with :func:`detect_model_kind` when
    None; a name that gives no clue is tried as a CLIP, then as a vision transformer).

    ``device`` / ``dtype`` go to the model's ``from_pretrained`` (a diffusion pipeline is moved with
    ``.to(device)`` and loaded with ``torch_dtype=dtype``); ``source_kwargs`` go to the source library's
    loader. A diffusion pipeline's own progress bar is off unless ``progress_bar=True`` (callers show
    their own progress).
    """
    name = str(name)
    if kind is not None:
        kind = normalize_model_kind(kind, source="load_model(kind=...)")
    else:
        kind = detect_model_kind(name)
    # the names it was loaded by, which an SAE's recorded model_name is checked against when spliced in
    return record_model_names(_load(name, kind, device, dtype, progress_bar, source_kwargs), model_name_aliases(name))


def _load(name: str, kind: Optional[str], device: Optional[Union[str, torch.device]], dtype: Optional[torch.dtype],
          progress_bar: bool, source_kwargs: dict[str, Any]) -> Any:
    if kind == "diffusion":
        if dtype is not None:
            source_kwargs["torch_dtype"] = dtype
        pipe = HookedDiffusionPipeline.from_pretrained(name, **source_kwargs)
        if hasattr(pipe.pipe, "set_progress_bar_config"):
            pipe.pipe.set_progress_bar_config(disable=not progress_bar)
        return pipe.to(device) if device is not None else pipe
    if kind == "vlm":
        return HookedVLM.from_pretrained(name, device=device, dtype=dtype, **source_kwargs)
    if kind == "clip":
        return HookedCLIP.from_pretrained(name, device=device, dtype=dtype, **source_kwargs)
    if kind == "vision":
        return HookedViT.from_pretrained(name, device=device, dtype=dtype, **source_kwargs)
    try:
        try:  # no clue from the name: a CLIP if it has a text tower, else a vision transformer alone
            return HookedCLIP.from_pretrained(name, device=device, dtype=dtype, **source_kwargs)
        except UnsupportedModelError:
            return HookedViT.from_pretrained(name, device=device, dtype=dtype, **source_kwargs)
    except Exception as error:
        if "/" in name or ":" in name or Path(name).expanduser().exists():
            raise
        # a bare word that is no registered name and loads as nothing: most likely a typo of one
        raise UnknownModelError(
            unknown_name_message("model", name, list_models(),
                                 see=f"Registered names: sae_lens_multimodal.models.registry.list_models(); other "
                                     f"models by Hugging Face repo id, open-clip:... / timm:... or a directory "
                                     f"(loading {name!r} as a Hugging Face name failed: {error})")) from error
