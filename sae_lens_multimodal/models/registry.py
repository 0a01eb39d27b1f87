"""Named models: short names (``"shapes-clip"``) for models whose source is known, resolved before any
library-specific loading, so every ``from_pretrained`` of this package (and :func:`~sae_lens_multimodal.models.load_model`)
accepts them.

>>> list_models()                       # ['shapes-clip', ...]
>>> model_info("shapes-clip").source    # 'open-clip:local-dir:/.../world/weights/shapes_clip'
>>> HookedViT.from_pretrained("shapes-clip")

A source is any name the loaders already understand (``"open-clip:local-dir:<dir>"``,
``"open-clip:ViT-B-32/<tag>"``, a Hugging Face repo id, a local directory...). Register your own with
:func:`register_model`. A package that registers many names can instead register itself as the provider
of a name prefix with :func:`register_model_provider`: its module is imported (and registers its names)
the first time a name with that prefix is looked up, so nothing is imported before it is needed. The
shapes world (``sae_lens_multimodal.world``) registers its ``shapes-*`` models that way.
This module imports nothing heavy and no other module of the package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from sae_lens_multimodal.core.names import unknown_name_message

__all__ = [
    "RegisteredModel",
    "MODEL_REGISTRY",
    "MODEL_PROVIDERS",
    "register_model",
    "register_model_provider",
    "load_model_providers",
    "list_models",
    "model_info",
    "resolve_model_name",
    "model_name_aliases",
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
    load_model_providers(name)  # a provider's own names come first: shadowing one needs overwrite=True
    old = MODEL_REGISTRY.get(name)
    if old is not None and old.source != entry.source and not overwrite:
        raise ValueError(
            f"Model name {name!r} is already registered for {old.source!r}; pass overwrite=True to "
            f"point it at {entry.source!r}."
        )
    MODEL_REGISTRY[name] = entry
    return entry


# ---------------------------------------------------------------------------- lazy providers
#: name prefix -> module that registers the names with that prefix when imported
MODEL_PROVIDERS: dict[str, str] = {}
_IMPORTED_PROVIDERS: set[str] = set()


def register_model_provider(prefix: str, module: str) -> None:
    """Names starting with ``prefix`` are registered by importing ``module`` (a dotted module name),
    which this registry does on the first lookup of such a name (or of all names, :func:`list_models`)."""
    if not prefix or not module or module != module.strip():
        raise ValueError(f"register_model_provider needs a name prefix and a module name; got {prefix!r}, {module!r}.")
    old = MODEL_PROVIDERS.get(prefix)
    if old is not None and old != module:
        raise ValueError(f"Model name prefix {prefix!r} is already provided by {old!r}, not {module!r}.")
    MODEL_PROVIDERS[prefix] = module


def load_model_providers(name: str | None = None) -> None:
    """Import the provider modules of ``name`` (every provider when ``name`` is None), once each."""
    for prefix, module in list(MODEL_PROVIDERS.items()):
        if module in _IMPORTED_PROVIDERS or (name is not None and not name.startswith(prefix)):
            continue
        _IMPORTED_PROVIDERS.add(module)  # before importing: the module's own register_model calls land here
        try:
            importlib.import_module(module)
        except BaseException:
            _IMPORTED_PROVIDERS.discard(module)
            raise


def list_models(kind: str | None = None) -> list[str]:
    """Registered names (of one ``kind`` if given), sorted."""
    load_model_providers()
    return sorted(n for n, m in MODEL_REGISTRY.items() if kind is None or m.kind == kind)


def model_info(name: str) -> RegisteredModel:
    """The registry entry for ``name``; a clear error with close matches if there is none."""
    load_model_providers(name)
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        load_model_providers()  # close matches may come from any provider
        raise UnknownModelError(unknown_name_message("registered model", name, list_models())) from None


def resolve_model_name(name: str) -> str:
    """The source of a registered name; any other name is returned unchanged."""
    load_model_providers(name)
    entry = MODEL_REGISTRY.get(name)
    return entry.source if entry is not None else name


def model_name_aliases(name: str) -> tuple[str, ...]:
    """Every name of the model ``name`` loads: itself, its source, and the registered names of that source
    (what an SAE's ``model_name`` may say; core/sae_metadata.check_sae_model_match compares them)."""
    source = resolve_model_name(name)
    registered = [n for n, entry in MODEL_REGISTRY.items() if entry.source == source]
    return tuple(dict.fromkeys([name, source, *registered]))


# ---------------------------------------------------------------------------- built-in providers
# The shapes world registers its models itself (sae_lens_multimodal/world/__init__.py), through the
# functions above; it is imported only when a "shapes-" name is looked up.
register_model_provider("shapes-", "sae_lens_multimodal.world")
