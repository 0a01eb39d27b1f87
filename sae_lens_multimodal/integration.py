"""Registration with SAELens and TransformerLens, run once at ``import sae_lens_multimodal``.

Everything here is idempotent (importing twice or ``importlib.reload`` raises nothing and registers
nothing twice) and touches no network.

* Model classes: SAELens resolves ``model_class_name`` strings in ``sae_lens.load_model.load_model``
  (used by its training and activation-caching runners). compat.py wraps that function so our class
  names (``"HookedViT"``, ``"HookedCLIP"``, ...) resolve to our ``from_pretrained``; other names go to
  SAELens. Every patch of SAELens / TransformerLens internals lives in compat.py, version-checked.
* SAE architectures and pretrained releases register themselves through the hooks listed in
  ``_REGISTRARS`` (each optional module contributes one function).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from sae_lens_multimodal import compat

__all__ = ["MODEL_CLASSES", "register_model_class", "register_with_ecosystem", "load_model"]

#: Our model class names -> "module:attribute" (imported lazily, so registration stays cheap).
MODEL_CLASSES: dict[str, str] = {
    "HookedViT": "sae_lens_multimodal.models.hooked_vit:HookedViT",
    "HookedCLIP": "sae_lens_multimodal.models.hooked_clip:HookedCLIP",
    "HookedText": "sae_lens_multimodal.models.hooked_text:HookedText",
    "HookedUNet": "sae_lens_multimodal.diffusion:HookedUNet",
    "HookedDiT": "sae_lens_multimodal.diffusion:HookedDiT",
    "HookedVLM": "sae_lens_multimodal.models.vlm:HookedVLM",
}

#: Optional registration functions of other subpackages ("module:function"), run when present.
_REGISTRARS: tuple[str, ...] = (
    "sae_lens_multimodal.saes:register_sae_classes",
    "sae_lens_multimodal.pretrained:register_releases",
)


def register_model_class(name: str, target: str) -> None:
    """Make ``model_class_name=name`` resolve (in SAELens runners) to ``target`` ('module:Class')."""
    MODEL_CLASSES[name] = target


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_model(model_class_name: str, model_name: str, device: Any = None,
               model_from_pretrained_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Load one of our hooked models by class name, as SAELens's ``load_model`` does for its own."""
    cls = _resolve(MODEL_CLASSES[model_class_name])
    model = cls.from_pretrained(model_name, **(model_from_pretrained_kwargs or {}))
    return model.to(device) if device is not None else model


def register_with_ecosystem() -> None:
    """Register model classes, SAE architectures and releases (idempotent)."""
    compat.apply_patches()
    compat.patch_load_model(MODEL_CLASSES.__contains__, load_model)
    for target in _REGISTRARS:
        module_name, _, func = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a real missing dependency inside the module: surface it
                raise
            continue
        registrar: Callable[[], None] | None = getattr(module, func, None)
        if registrar is not None:
            registrar()
