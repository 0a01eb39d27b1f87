"""Registration with SAELens and TransformerLens, run once at ``import sae_lens_multimodal``.

Everything here is idempotent (importing twice or ``importlib.reload`` raises nothing and registers
nothing twice) and touches no network.

Registration needs SAELens (and so torch), which take seconds to import; ``import sae_lens_multimodal``
should not (``sae-lens-mm --help`` builds its parsers without them). So :func:`register_when_sae_lens_loads`
registers at once when SAELens is already imported, and otherwise as soon as the import that loads
SAELens has finished: a meta-path finder counts the imports of ``sae_lens`` and of this package's modules
in progress and registers when the count returns to zero (registering earlier, in the middle of one of our
modules' import, would import that half-initialised module again).

* Model classes: SAELens resolves ``model_class_name`` strings in ``sae_lens.load_model.load_model``
  (used by its training and activation-caching runners). compat.py wraps that function so our class
  names (``"HookedViT"``, ``"HookedCLIP"``, ...) resolve to our ``from_pretrained``; other names go to
  SAELens. Every patch of SAELens / TransformerLens internals lives in compat.py, version-checked.
* SAE architectures and pretrained releases register themselves through the hooks listed in
  ``_REGISTRARS`` (each optional module contributes one function).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Optional

from sae_lens_multimodal import compat

__all__ = ["MODEL_CLASSES", "register_model_class", "register_with_ecosystem", "register_when_sae_lens_loads",
           "load_model"]

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


# ----------------------------------------------------------------------------- registration on SAELens import
_PACKAGE = __name__.rpartition(".")[0]
_state_lock = threading.Lock()
_imports_in_progress = 0
_registration_pending = False


def _counts(fullname: str) -> bool:
    return fullname == "sae_lens" or fullname.startswith(_PACKAGE + ".")


class _CountingLoader(importlib.machinery.SourceFileLoader):
    """A source loader that tells :func:`_import_finished` when its module's code has run."""

    def exec_module(self, module: ModuleType) -> None:
        global _imports_in_progress
        with _state_lock:
            _imports_in_progress += 1
        loaded = False
        try:
            super().exec_module(module)
            loaded = True
        finally:
            _import_finished(module.__name__, loaded)


def _import_finished(fullname: str, loaded: bool) -> None:
    global _imports_in_progress, _registration_pending
    with _state_lock:
        _imports_in_progress -= 1
        if fullname == "sae_lens" and loaded:
            _registration_pending = True
        run = _registration_pending and _imports_in_progress == 0
        if run:
            _registration_pending = False
    if run:
        # registered for good: later imports need no counting
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != _RegisterAfterSaeLensFinder.__name__]
        register_with_ecosystem()


class _RegisterAfterSaeLensFinder(importlib.abc.MetaPathFinder):
    """Finds ``sae_lens`` and this package's modules with the other finders and swaps their source loader
    for :class:`_CountingLoader`; everything else it leaves to the other finders."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if not _counts(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if type(spec.loader) is importlib.machinery.SourceFileLoader:
                spec.loader = _CountingLoader(spec.loader.name, spec.loader.path)
            return spec
        return None


def register_when_sae_lens_loads() -> None:
    """Register now if SAELens is imported, else once the import that loads it has finished (idempotent)."""
    if "sae_lens" in sys.modules:
        register_with_ecosystem()
    elif not any(type(f).__name__ == _RegisterAfterSaeLensFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterSaeLensFinder())
