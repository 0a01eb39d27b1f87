"""The one registry of vision-model source families, and name resolution.

Each family lives in one self-contained module of this package (``open_clip_vit.py``, ``hf_clip.py``...)
that calls :func:`register_vision_family` with:

* ``matches(obj)``: is this object one of ours (checked without importing the source library);
* ``convert(obj) -> (HookedViTConfig, state_dict, preprocess)``: exact weight conversion;
* optionally a name ``prefix`` (``"open-clip:"``, ``"timm:"``) with ``load(name, **kwargs)``, and/or the
  transformers ``model_type`` values it handles with ``load`` taking a hub id or local directory.

See CONTRIBUTING.md, "Adding a model family".
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.registry import resolve_model_name

__all__ = [
    "VisionFamily",
    "VISION_FAMILIES",
    "register_vision_family",
    "convert_vision_model",
    "load_vision_source",
    "UnsupportedModelError",
]

ConvertResult = tuple[HookedViTConfig, dict[str, torch.Tensor], Optional[Callable[[Any], torch.Tensor]]]


class UnsupportedModelError(TypeError):
    pass


@dataclass(frozen=True)
class VisionFamily:
    name: str
    description: str
    matches: Callable[[Any], bool]
    convert: Callable[[Any], ConvertResult]
    prefix: Optional[str] = None
    load: Optional[Callable[..., Any]] = None
    hf_model_types: tuple[str, ...] = ()
    #: On-disk/hub marker: a file whose presence (or a config.json key) identifies this library's layout.
    layout: Optional[str] = None


VISION_FAMILIES: dict[str, VisionFamily] = {}


def register_vision_family(family: VisionFamily) -> VisionFamily:
    """Register (or re-register, idempotently) a source family."""
    VISION_FAMILIES[family.name] = family
    return family


def supported_summary() -> str:
    return "\n".join(f"  - {f.name}: {f.description}" for f in VISION_FAMILIES.values())


def convert_vision_model(model: Any, **source_kwargs: Any) -> ConvertResult:
    """Convert a source model object, or a name, to (config, HookedViT state dict, preprocess)."""
    if isinstance(model, (str, os.PathLike)):
        model = load_vision_source(str(model), **source_kwargs)
    elif source_kwargs:
        raise TypeError(
            f"Keyword arguments {sorted(source_kwargs)} only apply when loading by name; "
            "got an already-built model object."
        )
    for family in VISION_FAMILIES.values():
        if family.matches(model):
            return family.convert(model)
    raise UnsupportedModelError(
        f"Unsupported vision model type {type(model).__module__}.{type(model).__qualname__}. "
        f"Supported source families:\n{supported_summary()}"
    )


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hub_json(repo_id: str, filename: str) -> Optional[dict]:
    """A JSON file from a hub repo (respects HF_HUB_OFFLINE and the local cache); None if absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return _read_json(Path(hf_hub_download(repo_id, filename)))
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError, ValueError):
        return None


def _family_for_layout(get_json: Callable[[str], Optional[dict]]) -> Optional[tuple[VisionFamily, str]]:
    config = get_json("config.json") or {}
    model_type = config.get("model_type")
    if model_type:
        for family in VISION_FAMILIES.values():
            if model_type in family.hf_model_types:
                return family, "transformers"
        raise UnsupportedModelError(
            f"transformers model_type {model_type!r} is not a supported vision family. Supported:\n"
            f"{supported_summary()}"
        )
    for family in VISION_FAMILIES.values():
        if family.layout and (get_json(family.layout) is not None or family.layout in config):
            return family, "native"
    return None


def load_vision_source(name: str, **kwargs: Any) -> Any:
    """Build the source-library model a name refers to (see HookedViT.from_pretrained for name forms)."""
    name = resolve_model_name(name)  # registered short names ("shapes-clip") first
    for family in VISION_FAMILIES.values():
        if family.prefix and name.startswith(family.prefix) and family.load is not None:
            return family.load(name[len(family.prefix):], **kwargs)
    path = Path(name).expanduser()
    if path.is_dir():
        found = _family_for_layout(lambda f: _read_json(path / f))
        where = f"local directory {str(path)!r}"
    elif "/" in name and not name.startswith(("/", ".")):
        found = _family_for_layout(lambda f: _hub_json(name, f))
        where = f"Hugging Face repo {name!r}"
    else:
        found, where = None, f"{name!r}"
    if found is None:
        prefixes = ", ".join(repr(f.prefix + "...") for f in VISION_FAMILIES.values() if f.prefix)
        raise UnsupportedModelError(
            f"Cannot tell which library {where} belongs to (no readable config.json with a model_type, "
            f"and no library marker file). If it is a hub repo that is not in the local cache, check the "
            f"network or HF_HUB_OFFLINE. Name forms: a library prefix ({prefixes}), a Hugging Face repo "
            f"id, or a local directory. Supported families:\n{supported_summary()}"
        )
    family, kind = found
    assert family.load is not None
    return family.load(name if kind == "transformers" else _native_name(family, name, path), **kwargs)


def _native_name(family: VisionFamily, name: str, path: Path) -> str:
    """The family's own spelling of a hub repo / local dir (open_clip: 'hf-hub:' / 'local-dir:')."""
    return f"local-dir:{path}" if path.is_dir() else f"hf-hub:{name}"


def _register_builtin_families() -> None:
    """Import every family module of this package (each calls register_vision_family on import).
    Importing a family module imports no source library: those are imported when a model is converted."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_builtin_families()
