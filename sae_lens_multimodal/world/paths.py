"""Where the shapes world's shipped weights live inside the package (they load offline from here)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["WEIGHTS_DIR", "SHAPES_CLIP_DIR", "SHAPES_CLIP_TYPOGRAPHIC_DIR", "SHAPES_DIFFUSION_DIR", "SHAPES_DIT_DIR", "SHAPES_VLM_DIR",
           "SHAPES_VLM_TYPOGRAPHIC_DIR", "BUNDLED_SAES_DIR"]

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
#: The shapes CLIP (open_clip local-dir layout). Registered name: "shapes-clip".
SHAPES_CLIP_DIR: Path = WEIGHTS_DIR / "shapes_clip"
#: The variant trained with its own colour written on images (world.training.train_clip --variant
#: typographic), so written colour words fool it. Registered name: "shapes-clip-typographic".
SHAPES_CLIP_TYPOGRAPHIC_DIR: Path = WEIGHTS_DIR / "shapes_clip_typographic"
#: The text-to-image pipeline (diffusers layout: model_index.json + one folder per component).
#: Registered name: "shapes-diffusion".
SHAPES_DIFFUSION_DIR: Path = WEIGHTS_DIR / "shapes_diffusion"
#: The text-to-image diffusion transformer (SD3-style MM-DiT; diffusers layout). Registered name: "shapes-dit".
SHAPES_DIT_DIR: Path = WEIGHTS_DIR / "shapes_dit"
#: The shapes VLM (transformers LLaVA layout: config.json, model.safetensors, processor files).
#: Registered name: "shapes-vlm".
SHAPES_VLM_DIR: Path = WEIGHTS_DIR / "shapes_vlm"
#: The same VLM recipe on the shapes-clip-typographic vision tower (train_vlm --tower shapes-clip-typographic),
#: for typographic attacks on a VLM. Registered name: "shapes-vlm-typographic".
SHAPES_VLM_TYPOGRAPHIC_DIR: Path = WEIGHTS_DIR / "shapes_vlm_typographic"
#: The bundled SAEs, one folder per release and SAE id (loaded through the "bundled" release format).
BUNDLED_SAES_DIR: Path = WEIGHTS_DIR / "saes"
