"""The hooked-module base every model in this package derives from.

It is TransformerLens's ``HookedRootModule`` plus three things TransformerLens and SAELens do not give a
non-language model:

* unknown hook names raise an error that lists the closest real ones (TransformerLens raises a bare
  ``KeyError`` or silently caches nothing);
* SAELens's SAE splicing (``add_sae``, ``run_with_saes``, ...), borrowed from ``HookedSAETransformer``
  unchanged, with a width check that names the hook and both widths;
* ``run_with_cache`` returns a TransformerLens ``ActivationCache`` (or a subclass) by default;
* the hook contract (core/contract.py): ``hook_specs()``, ``hook_spec(name)``, ``locate(name_or_sae)``,
  ``part(name)`` and ``parts()``, from one spec builder per model kind (``_build_hook_specs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from sae_lens import SAE
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from sae_lens_multimodal import compat
from sae_lens_multimodal.core.names import unknown_name_message
from sae_lens_multimodal.core.contract import LAYOUTS, HookSpec
from sae_lens_multimodal.core.sae_metadata import check_sae_model_match

__all__ = ["MultimodalHookedRootModule", "has_parts", "is_observed", "unknown_hook_error"]

#: HookedSAETransformer's splicing methods, checked by compat against the installed SAELens (an
#: incompatible version raises compat.IncompatibleVersionError here, naming what differs).
_SPLICING = compat.sae_splicing_methods()


def is_observed(hook_point: HookPoint) -> bool:
    """True when anything (a TransformerLens hook, a raw torch hook, nnsight) watches this hook point.

    Models use this to skip work that only exists to be observed, e.g. materialising attention patterns
    instead of calling the fused SDPA kernel, or per-head results.
    """
    if not isinstance(hook_point, HookPoint):
        return True  # replaced, e.g. by an SAE that add_sae spliced in: its value must be computed
    return bool(
        hook_point._forward_hooks
        or hook_point._forward_pre_hooks
        or hook_point._backward_hooks
        or hook_point._backward_pre_hooks
        or getattr(hook_point, "_always_observed", False)
        or ("__nnsight__" in hook_point.__dict__ and _nnsight_watches(hook_point))
    )


def _nnsight_watches(hook_point: HookPoint) -> bool:
    """Whether a running nnsight trace wants this hook point's input or output.

    nnsight (0.8) registers no torch hooks: it installs a controller as the module's ``forward`` and keeps
    a per-module state under ``__dict__["__nnsight__"]``. A trace's workers run ahead of the model and
    park on the next location they need, so a worker that wants ``...hook_pattern.output`` is parked on
    it when the attention module decides whether to materialise the pattern. Caches (``tracer.cache``)
    are listed in ``interleaver.observers``. If nnsight's internals differ from this, any active trace
    counts as watching: slower, never wrong.
    """
    try:
        interleaver, _, locations = hook_point.__dict__["__nnsight__"].active()
        if interleaver is None:
            return False
        parked, observers = interleaver.parked, interleaver.observers
        return any(loc in parked or loc in observers for loc in locations)
    except Exception:  # unknown nnsight version: err on the side of materialising
        return True


def unknown_hook_error(name: str, known: Iterable[str], what: str = "hook", docs: str = "docs/hooks.md") -> KeyError:
    """The package's error for a hook name the model does not have: close matches, and where the names are
    documented (``docs``: docs/hooks.md for image models, docs/hooks-diffusion.md for denoisers)."""
    known = list(known)
    return KeyError(unknown_name_message(
        what, name, known, see=f"See model.hook_dict.keys() for all {len(known)} hook names (documented in {docs})."
    ))


def _check_hook_pairs(hooks: Any, what: str) -> None:
    """``fwd_hooks`` / ``bwd_hooks`` are a list of (name or predicate, function) pairs; a bare pair or anything
    else fails inside TransformerLens with an unpacking error, so name it here."""
    if hooks is None:
        return
    if not isinstance(hooks, (list, tuple)) or (len(hooks) == 2 and isinstance(hooks[0], str) and callable(hooks[1])):
        raise TypeError(
            f"{what} is a list of (hook name, function) pairs, e.g. [('blocks.0.hook_resid_post', fn)]; got "
            f"{type(hooks).__name__} {hooks!r:.80}."
        )
    for pair in hooks:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"Each entry of {what} is a (hook name, function) pair; got {pair!r:.80}.")
        if not isinstance(pair[0], str) and not callable(pair[0]):
            raise TypeError(
                f"{what}: a hook is named by a string (e.g. 'blocks.0.hook_resid_post') or a predicate on names; "
                f"got {pair[0]!r} ({type(pair[0]).__name__})."
            )
        if not callable(pair[1]):
            raise TypeError(f"{what}: the hook function for {pair[0]!r} is not callable (got {type(pair[1]).__name__}).")


def has_parts(model: Any, *parts: str) -> bool:
    """Whether ``model`` is a hooked model of this package with every one of ``parts`` (core.contract.PARTS):
    how code asks "is there a vision tower / a text tower?" instead of testing attributes."""
    return isinstance(model, MultimodalHookedRootModule) and all(p in model.parts() for p in parts)


class MultimodalHookedRootModule(HookedRootModule):
    """Base class: TransformerLens hooks + SAELens SAE splicing + the hook contract for any hooked module.

    Subclasses call ``self.setup()`` at the end of ``__init__`` and implement :meth:`_build_hook_specs`
    (one :class:`~sae_lens_multimodal.core.contract.HookSpec` per hook, from the config), which ``add_sae``
    and every consumer read.
    """

    #: The part (core.contract.PARTS) a standalone model of this kind is; hosts of several parts override
    #: :meth:`_part_modules`.
    PART: str = ""

    #: ActivationCache class returned by run_with_cache (subclasses may refine it).
    activation_cache_class: type[ActivationCache] = ActivationCache

    #: where this kind of model's hook names are documented (quoted by unknown-hook errors)
    hook_docs: str = "docs/hooks.md"

    def __init__(self) -> None:
        super().__init__()
        # State SAELens's splicing methods expect (compat.SPLICING_STATE; see HookedSAETransformer.__init__).
        self._acts_to_saes: dict[str, Any] = {}
        self._transcoder_output_hooks: dict[str, str] = {}
        self.tokenizer = None

    # ------------------------------------------------------------------ hook-name validation
    def _enable_hook_with_name(self, name: str, hook: Callable, dir: str) -> None:  # type: ignore[override]
        if name not in self.mod_dict:
            raise unknown_hook_error(name, self.hook_dict.keys(), docs=self.hook_docs)
        super()._enable_hook_with_name(name, hook, dir)  # type: ignore[arg-type]

    def add_hook(self, name: Any, hook: Callable, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not isinstance(name, str) and not callable(name):
            raise TypeError(
                f"A hook is given as (hook name or name predicate, function); got the name {name!r} "
                f"({type(name).__name__}). Use a name such as 'blocks.0.hook_resid_post' (model.hook_dict.keys())."
            )
        if not callable(hook):
            raise TypeError(f"The hook function for {name!r} is not callable (got {type(hook).__name__}).")
        # TransformerLens indexes mod_dict directly here, which gives a bare KeyError.
        if isinstance(name, str) and name not in self.mod_dict:
            raise unknown_hook_error(name, self.hook_dict.keys(), docs=self.hook_docs)
        super().add_hook(name, hook, *args, **kwargs)

    def _check_names_filter(self, names_filter: Any) -> None:
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if isinstance(names, (list, tuple, set)):
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(
                        f"names_filter lists hook names (strings); got {name!r} ({type(name).__name__}). "
                        "See model.hook_dict.keys()."
                    )
                if name not in self.hook_dict:
                    raise unknown_hook_error(name, self.hook_dict.keys(), docs=self.hook_docs)

    @contextmanager
    def hooks(self, *args: Any, **kwargs: Any) -> Iterator["MultimodalHookedRootModule"]:  # type: ignore[override]
        """TransformerLens ``hooks`` (used by run_with_hooks and run_with_cache), with hook names claimed.

        A hooked model nested in another (HookedCLIP's towers, a VLM's vision tower) shares its HookPoints
        with the outer model, whose ``setup()`` names them from the outer root (``vision.blocks.0...``).
        Cache keys and ``hook.name`` come from those names, so for the duration of this context every hook
        point is named relative to ``self``, and the previous names are restored afterwards.
        """
        for key in ("fwd_hooks", "bwd_hooks"):
            _check_hook_pairs(kwargs.get(key), key)
        for key, given in zip(("fwd_hooks", "bwd_hooks"), args):
            _check_hook_pairs(given, key)
        renamed = [(hp, hp.name) for name, hp in self.hook_dict.items() if hp.name != name]
        for name, hp in self.hook_dict.items():
            hp.name = name
        try:
            with super().hooks(*args, **kwargs) as model:
                yield model
        finally:
            for hp, old in renamed:
                hp.name = old

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        names_filter: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, torch.Tensor]]:
        """Run the model and cache activations (TransformerLens semantics).

        Returns ``(output, cache)``; the cache is an ``ActivationCache`` unless
        ``return_cache_object=False``. ``names_filter`` takes a name, a list of names or a predicate;
        unknown names raise with close matches instead of silently caching nothing.
        """
        self._check_names_filter(names_filter)
        if isinstance(names_filter, (tuple, set)):  # TransformerLens takes lists only
            names_filter = list(names_filter)
        out, cache_dict = super().run_with_cache(
            *model_args, remove_batch_dim=remove_batch_dim, names_filter=names_filter, **kwargs
        )
        if return_cache_object:
            return out, self.activation_cache_class(cache_dict, self, has_batch_dim=not remove_batch_dim)
        return out, cache_dict

    # ------------------------------------------------------------------ the hook contract
    def _build_hook_specs(self) -> dict[str, HookSpec]:
        """One HookSpec per hook name, from the model's config (called once; the result is cached)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not describe its hooks: implement _build_hook_specs() "
            "(see sae_lens_multimodal/core/contract.py)."
        )

    def _specs(self) -> dict[str, HookSpec]:
        specs = self.__dict__.get("_hook_specs_cache")
        if specs is None:
            specs = self._build_hook_specs()
            self.__dict__["_hook_specs_cache"] = specs
        return specs

    def hook_specs(self) -> dict[str, HookSpec]:
        """Every hook of this model: full name -> :class:`~sae_lens_multimodal.core.contract.HookSpec`."""
        return dict(self._specs())

    def _canonical_name(self, name: str) -> str:
        """The full hook name an accepted spelling stands for (a model with aliases overrides this)."""
        return name

    def _unknown_hook(self, name: str, what: str = "hook") -> KeyError:
        return unknown_hook_error(name, self._specs().keys(), what=what, docs=self.hook_docs)

    def hook_spec(self, name: str, *, what: str = "hook") -> HookSpec:
        """The spec of hook ``name``; an unknown name raises a KeyError listing the closest real ones."""
        specs = self._specs()
        spec = specs.get(name)
        if spec is None:
            spec = specs.get(self._canonical_name(name))
        if spec is None:
            raise self._unknown_hook(name, what)
        return spec

    def hook_width(self, name: str) -> Optional[int]:
        """Width of the last dimension at hook ``name`` (None when it is not a feature dimension)."""
        return self.hook_spec(name).width

    def _part_modules(self) -> dict[str, Any]:
        """Part name -> the hooked sub-model that is that part (a standalone model is its one part)."""
        return {self.PART: self}

    def parts(self) -> tuple[str, ...]:
        """The parts (core.contract.PARTS) this model's hooks belong to."""
        return tuple(self._part_modules())

    def part(self, name: str) -> Any:
        """The hooked sub-model for part ``name`` (``HookedCLIP.part("vision")`` is its HookedViT; a
        standalone HookedViT's ``part("vision")`` is itself)."""
        modules = self._part_modules()
        if name not in modules:
            raise KeyError(
                f"{type(self).__name__} has no part {name!r}; its parts are {tuple(modules)}. "
                "Hook specs name their part in spec.part."
            )
        return modules[name]

    def locate(self, name_or_sae: Union[str, SAE], part: Optional[str] = None) -> HookSpec:
        """Where a hook name or an SAE lives in this model, as its HookSpec.

        ``name_or_sae`` is a full hook name, a name relative to a part (e.g. a vision-tower name
        ``blocks.9.hook_resid_post`` on a HookedCLIP or HookedVLM; ``part`` picks the part), or an SAE,
        located by ``sae.cfg.metadata.hook_name`` (and, where a bare name fits several parts, its metadata
        and ``d_in``).
        """
        if isinstance(name_or_sae, str):
            name, sae = name_or_sae, None
        elif not hasattr(getattr(name_or_sae, "cfg", None), "metadata"):
            raise TypeError(
                f"locate() takes a hook name (a string such as 'blocks.0.hook_resid_post') or an SAELens SAE; got "
                f"{type(name_or_sae).__name__} {name_or_sae!r}."
            )
        else:
            sae = name_or_sae
            name = sae.cfg.metadata.hook_name
            if name is None:
                raise ValueError(
                    "This SAE has no cfg.metadata.hook_name, so it is not known where to attach it. "
                    "Set sae.cfg.metadata.hook_name = '<hook name>' first."
                )
        if part is not None and part not in self.parts():
            raise KeyError(f"{type(self).__name__} has no part {part!r}; its parts are {self.parts()}.")
        return self._locate(name, sae, part)

    def _locate(self, name: str, sae: Optional[SAE], part: Optional[str]) -> HookSpec:
        spec = self.hook_spec(name, what="hook for this SAE" if sae is not None else "hook")
        if part is not None and spec.part != part:
            raise KeyError(f"Hook {spec.name!r} belongs to part {spec.part!r}, not {part!r}.")
        return spec

    # ------------------------------------------------------------------ SAE splicing (SAELens)
    def sae_width_check(self, sae: SAE, spec: HookSpec) -> None:
        """Refuse an SAE whose ``d_in`` does not fit the hook (``reshape_activations="hook_z"`` SAEs read the
        heads flattened)."""
        expected = spec.width
        if spec.layout in ("pattern", "scale", "pooled_scale"):  # no feature axis (core/arguments.FEATURE_LAYOUTS)
            raise ValueError(
                f"Hook {spec.name!r} has layout {spec.layout!r} ({LAYOUTS[spec.layout]}): its last dimension is not a "
                "feature dimension, so an SAE cannot read it. Attach the SAE to a hook with a feature axis (a "
                "residual-stream, attention-output or MLP hook; see model.hook_specs())."
            )
        if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
            if spec.layout != "heads":
                raise ValueError(
                    f"This SAE has reshape_activations='hook_z' (it reads per-head activations flattened), but "
                    f"hook {spec.name!r} has no head axis (layout {spec.layout!r}). Attach it to a per-head hook "
                    "such as attn.hook_z."
                )
            expected = spec.flat_width
        d_in = sae.cfg.d_in
        if expected is not None and d_in != expected:
            given = sae.cfg.metadata.hook_name
            origin = f" (from the SAE's hook_name {given!r})" if given != spec.name else ""
            raise ValueError(
                f"SAE d_in={d_in} does not match hook {spec.name!r}{origin}, whose activations have width "
                f"{expected}. Use an SAE trained on this hook (or set cfg.metadata.hook_name to a hook of "
                f"width {d_in})."
            )

    def add_sae(self, sae: SAE, use_error_term: bool | None = None, exclude_special_tokens: Any = False, *,
                on_model_mismatch: str = "warn") -> None:
        """Attach an SAELens SAE at ``sae.cfg.metadata.hook_name`` (SAELens semantics).

        Unlike SAELens, an unknown hook or a width mismatch raises instead of logging and skipping. An SAE whose
        metadata records another model (``model_name`` / ``model_fingerprint``) warns
        (:class:`~sae_lens_multimodal.core.sae_metadata.SAEModelMismatchWarning`); ``on_model_mismatch="error"``
        refuses it, ``"ignore"`` splices it silently (core/sae_metadata.check_sae_model_match).
        """
        self.sae_width_check(sae, self.locate(sae))
        check_sae_model_match(sae, self, on_mismatch=on_model_mismatch)
        _SPLICING["add_sae"](self, sae, use_error_term, exclude_special_tokens)

    # The remaining splicing methods are SAELens's own, used unchanged: they only need hook_dict,
    # setup(), real HookPoint attributes, _acts_to_saes and run_with_cache(return_cache_object=...).
    acts_to_saes = _SPLICING["acts_to_saes"]
    _reset_sae = _SPLICING["_reset_sae"]
    reset_saes = _SPLICING["reset_saes"]
    run_with_saes = _SPLICING["run_with_saes"]
    run_with_cache_with_saes = _SPLICING["run_with_cache_with_saes"]
    run_with_hooks_with_saes = _SPLICING["run_with_hooks_with_saes"]
    saes = _SPLICING["saes"]
