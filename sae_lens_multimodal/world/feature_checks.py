"""Ground-truth checks of vision-feature labels and steerability on the shapes world (issue 7).

The shapes world's images come with their factors (colour, shape, position, ...), so two claims about SAE
features can be checked instead of repeated:

* **free-label accuracy** (:func:`label_accuracy`): among the features whose top-activating images share a
  factor value (e.g. >= 90% of the top 20 images are red), how often does the free text label (both
  labelers of :mod:`sae_lens_multimodal.analysis.labels`) name that value?
* **steerability** (:func:`shapes_steerability`): the fraction of features whose clamping moves the
  CLIP's text-space probabilities toward their label by more than random baselines do (compare with the
  10-15% reported for real CLIP by Joseph et al. 2025).

Labels are read over the factor values of the world (6 colours, 3 shapes, 9 positions), each embedded in
the context the CLIP was trained on: the mean normalised embedding of every caption that has the value
(:func:`factor_text_embeddings`). Bare words are poor anchors for the shapes CLIP (it never saw a lone
word; the lone prompt "square" sits nearer "left" than the square captions).

>>> report = shapes_ground_truth()          # shapes-clip + the bundled SAE, prints the figures
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from sae_lens import SAE

from sae_lens_multimodal.analysis.labels import causal_labels, label_features
from sae_lens_multimodal.analysis.zero_shot import text_embeddings
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.steering.steerability import SteerabilityResult, steerability
from sae_lens_multimodal.world.shapes import ShapesWorld, caption, class_factor_combinations, to_tensor

__all__ = [
    "GROUND_TRUTH_FACTORS",
    "REAL_CLIP_STEERABLE_FRACTION",
    "factor_text_embeddings",
    "FeaturePurity",
    "LabelAccuracy",
    "label_accuracy",
    "shapes_steerability",
    "GroundTruthReport",
    "shapes_ground_truth",
]

GROUND_TRUTH_FACTORS: tuple[str, ...] = ("color", "shape", "position")
#: Fraction of steerable features reported for real CLIP ViTs (Joseph et al. 2025, arXiv 2504.08729).
REAL_CLIP_STEERABLE_FRACTION: tuple[float, float] = (0.10, 0.15)


@torch.no_grad()
def factor_text_embeddings(model: Any, factors: Sequence[str] = GROUND_TRUTH_FACTORS) -> tuple[list[str], torch.Tensor]:
    """``(values, embeddings [V, d_embed])``: every value of ``factors``, embedded as the normalised mean of
    the normalised text embeddings of all captions (colour x shape x position x size x texture) with it."""
    combos = class_factor_combinations(("color", "shape", "position", "size", "texture"))
    caps = [caption(c, size=True, texture=True) for c in combos]
    emb = text_embeddings(model, caps, normalize=True)
    values, rows = [], []
    for factor in factors:
        for value in ShapesWorld.factor_values[factor]:
            if value in values:
                raise ValueError(f"Factor value {value!r} occurs in two factors; labels would be ambiguous.")
            mask = torch.tensor([c[factor] == value for c in combos])
            values.append(value)
            rows.append(F.normalize(emb[mask].mean(0), dim=0))
    return values, torch.stack(rows)


@dataclass
class FeaturePurity:
    """A feature whose top-activating images share factor values, and what the labelers called it."""

    feature: int
    #: factor -> (modal value, share of the top images that have it), for factors at or above the purity bar
    pure: dict[str, tuple[str, float]]
    direct_label: Optional[str] = None
    causal_label: Optional[str] = None

    @property
    def values(self) -> set[str]:
        return {v for v, _ in self.pure.values()}

    @property
    def direct_correct(self) -> bool:
        return self.direct_label in self.values

    @property
    def causal_correct(self) -> bool:
        return self.causal_label in self.values


@dataclass
class LabelAccuracy:
    """Free-label accuracy over the features whose top activations share a factor value."""

    hook_name: str
    n_features: int  # features examined (active on at least top_k images)
    top_k: int
    purity: float
    features: list[FeaturePurity] = field(default_factory=list)

    @property
    def n_pure(self) -> int:
        return len(self.features)

    @property
    def direct_accuracy(self) -> float:
        return sum(f.direct_correct for f in self.features) / max(1, self.n_pure)

    @property
    def causal_accuracy(self) -> float:
        return sum(f.causal_correct for f in self.features) / max(1, self.n_pure)

    def chance(self) -> float:
        """Accuracy of a label drawn uniformly from the vocabulary of factor values (averaged over features)."""
        n_vocab = sum(len(ShapesWorld.factor_values[f]) for f in GROUND_TRUTH_FACTORS)
        return sum(len(f.values) / n_vocab for f in self.features) / max(1, self.n_pure)

    def per_factor(self) -> dict[str, tuple[int, float, float]]:
        """factor -> (features pure in it, direct-path accuracy, causal accuracy) on those features."""
        out = {}
        for factor in GROUND_TRUTH_FACTORS:
            fs = [f for f in self.features if factor in f.pure]
            if fs:
                out[factor] = (len(fs), sum(f.direct_label == f.pure[factor][0] for f in fs) / len(fs),
                               sum(f.causal_label == f.pure[factor][0] for f in fs) / len(fs))
        return out

    def to_table(self, max_rows: Optional[int] = 40) -> str:
        lines = [
            f"free-label accuracy at {self.hook_name}: {self.n_pure} of {self.n_features} features have top-{self.top_k} "
            f"images sharing a factor value (>= {self.purity:.0%}); label names it: direct-path "
            f"{self.direct_accuracy:.1%}, causal {self.causal_accuracy:.1%} (chance {self.chance():.1%})",
        ]
        for factor, (n, d, c) in self.per_factor().items():
            lines.append(f"  {factor:<9} {n:>4} features: direct-path {d:.1%}, causal {c:.1%} (label = that factor's value)")
        lines.append(f"{'feature':>8}  {'shared value(s)':<32} {'direct-path':<13} {'causal':<13}")
        for f in self.features[:max_rows] if max_rows is not None else self.features:
            shared = ", ".join(f"{v} {s:.0%}" for v, s in f.pure.values())
            lines.append(
                f"{f.feature:>8}  {shared[:32]:<32} {(f.direct_label or '-') + (' ok' if f.direct_correct else ''):<13} "
                f"{(f.causal_label or '-') + (' ok' if f.causal_correct else '')}"
            )
        if max_rows is not None and self.n_pure > max_rows:
            lines.append(f"... {self.n_pure - max_rows} more")
        return "\n".join(lines)

    __str__ = to_table

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {"feature": f.feature, "pure": {k: list(v) for k, v in f.pure.items()}, "direct_label": f.direct_label,
             "causal_label": f.causal_label, "direct_correct": f.direct_correct, "causal_correct": f.causal_correct}
            for f in self.features
        ]


def _hook(model: Any, sae: Any) -> str:
    location = model.locate(sae).name
    if not location.startswith("vision."):
        raise ValueError(f"Ground-truth checks need an SAE on the vision tower; this one is at {location!r}.")
    return location[len("vision."):]


@torch.no_grad()
def label_accuracy(
    model: Any,
    sae: Any,
    images: torch.Tensor,
    factors: Sequence[Any],
    *,
    top_k: int = 20,
    purity: float = 0.9,
    n_label_images: int = 64,
    max_features: Optional[int] = None,
    text: Optional[tuple[list[str], torch.Tensor]] = None,
    batch_size: int = 256,
) -> LabelAccuracy:
    """Free-label accuracy of both labelers on SAE features with a shared ground-truth factor value.

    A feature's activation on an image is its maximum over tokens; its top ``top_k`` images (all with
    activation > 0) "share" a value of a factor when at least ``purity`` of them have it. Such features are
    labelled (``label_features``, both methods, default "add" intervention, on the first
    ``n_label_images`` images) over the factor values (:func:`factor_text_embeddings`), and a label is
    correct when its top word is one of the shared values.
    """
    if len(images) != len(factors):
        raise ValueError(f"{len(images)} images but {len(factors)} factor sets.")
    hook = _hook(model, sae)
    per_image = []
    for i in range(0, len(images), batch_size):
        _, cache = model.vision.run_with_cache(images[i:i + batch_size], names_filter=hook)
        per_image.append(sae.encode(cache[hook].to(sae.W_dec.dtype)).amax(dim=1))
    acts = torch.cat(per_image)  # [N, d_sae]
    active = (acts > 0).sum(0) >= top_k
    ids = active.nonzero()[:, 0].tolist()
    if max_features is not None:
        ids = sorted(ids, key=lambda f: -float(acts[:, f].max()))[:max_features]
    result = LabelAccuracy(hook_name=f"vision.{hook}", n_features=len(ids), top_k=top_k, purity=purity)
    for f in ids:
        top = acts[:, f].topk(top_k).indices.tolist()
        pure = {}
        for factor in GROUND_TRUTH_FACTORS:
            value, count = Counter(getattr(factors[i], factor) for i in top).most_common(1)[0]
            if count / top_k >= purity:
                pure[factor] = (value, count / top_k)
        if pure:
            result.features.append(FeaturePurity(feature=f, pure=pure))
    if not result.features:
        return result
    words, emb = text if text is not None else factor_text_embeddings(model)
    report = label_features(
        model, sae, images[:n_label_images], words, feature_ids=[p.feature for p in result.features], text_embeds=emb,
        batch_size=batch_size,
    )
    for p, d, c in zip(result.features, report.top_labels("direct-path", 1), report.top_labels("causal", 1)):
        p.direct_label, p.causal_label = d[0][0], c[0][0]
    return result


@torch.no_grad()
def shapes_steerability(
    model: Any,
    sae: Any,
    images: torch.Tensor,
    *,
    toward: str = "label",
    max_features: Optional[int] = 64,
    n_label_images: int = 64,
    text: Optional[tuple[list[str], torch.Tensor]] = None,
    **kwargs: Any,
) -> SteerabilityResult:
    """Steerability over the world's factor values. ``toward="label"``: power is the probability moved
    toward each feature's causal label (issue 7's question: does clamping move predictions toward the
    label?); ``"promoted"``: toward its most-promoted value. Other arguments go to :func:`steerability`."""
    if toward not in ("label", "promoted"):
        raise ValueError(f"toward must be 'label' or 'promoted'; got {toward!r}.")
    words, emb = text if text is not None else factor_text_embeddings(model)
    hook = _hook(model, sae)
    _, cache = model.vision.run_with_cache(images, names_filter=hook)
    max_act = sae.encode(cache[hook].to(sae.W_dec.dtype)).amax(dim=(0, 1))
    ids = max_act.argsort(descending=True)[: max_features or len(max_act)]
    ids = [int(i) for i in ids if float(max_act[i]) > 0]
    targets = None
    if toward == "label":
        report = causal_labels(model, sae, images[:n_label_images], words, feature_ids=ids, text_embeds=emb)
        targets = [lab[0][0] for lab in report.top_labels("causal", 1)]
    return steerability(model, sae, images, words, text_embeds=emb, feature_ids=ids, targets=targets, **kwargs)


@dataclass
class GroundTruthReport:
    """Both ground-truth checks on one SAE."""

    labels: LabelAccuracy
    steerability: SteerabilityResult

    def to_table(self) -> str:
        lo, hi = REAL_CLIP_STEERABLE_FRACTION
        s = self.steerability
        return "\n".join([
            self.labels.to_table(max_rows=15),
            "",
            s.to_table(max_rows=15),
            f"steerable fraction {s.fraction_steerable:.1%} (real CLIP, Joseph et al. 2025: {lo:.0%}-{hi:.0%}); "
            + ", ".join(f"{k} draws called steerable {s.baseline_fraction_above(k):.1%}" for k in s.baseline_power),
        ])

    __str__ = to_table


def shapes_ground_truth(
    model: Any = None,
    sae: Any = None,
    *,
    n_images: int = 1000,
    n_steer_images: int = 24,
    seed: int = 7,
    max_features: Optional[int] = 64,
    progress: bool = True,
    verbose: bool = True,
) -> GroundTruthReport:
    """Run both checks on fresh world images (default: ``shapes-clip`` and the bundled
    ``shapes-clip-saes`` / ``blocks.2.hook_resid_post`` SAE) and print the figures."""
    if model is None:
        model = HookedCLIP.from_pretrained("shapes-clip")
    if sae is None:
        sae = SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post")
    images, factors = ShapesWorld(image_size=32, seed=seed).sample(n_images)
    x = to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3)
    text = factor_text_embeddings(model)
    labels = label_accuracy(model, sae, x, factors, text=text)
    steer = shapes_steerability(model, sae, x[:n_steer_images], text=text, max_features=max_features, progress=progress)
    report = GroundTruthReport(labels=labels, steerability=steer)
    if verbose:
        print(report.to_table())
    return report
