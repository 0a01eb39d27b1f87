"""Feature dashboards of vision SAEs (HookedViT / HookedCLIP): computing the :class:`FeatureDashboard` records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from sae_lens_multimodal.core.hooked_root import unknown_hook_error
from sae_lens_multimodal.analysis.labels import label_features
from sae_lens_multimodal.reports.dashboard_data import (
    FeatureDashboard,
    TopExample,
    ZeroShotProbe,
    _check_ids,
    _model_inputs,
    _patch_grid,
    _progress,
    _sae_name,
    _select,
    _steering_effect,
    _vision_tower,
    clamp_hooks,
)

__all__ = ["vision_feature_dashboards"]


@torch.no_grad()
def vision_feature_dashboards(
    model: Any,
    sae: Any,
    images: Any,
    *,
    feature_ids: Optional[Sequence[int]] = None,
    n_features: int = 8,
    top_k: int = 8,
    captions: Optional[Sequence[str]] = None,
    vocabulary: Any = None,
    text_embeds: Optional[torch.Tensor] = None,
    label_images: int = 64,
    class_names: Optional[Sequence[str]] = None,
    class_templates: Sequence[str] = ("{}",),
    class_embeds: Optional[torch.Tensor] = None,
    clamp_multiplier: float = 2.0,
    steer_images: int = 32,
    steer_positions: Any = None,
    activations: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[FeatureDashboard]:
    """Dashboards of vision SAE features on ``images`` (uint8 [N, H, W, 3] numpy, PIL images, or a
    preprocessed tensor).

    ``model``: a HookedCLIP (labels and zero-shot steering need the text tower) or a HookedViT. The SAE's
    ``cfg.metadata.hook_name`` is a vision hook (bare or ``vision.``-prefixed). ``feature_ids``: which
    features; default the ``n_features`` strongest among those active on 0.5-50% of the images.
    ``captions``: one per image, shown under the top images. ``vocabulary`` / ``text_embeds``: the label
    vocabulary (see :func:`~sae_lens_multimodal.analysis.labels.label_features`), ``label_images`` of the
    images are the labels' reference images. ``class_names`` (+ ``class_templates`` or precomputed
    ``class_embeds``): zero-shot classes for the steering effect, measured on ``steer_images`` images
    with the feature clamped to ``clamp_multiplier`` x its maximum at ``steer_positions`` (None: every
    token). ``activations``: the hook's activations [N, tokens, d_in] if already cached (else cached here).
    """
    tower, clip = _vision_tower(model)
    given = sae.cfg.metadata.hook_name
    if given is None:
        raise ValueError("The SAE has no cfg.metadata.hook_name; set it to the vision hook it reads.")
    try:
        spec = model.locate(given, part="vision")  # bare or vision.-prefixed
    except KeyError:
        spec = None
    if spec is None or spec.part != "vision":
        raise unknown_hook_error(given, tower.hook_specs().keys(), what="vision hook of this SAE")
    hook = spec.local_name
    x, display = _model_inputs(tower, images)
    n = len(display)
    if n == 0:
        raise ValueError("Pass at least one image.")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images.")

    # ---- cache the hook's activations once, then encode in batches
    if activations is not None:
        if len(activations) != n:
            raise ValueError(f"activations has {len(activations)} rows for {n} images.")
        resid = activations.to(sae.dtype)
    else:
        cached = []
        for i in _progress(range(0, n, batch_size), "caching activations", progress):
            _, cache = tower.run_with_cache(x[i : i + batch_size], names_filter=[hook])
            cached.append(cache[hook].to(sae.dtype))
        resid = torch.cat(cached)  # [N, T, d_in]
    if resid.ndim != 3:
        raise ValueError(f"Expected [batch, tokens, d] activations at {hook!r}; got shape {tuple(resid.shape)}.")
    d_sae = sae.cfg.d_sae

    def encode(sl: slice, ids: Optional[list[int]] = None) -> torch.Tensor:
        f = sae.encode(resid[sl])
        return f if ids is None else f[..., ids]

    img_max = torch.zeros(n, d_sae)
    active_tokens = torch.zeros(d_sae)
    for i in range(0, n, batch_size):
        f = encode(slice(i, i + batch_size)).float().cpu()  # page data lives on the CPU, wherever the model runs
        img_max[i : i + batch_size] = f.amax(1)
        active_tokens += (f > 0).sum((0, 1)).float()
    n_tokens = resid.shape[1]
    sample_freq = (img_max > 0).float().mean(0)
    if feature_ids is None:
        strength = img_max.topk(min(top_k, n), dim=0).values.mean(0)
        ids = _select(strength, (sample_freq >= 0.005) & (sample_freq <= 0.5), min(n_features, d_sae))
    else:
        ids = _check_ids(feature_ids, d_sae)
    feats = torch.cat([encode(slice(i, i + batch_size), ids).float().cpu() for i in range(0, n, batch_size)])  # [N, T, F]
    grid = _patch_grid(spec, n_tokens)

    # ---- labels (HookedCLIP only)
    labels = None
    notes: list[str] = []
    if clip is not None:
        try:
            labels = label_features(clip, sae, x[: min(label_images, n)], vocabulary, hook_name=hook,
                                    feature_ids=ids, text_embeds=text_embeds, batch_size=batch_size)
        except ValueError as err:  # e.g. a hook that does not write into the residual stream
            notes.append(f"No text labels: {err}")
    else:
        notes.append("No text labels or zero-shot steering: they need a HookedCLIP (both towers).")

    # ---- steering: zero-shot change with the feature clamped
    probe = None
    if clip is not None and class_names is not None:
        probe = ZeroShotProbe(clip, class_names, class_templates, text_embeds=class_embeds)
        sx = x[: min(steer_images, n)]
        before = probe.probs(sx)

    out = []
    for j, f in enumerate(_progress(ids, "vision dashboards", progress)):
        acts = feats[..., j]  # [N, T]
        per_image = acts.amax(1)
        fmax = float(per_image.max())
        order = per_image.argsort(descending=True)[: min(top_k, n)]
        top = []
        for i in order.tolist():
            heat, where = None, ""
            if grid is not None:
                start, gh, gw = grid
                heat = acts[i, start:].reshape(gh, gw).numpy()
                if int(acts[i].argmax()) < start:  # strongest on a prefix token, which has no patch
                    where = " (CLS)" if start == 1 else f" (prefix token {int(acts[i].argmax())})"
            cap = f"{float(per_image[i]):.2f}{where}" + (f" \u00b7 {captions[i]}" if captions is not None else "")
            top.append(TopExample(display[i], heat, float(per_image[i]), cap, index=i))
        lab = labels[f] if labels is not None else None
        effects = []
        if probe is not None:
            value = clamp_multiplier * fmax if fmax > 0 else clamp_multiplier
            hooks = clamp_hooks(tower, sae, f, value, hook_name=hook, positions=steer_positions)
            after = probe.probs(sx, fwd_hooks=hooks)
            where = "every token" if steer_positions is None else f"tokens {steer_positions}"
            effects.append(_steering_effect(
                probe, before, after,
                f"feature {f} clamped to {value:.3g} ({clamp_multiplier:g} x its max {fmax:.3g}) at {where} of "
                f"{hook}; zero-shot over {len(probe.class_names)} classes on {len(sx)} images",
                value, lab.label if lab is not None else None, (display[: len(sx)], display[: len(sx)]), 6,
            ))
        nz = acts[acts > 0].numpy()
        out.append(FeatureDashboard(
            feature=f, kind="vision", hook_name=hook, sae_name=_sae_name(sae), n_samples=n,
            token_frequency=float(active_tokens[f] / (n * n_tokens)), sample_frequency=float(sample_freq[f]),
            max_activation=fmax, top=top, activations=nz, labels=lab, steering=effects, notes=list(notes),
        ))
    return out
