"""The shapes world: procedurally drawn images with known ground truth, and the small models trained on it.

Importing this package registers its models (``"shapes-clip"``, ``"shapes-clip-typographic"``,
``"shapes-diffusion"``, ``"shapes-dit"``, ``"shapes-vlm"``, ``"shapes-vlm-typographic"``) with :mod:`sae_lens_multimodal.models.registry` and its pipeline classes with
:mod:`sae_lens_multimodal.diffusion.pipeline_classes` and its factor world (captions, factor values, prompt
sets and judge of factor-dict prompts) with :mod:`sae_lens_multimodal.analysis.factor_worlds`, the registries
any other package uses; the model registry imports this package on the first lookup of a ``shapes-`` name. The scripts that trained the shipped
weights live in :mod:`sae_lens_multimodal.world.training`, which nothing else imports.
"""

from sae_lens_multimodal.analysis.factor_worlds import register_factor_world
from sae_lens_multimodal.diffusion.pipeline_classes import register_pipeline_class
from sae_lens_multimodal.models.registry import register_model
from sae_lens_multimodal.world.causal import SHAPES_FACTOR_WORLD
from sae_lens_multimodal.world.clip import load_shapes_clip, typographic_attack, zero_shot_accuracy
from sae_lens_multimodal.world.paths import (
    SHAPES_CLIP_DIR,
    SHAPES_CLIP_TYPOGRAPHIC_DIR,
    SHAPES_DIFFUSION_DIR,
    SHAPES_DIT_DIR,
    SHAPES_VLM_DIR,
    SHAPES_VLM_TYPOGRAPHIC_DIR,
)
from sae_lens_multimodal.world.shapes import (
    ShapesDataset,
    ShapesWorld,
    all_captions,
    caption,
    class_factor_combinations,
    to_tensor,
)

# What a user calls. The world's constants (COLORS, SHAPES, POSITIONS, ...; the weight directories) and records
# (ShapeFactors, ZeroShotResult) stay importable from their modules (world.shapes, world.paths, world.clip);
# the diffusion model loads with world.diffusion.load_shapes_pipeline (diffusers) or load_model("shapes-diffusion").
__all__ = [
    "ShapesWorld",
    "ShapesDataset",
    "caption",
    "all_captions",
    "class_factor_combinations",
    "to_tensor",
    "load_shapes_clip",
    "zero_shot_accuracy",
    "typographic_attack",
]


# ---------------------------------------------------------------------------------------- registration

register_model(
    "shapes-clip",
    f"open-clip:local-dir:{SHAPES_CLIP_DIR}",
    "Small open_clip CLIP (ViT: 4 layers, width 64, 32x32 images, patch 4; text: 3 layers, width 64) "
    "trained on the shapes world; see sae_lens_multimodal/world/README.md.",
    kind="clip",
)
register_model(
    "shapes-clip-typographic",
    f"open-clip:local-dir:{SHAPES_CLIP_TYPOGRAPHIC_DIR}",
    "The shapes-clip architecture trained with each image's own colour name written on most images "
    "(world.training.train_clip --variant typographic), so a misleading written colour word fools it (a "
    "typographic attack); see docs/typographic.md.",
    kind="clip",
)
register_model(
    "shapes-diffusion",
    str(SHAPES_DIFFUSION_DIR),
    "Small text-to-image diffusers pipeline (ShapesDiffusionPipeline: UNet2DConditionModel on 32x32 RGB "
    "pixels, conditioned on the shapes-clip text tower) trained on the shapes world; "
    "see sae_lens_multimodal/world/README.md.",
    kind="diffusion",
)
register_model(
    "shapes-dit",
    str(SHAPES_DIT_DIR),
    "Small text-to-image diffusion transformer (ShapesDiTPipeline: an SD3-style SD3Transformer2DModel on 32x32 "
    "RGB pixels in 4x4 patches, joint attention with the shapes-clip text tower's tokens) trained on the shapes "
    "world; see docs/causal-analysis.md (UNet and DiT side by side).",
    kind="diffusion",
)
register_model(
    "shapes-vlm",
    str(SHAPES_VLM_DIR),
    "Small transformers LLaVA (LlavaForConditionalGeneration: the shapes-clip vision tower, frozen; a GELU "
    "projector; a 3-layer width-128 Llama) trained to answer questions about a shapes-world image's colour, "
    "shape, position, size and texture; see sae_lens_multimodal/world/README.md.",
    kind="vlm",
)
register_model(
    "shapes-vlm-typographic",
    str(SHAPES_VLM_TYPOGRAPHIC_DIR),
    "The shapes-vlm recipe on the shapes-clip-typographic vision tower (train_vlm --tower shapes-clip-typographic), "
    "for typographic attacks on a VLM; see docs/vlm.md.",
    kind="vlm",
)
# Batches [uncond, cond] like StableDiffusionPipeline; imported (with diffusers) only when a saved one is loaded.
register_pipeline_class("ShapesDiffusionPipeline", "sae_lens_multimodal.world.diffusion:ShapesDiffusionPipeline",
                        cfg_layout="batched")
# Factor-dict prompts of the shapes pipeline are captioned, sampled and judged by the shapes world
# (diffusion_patching, ablate_components, timestep_probes find it from the pipeline).
# PixArtAlphaPipeline's conventions ([negative, positive] batched); same lazy import.
register_pipeline_class("ShapesDiTPipeline", "sae_lens_multimodal.world.dit:ShapesDiTPipeline", cfg_layout="batched")
register_factor_world(SHAPES_FACTOR_WORLD, pipeline_classes=["ShapesDiffusionPipeline", "ShapesDiTPipeline"])
