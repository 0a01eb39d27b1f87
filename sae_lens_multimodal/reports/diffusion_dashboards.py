"""Feature dashboards of diffusion SAEs on a HookedDiffusionPipeline: computing the :class:`FeatureDashboard`
records (per-timestep curves, top generations, steered generations)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.analysis.temporal import sae_timestep_buckets
from sae_lens_multimodal.core.denoising import BRANCH_CODES, timestep_context
from sae_lens_multimodal.reports.dashboard_data import (
    FeatureDashboard,
    TimestepCurve,
    TopExample,
    ZeroShotProbe,
    _check_ids,
    _progress,
    _sae_name,
    _select,
    _steering_effect,
    clamp_hooks,
)
from sae_lens_multimodal.reports.html import to_uint8_image

__all__ = ["diffusion_feature_dashboards"]


@torch.no_grad()
def diffusion_feature_dashboards(
    pipe: Any,
    sae: Any,
    prompts: Sequence[str],
    *,
    feature_ids: Optional[Sequence[int]] = None,
    n_features: int = 6,
    top_k: int = 8,
    num_inference_steps: int = 20,
    seed: int = 0,
    steer_windows: Optional[Mapping[str, Any]] = None,
    steer_prompts: int = 4,
    clamp_multiplier: float = 2.0,
    cfg_branch: Optional[str] = None,
    probe: Optional[ZeroShotProbe] = None,
    pipeline_kwargs: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> list[FeatureDashboard]:
    """Dashboards of a timestep-aware (or plain) SAE on a HookedDiffusionPipeline's denoiser.

    The pipeline generates one image per prompt (prompt ``i`` always gets the initial noise of seed
    ``seed + i``), caching the SAE's hook on the conditional branch at every timestep. Per feature:
    activation per timestep (spatial mean per prompt; mean and 10-90% band over prompts), its top
    generations with the spatial map at its peak timestep, and generations of the first ``steer_prompts``
    prompts with the feature clamped to ``clamp_multiplier`` x its maximum during each window of
    ``steer_windows`` (name -> timesteps as in ``run_with_hooks(at_timesteps=)``; default: the timesteps
    where the feature's mean activation is at least 10% of its peak, and
    the first half of those), on ``cfg_branch`` rows (None: the SAE's own branch when its
    metadata names one, else every row). ``probe`` (a
    :class:`ZeroShotProbe`) captions generated images and measures the zero-shot change. Default feature
    choice: the ``n_features`` whose time-averaged activation varies most between prompts.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings.")
    hook_given = sae.cfg.metadata.hook_name
    if hook_given is None:
        raise ValueError("The SAE has no cfg.metadata.hook_name; set it to the denoiser hook it reads.")
    hook = pipe.locate(hook_given).name  # aliases resolve; an unknown hook raises with close matches
    kwargs = dict(pipeline_kwargs or {})
    kwargs.update(num_inference_steps=num_inference_steps, output_type="np")

    def generators(k: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + i) for i in range(k)]

    images, cache = pipe.run_with_cache(prompts, names_filter=[hook], cfg_branch="cond",
                                        generator=generators(len(prompts)), **kwargs)
    images = [to_uint8_image(im) for im in images]
    timesteps = [float(t) for t in cache.timesteps_of(hook, "cond")]
    acts = cache.stack(hook, "cond").to(sae.dtype)  # [T, B, (h, w,) d]
    if acts.ndim == 3:
        acts = acts[:, :, None, None, :]
    if acts.ndim != 5:
        raise ValueError(f"Expected [batch, h, w, d] or [batch, d] activations at {hook!r}; got {tuple(acts.shape[1:])}.")
    n_t, n_p, gh, gw, _ = acts.shape
    d_sae = sae.cfg.d_sae

    def encode(ti: int, ids: Optional[list[int]] = None) -> torch.Tensor:
        with timestep_context(timesteps[ti], branch="cond"):
            f = sae.encode(acts[ti]).float()  # [B, h, w, d_sae]
        return f if ids is None else f[..., ids]

    spatial_mean = torch.zeros(n_t, n_p, d_sae)
    active = torch.zeros(n_p, d_sae, dtype=torch.bool)
    for ti in _progress(range(n_t), "encoding timesteps", progress):
        f = encode(ti)
        spatial_mean[ti] = f.mean((1, 2))
        active |= (f > 0).any(1).any(1)
    if feature_ids is None:
        selectivity = spatial_mean.mean(0).std(0) if n_p > 1 else spatial_mean.mean(0).mean(0)
        ids = _select(selectivity, active.any(0), min(n_features, d_sae))
    else:
        ids = _check_ids(feature_ids, d_sae)
    feats = torch.stack([encode(ti, ids) for ti in range(n_t)])  # [T, B, h, w, F]

    branch = cfg_branch
    if branch is None and sae.cfg.metadata.get("cfg_branch") in BRANCH_CODES:
        branch = sae.cfg.metadata.get("cfg_branch")  # an SAE of one CFG branch steers that branch
    k = min(steer_prompts, n_p)
    clean_k = images[:k]
    if k:
        clean_k = [to_uint8_image(im) for im in pipe(prompts[:k], generator=generators(k), **kwargs)]
    before = probe.probs_of_images(clean_k) if probe is not None and k else None

    def caption(img_probs: Optional[torch.Tensor], i: int) -> str:
        if img_probs is None or probe is None:
            return ""
        c = int(img_probs[i].argmax())
        return f"CLIP: {probe.class_names[c]} ({float(img_probs[i, c]):.2f})"

    buckets = sae_timestep_buckets(sae, timesteps)
    out = []
    for j, f in enumerate(_progress(ids, "diffusion dashboards", progress)):
        fa = feats[..., j]  # [T, B, h, w]
        per_tp = fa.mean((2, 3))  # [T, B]
        curve = TimestepCurve(
            timesteps=timesteps, mean=per_tp.mean(1).numpy(),
            low=torch.quantile(per_tp, 0.1, dim=1).numpy(), high=torch.quantile(per_tp, 0.9, dim=1).numpy(),
            buckets=buckets,
        )
        peak = int(np.argmax(curve.mean))
        fmax = float(fa.max())
        strength = fa.amax((2, 3)).mean(0)  # [B]: time-averaged spatial max
        top = []
        for i in strength.argsort(descending=True)[: min(top_k, n_p)].tolist():
            heat = fa[peak, i].numpy() if gh * gw > 1 else None
            top.append(TopExample(images[i], heat, float(strength[i]),
                                  f"{float(strength[i]):.2f} \u00b7 {prompts[i]}", index=i))
        effects, columns, rows = [], ["clean"], [[(clean_k[i], caption(before, i))] for i in range(k)]
        value = clamp_multiplier * fmax if fmax > 0 else clamp_multiplier
        for name, window in (steer_windows or _default_windows(curve)).items():
            if not k:
                break
            # The pipeline hands the hook only the chosen timesteps and CFG rows, so an SAE trained on one
            # branch never sees the other branch's rows.
            steered = pipe.run_with_hooks(prompts[:k], fwd_hooks=clamp_hooks(pipe, sae, f, value, hook_name=hook),
                                          at_timesteps=window, cfg_branch=branch, generator=generators(k), **kwargs)
            steered = [to_uint8_image(im) for im in steered]
            after = probe.probs_of_images(steered) if probe is not None else None
            columns.append(name)
            for i in range(k):
                rows[i].append((steered[i], caption(after, i)))
            if probe is not None and before is not None and after is not None:
                effects.append(_steering_effect(
                    probe, before, after,
                    f"{name}: feature {f} clamped to {value:.3g} ({clamp_multiplier:g} x its max {fmax:.3g}) at "
                    f"every position of {hook}, CFG rows {branch or 'all'}; CLIP zero-shot over "
                    f"{len(probe.class_names)} classes on {k} generated images",
                    value, None, (clean_k, steered), 0,
                ))
        nz = fa[fa > 0].numpy()
        notes = [f"Heatmaps: the feature's spatial map ({gh}x{gw}) at timestep {timesteps[peak]:g}, where its mean "
                 "activation peaks."]
        n_buckets = len(getattr(sae.cfg, "timestep_ranges", None) or [])
        if n_buckets > 1:
            notes.append(
                f"This SAE has one dictionary per timestep range ({sae.cfg.timestep_ranges}): latent {f} is a "
                "different feature in each range, so its curve and its steering mean most inside the range where "
                "it is active (the default steering windows stay there).")
        out.append(FeatureDashboard(
            feature=f, kind="diffusion", hook_name=hook, sae_name=_sae_name(sae), n_samples=n_p,
            token_frequency=float((fa > 0).float().mean()), sample_frequency=float(active[:, f].float().mean()),
            max_activation=fmax, top=top, activations=nz, steering=effects, curve=curve,
            generations=(columns, rows, prompts[:k]) if k else None,
            notes=notes,
        ))
    return out


def _default_windows(curve: TimestepCurve) -> dict[str, list[float]]:
    """Steering windows of a feature: the timesteps where its mean activation is at least 10% of its peak,
    and the first half of those (does clamping it early suffice?)."""
    top = float(np.max(curve.mean)) if len(curve.mean) else 0.0
    on = [t for t, m in zip(curve.timesteps, curve.mean) if top > 0 and m >= 0.1 * top] or list(curve.timesteps)
    windows = {f"clamped t {on[0]:g}..{on[-1]:g} (active)": on}
    early = on[: len(on) // 2]
    if early:
        windows[f"clamped t {early[0]:g}..{early[-1]:g} (first half)"] = early
    return windows
