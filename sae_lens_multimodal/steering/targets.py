"""Where a steer acts in a model: the hook's spec (core/contract.py), a SAELens splice there."""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.steering.specs import Steer

__all__: list[str] = []


def _module_at(model: Any, name: str) -> Any:
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() and isinstance(obj, (torch.nn.ModuleList, torch.nn.Sequential)) else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _resolve_location(model: Any, steer: Steer) -> HookSpec:
    """The spec of the hook in ``model`` where ``steer`` acts (a HookPoint, or an SAE spliced there).

    ``model.locate`` resolves it: aliases of diffusion blocks, and bare tower names on HookedCLIP / HookedVLM
    (the vision tower, or the part an SAE's metadata and width name).
    """
    sae = getattr(steer, "sae", None)
    if steer.hook_name is not None:
        return model.locate(steer.hook_name)
    if sae is None or sae.cfg.metadata.hook_name is None:
        raise ValueError("This SAE has no cfg.metadata.hook_name; pass FeatureSteer(..., hook_name='<hook>').")
    return model.locate(sae)


def _spliced_sae(module: Any) -> Any:
    """The SAE of a SAELens splice wrapper (None for anything else)."""
    from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper

    return module.sae if isinstance(module, _SAEWrapper) else None
