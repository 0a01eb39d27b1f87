"""Which token / spatial positions of a hook an edit or a statistic applies to: the one reading of a
``positions`` argument (``"all"``, ``"cls"``, ``"patches"``, token indices, a boolean mask) that steering,
labels and steerability share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from sae_lens_multimodal.core.contract import HookSpec

__all__ = ["Positions", "token_mask"]

#: "all" | "cls" | "patches" | token indices | a boolean mask (1-D over positions, or 2-D spatial).
Positions = Union[str, Sequence[int], torch.Tensor]


def _grid_of(n: int, preferred: Optional[tuple[int, int]] = None) -> Optional[tuple[int, int]]:
    if preferred is not None and preferred[0] * preferred[1] == n:
        return preferred
    r = math.isqrt(n)
    return (r, r) if r * r == n else None


def _resample(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if tuple(mask.shape) == tuple(grid):
        return mask.bool()
    m = mask.float()[None, None]
    if mask.shape[0] >= grid[0] and mask.shape[1] >= grid[1]:
        m = F.adaptive_avg_pool2d(m, grid)  # coverage of each cell
    else:
        m = F.interpolate(m, size=grid, mode="nearest-exact")
    return m[0, 0] >= 0.5


def _image_tokens(vision: Any) -> Optional[tuple[int, Optional[tuple[int, int]], bool]]:
    """(prefix tokens, patch grid, has a CLS token) of a hook over a vision tower's tokens, from its HookSpec
    (or from the tower's HookedViTConfig, where the spec's facts come from); None for other hooks."""
    if vision is None:
        return None
    if isinstance(vision, HookSpec):
        return (vision.n_prefix_tokens, vision.grid, vision.has_cls_token) if vision.has_image_tokens else None
    return vision.n_prefix_tokens, vision.grid_size, vision.has_cls_token


def token_mask(
    positions: Positions,
    n_tokens: int,
    spec: Union[HookSpec, Any, None] = None,
    *,
    where: str = "this hook",
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Boolean mask over the ``n_tokens`` token positions of a hook, the one reading of ``positions`` the
    package uses (steering, labels, steerability).

    ``positions``: ``"all"``; ``"cls"`` / ``"patches"`` (a hook over a vision tower's tokens: pass its ``spec``,
    the :class:`~sae_lens_multimodal.core.contract.HookSpec` with its prefix tokens and patch grid, or the
    tower's :class:`~sae_lens_multimodal.models.config.HookedViTConfig`); token indices; a 1-D boolean mask
    over the positions; or a 2-D spatial mask over the patch grid (any size: resampled, a cell is selected
    when at least half of it is masked; prefix tokens such as CLS and registers are left out).
    """
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    image_tokens = _image_tokens(spec)
    prefix, native_grid, has_cls = image_tokens if image_tokens is not None else (0, None, False)
    if isinstance(positions, str):
        if positions == "all":
            mask[:] = True
            return mask
        if positions not in ("cls", "patches"):
            raise ValueError(
                f"positions must be 'all', 'cls', 'patches', token indices or a boolean mask; got {positions!r}."
            )
        if image_tokens is None:
            raise ValueError(
                f"positions={positions!r} needs a vision-transformer hook; {where} is not in a ViT. Use "
                "'all', token indices or a mask."
            )
        if positions == "cls":
            if not has_cls:
                raise ValueError("positions='cls': this vision transformer has no CLS token.")
            mask[0] = True
        else:
            mask[prefix:] = True
        return mask
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.ndim == 2:
            grid = _grid_of(n_tokens - prefix, native_grid)
            if grid is None:
                raise ValueError(
                    f"A spatial mask needs a square grid of positions; {where} has {n_tokens - prefix} "
                    "non-prefix positions. Pass token indices instead."
                )
            mask[prefix:] = _resample(positions.to(mask.device), grid).flatten()
            return mask
        if positions.ndim != 1 or positions.numel() != n_tokens:
            raise ValueError(
                f"A boolean position mask must have one entry per position ({n_tokens} at {where}) or be a "
                f"2-D spatial mask; got shape {tuple(positions.shape)}."
            )
        return positions.to(mask.device).clone()
    idx = torch.as_tensor(positions, dtype=torch.long).flatten()
    if idx.numel() and (idx.max() >= n_tokens or idx.min() < -n_tokens):
        raise IndexError(f"Position index out of range: {where} has {n_tokens} positions (got {idx.tolist()}).")
    mask[idx.to(mask.device)] = True
    return mask
