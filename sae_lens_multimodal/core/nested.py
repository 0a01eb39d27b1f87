"""SAE splicing for models made of hooked sub-models (HookedCLIP's towers, HookedVLM's parts).

An SAE trained on a standalone HookedViT records a bare hook name (``blocks.9.hook_resid_post``). In a model
that holds several hooked sub-models the same hook exists once per part (``vision.blocks.9...``,
``text.blocks.9...``), so a bare name has to be resolved to one part before splicing. This mixin does that
resolution and the splicing itself once, for every such model; a model says which parts accept bare names
(:attr:`BARE_NAME_PARTS`), which names are already full (:meth:`_is_full_name`), and how an SAE's metadata
names its part (:meth:`_part_named_by_metadata`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from sae_lens import SAE, logger
from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, get_deep_attr, set_deep_attr
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.hooked_root import unknown_hook_error

__all__ = ["NestedSAEHostMixin"]


class NestedSAEHostMixin:
    """Mixin for a :class:`~sae_lens_multimodal.core.hooked_root.MultimodalHookedRootModule` whose hooks
    live in hooked sub-models. The host sets ``self._sae_locations = {}`` in ``__init__``."""

    #: Sub-model attribute names where a bare hook name may live, in order of preference.
    BARE_NAME_PARTS: Sequence[str] = ("vision",)
    _sae_locations: dict[str, tuple[str, str]]

    # ---- what a host model says about itself
    def _is_full_name(self, name: str) -> bool:
        """Whether ``name`` already names its part (``vision.blocks.0.hook_resid_post``)."""
        raise NotImplementedError

    def _part_named_by_metadata(self, metadata: Any) -> Optional[str]:
        """The part an SAE's metadata names (e.g. ``model_class_name == "HookedText"`` -> ``"text"``)."""
        return None

    # ---- resolution
    def _exists(self, full: str) -> bool:
        return full in self.hook_dict or any(full in locs for locs in self._sae_locations.values())  # type: ignore[attr-defined]

    def sae_hook_location(self, sae: SAE) -> str:
        """Where in this model an SAE is spliced: the full hook name for ``sae.cfg.metadata.hook_name``.

        A full name is used as is. A bare name (as recorded on a standalone sub-model) goes to the first of
        :attr:`BARE_NAME_PARTS` that has it, unless the SAE's metadata names another part (``tower`` /
        ``part``, or a ``model_class_name`` the host recognises) or only one part's width fits ``d_in``.
        """
        name = sae.cfg.metadata.hook_name
        if name is None:
            raise ValueError(
                "This SAE has no cfg.metadata.hook_name, so it is not known where to attach it. "
                "Set sae.cfg.metadata.hook_name = '<hook name>' first."
            )
        return self._resolve(name, sae)

    def _resolve(self, name: str, sae: Optional[SAE] = None, part: Optional[str] = None) -> str:
        hook_dict = self.hook_dict  # type: ignore[attr-defined]
        if self._is_full_name(name):
            if not self._exists(name):
                raise unknown_hook_error(name, hook_dict.keys(), what="hook for this SAE")
            return name
        candidates = [p for p in self.BARE_NAME_PARTS if self._exists(f"{p}.{name}")]
        if not candidates:
            raise unknown_hook_error(
                f"{self.BARE_NAME_PARTS[0]}.{name}", hook_dict.keys(), what=f"hook for this SAE (bare name {name!r})"
            )
        if part is None and sae is not None and len(candidates) > 1:
            meta = sae.cfg.metadata
            said = meta.get("part") or meta.get("tower")
            part = said if said in candidates else self._part_named_by_metadata(meta)
            if part is None:
                fits = [p for p in candidates if self.hook_width(f"{p}.{name}") in (None, sae.cfg.d_in)]  # type: ignore[attr-defined]
                part = fits[0] if len(fits) == 1 else None
        part = part if part in candidates else candidates[0]
        return f"{part}.{name}"

    # ---- splicing (SAELens semantics; the SAE object is never modified)
    def add_sae(self, sae: SAE, use_error_term: Optional[bool] = None, exclude_special_tokens: Any = False) -> None:
        """Attach an SAELens SAE at :meth:`sae_hook_location` of its ``hook_name``, keyed by that hook name
        in ``acts_to_saes``. Unknown hooks and width mismatches raise."""
        name = sae.cfg.metadata.hook_name
        location = self.sae_hook_location(sae)
        name_out = sae.cfg.metadata.hook_name_out or name
        location_out = location if name_out == name else self._resolve(name_out, part=location.split(".")[0])
        expected = self.hook_width(location)  # type: ignore[attr-defined]
        if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
            expected = self._hook_z_width(location, expected)  # type: ignore[attr-defined]
        if expected is not None and sae.cfg.d_in != expected:
            raise ValueError(
                f"SAE d_in={sae.cfg.d_in} does not match hook {location!r} (from the SAE's hook_name {name!r}), "
                f"whose activations have width {expected}. Use an SAE trained on this hook."
            )
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
