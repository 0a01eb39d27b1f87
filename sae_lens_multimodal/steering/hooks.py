"""Applying steers: one steer bound to one model (:class:`_Steerer`: checks, which rows / positions / timesteps,
the edit) and :func:`steering_hooks`, the TransformerLens ``fwd_hooks`` that apply them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from sae_lens_multimodal.core.arguments import FEATURE_LAYOUTS, check_layout
from sae_lens_multimodal.core.denoising import cfg_row_labels, current_denoising_state
from sae_lens_multimodal.core.positions import _resample, token_mask
from sae_lens_multimodal.steering.specs import DirectionSteer, FeatureSteer, Steer
from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.steering.targets import _module_at, _resolve_location, _spliced_sae

__all__ = ["steering_hooks"]


class _Steerer:
    """One steer bound to one model: where it acts and the edit itself."""

    def __init__(self, model: Any, steer: Steer) -> None:
        self.model = model
        self.steer = steer
        self.sae = getattr(steer, "sae", None)
        diffusion = has_parts(model, "denoiser")
        if not diffusion and (steer.timesteps is not None or steer.cfg_branch is not None):
            what = "timesteps=" if steer.timesteps is not None else "cfg_branch="
            raise ValueError(
                f"{what} only applies to diffusion models (HookedUNet, HookedDiT, HookedDiffusionPipeline); "
                f"{type(model).__name__} has no denoising timesteps or guidance branches. Remove it."
            )
        self.diffusion = diffusion
        self.via_splice_hook = False  # set by steer(): whether a later splice of the SAE is steered via its hook
        self.splice_fired = False  # whether that happened
        # Unknown hooks: the model's KeyError with close matches; hooks without a feature axis are refused.
        self.spec = check_layout(model, _resolve_location(model, steer), FEATURE_LAYOUTS, purpose="steering")
        self.location = self.spec.name
        pos = steer.positions
        if isinstance(pos, str) and pos in ("cls", "patches"):
            if not self.spec.has_image_tokens:
                raise ValueError(
                    f"positions={pos!r} needs a vision-transformer hook; {self.location!r} is not in a ViT. Use "
                    "'all', token indices or a mask."
                )
            if pos == "cls" and not self.spec.has_cls_token:
                raise ValueError("positions='cls': this vision transformer has no CLS token.")
        self.width = self.spec.width
        if self.sae is not None:
            d_in = int(self.sae.cfg.d_in)
            if getattr(self.sae.cfg, "reshape_activations", "none") == "hook_z":
                expected = self.spec.flat_width
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
        from sae_lens_multimodal.diffusion.pipeline import TimestepSelector  # imports diffusers: diffusion models only

        self.selector = TimestepSelector(steer.timesteps) if steer.timesteps is not None else None

    def _per_head_flat(self, n: int) -> bool:
        """Whether a direction of width ``n`` spans all heads of a per-head hook ([..., head, d_head])."""
        return self.spec.layout == "heads" and self.spec.flat_width == n

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
        state = current_denoising_state()  # which call and which rows: the running call's own state
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
            labels = state.batch_branches or cfg_row_labels(batch)
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
        mask = token_mask(pos, n_first, self.spec, where=repr(self.location), device=device)
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
        spatial = self.spec.layout == "spatial"  # a channel-last feature map [batch, h, w, channels]
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
