"""The published ways of naming CLIP features with text, behind the one labeler interface (module ``base``).

Each is written from the method's description for an SAE on a CLIP vision tower (no code is copied):

``decoder-projection`` (DN-CBM style, Rao et al. 2024)
    The feature's decoder direction projected naively into the joint space (final LayerNorm weight and the
    projection, as if the direction sat at the last layer), read against the text embeddings.
``textspan`` (TextSpan style, Gandelsman et al. 2024)
    TextSpan finds, per attention head, the text directions that explain most of the variance of the
    head's outputs over images (greedy, projecting each chosen direction out). Here the "outputs" are the
    reference images' centred embeddings weighted by the feature's activation; the first basis direction
    is the label.
``splice`` (SpLiCE style, Bhalla et al. 2024)
    A sparse non-negative decomposition of the feature's causal effect on the image embedding (the mean
    change of the normalised embedding when the feature is added) over the centred text embeddings;
    the terms with the largest weights label the feature (several terms when several have weight).
``image-side``
    The text embedding nearest the mean embedding shift of the feature's top-activating images (their
    mean embedding minus that of all reference images).
``direct-path`` / ``causal``
    This package's two labels (:func:`sae_lens_multimodal.analysis.labels.label_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sae_lens_multimodal.analysis.decomposition import direct_path_matrix
from sae_lens_multimodal.analysis.labelers.base import (
    FeatureLabel,
    LabelInputs,
    TermScore,
    VocabularyLabeler,
    labels_from_scores,
)
from sae_lens_multimodal.analysis.labels import _sae_parts, _to_residual, label_features

__all__ = [
    "DecoderProjectionLabeler",
    "TextSpanLabeler",
    "SpliceLabeler",
    "ImageSideLabeler",
    "DirectPathLabeler",
    "CausalLabeler",
    "sparse_nonnegative_codes",
]


def _degap_image(v: torch.Tensor, inputs: LabelInputs) -> torch.Tensor:
    """Remove the component along the mean image embedding (the direction every image shares)."""
    mu = F.normalize(inputs.image_embeds.mean(0), dim=0)
    return v - (v @ mu)[..., None] * mu


def _read(v: torch.Tensor, inputs: LabelInputs) -> torch.Tensor:
    """Cosine of image-side vectors [F, d] with the de-gapped text embeddings: [F, V]."""
    return F.normalize(_degap_image(v, inputs), dim=-1) @ inputs.text_degapped.T


@dataclass
class DecoderProjectionLabeler(VocabularyLabeler):
    """DN-CBM style: the decoder direction through the final LN weight and the projection (no later layer)."""

    name: str = "decoder-projection"
    min_validity: float = 0.0

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        vision = model.part("vision")
        w_dec, _ = _sae_parts(sae)
        dirs = _to_residual(vision, inputs.hook, w_dec[ids].to(vision.cfg.dtype))
        M, _ = direct_path_matrix(vision)
        u = (dirs - dirs.mean(-1, keepdim=True)) @ M  # LayerNorm centres its input
        return labels_from_scores(ids, _read(u.float(), inputs), inputs.vocabulary, min_validity=self.min_validity)


@dataclass
class TextSpanLabeler(VocabularyLabeler):
    """TextSpan style: the text direction explaining most variance of the activation-weighted image embeddings.

    ``n_basis`` directions are chosen greedily (each projected out of the data and the remaining texts);
    the label is the first, its validity the share of variance it explains."""

    name: str = "textspan"
    n_basis: int = 3
    min_validity: float = 0.0

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        centred = _degap_image(inputs.image_embeds - inputs.image_embeds.mean(0), inputs)
        out = []
        for f in ids:
            a = inputs.acts[:, f]
            X = centred * (a / a.max().clamp_min(1e-12))[:, None]
            total = X.pow(2).sum().clamp_min(1e-12)
            T = inputs.text_degapped.clone()
            chosen: list[TermScore] = []
            for _ in range(self.n_basis):
                var = (X @ T.T).pow(2).sum(0)  # variance along each (remaining) text direction
                var[[inputs.vocabulary.index(t.term) for t in chosen]] = -1
                j = int(var.argmax())
                share = float(var[j] / total)
                chosen.append(TermScore(inputs.vocabulary[j], share, min(1.0, share)))
                t = F.normalize(T[j], dim=0)
                X = X - (X @ t)[:, None] * t
                T = F.normalize(T - (T @ t)[:, None] * t, dim=-1)
            first = chosen[:1] if chosen[0].validity >= self.min_validity else []
            out.append(FeatureLabel(feature=f, terms=first, validity=first[0].validity if first else 0.0))
        return out


def sparse_nonnegative_codes(v: torch.Tensor, dictionary: torch.Tensor, l1: float, steps: int = 300) -> torch.Tensor:
    """``argmin_w>=0 0.5 |v - w D|^2 + l1 |w|_1`` for each row of ``v`` [F, d] over ``dictionary`` [V, d]
    (projected ISTA with step 1 / largest eigenvalue of D D^T): [F, V]."""
    gram = dictionary @ dictionary.T
    step = 1.0 / float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
    w = torch.zeros(v.shape[0], dictionary.shape[0], dtype=v.dtype)
    vd = v @ dictionary.T
    for _ in range(steps):
        w = (w - step * (w @ gram - vd) - step * l1).clamp_min(0)
    return w


@dataclass
class SpliceLabeler(VocabularyLabeler):
    """SpLiCE style: sparse non-negative decomposition of the feature's causal effect on the embedding.

    Terms with weight >= ``min_share`` of the largest are returned (best first, at most ``max_terms``);
    validity is the cosine between the effect and its sparse reconstruction."""

    name: str = "splice"
    l1: float = 0.25
    max_terms: int = 3
    min_share: float = 0.5
    min_validity: float = 0.0

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        effect = F.normalize(_degap_image(_causal_vectors(inputs, ids), inputs), dim=-1)
        D = inputs.text_degapped
        w = sparse_nonnegative_codes(effect, D, self.l1 * float((effect @ D.T).abs().max()))
        out = []
        for row, f in enumerate(ids):
            recon = w[row] @ D
            validity = float(F.cosine_similarity(recon, effect[row], dim=0).clamp(0, 1)) if recon.any() else 0.0
            order = w[row].argsort(descending=True)[: self.max_terms].tolist()
            top = float(w[row, order[0]])
            terms = [TermScore(inputs.vocabulary[j], float(w[row, j]), validity) for j in order
                     if top > 0 and float(w[row, j]) >= self.min_share * top]
            if validity < self.min_validity:
                terms = []
            out.append(FeatureLabel(feature=f, terms=terms, validity=validity if terms else 0.0))
        return out


def _label_report(inputs: LabelInputs, ids: list[int]) -> Any:
    """label_features on the reference images (both methods), cached for the labelers that read it."""
    key = ("label_features", tuple(ids))
    if key not in inputs.cache:
        n = min(len(inputs.images), inputs.cache.get("n_effect_images", 64))
        inputs.cache[key] = label_features(
            inputs.model, inputs.sae, inputs.images[:n], inputs.vocabulary, feature_ids=ids, text_embeds=inputs.text,
        )
    return inputs.cache[key]


def _causal_vectors(inputs: LabelInputs, ids: list[int]) -> torch.Tensor:
    return _label_report(inputs, ids).extra["causal_vector"].float()


@dataclass
class ImageSideLabeler(VocabularyLabeler):
    """The text nearest the mean embedding shift of the feature's ``top_k`` top-activating images."""

    name: str = "image-side"
    top_k: int = 20
    min_validity: float = 0.0

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        mean = inputs.image_embeds.mean(0)
        shifts = torch.stack([inputs.image_embeds[inputs.top_images(f, self.top_k)].mean(0) - mean for f in ids])
        return labels_from_scores(ids, _read(shifts, inputs), inputs.vocabulary, min_validity=self.min_validity)


@dataclass
class DirectPathLabeler(VocabularyLabeler):
    """This package's direct-path label; validity = the share of the real effect the direct path explains."""

    name: str = "direct-path"
    min_validity: float = 0.0

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        report = _label_report(inputs, ids)
        return labels_from_scores(ids, report.direct_scores, inputs.vocabulary, validity=report.validity,
                                  min_validity=self.min_validity)


@dataclass
class CausalLabeler(VocabularyLabeler):
    """This package's causal label (the feature added in the real forward pass); validity = the top score."""

    name: str = "causal"
    min_validity: float = 0.0

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        report = _label_report(inputs, ids)
        return labels_from_scores(ids, report.causal_scores, inputs.vocabulary, min_validity=self.min_validity)
