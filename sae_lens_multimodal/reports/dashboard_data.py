"""Feature dashboards, the data: the records a dashboard page shows (:class:`FeatureDashboard` and its parts)
and what computing them shares (the zero-shot probe, clamp hooks, model inputs). Computing:
:mod:`.vision_dashboards`, :mod:`.diffusion_dashboards`; rendering: :mod:`.dashboards`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.analysis.temporal import commit_index
from sae_lens_multimodal.analysis.zero_shot import ZeroShotClassifier
from sae_lens_multimodal.reports.html import to_uint8_image
from sae_lens_multimodal.steering import FeatureSteer, steering_hooks

__all__ = [
    "TopExample",
    "SteeringEffect",
    "TimestepCurve",
    "FeatureDashboard",
    "ZeroShotProbe",
    "clamp_feature_hook",
    "clamp_hooks",
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
    (one bare hook; :func:`clamp_hooks` does the same through the steering API).

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

    Uses the package's steering API (:class:`~sae_lens_multimodal.steering.FeatureSteer`);
    :func:`clamp_feature_hook` is the same edit as one bare hook, with ``timesteps`` / ``cfg_branch`` left
    to the caller (``HookedDiffusionPipeline.run_with_hooks(at_timesteps=, cfg_branch=)``).
    """
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
    """(vision tower, CLIP model or None: the model when it also has a text tower)."""
    if not has_parts(model, "vision"):
        raise TypeError(f"Vision dashboards need a HookedCLIP or HookedViT; got {type(model).__name__}.")
    return model.part("vision"), (model if has_parts(model, "vision", "text") else None)


def _patch_grid(spec: HookSpec, n_tokens: int) -> Optional[tuple[int, int, int]]:
    """(first patch token, grid_h, grid_w) when the hook's tokens are its prefix tokens + its patch grid
    (images at the model's native size), from the hook's spec."""
    if spec.grid is None or n_tokens != spec.n_tokens:
        return None
    return (spec.n_prefix_tokens, *spec.grid)


class ZeroShotProbe:
    """Zero-shot class probabilities of a HookedCLIP over ``class_names`` (with the model's logit scale)."""

    def __init__(self, model: Any, class_names: Sequence[str], templates: Sequence[str] = ("{}",),
                 text_embeds: Optional[torch.Tensor] = None) -> None:
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
