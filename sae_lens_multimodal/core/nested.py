"""SAE splicing and hook specs for models made of hooked sub-models (HookedCLIP's towers, HookedVLM's parts).

An SAE trained on a standalone HookedViT records a bare hook name (``blocks.9.hook_resid_post``). In a model
that holds several hooked sub-models the same hook exists once per part (``vision.blocks.9...``,
``text.blocks.9...``), so a bare name has to be resolved to one part before splicing. This mixin does that
resolution (:meth:`locate`) and the splicing itself once, for every such model. A model says which parts it
has and under which attribute (:attr:`PART_PREFIXES`), which of them accept bare names
(:attr:`BARE_NAME_PARTS`), and how an SAE's metadata names its part (:meth:`_part_named_by_metadata`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

from sae_lens import SAE, logger
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, get_deep_attr, set_deep_attr
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.core.sae_metadata import check_sae_model_match

__all__ = ["NestedSAEHostMixin"]


class NestedSAEHostMixin:
    """Mixin for a :class:`~sae_lens_multimodal.core.hooked_root.MultimodalHookedRootModule` whose hooks
    live in hooked sub-models. The host sets ``self._sae_locations = {}`` in ``__init__``."""

    #: Part (core.contract.PARTS) -> the attribute holding that sub-model, which is also its hook-name prefix.
    PART_PREFIXES: Mapping[str, str] = {"vision": "vision"}
    #: Hook-name prefixes where a bare hook name may live, in order of preference.
    BARE_NAME_PARTS: Sequence[str] = ("vision",)
    _sae_locations: dict[str, tuple[str, str]]

    # ---- what a host model says about itself
    def _part_named_by_metadata(self, metadata: Any) -> Optional[str]:
        """The prefix an SAE's metadata names (e.g. ``model_class_name == "HookedText"`` -> ``"text"``)."""
        return None

    # ---- parts
    def _part_modules(self) -> dict[str, Any]:
        return {part: getattr(self, prefix) for part, prefix in self.PART_PREFIXES.items()}

    def part(self, name: str) -> Any:
        """The hooked sub-model for part ``name`` (a part of core.contract.PARTS, or its hook-name prefix)."""
        for part, prefix in self.PART_PREFIXES.items():
            if name == prefix:
                name = part
        return super().part(name)  # type: ignore[misc]

    def _prefix(self, part: str) -> str:
        return self.PART_PREFIXES.get(part, part)

    # ---- resolution
    def _is_full_name(self, name: str) -> bool:
        """Whether ``name`` already names its part (``vision.blocks.0.hook_resid_post``)."""
        return name in self._specs() or name.partition(".")[0] in self.PART_PREFIXES.values()  # type: ignore[attr-defined]

    def sae_hook_location(self, sae: SAE) -> str:
        """Where in this model an SAE is spliced: the full hook name for ``sae.cfg.metadata.hook_name``
        (``locate(sae).name``)."""
        return self.locate(sae).name  # type: ignore[attr-defined]

    def _locate(self, name: str, sae: Optional[SAE], part: Optional[str]) -> HookSpec:
        """A full name is used as is. A bare name (as recorded on a standalone sub-model) goes to ``part``
        when given, else to the first of :attr:`BARE_NAME_PARTS` that has it, unless the SAE's metadata
        names another part (``tower`` / ``part``, or a ``model_class_name`` the host recognises) or only one
        part's width fits ``d_in``."""
        what = "hook for this SAE" if sae is not None else "hook"
        if part is not None and not self._is_full_name(name):
            return super()._locate(f"{self._prefix(part)}.{name}", sae, part)  # type: ignore[misc]
        return self.hook_spec(self._resolve(name, sae, what=what), what=what)  # type: ignore[attr-defined]

    def _resolve(self, name: str, sae: Optional[SAE] = None, part: Optional[str] = None, what: str = "hook") -> str:
        specs = self._specs()  # type: ignore[attr-defined]
        if self._is_full_name(name):
            if name not in specs:
                raise self._unknown_hook(name, what)  # type: ignore[attr-defined]
            return name
        candidates = [p for p in self.BARE_NAME_PARTS if f"{p}.{name}" in specs]
        if not candidates:
            raise self._unknown_hook(  # type: ignore[attr-defined]
                f"{self.BARE_NAME_PARTS[0]}.{name}", f"{what} (bare name {name!r})"
            )
        if part is None and sae is not None and len(candidates) > 1:
            meta = sae.cfg.metadata
            said = meta.get("part") or meta.get("tower")
            said = self._prefix(said) if isinstance(said, str) else said
            part = said if said in candidates else self._part_named_by_metadata(meta)
            if part is None:
                fits = [p for p in candidates if specs[f"{p}.{name}"].width in (None, sae.cfg.d_in)]
                part = fits[0] if len(fits) == 1 else None
        part = part if part in candidates else candidates[0]
        return f"{part}.{name}"

    # ---- splicing (SAELens semantics; the SAE object is never modified)
    def add_sae(self, sae: SAE, use_error_term: Optional[bool] = None, exclude_special_tokens: Any = False, *,
                on_model_mismatch: str = "warn") -> None:
        """Attach an SAELens SAE at :meth:`sae_hook_location` of its ``hook_name``, keyed by that hook name
        in ``acts_to_saes``. Unknown hooks and width mismatches raise; an SAE recorded for another model warns
        (``on_model_mismatch``: see core/sae_metadata.check_sae_model_match)."""
        name = sae.cfg.metadata.hook_name
        spec = self.locate(sae)  # type: ignore[attr-defined]
        location = spec.name
        name_out = sae.cfg.metadata.hook_name_out or name
        location_out = location if name_out == name else self._resolve(name_out, part=location.split(".")[0])
        self.sae_width_check(sae, spec)  # type: ignore[attr-defined]
        check_sae_model_match(sae, self, on_mismatch=on_model_mismatch)
        acts_to_saes = self._acts_to_saes  # type: ignore[attr-defined]
        if name in acts_to_saes:
            self._reset_sae(name)
        wrapper = _SAEWrapper(
            sae,
            use_error_term=use_error_term if use_error_term is not None else sae.use_error_term,
            exclude_special_tokens=exclude_special_tokens,
        )
        if location_out != location:  # a transcoder: capture its input at the input hook
            point = get_deep_attr(self, location)
            point.add_hook(lambda tensor, hook: (wrapper.capture_input(tensor), tensor)[1], dir="fwd", is_permanent=True)
        acts_to_saes[name] = wrapper
        self._sae_locations[name] = (location, location_out)
        set_deep_attr(self, location_out, wrapper)
        self.setup()  # type: ignore[attr-defined]

    def _reset_sae(self, act_name: str, prev_wrapper: Optional[_SAEWrapper] = None) -> None:
        acts_to_saes = self._acts_to_saes  # type: ignore[attr-defined]
        if act_name not in acts_to_saes:
            logger.warning(f"No SAE is attached to {act_name}. There's nothing to reset.")
            return
        location, location_out = self._sae_locations.pop(act_name)
        if location_out != location:
            point = get_deep_attr(self, location)
            if isinstance(point, HookPoint):
                point.remove_hooks(dir="fwd", including_permanent=True)
        set_deep_attr(self, location_out, HookPoint())
        del acts_to_saes[act_name]
        self.setup()  # type: ignore[attr-defined]
        if prev_wrapper is not None:
            self.add_sae(
                prev_wrapper.sae,
                use_error_term=prev_wrapper.use_error_term,
                exclude_special_tokens=prev_wrapper.exclude_special_tokens,
            )

    def hooks(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        # A sub-model may have been changed directly (model.vision.add_sae(...)): refresh the hook names.
        self.setup()  # type: ignore[attr-defined]
        return super().hooks(*args, **kwargs)  # type: ignore[misc]
