"""The shapes world: procedurally drawn images with known ground truth, and the small models trained on it."""

from sae_lens_multimodal.world.shapes import (
    CLASS_FACTORS,
    COLORS,
    FACTOR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXT_WORDS,
    TEXTURES,
    ShapeFactors,
    ShapesDataset,
    ShapesWorld,
    all_captions,
    caption,
    caption_vocabulary,
    class_factor_combinations,
    to_tensor,
)

__all__ = [
    "CLASS_FACTORS",
    "COLORS",
    "FACTOR_NAMES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEXT_WORDS",
    "TEXTURES",
    "ShapeFactors",
    "ShapesDataset",
    "ShapesWorld",
    "all_captions",
    "caption",
    "caption_vocabulary",
    "class_factor_combinations",
    "to_tensor",
]
