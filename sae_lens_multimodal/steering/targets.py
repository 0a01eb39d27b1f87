"""Where a steer acts in a model: the full hook name, a SAELens splice there, the vision transformer a hook
is in."""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_multimodal.steering.specs import Steer

__all__: list[str] = []

_PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_q_text", "hook_k_text",
             "hook_v_text", "hook_z_text", "hook_result_text")


def _is_diffusion(model: Any) -> bool:
    from sae_lens_multimodal.diffusion.hooked import HookedDenoiser

    return isinstance(model, HookedDenoiser)


def _unknown(model: Any, name: str) -> KeyError:
    if hasattr(model, "_unknown"):
        return model._unknown(name)
    from sae_lens_multimodal.core.hooked_root import unknown_hook_error

    return unknown_hook_error(name, model.hook_dict.keys())


def _module_at(model: Any, name: str) -> Any:
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() and isinstance(obj, (torch.nn.ModuleList, torch.nn.Sequential)) else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _resolve_location(model: Any, steer: Steer) -> str:
    """The full hook name in ``model`` where ``steer`` acts (a HookPoint, or an SAE spliced there)."""
    from transformer_lens.hook_points import HookPoint

    sae = getattr(steer, "sae", None)
    given = steer.hook_name if steer.hook_name is not None else (sae.cfg.metadata.hook_name if sae is not None else None)
    if given is None:
        raise ValueError("This SAE has no cfg.metadata.hook_name; pass FeatureSteer(..., hook_name='<hook>').")
    if sae is not None and steer.hook_name is None and hasattr(model, "sae_hook_location"):
        return model.sae_hook_location(sae)  # HookedCLIP: bare tower names go to the vision tower
    name = model.canonical_hook_name(given) if hasattr(model, "canonical_hook_name") else given
    candidates = [name]
    if hasattr(model, "vision") and hasattr(model, "text") and not name.startswith(("vision.", "text.")):
        candidates.append(f"vision.{name}")  # HookedCLIP: a bare name means the vision tower (as for SAEs)
    for cand in candidates:
        module = _module_at(model, cand)
        if isinstance(module, HookPoint) or _spliced_sae(module) is not None:
            return cand
    raise _unknown(model, given)


def _spliced_sae(module: Any) -> Any:
    """The SAE of a SAELens splice wrapper (None for anything else)."""
    from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper

    return module.sae if isinstance(module, _SAEWrapper) else None


def _vit_cfg(model: Any, location: str) -> Any:
    """The HookedViTConfig of the vision transformer that ``location`` is in (None if not in one)."""
    from sae_lens_multimodal.models.config import HookedViTConfig

    obj = model
    for part in location.split("."):
        cfg = getattr(obj, "cfg", None)
        if isinstance(cfg, HookedViTConfig):
            return cfg
        obj = _module_at(obj, part)
        if obj is None:
            return None
    return None
