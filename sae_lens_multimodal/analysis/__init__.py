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
# Causal and temporal analyses (vision patching, diffusion patching, ablation, timestep analysis).
from sae_lens_multimodal.analysis.vision_patching import VisionPatchingResult, clip_activation_patching, shape_patch_mask
from sae_lens_multimodal.analysis.diffusion_patching import DiffusionPatchingResult, diffusion_patching, unet_blocks
from sae_lens_multimodal.analysis.ablation import AblationResult, Component, ablate_components, shapes_prompts
from sae_lens_multimodal.analysis.temporal import FeatureTimecourse, ProbeResult, feature_timecourse, timestep_probes

__all__ = ["image_patching_index", "patching_shape", "tokens_per_image"]
# CLIP shared-space analysis (zero-shot, logit lens, decomposition, feature labels).
__all__ += [
    "EmbeddingDecomposition", "decompose_image_embedding",
    "FeatureLabels", "LabelReport", "causal_labels", "direct_path_labels", "label_features",
    "CLIPLogitLensResult", "clip_logit_lens",
    "Vocabulary", "default_vocabulary", "load_vocabulary",
    "ZeroShotClassifier", "ZeroShotMetrics", "ce_recovered", "zero_shot_classifier",
]
# Typographic attacks and their suppression through SAE features (docs/typographic.md).
from sae_lens_multimodal.analysis.typographic import (  # noqa: E402
    TextFeature,
    TypographicAttackSet,
    TypographicResult,
    build_attack_set,
    find_text_features,
    typographic_analysis,
)

__all__ += [
    "TextFeature", "TypographicAttackSet", "TypographicResult", "build_attack_set", "find_text_features",
    "typographic_analysis",
]
__all__ += [
    "VisionPatchingResult", "clip_activation_patching", "shape_patch_mask",
    "DiffusionPatchingResult", "diffusion_patching", "unet_blocks",
    "AblationResult", "Component", "ablate_components", "shapes_prompts",
    "FeatureTimecourse", "ProbeResult", "feature_timecourse", "timestep_probes",
]
