"""Per-feature dashboards for vision and diffusion SAEs, written as static HTML (see :mod:`.html`).

Computing and rendering are separate: :func:`vision_feature_dashboards` / :func:`diffusion_feature_dashboards`
return :class:`FeatureDashboard` records (plain data: images, activations, labels, steering effects,
per-timestep curves), :func:`dashboard_pages` renders them to HTML pages, and
:func:`write_feature_dashboards` does both and writes the directory atomically.

What a dashboard shows
    * top-activating images with a heatmap of the feature's activation per patch (vision), or the
      generated images it is strongest on, with its spatial map at its peak timestep (diffusion);
    * a histogram of its nonzero activations;
    * vision on a HookedCLIP: both text labels of :mod:`sae_lens_multimodal.analysis.labels` (direct-path
      with its validity, causal) with their scores;
    * steering: the feature clamped to ``clamp_multiplier`` times its largest observed activation at every
      token, and the change of zero-shot class probabilities (vision: on held images; diffusion: of the
      images generated with the feature clamped at chosen timesteps, judged by a CLIP);
    * diffusion: the feature's activation per timestep (mean over prompts and a 10-90% band) and
      generations with and without the feature steered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch

from sae_lens_multimodal.reports.html import (
    Page,
    Raw,
    comparison_grid,
    heatmap_overlay,
    histogram_png,
    image_grid,
    image_tag,
    img_tag,
    link,
    paragraph,
    table,
    timestep_curve_png,
    to_uint8_image,
    write_site,
)

__all__ = [
    "TopExample",
    "SteeringEffect",
    "TimestepCurve",
    "FeatureDashboard",
    "ZeroShotProbe",
    "clamp_feature_hook",
    "clamp_hooks",
    "vision_feature_dashboards",
    "diffusion_feature_dashboards",
    "dashboard_pages",
    "write_dashboards",
    "write_feature_dashboards",
]


# --------------------------------------------------------------------------------------------- records
@dataclass
class TopExample:
    """One top-activating example: the image, the feature's map over its patches, and a caption."""

    image: np.ndarray  # uint8 [H, W, 3]
    heatmap: Optional[np.ndarray]  # [grid_h, grid_w], None when the activation has no patch grid
    activation: float
    caption: str = ""
    index: int = -1  # position of the example among the images / prompts the dashboard was computed on


@dataclass
class SteeringEffect:
    """Zero-shot change when the feature is clamped: per-class mean probability changes and examples."""

    description: str
    value: float
    changed_fraction: float  # share of examples whose top zero-shot class changed
    gained: list[tuple[str, float]]  # classes whose mean probability rose most, with the rise
    lost: list[tuple[str, float]]
    #: (label word, mean probability of classes containing it before, after), when the feature has a label
    toward_label: Optional[tuple[str, float, float]] = None
    #: rows of (image before, prediction before, image after, prediction after)
    examples: list[tuple[np.ndarray, str, np.ndarray, str]] = field(default_factory=list)


@dataclass
class TimestepCurve:
    """A feature's activation per denoising timestep: mean over prompts and a low/high band."""

    timesteps: list[float]  # in sampling order (noise first)
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    statistic: str = "spatial mean"
    #: for a timestep-bucketed SAE, the bucket (separate dictionary) of each timestep: the feature exists only
    #: in the bucket where it peaks, so its timing is read within that stretch
    buckets: Optional[list[int]] = None

    def _stretch(self) -> tuple[int, int]:
        """[start, end) step indices over which the feature is one feature: all, or its peak bucket's stretch."""
        n = len(self.mean)
        if not self.buckets or not n:
            return 0, n
        peak = int(np.argmax(self.mean))
        start, end = peak, peak + 1
        while start > 0 and self.buckets[start - 1] == self.buckets[peak]:
            start -= 1
        while end < n and self.buckets[end] == self.buckets[peak]:
            end += 1
        return start, end

    @property
    def half_max_timestep(self) -> Optional[float]:
        """The first timestep (in sampling order) at which the mean reaches half of its maximum (the same
        definition as ``FeatureTimecourse.half_max_timesteps`` in analysis/temporal.py)."""
        start, end = self._stretch()
        mean = self.mean[start:end]
        top = float(np.max(mean)) if len(mean) else 0.0
        if top <= 0:
            return None
        return float(self.timesteps[start + int(np.argmax(mean >= top / 2))])

    @property
    def commit_timestep(self) -> Optional[float]:
        """The timestep from which the mean stays within 10% of its total excursion from its final value
        (:func:`sae_lens_multimodal.analysis.temporal.commit_index`, the package's one definition), within the
        peak bucket's stretch for a timestep-bucketed SAE."""
        from sae_lens_multimodal.analysis.temporal import commit_index

        start, end = self._stretch()
        if end <= start:
            return None
        return float(self.timesteps[start + commit_index(torch.as_tensor(self.mean[start:end], dtype=torch.float64))])


@dataclass
class FeatureDashboard:
    """Everything one feature's page shows (plain data; render with :func:`dashboard_pages`)."""

    feature: int
    kind: str  # "vision" or "diffusion"
    hook_name: str
    sae_name: str
    n_samples: int  # images (vision) or prompts (diffusion)
    token_frequency: float  # share of tokens / spatial positions where the feature is active
    sample_frequency: float  # share of images / prompts where it is active anywhere
    max_activation: float
    top: list[TopExample]
    activations: np.ndarray  # nonzero activations, for the histogram
    labels: Any = None  # analysis.labels.FeatureLabels
    steering: list[SteeringEffect] = field(default_factory=list)
    curve: Optional[TimestepCurve] = None
    #: generations: (column labels, rows of (image, caption) per column, row labels)
    generations: Optional[tuple[list[str], list[list[tuple[np.ndarray, str]]], list[str]]] = None
    notes: list[str] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return f"{self.kind}-feature-{self.feature}.html"

    @property
    def short_label(self) -> str:
        lab = self.labels
        if lab is None:
            return ""
        parts = []
        if lab.causal:
            parts.append(f"causal: {lab.causal[0][0]}")
        if lab.direct_path:
            parts.append(f"direct: {lab.direct_path[0][0]}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------- helpers
def _progress(iterable: Any, desc: str, enabled: bool, total: Optional[int] = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def clamp_feature_hook(sae: Any, feature: int, value: float, positions: Any = None) -> Callable:
    """A TransformerLens hook that clamps SAE ``feature`` to ``value`` and keeps the SAE's error term
    (the fallback when :mod:`sae_lens_multimodal.steering` is not available; see :func:`clamp_hooks`).

    The activation becomes ``x + decode(a with a[feature] = value) - decode(a)``: only the feature's own
    contribution changes, whatever the SAE reconstructs badly stays as it was. ``positions`` indexes the
    token axis (dim 1) of a [batch, tokens, d] activation; None clamps at every row (all tokens, or every
    spatial position of a channel-last diffusion activation). Timestep-aware SAEs read the timestep from
    the running pipeline, as when spliced.
    """

    def hook_fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        x = act.to(sae.dtype)
        a = sae.encode(x)
        new = a.clone()
        if positions is None:
            new[..., feature] = value
        else:
            new[:, positions, feature] = value
        steered = sae.decode(new)
        sae.encode(x)  # timestep-aware SAEs pair each decode with the encode before it
        base = sae.decode(a)
        return act + (steered - base).to(act.dtype)

    return hook_fn


def clamp_hooks(model: Any, sae: Any, feature: int, value: float, *, hook_name: str, positions: Any = None,
                timesteps: Any = None, cfg_branch: Optional[str] = None) -> list[tuple[Any, Callable]]:
    """``fwd_hooks`` that clamp ``feature`` to ``value`` at ``hook_name`` of ``model`` (error term kept).

    Uses the package's steering API (:class:`~sae_lens_multimodal.steering.FeatureSteer`) when it is
    installed; otherwise :func:`clamp_feature_hook`, with ``timesteps`` / ``cfg_branch`` left to the
    caller (``HookedDiffusionPipeline.run_with_hooks(at_timesteps=, cfg_branch=)``).
    """
    try:
        from sae_lens_multimodal.steering import FeatureSteer, steering_hooks
    except ImportError:
        return [(hook_name, clamp_feature_hook(sae, feature, value, positions))]
    steer = FeatureSteer(sae, int(feature), "clamp", value=float(value),
                         positions="all" if positions is None else positions,
                         timesteps=timesteps, cfg_branch=cfg_branch, hook_name=hook_name)
    return list(steering_hooks(model, [steer]))


def _sae_name(sae: Any) -> str:
    meta = sae.cfg.metadata
    release, sae_id = meta.get("release") if hasattr(meta, "get") else None, meta.get("sae_id") if hasattr(meta, "get") else None
    arch = sae.cfg.architecture() if callable(getattr(sae.cfg, "architecture", None)) else type(sae).__name__
    base = f"{release}/{sae_id}" if release and sae_id else type(sae).__name__
    return f"{base} ({arch}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae})"


def _mean_std(preprocess: Any) -> Optional[tuple[Any, Any]]:
    for t in getattr(preprocess, "transforms", []) or []:
        if type(t).__name__ == "Normalize":
            return t.mean, t.std
    # transformers models: HFImagePreprocess wraps the checkpoint's image processor
    proc = getattr(preprocess, "processor", None)
    if getattr(proc, "do_normalize", False) and getattr(proc, "image_mean", None) is not None:
        return proc.image_mean, proc.image_std
    return None


def _model_inputs(tower: Any, images: Any) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(model input tensor, uint8 display images) from uint8 numpy / PIL images, or from a preprocessed
    tensor (un-normalised with the tower's Normalize for display)."""
    if isinstance(images, torch.Tensor):
        x = images
        ms = _mean_std(getattr(tower, "preprocess", None))
        if ms is not None:
            mean = torch.as_tensor(ms[0], dtype=x.dtype).reshape(1, -1, 1, 1)
            std = torch.as_tensor(ms[1], dtype=x.dtype).reshape(1, -1, 1, 1)
            raw = (x.detach().cpu() * std + mean).clamp(0, 1)
        else:
            lo, hi = x.amin(), x.amax()
            raw = ((x.detach().cpu() - lo) / (hi - lo).clamp_min(1e-12))
        return x, [to_uint8_image(r) for r in raw]
    display = [to_uint8_image(im) for im in images]
    return _preprocess_uint8(tower, display), display


def _preprocess_uint8(tower: Any, images: Sequence[np.ndarray]) -> torch.Tensor:
    from PIL import Image

    pre = getattr(tower, "preprocess", None)
    if pre is None:
        raise ValueError("This model has no .preprocess; pass images as a preprocessed tensor.")
    return torch.stack([pre(Image.fromarray(np.asarray(im))) for im in images])


def _vision_tower(model: Any) -> tuple[Any, Any]:
    """(vision tower, CLIP model or None)."""
    if hasattr(model, "vision") and hasattr(model, "text"):
        return model.vision, model
    return model, None


def _patch_grid(tower: Any, n_tokens: int) -> Optional[tuple[int, int, int]]:
    """(first patch token, grid_h, grid_w) when the tokens are prefix tokens + a patch grid."""
    cfg = getattr(tower, "cfg", None)
    if cfg is None:
        return None
    size = cfg.image_size if isinstance(cfg.image_size, tuple) else (cfg.image_size, cfg.image_size)
    patch = cfg.patch_size if isinstance(cfg.patch_size, tuple) else (cfg.patch_size, cfg.patch_size)
    gh, gw = size[0] // patch[0], size[1] // patch[1]
    prefix = n_tokens - gh * gw
    return (prefix, gh, gw) if 0 <= prefix <= 8 else None


class ZeroShotProbe:
    """Zero-shot class probabilities of a HookedCLIP over ``class_names`` (with the model's logit scale)."""

    def __init__(self, model: Any, class_names: Sequence[str], templates: Sequence[str] = ("{}",),
                 text_embeds: Optional[torch.Tensor] = None) -> None:
        from sae_lens_multimodal.analysis.zero_shot import ZeroShotClassifier

        self.model = model
        self.class_names = list(class_names)
        self.classifier = ZeroShotClassifier(model, self.class_names, templates, weights=text_embeds)

    @torch.no_grad()
    def probs(self, inputs: torch.Tensor, fwd_hooks: Sequence[tuple[str, Callable]] = (), batch_size: int = 128) -> torch.Tensor:
        """[N, n_classes] probabilities for preprocessed images, with ``fwd_hooks`` on the vision tower."""
        out = []
        vision = self.model.vision
        for i in range(0, len(inputs), batch_size):
            with vision.hooks(fwd_hooks=list(fwd_hooks)):
                logits = self.classifier.logits(inputs[i : i + batch_size])
            out.append(self.model.logits_to_probs(logits))
        return torch.cat(out)

    def probs_of_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Probabilities for uint8 images (preprocessed with the model's own transform)."""
        return self.probs(_preprocess_uint8(self.model.vision, images))


def _steering_effect(
    probe: ZeroShotProbe,
    before: torch.Tensor,
    after: torch.Tensor,
    description: str,
    value: float,
    label_word: Optional[str],
    example_images: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
    n_examples: int,
    n_classes_shown: int = 5,
) -> SteeringEffect:
    delta = (after - before).mean(0)
    names = probe.class_names
    k = min(n_classes_shown, len(names))
    up = delta.topk(k)
    down = (-delta).topk(k)
    pb, pa = before.argmax(-1), after.argmax(-1)
    toward = None
    if label_word:
        mask = torch.tensor([label_word in n.split() for n in names])
        if bool(mask.any()):
            toward = (label_word, float(before[:, mask].sum(-1).mean()), float(after[:, mask].sum(-1).mean()))
    imgs_b, imgs_a = example_images
    examples = []
    for i in range(min(n_examples, len(before))):
        examples.append((imgs_b[i], f"{names[int(pb[i])]} ({float(before[i, pb[i]]):.2f})",
                         imgs_a[i], f"{names[int(pa[i])]} ({float(after[i, pa[i]]):.2f})"))
    return SteeringEffect(
        description=description,
        value=value,
        changed_fraction=float((pb != pa).float().mean()),
        gained=[(names[int(i)], float(v)) for v, i in zip(up.values, up.indices)],
        lost=[(names[int(i)], -float(v)) for v, i in zip(down.values, down.indices)],
        toward_label=toward,
        examples=examples,
    )


def _select(scores: torch.Tensor, eligible: torch.Tensor, n: int) -> list[int]:
    masked = torch.where(eligible, scores, torch.full_like(scores, float("-inf")))
    order = masked.argsort(descending=True)
    chosen = [int(i) for i in order[:n] if bool(eligible[i])]
    if len(chosen) < n:  # too few in the preferred band: fill with the strongest of the rest
        rest = [int(i) for i in scores.argsort(descending=True) if int(i) not in chosen]
        chosen += rest[: n - len(chosen)]
    return chosen


def _check_ids(ids: Sequence[int], d_sae: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad or not ids:
        raise ValueError(f"feature_ids must be a non-empty list of features in [0, {d_sae}); got {ids[:10]}.")
    return ids


# --------------------------------------------------------------------------------------------- vision
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
    hook = sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("The SAE has no cfg.metadata.hook_name; set it to the vision hook it reads.")
    hook = hook[len("vision."):] if hook.startswith("vision.") else hook
    if hook not in tower.hook_dict:
        from sae_lens_multimodal.core.hooked_root import unknown_hook_error

        raise unknown_hook_error(hook, tower.hook_dict.keys(), what="vision hook of this SAE")
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
    grid = _patch_grid(tower, n_tokens)

    # ---- labels (HookedCLIP only)
    labels = None
    notes: list[str] = []
    if clip is not None:
        from sae_lens_multimodal.analysis.labels import label_features

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


# --------------------------------------------------------------------------------------------- diffusion
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
    from sae_lens_multimodal.analysis.temporal import sae_timestep_buckets
    from sae_lens_multimodal.saes.timesteps import timestep_context

    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings.")
    hook_given = sae.cfg.metadata.hook_name
    if hook_given is None:
        raise ValueError("The SAE has no cfg.metadata.hook_name; set it to the denoiser hook it reads.")
    hook = pipe.canonical_hook_name(hook_given)
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
    if branch is None and sae.cfg.metadata.get("cfg_branch") in ("cond", "uncond"):
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


def _shared_vmax(top: Sequence[TopExample]) -> Optional[float]:
    """One colour scale for the heatmaps of a feature's top examples: their largest patch value."""
    maps = [float(np.max(t.heatmap)) for t in top if t.heatmap is not None]
    return max(maps) if maps and max(maps) > 0 else None


# --------------------------------------------------------------------------------------------- rendering
def _labels_html(lab: Any) -> str:
    if lab is None:
        return ""
    parts = []
    cols = []
    if lab.direct_path is not None:
        v = "n/a" if lab.validity is None or lab.validity != lab.validity else f"{lab.validity:.2f}"
        cols.append((f"direct-path (validity {v})", lab.direct_path))
    if lab.causal is not None:
        cols.append(("causal", lab.causal))
    depth = max(len(c[1]) for c in cols) if cols else 0
    rows = []
    for r in range(depth):
        row: list[Any] = []
        for _, words in cols:
            row += [words[r][0], float(words[r][1])] if r < len(words) else ["", ""]
        rows.append(row)
    header = []
    for name, _ in cols:
        header += [name, "score"]
    parts.append(table(rows, header))
    if lab.agreement is not None:
        parts.append(paragraph(f"Agreement of the two labels (Pearson over the vocabulary): {lab.agreement:.2f}; "
                               f"top-k overlap {lab.top_k_overlap:.2f}.", "note"))
    parts.append(paragraph("Scores: cosine similarity in the joint space after removing the modality gap. "
                           "Validity: the share of the feature's real effect on the embedding that the direct "
                           "path explains; trust the direct-path label only when it is high.", "note"))
    return "".join(parts)


def _steering_html(effects: Sequence[SteeringEffect]) -> str:
    parts = []
    for e in effects:
        parts.append(paragraph(e.description))
        lines = [f"Top zero-shot prediction changed on {100 * e.changed_fraction:.0f}% of the images."]
        if e.toward_label is not None:
            w, b, a = e.toward_label
            lines.append(f"Probability of classes containing the label '{w}': {b:.3f} \u2192 {a:.3f}.")
        parts.append(paragraph(" ".join(lines)))
        n = max(len(e.gained), len(e.lost))
        rows = [[*(e.gained[i] if i < len(e.gained) else ("", float("nan"))),
                 *(e.lost[i] if i < len(e.lost) else ("", float("nan")))] for i in range(n)]
        parts.append(table(rows, ["gained class", "mean \u0394p", "lost class", "mean \u0394p"]))
        if e.examples:
            ex_rows = [[Raw(image_tag(b, 3, alt="image")), pb, pa] for b, pb, a, pa in e.examples]
            parts.append(table(ex_rows, ["image", "zero-shot (clean)", "zero-shot (clamped)"]))
    return "".join(parts)


def _top_html(d: FeatureDashboard) -> str:
    if not d.top:
        return paragraph("No examples.")
    vmax = _shared_vmax(d.top)
    items = [(heatmap_overlay(t.image, t.heatmap, vmax=vmax) if t.heatmap is not None else t.image, t.caption)
             for t in d.top]
    body = image_grid(items, scale=4)
    if vmax is not None:
        body += paragraph(f"Heatmap colour scale: 0 to {vmax:.3g} (the largest patch activation shown).", "note")
    if any(t.heatmap is not None for t in d.top):
        body += paragraph("The same images without the overlay:", "note")
        body += image_grid([(t.image, "") for t in d.top], scale=2)
    return body


def render_dashboard(d: FeatureDashboard, index_href: str = "index.html", extra_nav: Sequence[tuple[str, str]] = ()) -> str:
    """One feature's page."""
    page = Page(
        f"{d.kind.capitalize()} feature {d.feature}",
        subtitle=f"{d.sae_name} at {d.hook_name}" + (f" \u00b7 {d.short_label}" if d.short_label else ""),
        nav=[(index_href, "\u2190 all features"), *extra_nav],
    )
    unit = "images" if d.kind == "vision" else "prompts"
    tok = "tokens" if d.kind == "vision" else "positions x timesteps"
    summary = [
        ["hook", d.hook_name], ["SAE", d.sae_name], [unit, d.n_samples],
        [f"active on ({unit})", f"{100 * d.sample_frequency:.1f}%"], [f"active on ({tok})", f"{100 * d.token_frequency:.2f}%"],
        ["max activation", d.max_activation],
    ]
    if d.curve is not None and d.curve.half_max_timestep is not None:
        summary.append(["mean reaches half its max at timestep", f"{d.curve.half_max_timestep:g}"])
    if d.curve is not None and d.curve.commit_timestep is not None:
        summary.append(["commits at timestep (stays within 10% of its final value)", f"{d.curve.commit_timestep:g}"])
    page.add("Summary", table(summary, ["", "value"]) + "".join(paragraph(n, "note") for n in d.notes), id="summary")
    if d.labels is not None:
        page.add("Text labels", _labels_html(d.labels), id="labels")
    heading = "Top-activating images (patch heatmaps)" if d.kind == "vision" else "Top generations (spatial heatmaps)"
    page.add(heading, _top_html(d), id="top")
    page.add("Activation histogram", img_tag(histogram_png(d.activations, title=f"nonzero activations ({len(d.activations)})"),
                                             alt="activation histogram", css_class="plot"), id="histogram")
    if d.curve is not None:
        c = d.curve
        page.add("Activation per timestep", img_tag(timestep_curve_png(
            c.timesteps, {f"feature {d.feature}": (c.mean, c.low, c.high)},
            title=f"{c.statistic} per prompt: mean and 10-90% band"), alt="per-timestep curve", css_class="plot"),
            id="timesteps")
    if d.generations is not None:
        cols, rows, row_labels = d.generations
        page.add("Steered generations", comparison_grid(rows, cols, row_labels, scale=4), id="generations")
    if d.steering:
        page.add("Steering effect", _steering_html(d.steering), id="steering")
    return page.to_html()


def render_index(dashboards: Sequence[FeatureDashboard], title: str = "Feature dashboards", prefix: str = "",
                 extra_nav: Sequence[tuple[str, str]] = ()) -> str:
    """The index page: one row per feature with its summary and a link to its page."""
    page = Page(title, subtitle=f"{len(dashboards)} features", nav=list(extra_nav))
    for kind in ("vision", "diffusion"):
        ds = [d for d in dashboards if d.kind == kind]
        if not ds:
            continue
        rows = []
        for d in ds:
            steer = ""
            if d.steering:
                e = d.steering[0]
                steer = ", ".join(f"{w} {v:+.2f}" for w, v in e.gained[:2])
            extra = d.short_label if kind == "vision" else (
                f"commits at t={d.curve.commit_timestep:g}" if d.curve is not None and d.curve.commit_timestep is not None else "")
            thumb = Raw(image_tag(heatmap_overlay(d.top[0].image, d.top[0].heatmap) if d.top and d.top[0].heatmap is not None
                                  else (d.top[0].image if d.top else np.zeros((8, 8, 3), np.uint8)), 2, alt="top image"))
            rows.append([link(prefix + d.file_name, f"feature {d.feature}"), thumb, d.hook_name,
                         f"{100 * d.sample_frequency:.1f}%", d.max_activation, extra, steer])
        page.add(f"{kind.capitalize()} features", table(
            rows, ["feature", "top image", "hook", f"active on ({'images' if kind == 'vision' else 'prompts'})",
                   "max act.", "labels" if kind == "vision" else "timing", "steering: most gained classes"]),
            id=f"{kind}-features")
    return page.to_html()


def dashboard_pages(dashboards: Sequence[FeatureDashboard], *, directory: str = "", title: str = "Feature dashboards",
                    extra_nav: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """Relative path -> HTML for the index (``<directory>/index.html``) and one page per feature."""
    if not dashboards:
        raise ValueError("No dashboards to render.")
    names = [d.file_name for d in dashboards]
    if len(set(names)) != len(names):
        raise ValueError("Two dashboards have the same kind and feature id; their pages would collide.")
    base = f"{directory.rstrip('/')}/" if directory else ""
    depth = "../" * base.count("/")
    nav_inner = [(depth + h, t) for h, t in extra_nav]
    files = {base + "index.html": render_index(dashboards, title, extra_nav=nav_inner)}
    for d in dashboards:
        files[base + d.file_name] = render_dashboard(d, "index.html", extra_nav=nav_inner)
    return files


def write_dashboards(dashboards: Sequence[FeatureDashboard], out_dir: Union[str, os.PathLike],
                     title: str = "Feature dashboards") -> os.PathLike:
    """Write the index and feature pages to ``out_dir`` atomically; returns the index page's path."""
    out = write_site(out_dir, dashboard_pages(dashboards, title=title))
    return out / "index.html"


def write_feature_dashboards(model: Any, sae: Any, inputs: Any, out_dir: Union[str, os.PathLike], *,
                             title: Optional[str] = None, **options: Any) -> os.PathLike:
    """Compute and write dashboards; returns the index page's path.

    * vision: ``model`` a HookedCLIP / HookedViT, ``inputs`` images (see :func:`vision_feature_dashboards`);
    * diffusion: ``model`` a HookedDiffusionPipeline, ``inputs`` prompts (see
      :func:`diffusion_feature_dashboards`).

    ``options`` go to the function for that kind.
    """
    from sae_lens_multimodal.diffusion.pipeline import HookedDiffusionPipeline

    if isinstance(model, HookedDiffusionPipeline):
        dashboards = diffusion_feature_dashboards(model, sae, inputs, **options)
    elif hasattr(model, "hook_dict") and (hasattr(model, "vision") or hasattr(model, "embed")):
        dashboards = vision_feature_dashboards(model, sae, inputs, **options)
    else:
        raise TypeError(
            f"write_feature_dashboards needs a HookedCLIP, HookedViT or HookedDiffusionPipeline; got {type(model).__name__}."
        )
    return write_dashboards(dashboards, out_dir, title or f"Feature dashboards: {dashboards[0].hook_name}")
