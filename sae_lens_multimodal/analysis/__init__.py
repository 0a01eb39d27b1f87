"""Analysis helpers that adapt TransformerLens / SAELens analysis code to image models."""

from sae_lens_multimodal.analysis.patching import image_patching_index, patching_shape, tokens_per_image
from sae_lens_multimodal.analysis.decomposition import decompose_image_embedding
from sae_lens_multimodal.analysis.labels import causal_labels, direct_path_labels, label_features
from sae_lens_multimodal.analysis.logit_lens import clip_logit_lens
from sae_lens_multimodal.analysis.vocabulary import Vocabulary, default_vocabulary, load_vocabulary
from sae_lens_multimodal.analysis.zero_shot import ZeroShotClassifier, ce_recovered, zero_shot_classifier
# Causal and temporal analyses (vision patching, diffusion patching, ablation, timestep analysis).
from sae_lens_multimodal.analysis.vision_patching import clip_activation_patching
from sae_lens_multimodal.analysis.diffusion_patching import diffusion_patching, unet_blocks
from sae_lens_multimodal.analysis.ablation import Component, ablate_components
from sae_lens_multimodal.analysis.temporal import feature_timecourse, timestep_probes
# Head roles, bottleneck ablation and the diffusion lens (docs/diffusion-heads.md).
from sae_lens_multimodal.analysis.head_roles import assign_head_roles, attention_head_statistics, bottleneck_ablation
from sae_lens_multimodal.analysis.diffusion_lens import diffusion_lens
# Attribution patching and its exact reference (docs/circuits.md).
from sae_lens_multimodal.analysis.attribution import attribution_patching
from sae_lens_multimodal.analysis.circuits_exact import exact_patching

__all__ = ["image_patching_index", "patching_shape", "tokens_per_image"]
# CLIP shared-space analysis (zero-shot, logit lens, decomposition, feature labels).
__all__ += [
    "decompose_image_embedding",
    "causal_labels", "direct_path_labels", "label_features",
    "clip_logit_lens",
    "Vocabulary", "default_vocabulary", "load_vocabulary",
    "ZeroShotClassifier", "ce_recovered", "zero_shot_classifier",
]
# Typographic attacks on the shapes world (docs/typographic.md) live with the world: sae_lens_multimodal.world.typographic.
__all__ += [
    "clip_activation_patching",
    "diffusion_patching", "unet_blocks",
    "Component", "ablate_components",
    "feature_timecourse", "timestep_probes",
    "attention_head_statistics", "assign_head_roles", "bottleneck_ablation", "diffusion_lens",
    "attribution_patching", "exact_patching",
]
# Result records (VisionPatchingResult, FeatureLabels, ...) stay importable from their modules; the factor-world
# registry (FactorWorld, register_factor_world) from analysis.factor_worlds. The shapes-world helpers
# (shape_patch_mask, shapes_prompts) live with the world: sae_lens_multimodal.world.causal.
