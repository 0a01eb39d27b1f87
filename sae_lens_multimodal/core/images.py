"""Image format conversion shared by the analyses and the pipelines (no heavy dependencies)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Pipeline output (``output_type="pt"``: float [n, 3, H, W] in [0, 1]) -> uint8 [n, H, W, 3], the
    format image classifiers and the report writers take."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Expected the pipeline's output_type='pt' images, float [n, 3, H, W]; got "
            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}."
        )
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
