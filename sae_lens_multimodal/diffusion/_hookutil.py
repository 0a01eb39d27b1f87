"""Calling a hook point from inside a diffusers forward without changing anything when nothing watches it."""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.hooked_root import is_observed


def observed(module: nn.Module | None) -> bool:
    """True when the hook slot must be called: a watched HookPoint, or anything spliced in (an SAE)."""
    if module is None:
        return False
    if isinstance(module, HookPoint):
        return is_observed(module)
    # SAELens's add_sae swaps an _SAEWrapper into the slot: it always has to run.
    return True


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors track no version counter
        return None


def call_hook(hook: nn.Module, view: torch.Tensor) -> tuple[torch.Tensor, bool | None]:
    """Run ``hook`` on ``view``.

    Returns ``(value, modified)``: ``value`` is ``view`` itself when the hook returned its input (or None),
    and ``modified`` says whether the hook replaced or edited it in place (None: unknown, inference mode).
    Returning the very input object is how identity hooks stay bit-identical.
    """
    before = _version(view)
    result = hook(view)
    if result is None or result is view:
        if before is None:
            return view, None
        return view, _version(view) != before
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"Hook at {getattr(hook, 'name', hook)!r} returned {type(result).__name__}, expected a Tensor.")
    if result.shape != view.shape:
        raise ValueError(
            f"Hook at {getattr(hook, 'name', hook)!r} returned shape {tuple(result.shape)}, but the activation has "
            f"shape {tuple(view.shape)}. Hooks must return a tensor of the activation's shape (or None)."
        )
    return result, True


def hook_channel_last(hook: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool | None]:
    """Show ``x`` to ``hook`` channel-last ((b, c, h, w) -> (b, h, w, c)) and map the result back."""
    if x.ndim != 4:
        return call_hook(hook, x)
    view = x.permute(0, 2, 3, 1)
    value, modified = call_hook(hook, view)
    if value is view:
        return x, modified  # in-place edits already live in x's storage
    return value.permute(0, 3, 1, 2).contiguous(), True
