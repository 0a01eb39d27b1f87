"""Analysis helpers that adapt TransformerLens / SAELens analysis code to image models."""

from sae_lens_multimodal.analysis.patching import image_patching_index, patching_shape, tokens_per_image
from sae_lens_multimodal.analysis.decomposition import EmbeddingDecomposition, decompose_image_embedding
from sae_lens_multimodal.analysis.labels import (
    FeatureLabels,
    LabelReport,
    causal_labels,
    direct_path_labels,
    label_features,
)
from sae_lens_multimodal.analysis.logit_lens import CLIPLogitLensResult, clip_logit_lens
from sae_lens_multimodal.analysis.vocabulary import Vocabulary, default_vocabulary, load_vocabulary
from sae_lens_multimodal.analysis.zero_shot import ZeroShotClassifier, ZeroShotMetrics, ce_recovered, zero_shot_classifier

__all__ = ["image_patching_index", "patching_shape", "tokens_per_image"]
# CLIP shared-space analysis (zero-shot, logit lens, decomposition, feature labels).
__all__ += [
    "EmbeddingDecomposition", "decompose_image_embedding",
    "FeatureLabels", "LabelReport", "causal_labels", "direct_path_labels", "label_features",
    "CLIPLogitLensResult", "clip_logit_lens",
    "Vocabulary", "default_vocabulary", "load_vocabulary",
    "ZeroShotClassifier", "ZeroShotMetrics", "ce_recovered", "zero_shot_classifier",
]
