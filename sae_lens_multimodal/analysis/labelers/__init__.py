"""Free text labels for vision SAE features, several ways behind one interface.

>>> from sae_lens_multimodal.analysis.labelers import LABELERS, prepare_inputs
>>> inputs = prepare_inputs(model, sae, vocabulary, images)       # shared by every labeler
>>> labels = {name: make().label(model, sae, features, inputs=inputs) for name, make in LABELERS.items()}

``base``: the interface (:class:`Labeler`, :class:`FeatureLabel`), shared inputs, vocabulary embeddings in
context. ``baselines``: the published labelers (DN-CBM-style decoder projection, TextSpan-style, SpLiCE-style,
image-side) and this package's direct-path / causal labels. ``enrichment``: one slot per attribute, with
abstention (the best on the shapes world's ground truth; docs/clip.md).
"""

from __future__ import annotations

from typing import Callable

from sae_lens_multimodal.analysis.labelers.base import (
    FeatureLabel,
    Labeler,
    LabelInputs,
    TermScore,
    context_text_embeddings,
    degap_text,
    prepare_inputs,
)
from sae_lens_multimodal.analysis.labelers.baselines import (
    CausalLabeler,
    DecoderProjectionLabeler,
    DirectPathLabeler,
    ImageSideLabeler,
    SpliceLabeler,
    TextSpanLabeler,
    sparse_nonnegative_codes,
)
from sae_lens_multimodal.analysis.labelers.enrichment import EnrichmentLabeler

__all__ = [
    "FeatureLabel",
    "Labeler",
    "LabelInputs",
    "TermScore",
    "context_text_embeddings",
    "degap_text",
    "prepare_inputs",
    "CausalLabeler",
    "DecoderProjectionLabeler",
    "DirectPathLabeler",
    "ImageSideLabeler",
    "SpliceLabeler",
    "TextSpanLabeler",
    "EnrichmentLabeler",
    "sparse_nonnegative_codes",
    "LABELERS",
    "BEST_LABELER",
]

#: Every labeler by name, each with its default settings (the side-by-side table runs them all).
LABELERS: dict[str, Callable[[], Labeler]] = {
    "decoder-projection": DecoderProjectionLabeler,
    "textspan": TextSpanLabeler,
    "splice": SpliceLabeler,
    "image-side": ImageSideLabeler,
    "direct-path": DirectPathLabeler,
    "causal": CausalLabeler,
    "enrichment": EnrichmentLabeler,
}
#: The labeler that names the shapes world's features best (measured by `sae-lens-mm ground-truth`).
BEST_LABELER = "enrichment"
