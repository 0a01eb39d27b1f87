"""Named models: short names (``"shapes-clip"``) for models whose source is known, resolved before any
library-specific loading, so every ``from_pretrained`` of this package accepts them.

>>> list_models()                       # ['shapes-clip', ...]
>>> model_info("shapes-clip").source    # 'open-clip:local-dir:/.../world/weights/shapes_clip'
>>> HookedViT.from_pretrained("shapes-clip")

A source is any name the loaders already understand (``"open-clip:local-dir:<dir>"``,
``"open-clip:ViT-B-32/<tag>"``, a Hugging Face repo id, a local directory...). Register your own with
:func:`register_model`. This module imports nothing heavy and no other module of the package.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RegisteredModel",
    "MODEL_REGISTRY",
    "register_model",
    "list_models",
    "model_info",
    "resolve_model_name",
    "UnknownModelError",
]


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    #: The canonical source name the loaders understand, e.g. "open-clip:local-dir:<dir>".
    source: str
    description: str
    #: What the model is ("clip", "vision", "diffusion", ...), for loaders that accept only some kinds.
    kind: str = ""


MODEL_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str, source: str, description: str, *, kind: str = "", overwrite: bool = False) -> RegisteredModel:
    """Register ``name`` as a short name for ``source``. Re-registering the same name with the same
    source is a no-op; a different source needs ``overwrite=True`` (so two packages cannot silently
    shadow each other)."""
    if not name or name != name.strip() or ":" in name:
        raise ValueError(
            f"Model name {name!r} must be non-empty, without surrounding spaces and without ':' "
            "(':' marks library prefixes such as 'open-clip:')."
        )
    entry = RegisteredModel(name=name, source=str(source), description=description, kind=kind)
    old = MODEL_REGISTRY.get(name)
    if old is not None and old.source != entry.source and not overwrite:
        raise ValueError(
            f"Model name {name!r} is already registered for {old.source!r}; pass overwrite=True to "
            f"point it at {entry.source!r}."
        )
    MODEL_REGISTRY[name] = entry
    return entry


def list_models(kind: str | None = None) -> list[str]:
    """Registered names (of one ``kind`` if given), sorted."""
    return sorted(n for n, m in MODEL_REGISTRY.items() if kind is None or m.kind == kind)


def model_info(name: str) -> RegisteredModel:
    """The registry entry for ``name``; a clear error with close matches if there is none."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(MODEL_REGISTRY), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise UnknownModelError(f"No registered model named {name!r}.{hint} Registered: {list_models()}.") from None


def resolve_model_name(name: str) -> str:
    """The source of a registered name; any other name is returned unchanged."""
    entry = MODEL_REGISTRY.get(name)
    return entry.source if entry is not None else name


# ---------------------------------------------------------------------------- built-in models
_WORLD_WEIGHTS = Path(__file__).resolve().parent.parent / "world" / "weights"

register_model(
    "shapes-clip",
    f"open-clip:local-dir:{_WORLD_WEIGHTS / 'shapes_clip'}",
    "Small open_clip CLIP (ViT: 4 layers, width 64, 32x32 images, patch 4; text: 3 layers, width 64) "
    "trained on the shapes world; "
    "see sae_lens_multimodal/world/README.md.",
    kind="clip",
)

register_model(
    "shapes-clip-typographic",
    f"open-clip:local-dir:{_WORLD_WEIGHTS / 'shapes_clip_typographic'}",
    "The shapes-clip architecture trained with each image's own colour name written on most images "
    "(train_clip.py --variant typographic), so a misleading written colour word fools it (a typographic "
    "attack); see docs/typographic.md.",
    kind="clip",
)

register_model(
    "shapes-diffusion",
    str(_WORLD_WEIGHTS / "shapes_diffusion"),
    "Small text-to-image diffusers pipeline (ShapesDiffusionPipeline: UNet2DConditionModel on 32x32 RGB "
    "pixels, conditioned on the shapes-clip text tower) trained on the shapes world; "
    "see sae_lens_multimodal/world/README.md.",
    kind="diffusion",
)
