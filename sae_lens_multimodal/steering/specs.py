"""What a steer is: :class:`FeatureSteer` (SAE latents) and :class:`DirectionSteer` (a direction in a hook's
activation space), the edit modes, and their checks. Applying them: :mod:`sae_lens_multimodal.steering.hooks`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch

from sae_lens_multimodal.core.arguments import as_feature_indices, check_latent_value, finite_float, finite_values
from sae_lens_multimodal.core.denoising import check_cfg_branch
from sae_lens_multimodal.core.positions import Positions

__all__ = ["MODES", "FeatureSteer", "DirectionSteer", "Steer", "Mode", "Positions"]

Mode = Literal["clamp", "add", "scale", "ablate"]
#: What each mode does to a feature's activation (or a direction's coordinate) ``a`` at the chosen positions.
MODES: dict[str, str] = {
    "clamp": "a -> value",
    "add": "a -> a + value",
    "scale": "a -> a * value",
    "ablate": "a -> 0",
}


def _check_common(mode: str, value: Any, positions: Any, cfg_branch: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} ({'; '.join(f'{k}: {v}' for k, v in MODES.items())}); got {mode!r}.")
    if mode == "ablate" and value is not None:
        raise ValueError("mode='ablate' sets the feature to 0 and takes no value=; drop value, or use mode='clamp'.")
    if mode != "ablate" and value is None:
        raise ValueError(f"mode={mode!r} needs value= ({MODES[mode]}).")
    check_cfg_branch(cfg_branch, allow_both=False)  # None: both branches
    if isinstance(positions, str) and positions not in ("all", "cls", "patches"):
        raise ValueError(
            f"positions must be 'all', 'cls', 'patches', a list of token indices or a boolean mask; got {positions!r}."
        )


@dataclass
class FeatureSteer:
    """Edit SAE latents ``features`` of ``sae`` at its hook (``sae.cfg.metadata.hook_name``, or ``hook_name``).

    Args:
        sae: an SAELens SAE (any architecture; its ``encode`` / ``decode`` are used).
        features: one latent index or a list of them.
        mode: ``"clamp"`` (set to ``value``), ``"add"`` (add ``value``), ``"scale"`` (multiply by
            ``value``) or ``"ablate"`` (set to 0).
        value: a number, or one number per feature.
        positions: ``"all"`` (default), ``"cls"``, ``"patches"`` (ViT hooks), token / flat spatial indices,
            a 1-D boolean mask over positions, or a 2-D boolean spatial mask (a ViT's patch grid or a
            diffusion feature map; a mask of another size is resampled onto the hook's grid: a position is
            selected when at least half of it is covered).
        timesteps: diffusion only: ``None`` (all), a number / list (exact scheduler timesteps), a
            ``range`` (half-open interval) or a predicate ``t -> bool``.
        cfg_branch: diffusion only: ``"cond"``, ``"uncond"`` or ``None`` (both).
        hook_name: the hook to steer at, if not the SAE's own.

    >>> FeatureSteer(sae, [3, 7], "scale", value=2.0, positions="cls")
    """

    sae: Any
    features: Union[int, Sequence[int]]
    mode: Mode = "clamp"
    value: Optional[Union[float, Sequence[float], torch.Tensor]] = None
    positions: Positions = "all"
    timesteps: Any = None
    cfg_branch: Optional[str] = None
    hook_name: Optional[str] = None

    def __post_init__(self) -> None:
        _check_common(self.mode, self.value, self.positions, self.cfg_branch)
        self.feature_ids: list[int] = as_feature_indices(self.features, int(self.sae.cfg.d_sae), what="features")
        if self.value is not None:
            v = finite_values(self.value, "value")
            if v.numel() not in (1, len(self.feature_ids)):
                raise ValueError(
                    f"value has {v.numel()} entries for {len(self.feature_ids)} features; pass one number or one per feature."
                )
            check_latent_value(self.sae, self.mode, v)


@dataclass
class DirectionSteer:
    """Edit the coordinate of the activation along ``direction`` at ``hook_name``.

    The coordinate is ``a = x . d / |d|^2`` (the multiple of ``d`` that ``x`` contains), so ``"add"`` gives
    ``x + value * d``, ``"clamp"`` sets the component along ``d`` to ``value * d``, ``"scale"`` multiplies it
    and ``"ablate"`` projects it out. ``positions`` / ``timesteps`` / ``cfg_branch`` as in
    :class:`FeatureSteer`.

    >>> DirectionSteer("vision.blocks.2.hook_resid_post", v, "add", value=4.0, positions="patches")
    """

    hook_name: str
    direction: torch.Tensor
    mode: Mode = "add"
    value: Optional[float] = None
    positions: Positions = "all"
    timesteps: Any = None
    cfg_branch: Optional[str] = None

    def __post_init__(self) -> None:
        _check_common(self.mode, self.value, self.positions, self.cfg_branch)
        d = torch.as_tensor(self.direction)
        if d.ndim == 2 and d.shape[0] == 1:
            d = d[0]
        if d.ndim != 1:
            raise ValueError(f"direction must be one vector [d]; got shape {tuple(d.shape)}. Use one DirectionSteer per direction.")
        if not torch.isfinite(d).all() or float(d.norm()) == 0.0:
            raise ValueError("direction must be a finite, non-zero vector.")
        self.direction = d.detach()
        if self.value is not None:
            if isinstance(self.value, (list, tuple)) or (isinstance(self.value, torch.Tensor) and self.value.numel() != 1):
                raise ValueError("value of a DirectionSteer is one number.")
            self.value = finite_float(self.value, "value")


Steer = Union[FeatureSteer, DirectionSteer]
