"""Everything this package does to SAELens and TransformerLens internals, in one place, version-checked.

SAELens and TransformerLens have no extension points for three things we need, so we rely on their
internals, and only here:

* **Pretrained directory** (:func:`patch_pretrained_directory`): SAELens looks releases up in the cached
  ``get_pretrained_saes_directory()``; it is wrapped so our releases come back after ``cache_clear()``, and
  every ``sae_lens`` module that imported the function by name is re-pointed at the wrapper.
* **Model loading** (:func:`patch_load_model`): SAELens's runners resolve ``model_class_name`` in
  ``sae_lens.load_model.load_model``; it is wrapped so our class names reach our loader.
* **SAE splicing** (:func:`sae_splicing_methods`): our hooked models borrow ``HookedSAETransformer``'s
  ``add_sae`` / ``run_with_saes`` / ... unchanged, which rely on its private state (``_acts_to_saes``,
  ``_transcoder_output_hooks``) and helpers (``_SAEWrapper``, ``get_deep_attr``, ``set_deep_attr``).

Each patch is applied once (calling it again changes nothing) and first checks that the internals it uses
exist with the shape it expects. If they do not (a SAELens or TransformerLens version whose internals
differ from the tested ones, :data:`TESTED_VERSIONS`), splicing raises :class:`IncompatibleVersionError`
and the patches warn with :class:`CompatibilityWarning`; both messages name the installed versions and
the feature that is not supported, instead of failing deep inside SAELens later. (SAELens's modules are
imported inside the checks, not at module level, so that a SAELens without them gets this message rather
than an ImportError.)

Other private SAELens names the package reads without patching anything (``_SAEWrapper`` in steering and
HookedViT's special-token masks, ``_disable_hooks`` in steering, ``handle_config_defaulting`` in
pretrained/bundled.py) are not checked here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any, Optional

__all__ = [
    "TESTED_VERSIONS",
    "SUPPORTED_RANGES",
    "SPLICING_METHODS",
    "SPLICING_STATE",
    "CompatibilityWarning",
    "IncompatibleVersionError",
    "installed_versions",
    "check_version_ranges",
    "sae_splicing_methods",
    "patch_pretrained_directory",
    "add_directory_extender",
    "patch_load_model",
    "sae_trainer_progress_bar",
    "apply_patches",
]

#: The versions this module's patches were written against and are tested with (minor series).
TESTED_VERSIONS: dict[str, str] = {"sae-lens": "6.54", "transformer-lens": "3.9"}
#: The ranges pyproject.toml allows: (lowest, first excluded) as (major, minor) tuples.
SUPPORTED_RANGES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "sae-lens": ((6, 54), (7, 0)),
    "transformer-lens": ((3, 9), (4, 0)),
}
#: HookedSAETransformer members our hooked models use unchanged.
SPLICING_METHODS: tuple[str, ...] = (
    "add_sae", "acts_to_saes", "_reset_sae", "reset_saes", "run_with_saes", "run_with_cache_with_saes",
    "run_with_hooks_with_saes", "saes",
)
#: The private state those members read and write; our base class sets it up in ``__init__``.
SPLICING_STATE: tuple[str, ...] = ("_acts_to_saes", "_transcoder_output_hooks")
#: Fields we fill in SAELens's ``PretrainedSAELookup``.
_LOOKUP_FIELDS = (
    "release", "repo_id", "model", "conversion_func", "saes_map", "expected_var_explained", "expected_l0",
    "neuronpedia_id", "norm_scaling_factor", "config_overrides",
)
#: Modules that imported ``load_model`` by name from ``sae_lens.load_model``.
_RUNNER_MODULES = (
    "sae_lens.load_model",
    "sae_lens.llm_sae_training_runner",
    "sae_lens.cache_activations_runner",
    "sae_lens.multi_sae_training_runner",
)
_ORIGINAL_ATTR = "_sae_lens_multimodal_original"


class IncompatibleVersionError(ImportError):
    """The installed SAELens / TransformerLens lacks internals this package relies on."""


class CompatibilityWarning(UserWarning):
    """A feature is switched off, or untested, because of the installed SAELens / TransformerLens version."""


def installed_versions() -> dict[str, str]:
    """Installed versions of sae-lens and transformer-lens ("not installed" when absent)."""
    out = {}
    for dist in TESTED_VERSIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _versions_text() -> str:
    installed = installed_versions()
    return ", ".join(f"{d} {installed[d]} (tested: {TESTED_VERSIONS[d]}.x)" for d in TESTED_VERSIONS)


def _problem(feature: str, missing: Iterable[str]) -> str:
    return (
        f"{feature} is not supported with the installed {_versions_text()}: its internals differ from the "
        f"tested versions ({'; '.join(missing)}). Install sae-lens>=6.54,<7 and transformer-lens>=3.9,<4, "
        "or report the version at the sae-lens-multimodal issue tracker."
    )


def _major_minor(version: str) -> Optional[tuple[int, int]]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def check_version_ranges() -> tuple[str, ...]:
    """Warn once (CompatibilityWarning) for each installed version outside :data:`SUPPORTED_RANGES`;
    returns the distributions warned about."""
    outside = []
    for dist, version in installed_versions().items():
        low, high = SUPPORTED_RANGES[dist]
        parsed = _major_minor(version)
        if parsed is not None and not (low <= parsed < high):
            outside.append(dist)
            warnings.warn(
                f"{dist} {version} is outside the range sae-lens-multimodal supports "
                f"({'.'.join(map(str, low))} <= version < {'.'.join(map(str, high))}; tested: "
                f"{TESTED_VERSIONS[dist]}.x). Features that rely on its internals are checked when used.",
                CompatibilityWarning,
                stacklevel=2,
            )
    return tuple(outside)


# --------------------------------------------------------------------------------- SAE splicing
def _private_names(member: Any) -> set[str]:
    """Private names a borrowed method's code (nested functions included) refers to."""
    func = member.fget if isinstance(member, property) else member
    code = getattr(inspect.unwrap(func), "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        current = stack.pop()
        names.update(n for n in current.co_names if n.startswith("_") and not n.startswith("__"))
        stack.extend(c for c in current.co_consts if inspect.iscode(c))
    return names


def _splicing_problems() -> list[str]:
    try:
        from sae_lens.analysis import hooked_sae_transformer as hst
    except ImportError as e:
        return [f"sae_lens.analysis.hooked_sae_transformer cannot be imported ({e})"]
    cls = getattr(hst, "HookedSAETransformer", None)
    if cls is None:
        return ["sae_lens.analysis.hooked_sae_transformer has no HookedSAETransformer"]
    problems = [f"HookedSAETransformer.{name} is missing" for name in SPLICING_METHODS if not hasattr(cls, name)]
    for helper in ("_SAEWrapper", "get_deep_attr", "set_deep_attr"):
        if not callable(getattr(hst, helper, None)):
            problems.append(f"sae_lens.analysis.hooked_sae_transformer.{helper} is missing")
    # The borrowed methods may only rely on the state we set up, on each other, and on the helpers above.
    known = set(SPLICING_STATE) | set(SPLICING_METHODS) | {"_SAEWrapper"}
    for name in SPLICING_METHODS:
        if hasattr(cls, name):
            unknown = sorted(_private_names(inspect.getattr_static(cls, name)) - known)
            if unknown:
                problems.append(f"HookedSAETransformer.{name} now relies on {unknown}")
    wrapper_cls = getattr(hst, "_SAEWrapper", None)
    if callable(wrapper_cls):
        try:
            params = inspect.signature(wrapper_cls.__init__).parameters
        except (TypeError, ValueError):
            params = {}
        for param in ("sae", "use_error_term", "exclude_special_tokens"):
            if param not in params:
                problems.append(f"_SAEWrapper() no longer takes {param!r}")
    try:
        from transformer_lens.HookedRootModule import HookedRootModule
    except ImportError as e:
        return problems + [f"transformer_lens.HookedRootModule cannot be imported ({e})"]
    for name in ("setup", "hooks", "run_with_cache", "run_with_hooks", "add_hook", "_enable_hook_with_name",
                 "remove_all_hook_fns"):
        if not hasattr(HookedRootModule, name):
            problems.append(f"transformer_lens HookedRootModule.{name} is missing")
    return problems


@functools.lru_cache(maxsize=None)
def sae_splicing_methods() -> dict[str, Any]:
    """HookedSAETransformer's splicing members (name -> the class attribute, property or function), after
    checking that they rely only on :data:`SPLICING_STATE`. Raises :class:`IncompatibleVersionError`
    (naming the versions and what differs) otherwise."""
    check_version_ranges()
    problems = _splicing_problems()
    if problems:
        raise IncompatibleVersionError(_problem("SAE splicing on hooked models (add_sae, run_with_saes, ...)", problems))
    from sae_lens.analysis.hooked_sae_transformer import HookedSAETransformer

    return {name: inspect.getattr_static(HookedSAETransformer, name) for name in SPLICING_METHODS}


# --------------------------------------------------------------------------------- pretrained directory
#: name -> function adding entries to SAELens's directory dict (a name, so a reloaded module replaces its own)
_DIRECTORY_EXTENDERS: dict[str, Callable[[dict[str, Any]], None]] = {}


def add_directory_extender(name: str, extend: Callable[[dict[str, Any]], None]) -> None:
    """Have ``extend(directory)`` run on SAELens's pretrained-SAE directory every time it is read
    (re-adding a name replaces its function)."""
    _DIRECTORY_EXTENDERS[name] = extend


def _directory_problems() -> list[str]:
    try:
        from sae_lens.loading import pretrained_sae_loaders as psl
        from sae_lens.loading import pretrained_saes_directory as psd
    except ImportError as e:
        return [f"sae_lens.loading cannot be imported ({e})"]
    problems = []
    current = getattr(psd, "get_pretrained_saes_directory", None)
    original = getattr(current, _ORIGINAL_ATTR, current)
    if not callable(original) or not hasattr(original, "cache_clear"):
        problems.append("sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory is not a cached function")
    lookup = getattr(psd, "PretrainedSAELookup", None)
    if lookup is None or not dataclasses.is_dataclass(lookup):
        problems.append("PretrainedSAELookup is missing or not a dataclass")
    else:
        missing = sorted(set(_LOOKUP_FIELDS) - {f.name for f in dataclasses.fields(lookup)})
        if missing:
            problems.append(f"PretrainedSAELookup lacks the fields {missing}")
    for table in ("NAMED_PRETRAINED_SAE_LOADERS", "NAMED_PRETRAINED_SAE_CONFIG_GETTERS"):
        if not isinstance(getattr(psl, table, None), dict):
            problems.append(f"sae_lens.loading.pretrained_sae_loaders.{table} is missing")
    return problems


def _warn_unsupported(feature: str, problems: list[str]) -> None:
    warnings.warn(_problem(feature, problems), CompatibilityWarning, stacklevel=3)


def patch_pretrained_directory() -> bool:
    """Wrap SAELens's cached ``get_pretrained_saes_directory`` so each call also runs the directory
    extenders (:func:`add_directory_extender`); re-point every loaded ``sae_lens`` module that imported it
    by name. ``cache_clear``/``cache_info`` still reach SAELens's cache. Idempotent. Returns False (and
    warns) when SAELens's internals differ, in which case our releases are not loadable by name."""
    check_version_ranges()
    problems = _directory_problems()
    if problems:
        _warn_unsupported("SAE.from_pretrained for sae-lens-multimodal releases", problems)
        return False
    from sae_lens.loading import pretrained_saes_directory as psd

    current = psd.get_pretrained_saes_directory
    original = getattr(current, _ORIGINAL_ATTR, current)
    if getattr(current, _ORIGINAL_ATTR, None) is None:

        def get_pretrained_saes_directory() -> dict[str, Any]:
            directory = original()
            for extend in list(_DIRECTORY_EXTENDERS.values()):
                extend(directory)
            return directory

        get_pretrained_saes_directory.__doc__ = original.__doc__
        get_pretrained_saes_directory.cache_clear = original.cache_clear  # type: ignore[attr-defined]
        get_pretrained_saes_directory.cache_info = original.cache_info  # type: ignore[attr-defined]
        setattr(get_pretrained_saes_directory, _ORIGINAL_ATTR, original)
        wrapper: Callable[[], dict[str, Any]] = get_pretrained_saes_directory
    else:
        wrapper = current
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "sae_lens" or module_name.startswith("sae_lens.")):
            continue
        bound = getattr(module, "get_pretrained_saes_directory", None)
        if bound is original or (bound is not None and bound is not wrapper and getattr(bound, _ORIGINAL_ATTR, None)):
            setattr(module, "get_pretrained_saes_directory", wrapper)
    psd.get_pretrained_saes_directory = wrapper  # type: ignore[assignment]
    return True


# --------------------------------------------------------------------------------- model loading
#: (handles(model_class_name) -> bool, load(model_class_name, model_name, *args, **kwargs)); set by integration.py
_LOAD_MODEL_HANDLER: list[tuple[Callable[[str], bool], Callable[..., Any]]] = []


def patch_load_model(handles: Callable[[str], bool], load: Callable[..., Any]) -> bool:
    """Wrap ``sae_lens.load_model.load_model`` (and the runners' imported copies) so class names for which
    ``handles(name)`` is true go to ``load``; others to SAELens. Idempotent: one wrapper, whose handler
    the latest call sets. Returns False (and warns) when SAELens's internals differ."""
    check_version_ranges()
    try:
        lm = importlib.import_module("sae_lens.load_model")
    except ImportError as e:
        _warn_unsupported("SAELens runners loading sae-lens-multimodal models by class name", [str(e)])
        return False
    current = getattr(lm, "load_model", None)
    if not callable(current):
        _warn_unsupported("SAELens runners loading sae-lens-multimodal models by class name",
                          ["sae_lens.load_model.load_model is missing"])
        return False
    _LOAD_MODEL_HANDLER[:] = [(handles, load)]
    original = getattr(current, "__wrapped_original__", current)
    if getattr(current, "__wrapped_original__", None) is None:

        def load_model_with_multimodal(model_class_name: str, model_name: str, *args: Any, **kwargs: Any) -> Any:
            for claims, load_ours in _LOAD_MODEL_HANDLER:
                if claims(model_class_name):
                    return load_ours(model_class_name, model_name, *args, **kwargs)
            return original(model_class_name, model_name, *args, **kwargs)

        load_model_with_multimodal.__wrapped_original__ = original  # type: ignore[attr-defined]
        load_model_with_multimodal.__doc__ = original.__doc__
        wrapper: Callable[..., Any] = load_model_with_multimodal
    else:
        wrapper = current
    for module_name in _RUNNER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, "load_model", None) is not None:
            module.load_model = wrapper  # type: ignore[attr-defined]
    return True


# --------------------------------------------------------------------------------- trainer progress bar
@contextlib.contextmanager
def sae_trainer_progress_bar(factory: Callable[..., Any]) -> Iterator[None]:
    """While the block runs, ``SAETrainer.fit`` makes its progress bar with ``factory(total=..., initial=...,
    desc=...)`` instead of tqdm. SAELens has no option for this (fit calls the module-level name ``tqdm`` of
    ``sae_lens.training.sae_trainer``); data-parallel training needs it to show one bar per machine with the
    job's global progress instead of one per rank. Warns and changes nothing when that name is missing."""
    module = importlib.import_module("sae_lens.training.sae_trainer")
    original = getattr(module, "tqdm", None)
    if original is None:
        _warn_unsupported("one progress bar per machine in data-parallel training",
                          ["sae_lens.training.sae_trainer.tqdm is missing"])
        yield
        return
    module.tqdm = factory  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.tqdm = original  # type: ignore[attr-defined]


def apply_patches() -> None:
    """Check the installed versions and the splicing internals (raises :class:`IncompatibleVersionError`),
    and install the pretrained-directory wrapper. Idempotent. The load_model patch needs our class table
    and is applied by ``integration.register_with_ecosystem``."""
    sae_splicing_methods()
    patch_pretrained_directory()
