"""``enrichment``: name what a feature's top-activating images have in common, one slot per attribute, or abstain.

For every vocabulary term, the CLIP scores each reference image (cosine of its image embedding with the
term's de-gapped text embedding). A term's **validity** for a feature is ``2 * AUROC - 1`` of the term's
scores on the feature's ``top_k`` top-activating images against all reference images: 0 when the top images
score like any image, 1 when they outscore every other image. When the CLIP separates images with the term
from those without, this equals the share of top images with the term minus its share of all images.

Slots are formed without knowing the attributes: terms whose scores are correlated over the reference
images, positively or negatively (alternatives of one attribute, "red" / "blue", or overlapping terms,
"top" / "top left"), describe the same attribute (co-activation). Terms are taken best first; a term joins
the label when its validity reaches ``min_validity`` and ``relative`` times the first term's validity, and
it is not correlated (``|r| >= slot_correlation``) with a term already in the label. A feature with no term
at ``min_validity`` gets no label (abstains). The label's validity is that of its weakest term.

**Calibration** (``calibrate=True``, the default): the raw ``2 * AUROC - 1`` of a term cannot exceed one minus
the share of images that have it, so a value of a three-valued attribute (a shape: at most 0.67) loses to a
value of a nine-valued one (a position: 0.89) even when every top image has the first and only half have the
second; the relative rule then drops the right term. Each term's validity is therefore divided by its
*ceiling*: the ``ceiling_quantile`` quantile (0.99) of the term's raw validity over all features of the SAE
active on at least ``top_k`` reference images (at least ``min_ceiling``), i.e. what this SAE's most
term-selective features reach. It needs no attribute names: only the SAE, the CLIP and the images. With fewer
than ``min_features`` such features a percentile is no ceiling, and the validity is left raw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sae_lens_multimodal.analysis.labelers.base import (
    FeatureLabel,
    LabelInputs,
    TermScore,
    VocabularyLabeler,
)

__all__ = ["EnrichmentLabeler", "otsu_thresholds", "term_presence", "term_correlations", "term_ceilings"]


def otsu_thresholds(scores: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Per column of ``scores`` [N, V], the threshold that maximises the between-group variance of the
    two groups it splits the column into (Otsu's method on a ``bins``-bin histogram): [V]."""
    lo, hi = scores.min(0).values, scores.max(0).values
    edges = lo[None] + (hi - lo)[None] * torch.linspace(0, 1, bins + 1, dtype=scores.dtype)[1:-1, None]  # [B-1, V]
    below = (scores[None] <= edges[:, None]).float()  # [B-1, N, V]
    n = scores.shape[0]
    w0 = below.mean(1)
    m0 = (below * scores[None]).sum(1) / below.sum(1).clamp_min(1)
    m1 = ((1 - below) * scores[None]).sum(1) / (n - below.sum(1)).clamp_min(1)
    between = w0 * (1 - w0) * (m0 - m1).pow(2)
    return edges.gather(0, between.argmax(0, keepdim=True))[0]


def term_presence(inputs: LabelInputs) -> torch.Tensor:
    """[N, V] booleans: the term is present on the reference image (score above its Otsu threshold)."""
    if "presence" not in inputs.cache:
        scores = inputs.image_embeds @ inputs.text_degapped.T
        inputs.cache["presence"] = scores > otsu_thresholds(scores)
    return inputs.cache["presence"]


def slot_winners(inputs: LabelInputs, slot_correlation: float) -> torch.Tensor:
    """[N, V] booleans: on the reference image, the term scores at least as high as every term correlated
    with it (``|r| >= slot_correlation``: the other values of its attribute), i.e. zero-shot within its slot."""
    key = ("winners", slot_correlation)
    if key not in inputs.cache:
        scores = inputs.image_embeds @ inputs.text_degapped.T
        mates = term_correlations(inputs).abs() >= slot_correlation  # [V, V], the diagonal included
        masked = torch.where(mates[None], scores[:, None, :], torch.full_like(scores[:, None, :], -torch.inf))
        inputs.cache[key] = scores >= masked.amax(-1)
    return inputs.cache[key]


def term_correlations(inputs: LabelInputs) -> torch.Tensor:
    """[V, V] correlation of the terms' zero-shot scores over the reference images (co-activation)."""
    if "term_correlations" not in inputs.cache:
        s = inputs.image_embeds @ inputs.text_degapped.T
        s = (s - s.mean(0)) / s.std(0).clamp_min(1e-12)
        inputs.cache["term_correlations"] = s.T @ s / max(1, s.shape[0] - 1)
    return inputs.cache["term_correlations"]


def _score_ranks(inputs: LabelInputs) -> torch.Tensor:
    """[N, V] quantile in [0, 1] of each reference image's zero-shot score for each term among all images."""
    if "score_ranks" not in inputs.cache:
        scores = inputs.image_embeds @ inputs.text_degapped.T
        inputs.cache["score_ranks"] = scores.argsort(0).argsort(0).float() / max(1, len(scores) - 1)
    return inputs.cache["score_ranks"]


def term_ceilings(inputs: LabelInputs, top_k: int, quantile: float, minimum: float,
                  raw: Callable[[torch.Tensor], torch.Tensor], min_features: int = 1) -> torch.Tensor:
    """[V] each term's ceiling: the ``quantile`` of ``raw(top images)`` over every feature active on at least
    ``top_k`` reference images, at least ``minimum`` (1 for every term when fewer than ``min_features`` are)."""
    alive = ((inputs.acts > 0).sum(0) >= top_k).nonzero()[:, 0].tolist()
    if not alive or len(alive) < min_features:
        return torch.ones(len(inputs.vocabulary))
    per_feature = torch.stack([raw(inputs.top_images(f, top_k)) for f in alive])  # [F, V]
    return per_feature.quantile(quantile, dim=0).clamp_min(minimum)


@dataclass
class EnrichmentLabeler(VocabularyLabeler):
    """Terms present on the feature's top images far more than on the reference images (module docs)."""

    name: str = "enrichment"
    top_k: int = 20
    min_validity: float = 0.5
    slot_correlation: float = 0.2
    max_terms: int = 4
    relative: float = 0.85
    #: divide each term's validity by its ceiling over the SAE's features (module docs)
    calibrate: bool = True
    ceiling_quantile: float = 0.99
    min_ceiling: float = 0.5
    min_features: int = 50
    #: "auroc" (default, module docs); "otsu": the share of top images whose score is above the term's Otsu
    #: threshold, minus that share over all images; "slot": the same with "the term wins zero-shot among the
    #: terms correlated with it" (both measured worse on the shapes world: docs/clip.md)
    presence: str = "auroc"

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        if self.presence not in ("slot", "otsu", "auroc"):
            raise ValueError(f"presence must be 'auroc', 'otsu' or 'slot'; got {self.presence!r}.")
        if not 0.0 < self.ceiling_quantile <= 1.0 or not 0.0 < self.min_ceiling <= 1.0:
            raise ValueError("ceiling_quantile and min_ceiling must be in (0, 1].")
        if self.presence == "auroc":
            ranks = _score_ranks(inputs)

            def raw(top: torch.Tensor) -> torch.Tensor:
                return 2 * ranks[top].mean(0) - 1
        else:
            present = (slot_winners(inputs, self.slot_correlation) if self.presence == "slot" else term_presence(inputs)).float()
            base = present.mean(0)

            def raw(top: torch.Tensor) -> torch.Tensor:
                return present[top].mean(0) - base
        key = ("ceilings", self.presence, self.top_k, self.ceiling_quantile, self.min_ceiling, self.min_features,
               self.slot_correlation)
        if self.calibrate and key not in inputs.cache:
            inputs.cache[key] = term_ceilings(inputs, self.top_k, self.ceiling_quantile, self.min_ceiling, raw,
                                              self.min_features)
        ceiling = inputs.cache[key] if self.calibrate else torch.ones(len(inputs.vocabulary))
        corr = term_correlations(inputs).abs()
        out = []
        for f in ids:
            top = inputs.top_images(f, self.top_k)
            if len(top) == 0:
                out.append(FeatureLabel(feature=f))
                continue
            score = raw(top)
            validity = (score / ceiling).clamp(-1, 1)
            chosen: list[int] = []
            for j in validity.argsort(descending=True).tolist():
                floor = self.min_validity if not chosen else max(self.min_validity, self.relative * float(validity[chosen[0]]))
                if float(validity[j]) < floor or len(chosen) >= self.max_terms:
                    break
                if all(float(corr[j, c]) < self.slot_correlation for c in chosen):
                    chosen.append(j)
            terms = [TermScore(inputs.vocabulary[j], float(score[j]), float(validity[j])) for j in chosen]
            out.append(FeatureLabel(feature=f, terms=terms, validity=min((t.validity for t in terms), default=0.0)))
        return out
