"""Steering: clamp, add, scale or ablate SAE features or raw directions at hook points.

One API for every hooked model of this package (HookedViT, HookedCLIP, HookedVLM, HookedUNet, HookedDiT,
HookedDiffusionPipeline). A steer says *what* to edit (:class:`FeatureSteer`: SAE latents;
:class:`DirectionSteer`: a direction in the hook's activation space), *how* (``mode``), *where* (hook,
token / spatial positions) and, for diffusion models, *when* (timesteps, CFG branch). Apply steers with

* ``model.run_with_hooks(x, fwd_hooks=steering_hooks(model, [s1, s2]))`` (also inside ``model.saes(...)``
  and with ``run_with_hooks_with_saes``), or
* ``with steer(model, s1, s2): model(x)`` (also around or inside ``run_with_saes`` / ``model.saes``).

SAE features keep the SAE error term: the steered activation is ``x + decode(f') - decode(f)`` where ``f``
is the SAE's encoding of ``x`` and ``f'`` the edited encoding, so only the decoder change of the edited
features is added and an edit that changes nothing leaves ``x`` bit-for-bit unchanged. When the same SAE
is spliced into the model (``run_with_saes`` / ``model.saes``), the edit is made on its feature
activations (``hook_sae_acts_post``) instead and the splice's own ``use_error_term`` decides whether the
error term is kept (SAELens semantics).

>>> from sae_lens import SAE
>>> from sae_lens_multimodal import HookedCLIP
>>> from sae_lens_multimodal.steering import FeatureSteer, steer
>>> model = HookedCLIP.from_pretrained("shapes-clip")
>>> sae = SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post")
>>> with steer(model, FeatureSteer(sae, 17, "clamp", value=8.0, positions="patches")):
...     emb = model.encode_image(images)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["MODES", "FeatureSteer", "DirectionSteer", "Steer", "steering_hooks", "steer", "token_mask"]

Mode = Literal["clamp", "add", "scale", "ablate"]
#: What each mode does to a feature's activation (or a direction's coordinate) ``a`` at the chosen positions.
MODES: dict[str, str] = {
    "clamp": "a -> value",
    "add": "a -> a + value",
    "scale": "a -> a * value",
    "ablate": "a -> 0",
}
#: "all" | "cls" | "patches" | token indices | a boolean mask (1-D over positions, or 2-D spatial).
Positions = Union[str, Sequence[int], torch.Tensor]
_BRANCHES = ("cond", "uncond")
_PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_q_text", "hook_k_text",
             "hook_v_text", "hook_z_text", "hook_result_text")


def _check_common(mode: str, value: Any, positions: Any, cfg_branch: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} ({'; '.join(f'{k}: {v}' for k, v in MODES.items())}); got {mode!r}.")
    if mode != "ablate" and value is None:
        raise ValueError(f"mode={mode!r} needs value= ({MODES[mode]}).")
    if cfg_branch is not None and cfg_branch not in _BRANCHES:
        raise ValueError(f"cfg_branch must be 'cond', 'uncond' or None (both branches); got {cfg_branch!r}.")
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
        d_sae = int(self.sae.cfg.d_sae)
        feats = [self.features] if isinstance(self.features, int) else [int(f) for f in self.features]
        if not feats:
            raise ValueError("features is empty: pass at least one SAE latent index.")
        bad = [f for f in feats if not 0 <= f < d_sae]
        if bad:
            raise IndexError(f"Feature index {bad[0]} is out of range: this SAE has d_sae={d_sae} latents (indices 0..{d_sae - 1}).")
        self.feature_ids: list[int] = feats
        if self.value is not None:
            v = torch.as_tensor(self.value, dtype=torch.float32).flatten()
            if v.numel() not in (1, len(feats)):
                raise ValueError(f"value has {v.numel()} entries for {len(feats)} features; pass one number or one per feature.")


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
        if self.value is not None and torch.as_tensor(self.value).numel() != 1:
            raise ValueError("value of a DirectionSteer is one number.")


Steer = Union[FeatureSteer, DirectionSteer]


# ---------------------------------------------------------------------------------------------- resolution
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


def token_mask(
    positions: Positions,
    n_tokens: int,
    vit_cfg: Any = None,
    *,
    where: str = "this hook",
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Boolean mask over the ``n_tokens`` token positions of a hook, the one reading of ``positions`` the
    package uses (steering, labels, steerability).

    ``positions``: ``"all"``; ``"cls"`` / ``"patches"`` (a vision-transformer hook: pass its ``vit_cfg``, a
    :class:`~sae_lens_multimodal.models.config.HookedViTConfig`); token indices; a 1-D boolean mask over the
    positions; or a 2-D spatial mask over the patch grid (any size: resampled, a cell is selected when at least
    half of it is masked; prefix tokens such as CLS and registers are left out).
    """
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    prefix = vit_cfg.n_prefix_tokens if vit_cfg is not None else 0
    if isinstance(positions, str):
        if positions == "all":
            mask[:] = True
            return mask
        if positions not in ("cls", "patches"):
            raise ValueError(
                f"positions must be 'all', 'cls', 'patches', token indices or a boolean mask; got {positions!r}."
            )
        if vit_cfg is None:
            raise ValueError(
                f"positions={positions!r} needs a vision-transformer hook; {where} is not in a ViT. Use "
                "'all', token indices or a mask."
            )
        if positions == "cls":
            if not vit_cfg.has_cls_token:
                raise ValueError("positions='cls': this vision transformer has no CLS token.")
            mask[0] = True
        else:
            mask[prefix:] = True
        return mask
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.ndim == 2:
            grid = _grid_of(n_tokens - prefix, vit_cfg.grid_size if vit_cfg is not None else None)
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


class _Steerer:
    """One steer bound to one model: where it acts and the edit itself."""

    def __init__(self, model: Any, steer: Steer) -> None:
        self.model = model
        self.steer = steer
        self.sae = getattr(steer, "sae", None)
        diffusion = _is_diffusion(model)
        if not diffusion and (steer.timesteps is not None or steer.cfg_branch is not None):
            what = "timesteps=" if steer.timesteps is not None else "cfg_branch="
            raise ValueError(
                f"{what} only applies to diffusion models (HookedUNet, HookedDiT, HookedDiffusionPipeline); "
                f"{type(model).__name__} has no denoising timesteps or guidance branches. Remove it."
            )
        self.diffusion = diffusion
        self.via_splice_hook = False  # set by steer(): whether a later splice of the SAE is steered via its hook
        self.splice_fired = False  # whether that happened
        self.location = _resolve_location(model, steer)
        self.short = self.location.rsplit(".", 1)[-1]
        self.vit = None if diffusion else _vit_cfg(model, self.location)
        pos = steer.positions
        if isinstance(pos, str) and pos in ("cls", "patches"):
            if self.vit is None:
                raise ValueError(
                    f"positions={pos!r} needs a vision-transformer hook; {self.location!r} is not in a ViT. Use "
                    "'all', token indices or a mask."
                )
            if pos == "cls" and not self.vit.has_cls_token:
                raise ValueError("positions='cls': this vision transformer has no CLS token.")
        self.width = model.hook_width(self.location) if hasattr(model, "hook_width") else None
        if self.sae is not None:
            d_in = int(self.sae.cfg.d_in)
            if getattr(self.sae.cfg, "reshape_activations", "none") == "hook_z" and hasattr(model, "_hook_z_width"):
                expected = model._hook_z_width(self.location, self.width)
            else:
                expected = self.width
            if expected is not None and d_in != expected:
                raise ValueError(
                    f"SAE d_in={d_in} does not match hook {self.location!r}, whose activations have width {expected}. "
                    "Steer with an SAE trained on this hook (or pass hook_name= of a hook of width d_in)."
                )
            self.feats = torch.tensor(steer.feature_ids, dtype=torch.long)
        else:
            d = steer.direction
            if self.width is not None and d.shape[0] != self.width and not self._per_head_flat(d.shape[0]):
                raise ValueError(
                    f"Direction has shape {tuple(d.shape)} but hook {self.location!r} has activations of shape "
                    f"[..., {self.width}]: a direction needs {self.width} entries."
                )
        from sae_lens_multimodal.diffusion.pipeline import TimestepSelector

        self.selector = TimestepSelector(steer.timesteps) if steer.timesteps is not None else None

    def _per_head_flat(self, n: int) -> bool:
        """Whether a direction of width ``n`` spans all heads of a per-head hook ([..., head, d_head])."""
        if self.short not in _PER_HEAD or self.width is None or not hasattr(self.model, "_hook_z_width"):
            return False
        return self.model._hook_z_width(self.location, self.width) == n

    # ------------------------------------------------------------------ where
    def target(self) -> str:
        """The hook name to register on now: the hook point, or inside an SAE spliced at it."""
        module = _module_at(self.model, self.location)
        spliced = _spliced_sae(module)
        if spliced is None:
            return self.location
        if spliced is self.sae:
            return f"{self.location}.hook_sae_acts_post"  # edit the spliced SAE's own latents
        return f"{self.location}.hook_sae_output"  # what flows on from a different SAE spliced here

    # ------------------------------------------------------------------ when and which rows
    def rows(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        """Boolean [batch] of rows to edit now; None = every row; an all-False tensor = nothing to do."""
        if not self.diffusion:
            return None
        from sae_lens_multimodal.diffusion.context import current_denoising_state

        state = current_denoising_state()
        if self.selector is not None:
            if state is None or state.timestep is None:
                raise RuntimeError(
                    "timesteps= needs the timestep of the denoiser call, which is only known while the hooked "
                    "denoiser (or HookedDiffusionPipeline) runs."
                )
            pipe = getattr(self.model, "pipe", None)
            schedule = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
            if schedule is not None and state.call_index == 0:
                self.selector.validate([t.item() if isinstance(t, torch.Tensor) else t for t in schedule])
            if not self.selector(state.timestep):
                return torch.zeros(batch, dtype=torch.bool, device=device)
        want = self.steer.cfg_branch
        if want is None:
            return None
        branch = None if state is None else state.branch
        if branch is None:
            raise RuntimeError(
                "cfg_branch= needs a HookedDiffusionPipeline run (a bare denoiser call has no guidance branch)."
            )
        if branch == "both":
            labels = state.batch_branches or (("uncond",) * (batch // 2) + ("cond",) * (batch - batch // 2))
            if len(labels) != batch:
                return None
            return torch.tensor([b == want for b in labels], dtype=torch.bool, device=device)
        return torch.full((batch,), branch == want, dtype=torch.bool, device=device)

    # ------------------------------------------------------------------ which positions
    def position_mask(self, lead: tuple[int, ...], spatial: bool, device: torch.device) -> Optional[torch.Tensor]:
        """Boolean mask over the position dims ``lead`` (activation shape without batch and width); None = all."""
        pos = self.steer.positions
        if isinstance(pos, str) and pos == "all":
            return None
        n_first = lead[0] if lead else 1
        if spatial:  # diffusion feature map [h, w]: indices are flat, masks are spatial
            h, w = lead[0], lead[1]
            if isinstance(pos, torch.Tensor) and pos.dtype == torch.bool and pos.ndim == 2:
                return _resample(pos.to(device), (h, w))
            return token_mask(pos, h * w, where=repr(self.location), device=device).reshape(h, w)
        mask = token_mask(pos, n_first, self.vit, where=repr(self.location), device=device)
        return mask.reshape(n_first, *([1] * (len(lead) - 1))).expand(lead) if len(lead) > 1 else mask

    # ------------------------------------------------------------------ the edit
    def _new(self, a: torch.Tensor) -> torch.Tensor:
        s = self.steer
        if s.mode == "ablate":
            return torch.zeros_like(a)
        v = torch.as_tensor(s.value, dtype=a.dtype, device=a.device).flatten()
        if s.mode == "clamp":
            return v.expand_as(a) if v.numel() == a.shape[-1] else torch.full_like(a, float(v[0]))
        if s.mode == "add":
            return a + v
        return a * v

    def _select(self, shape: tuple[int, ...], spatial: bool, device: torch.device) -> Optional[torch.Tensor]:
        """Boolean mask over ``shape[:-1]`` (batch and positions); None = edit everything; all-False = skip."""
        rows = self.rows(shape[0], device)
        pos = self.position_mask(tuple(shape[1:-1]), spatial, device)
        if rows is None and pos is None:
            return None
        sel = torch.ones(shape[:-1], dtype=torch.bool, device=device)
        if rows is not None:
            sel &= rows.reshape(-1, *([1] * (len(shape) - 2)))
        if pos is not None:
            sel &= pos
        return sel

    def edit_latents(self, f: torch.Tensor, spatial: bool) -> Optional[torch.Tensor]:
        """Edited copy of SAE latents ``f`` [batch, ..., d_sae] (None when nothing is selected)."""
        sel = self._select(tuple(f.shape), spatial, f.device)
        if sel is not None and not bool(sel.any()):
            return None
        feats = self.feats.to(f.device)
        old = f[..., feats]
        new = self._new(old)
        if sel is not None:
            new = torch.where(sel[..., None], new, old)
        out = f.clone()
        out[..., feats] = new
        return out

    def hook(self, act: torch.Tensor, hook: Any) -> Optional[torch.Tensor]:
        """TransformerLens hook: at the hook point (or a foreign splice's output), or at this SAE's latents."""
        sae = self.sae
        spatial = self.diffusion and act.ndim == 4 and self.short not in _PER_HEAD
        if sae is not None and hook is getattr(sae, "hook_sae_acts_post", None):
            return self.edit_latents(act, spatial=spatial)  # latents of this SAE, spliced here
        if sae is not None:
            return self._feature_delta(act, spatial)
        return self._direction_edit(act, spatial)

    def _feature_delta(self, act: torch.Tensor, spatial: bool) -> Optional[torch.Tensor]:
        from sae_lens.saes.sae import _disable_hooks

        sae = self.sae
        x = act.to(sae.W_dec.dtype)
        with torch.no_grad(), _disable_hooks(sae):  # the SAE's own hook points stay untouched
            f = sae.encode(x)
            f_new = self.edit_latents(f, spatial=spatial and f.ndim == 4)
            if f_new is None:
                return None
            base = sae.decode(f)
            # Encode again before the second decode: stateful SAEs (timestep-bucketed ones) pair each
            # decode with the preceding encode (e.g. to pass rows outside their timestep ranges through).
            sae.encode(x)
            delta = sae.decode(f_new) - base
        return act + delta.to(act.dtype)

    def _direction_edit(self, act: torch.Tensor, spatial: bool) -> Optional[torch.Tensor]:
        d = self.steer.direction.to(act.device, act.dtype)
        x = act
        if act.shape[-1] != d.shape[0]:
            if act.ndim >= 3 and act.shape[-2] * act.shape[-1] == d.shape[0]:
                x = act.flatten(-2)  # per-head hook steered with a direction over all heads
                spatial = False
            else:
                raise ValueError(
                    f"Direction has shape {tuple(d.shape)} but the activation at {self.location!r} has shape "
                    f"{tuple(act.shape)}."
                )
        sel = self._select(tuple(x.shape), spatial, x.device)
        if sel is not None and not bool(sel.any()):
            return None
        coord = (x @ d) / (d @ d)
        change = self._new(coord) - coord
        if sel is not None:
            change = torch.where(sel, change, torch.zeros_like(change))
        out = x + change[..., None] * d
        return out.reshape(act.shape)


class _Target:
    """A TransformerLens hook-name predicate that picks, when hooks are added, where a steer acts now
    (the hook point, or inside an SAE spliced there), so the same ``fwd_hooks`` list works with and
    without ``run_with_saes`` / ``run_with_hooks_with_saes``."""

    def __init__(self, steerer: _Steerer) -> None:
        self.steerer = steerer
        self._name: Optional[str] = None

    def __call__(self, name: str) -> bool:
        if self._name is None or name == self.steerer.location or name.startswith(self.steerer.location + ".hook_sae"):
            self._name = self.steerer.target()
        return name == self._name

    def __repr__(self) -> str:
        return f"<steer at {self.steerer.target()!r}>"


def _bind(model: Any, steers: Sequence[Steer]) -> list[_Steerer]:
    if isinstance(steers, (FeatureSteer, DirectionSteer)):
        steers = [steers]
    out = []
    for s in steers:
        if not isinstance(s, (FeatureSteer, DirectionSteer)):
            raise TypeError(f"Expected FeatureSteer / DirectionSteer objects; got {type(s).__name__}.")
        out.append(_Steerer(model, s))
    return out


def steering_hooks(model: Any, steers: Union[Steer, Sequence[Steer]]) -> list[tuple[Callable[[str], bool], Callable]]:
    """TransformerLens ``fwd_hooks`` that apply ``steers`` (in order) for ``run_with_hooks`` / ``hooks()``.

    Every steer is checked against ``model`` now (unknown hooks, widths, positions, diffusion-only
    options). Each entry's name is a hook-name predicate that picks the hook point, or the latents of the
    same SAE when it is spliced at that hook by the time the hooks are added (``run_with_hooks_with_saes``,
    inside ``model.saes(...)``).

    >>> out = model.run_with_hooks(images, fwd_hooks=steering_hooks(model, [FeatureSteer(sae, 5, "ablate")]))
    >>> imgs = pipe.run_with_hooks(prompt, fwd_hooks=steering_hooks(pipe, [FeatureSteer(sae, 5, "add", 3.0,
    ...                            timesteps=range(500, 1000), cfg_branch="cond")]))
    """
    return [(_Target(s), s.hook) for s in _bind(model, steers)]


@contextmanager
def steer(model: Any, *steers: Steer) -> Iterator[Any]:
    """Apply ``steers`` to every forward pass of ``model`` inside the block; removed on exit, also on errors.

    Works around or inside ``model.run_with_saes`` / ``model.saes(...)``: a steer on the latents of an SAE
    that gets spliced while the block runs edits those latents in the splice.

    >>> with steer(model, FeatureSteer(sae, 5, "clamp", 6.0), DirectionSteer(hook, v, "add", 2.0)):
    ...     logits = model(images, texts)
    """
    if len(steers) == 1 and isinstance(steers[0], (list, tuple)):
        steers = tuple(steers[0])
    bound = _bind(model, steers)
    handles = []
    try:
        for s in bound:
            if s.sae is None:
                continue
            point = s.sae.hook_sae_acts_post

            def on_splice(module: Any, inputs: Any, output: Any, s: _Steerer = s) -> Optional[torch.Tensor]:
                # Fires only while the SAE is spliced into this model after the hooks below were added
                # (a splice present at entry is steered through the TransformerLens hook instead).
                if s.via_splice_hook and any(_spliced_sae(w) is s.sae for w in getattr(model, "_acts_to_saes", {}).values()):
                    s.splice_fired = True
                    return s.hook(output, hook=module)
                return None

            handles.append(point.register_forward_hook(on_splice))
        hooks = []
        for s in bound:
            target = s.target()
            # A steer on a spliced SAE's latents at entry goes through the TransformerLens hook on them;
            # otherwise the hook point gets the hook and the splice hook covers a later splice.
            s.via_splice_hook = not target.endswith(".hook_sae_acts_post")
            hooks.append((target, s.hook))
        entry = [_module_at(model, s.location) if s.via_splice_hook else None for s in bound]
        with model.hooks(fwd_hooks=hooks):
            yield model
        for s, point in zip(bound, entry):
            # Splicing an SAE replaces the hook point, so a steer registered on it before the splice did
            # not run while that SAE was in place (unless it steers this SAE's own latents).
            if point is not None and _module_at(model, s.location) is not point and not s.splice_fired:
                warnings.warn(
                    f"The steer at {s.location!r} was bypassed while an SAE was spliced there inside the steer() "
                    "block (splicing replaces the hook point). Enter steer() inside run_with_saes / model.saes(...), "
                    "or pass steering_hooks(...) to run_with_hooks_with_saes.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    finally:
        for h in handles:
            h.remove()
