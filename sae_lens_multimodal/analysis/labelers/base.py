"""One interface for free text labels of vision SAE features, and what every labeler shares.

A labeler turns (CLIP, SAE, features, vocabulary, reference images) into one :class:`FeatureLabel` per
feature: zero or more terms of the vocabulary ("red; top left"), each with a score and a validity in
[0, 1], and the feature's validity. A label with no terms is an abstention. Labelers know nothing about
the data beyond the model, the SAE, the vocabulary and the images they are given, so the same call works
on any CLIP with the package's vocabulary file or a user's.

Everything several labelers need (the features' per-image activations, the image embeddings, the
vocabulary's text embeddings with the modality gap removed) is computed once by :func:`prepare_inputs`
and can be passed to every labeler (``inputs=``), so running all of them side by side costs one pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from sae_lens_multimodal.analysis.labels import vocabulary_text_embeddings
from sae_lens_multimodal.analysis.vocabulary import Vocabulary, VocabularyLike, load_vocabulary
from sae_lens_multimodal.analysis.zero_shot import text_embeddings
from sae_lens_multimodal.core.hooked_root import has_parts

__all__ = [
    "VocabularyLabeler",
    "TermScore",
    "FeatureLabel",
    "Labeler",
    "LabelInputs",
    "prepare_inputs",
    "context_text_embeddings",
    "degap_text",
    "labels_from_scores",
]


@dataclass(frozen=True)
class TermScore:
    """One term of a label: the vocabulary entry, the labeler's raw score and its validity in [0, 1]."""

    term: str
    score: float
    validity: float


@dataclass
class FeatureLabel:
    """A feature's label: one term per slot (best first); no terms means the labeler abstained."""

    feature: int
    terms: list[TermScore] = field(default_factory=list)
    #: The labeler's confidence in the whole label, in [0, 1] (0 when it abstains).
    validity: float = 0.0

    @property
    def label(self) -> Optional[str]:
        """``"red; top left"``, or None when the labeler abstained."""
        return "; ".join(t.term for t in self.terms) if self.terms else None

    @property
    def top_term(self) -> Optional[str]:
        return self.terms[0].term if self.terms else None

    def __str__(self) -> str:
        if not self.terms:
            return f"feature {self.feature}: (no label)"
        parts = ", ".join(f"{t.term} ({t.validity:.2f})" for t in self.terms)
        return f"feature {self.feature}: {parts}; validity {self.validity:.2f}"


@dataclass
class LabelInputs:
    """What the labelers share: computed once per (model, SAE, vocabulary, images)."""

    model: Any
    sae: Any
    hook: str  # vision-tower hook of the SAE (no "vision." prefix)
    vocabulary: Vocabulary
    images: Any  # the reference images (a preprocessed tensor)
    #: normalised text embeddings of the vocabulary [V, d_embed]
    text: torch.Tensor
    #: text embeddings with the vocabulary mean removed, normalised [V, d_embed] (the modality gap removed)
    text_degapped: torch.Tensor
    #: normalised image embeddings of the reference images [N, d_embed]
    image_embeds: torch.Tensor
    #: every feature's activation on each reference image, its maximum over tokens [N, d_sae]
    acts: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict)  # labelers may keep what others can reuse

    def top_images(self, feature: int, k: int) -> torch.Tensor:
        """Indices of the ``k`` reference images on which ``feature`` is most active (active ones only)."""
        a = self.acts[:, feature]
        idx = a.topk(min(k, len(a))).indices
        return idx[a[idx] > 0]


@runtime_checkable
class Labeler(Protocol):
    """Anything with a ``name`` and this ``label`` method is a labeler."""

    name: str

    def label(
        self, model: Any, sae: Any, features: Sequence[int], vocabulary: VocabularyLike = None,
        images: Any = None, *, inputs: Optional[LabelInputs] = None,
    ) -> list[FeatureLabel]:
        ...


def degap_text(text: torch.Tensor) -> torch.Tensor:
    """Normalised text embeddings with their mean removed: what distinguishes the terms from each other,
    without the direction every text shares (the modality gap)."""
    t = F.normalize(text, dim=-1)
    return F.normalize(t - t.mean(0, keepdim=True), dim=-1)


@torch.no_grad()
def context_text_embeddings(
    model: Any, terms: Sequence[str], corpus: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Each term embedded in the contexts a model was trained on: the normalised mean of the normalised
    text embeddings of the ``corpus`` sentences that contain the term as whole words [V, d_embed].

    A model that never saw lone words (a CLIP trained on one kind of caption) embeds a bare word far from
    what the word means in its captions; averaging over sentences that use the word recovers it. Any
    corpus works (the training captions of the model, a caption data set); a term no sentence contains
    raises, naming it.
    """
    corpus = list(corpus)
    if not corpus:
        raise ValueError("context_text_embeddings needs a non-empty corpus of sentences.")
    emb = text_embeddings(model, corpus, batch_size=batch_size, normalize=True)
    rows, missing = [], []
    lowered = [f" {' '.join(re.findall(r'[a-z0-9]+', s.lower()))} " for s in corpus]
    for term in terms:
        key = f" {' '.join(re.findall(r'[a-z0-9]+', term.lower()))} "
        mask = torch.tensor([key in s for s in lowered])
        if not mask.any():
            missing.append(term)
            continue
        rows.append(F.normalize(emb[mask].mean(0), dim=0))
    if missing:
        raise ValueError(f"No corpus sentence contains {missing[:10]}; add sentences that use them or drop them "
                         "from the vocabulary.")
    return torch.stack(rows)


def _vision_hook(model: Any, sae: Any) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if hook is None:
        raise ValueError("The SAE has no cfg.metadata.hook_name; labelers need to know where it reads.")
    spec = model.locate(hook)
    if spec.part != "vision":
        raise ValueError(f"{hook!r} is a {spec.part}-tower hook; these labelers are for vision features.")
    return spec.local_name


@torch.no_grad()
def prepare_inputs(
    model: Any,
    sae: Any,
    vocabulary: VocabularyLike,
    images: Any,
    *,
    text_embeds: Optional[torch.Tensor] = None,
    templates: Optional[Sequence[str]] = None,
    batch_size: int = 256,
) -> LabelInputs:
    """Compute what the labelers share (see :class:`LabelInputs`). ``images``: a preprocessed image tensor
    [N, C, H, W] (the reference images: top images, effects and validities are measured on them).
    ``text_embeds``: precomputed vocabulary embeddings (e.g. :func:`context_text_embeddings`); default:
    the vocabulary embedded with ``templates`` (:data:`~sae_lens_multimodal.analysis.labels.LABEL_TEMPLATES`)."""
    if not has_parts(model, "vision", "text"):
        raise TypeError("Labelers need a HookedCLIP (both towers: the vocabulary is embedded by its text tower).")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty preprocessed tensor [N, C, H, W] (the reference images).")
    vocab = load_vocabulary(vocabulary)
    if text_embeds is None:
        text_embeds = (vocabulary_text_embeddings(model, vocab) if templates is None
                       else vocabulary_text_embeddings(model, vocab, templates))
    if text_embeds.shape[0] != len(vocab):
        raise ValueError(f"text_embeds has {text_embeds.shape[0]} rows for a vocabulary of {len(vocab)} terms.")
    hook = _vision_hook(model, sae)
    vision = model.part("vision")
    acts, embeds = [], []
    for i in range(0, len(images), batch_size):
        _, cache = vision.run_with_cache(images[i:i + batch_size], names_filter=[hook, "hook_out"])
        acts.append(sae.encode(cache[hook].to(sae.W_dec.dtype)).amax(dim=1))
        embeds.append(F.normalize(cache["hook_out"], dim=-1))
    text = F.normalize(text_embeds.float(), dim=-1)
    return LabelInputs(model=model, sae=sae, hook=hook, vocabulary=vocab, images=images, text=text,
                       text_degapped=degap_text(text), image_embeds=torch.cat(embeds).float(),
                       acts=torch.cat(acts).float())


def resolve_inputs(model: Any, sae: Any, vocabulary: VocabularyLike, images: Any,
                   inputs: Optional[LabelInputs]) -> LabelInputs:
    """``inputs`` when given (checked to be for this model and SAE), else :func:`prepare_inputs`."""
    if inputs is not None:
        if inputs.model is not model or inputs.sae is not sae:
            raise ValueError("inputs= were prepared for another model or SAE; call prepare_inputs(model, sae, ...).")
        return inputs
    if images is None:
        raise ValueError("Pass images= (reference images) or inputs= (from prepare_inputs).")
    return prepare_inputs(model, sae, vocabulary, images)


def check_features(features: Sequence[int], d_sae: int) -> list[int]:
    ids = [int(f) for f in features]
    if not ids:
        raise ValueError("No features to label.")
    bad = [f for f in ids if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"Feature indices must be in [0, {d_sae}); got {bad[:5]}.")
    return ids


def labels_from_scores(
    features: Sequence[int], scores: torch.Tensor, vocabulary: Vocabulary, validity: Optional[torch.Tensor] = None,
    min_validity: float = 0.0,
) -> list[FeatureLabel]:
    """One-term labels: each feature's top-scoring term. ``validity`` [F] defaults to the top score clipped
    to [0, 1]; a feature whose validity is below ``min_validity`` gets no label."""
    out = []
    top, idx = scores.max(dim=-1)
    val = top.clamp(0, 1) if validity is None else validity.nan_to_num(0.0).clamp(0, 1)
    for f, s, i, v in zip(features, top.tolist(), idx.tolist(), val.tolist()):
        terms = [TermScore(vocabulary[i], s, v)] if v >= min_validity else []
        out.append(FeatureLabel(feature=int(f), terms=terms, validity=v if terms else 0.0))
    return out


class VocabularyLabeler:
    """The shared entry of this package's labelers: resolve the inputs once (or reuse ``inputs`` computed for
    several labelers), check the feature ids, then :meth:`label_resolved`, which is what each labeler computes."""

    @torch.no_grad()
    def label(self, model: Any, sae: Any, features: Sequence[int], vocabulary: VocabularyLike = None,
              images: Any = None, *, inputs: Optional[LabelInputs] = None) -> list[FeatureLabel]:
        inputs = resolve_inputs(model, sae, vocabulary, images, inputs)
        return self.label_resolved(model, sae, inputs, check_features(features, inputs.acts.shape[1]))

    def label_resolved(self, model: Any, sae: Any, inputs: LabelInputs, ids: list[int]) -> list[FeatureLabel]:
        raise NotImplementedError
