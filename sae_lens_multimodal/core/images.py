"""Image format conversion shared by the analyses and the pipelines, and the one conversion of a vision
model's image input (no heavy dependencies; Pillow only for raw-pixel numpy inputs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["to_uint8", "as_image_batch", "check_finite_pixels"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Pipeline output (``output_type="pt"``: float [n, 3, H, W] in [0, 1]) -> uint8 [n, H, W, 3], the
    format image classifiers and the report writers take."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Expected the pipeline's output_type='pt' images, float [n, 3, H, W]; got "
            f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}."
        )
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- model inputs
def _kind(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return "tensor"
    if isinstance(item, np.ndarray):
        return "numpy array"
    if type(item).__module__.startswith("PIL.") and hasattr(item, "mode") and hasattr(item, "size"):
        return "PIL image"
    if isinstance(item, (str, os.PathLike)):
        return "path"
    return type(item).__name__


def _refuse_path(item: Any) -> TypeError:
    return TypeError(
        f"Got the path {str(item)!r} where an image was expected; open it first: "
        "PIL.Image.open(path).convert('RGB')."
    )


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype == torch.bool or x.dtype.is_complex or not x.dtype.is_floating_point:
        raise TypeError(
            f"Image tensors must be preprocessed floats (B, C, H, W); got a {x.dtype} tensor. Raw uint8 pixels go "
            "in as PIL images or numpy uint8 (H, W, C) arrays (run through model.preprocess), or convert them "
            "yourself with model.preprocess."
        )


def _numpy_raw(a: np.ndarray, n_channels: int) -> list[Any]:
    """A uint8 (H, W, C) image or (N, H, W, C) batch -> PIL images (as PIL.Image.fromarray reads them)."""
    from PIL import Image  # Pillow: only for raw-pixel inputs

    expected = f"uint8 arrays are raw pixels, (H, W, {n_channels}) for one image or (N, H, W, {n_channels}) for a batch"
    if a.ndim == 2:
        raise ValueError(
            f"Got a 2-d uint8 array {a.shape} (a grayscale image?); {expected}. "
            + ("Stack it to RGB: np.stack([a] * 3, axis=-1)." if n_channels == 3 else "")
        )
    if a.ndim not in (3, 4):
        raise ValueError(f"Got a {a.ndim}-d uint8 array {a.shape}; {expected}.")
    if a.shape[-1] != n_channels:
        if a.shape[-3] == n_channels:
            fix = "a.transpose(1, 2, 0)" if a.ndim == 3 else "a.transpose(0, 2, 3, 1)"
            raise ValueError(f"Got a channel-first uint8 array {a.shape}; {expected}. Transpose it: {fix}.")
        if a.shape[-1] == 4 and n_channels == 3:
            raise ValueError(f"Got a 4-channel (RGBA?) uint8 array {a.shape}; {expected}. Drop alpha: a[..., :3].")
        raise ValueError(f"Got a uint8 array {a.shape} with {a.shape[-1]} channels; {expected}.")
    batch = a[None] if a.ndim == 3 else a
    if len(batch) == 0:
        raise ValueError(f"Got an empty batch (shape {a.shape}): pass at least one image.")
    return [Image.fromarray(img[..., 0] if n_channels == 1 else img) for img in batch]


def _numpy_float(a: np.ndarray, n_channels: int) -> torch.Tensor:
    """A float (N, C, H, W) / (C, H, W) array: already preprocessed, used like a tensor."""
    if a.ndim in (3, 4) and a.shape[-1] == n_channels and a.shape[-3] != n_channels:
        raise ValueError(
            f"Got a channel-last {a.dtype} array {a.shape}. Float arrays are read as preprocessed pixels "
            f"(N, {n_channels}, H, W); raw pixels go in as uint8 (H, W, {n_channels}) / (N, H, W, {n_channels}) "
            "arrays (preprocessed like PIL images). Use a.astype(np.uint8) for 0..255 pixels, or "
            "a.transpose(0, 3, 1, 2) if they are already preprocessed."
        )
    return torch.from_numpy(np.ascontiguousarray(a))


def as_image_batch(images: Any, n_channels: int, preprocess: Optional[Callable[[Any], torch.Tensor]],
                   owner: str = "This model") -> torch.Tensor:
    """The one conversion of a vision model's image input to a float (B, C, H, W) tensor.

    Accepts a preprocessed float tensor / array (B, C, H, W) (or a list of (C, H, W) ones), PIL images and
    uint8 numpy arrays (one (H, W, C) image or an (N, H, W, C) batch, converted like PIL images), the raw
    ones through ``preprocess``. Refuses, naming expected vs got: an empty batch, lists mixing kinds,
    integer / bool tensors, paths, other layouts. Shape and size checks are the model's; non-finite values
    are refused by :func:`check_finite_pixels`.
    """
    if isinstance(images, (str, os.PathLike)):
        raise _refuse_path(images)
    if isinstance(images, torch.Tensor):
        _check_dtype(images)
        x = images
    elif isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            x = _preprocessed(_numpy_raw(images, n_channels), preprocess, owner, given="uint8 ndarray")
        elif images.dtype.kind == "f":
            x = _numpy_float(images, n_channels)
        else:
            raise TypeError(
                f"Got a numpy array of dtype {images.dtype}; raw pixels must be uint8 (H, W, C) "
                "(a.astype(np.uint8)), preprocessed pixels float (N, C, H, W)."
            )
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("Got an empty list of images: pass at least one image.")
        kinds = [_kind(i) for i in items]
        if len(set(kinds)) > 1:
            first_other = next(i for i, k in enumerate(kinds) if k != kinds[0])
            raise TypeError(
                f"The list of images mixes kinds: item 0 is a {kinds[0]}, item {first_other} a {kinds[first_other]}. "
                "Pass one kind: all PIL images, all uint8 (H, W, C) arrays, or all preprocessed (C, H, W) tensors."
            )
        kind = kinds[0]
        if kind == "path":
            raise _refuse_path(items[0])
        if kind == "tensor" or (kind == "numpy array" and items[0].dtype.kind == "f"):
            tensors = [torch.as_tensor(i) for i in items]
            for t in tensors:
                _check_dtype(t)
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise ValueError(
                    f"The images in the list have different shapes {sorted(shapes)}; preprocess them to one size "
                    "(model.preprocess does) before batching."
                )
            x = torch.stack(tensors)
        elif kind == "numpy array":
            raw = []
            for a in items:
                if a.dtype != np.uint8:
                    raise TypeError(f"A list of arrays holds raw uint8 (H, W, C) images; got dtype {a.dtype}.")
                if a.ndim != 3:
                    raise ValueError(f"Each array in a list is one (H, W, {n_channels}) image; got shape {a.shape}.")
                raw += _numpy_raw(a, n_channels)
            x = _preprocessed(raw, preprocess, owner, given="uint8 ndarray")
        elif kind == "PIL image":
            x = _preprocessed(items, preprocess, owner)
        else:
            raise TypeError(
                f"Cannot read a {kind} as an image. Pass a preprocessed float tensor (B, {n_channels}, H, W), PIL "
                f"images, or uint8 numpy arrays (H, W, {n_channels}) / (N, H, W, {n_channels})."
            )
    if x.ndim >= 1 and x.shape[0] == 0:
        raise ValueError(f"Got an empty batch (shape {tuple(x.shape)}): pass at least one image.")
    return x


def _preprocessed(items: list[Any], preprocess: Optional[Callable[[Any], torch.Tensor]], owner: str,
                  given: Optional[str] = None) -> torch.Tensor:
    if preprocess is None:
        raise TypeError(
            f"Got {given or type(items[0]).__name__} input but {owner} has no preprocess function. Pass a preprocessed "
            "(B, C, H, W) tensor, or set model.preprocess (from_pretrained sets it from the source model)."
        )
    out = [preprocess(i) for i in items]
    if not all(isinstance(o, torch.Tensor) for o in out):
        raise TypeError(f"model.preprocess returned {type(out[0]).__name__}, not a (C, H, W) tensor.")
    return torch.stack(out)


def check_finite_pixels(x: torch.Tensor) -> None:
    """Refuse images with NaN / inf values, naming how many and where the first one is."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        where = ", ".join(f"{n} {i}" for n, i in zip(("image", "channel", "row", "column"), first))
        raise ValueError(
            f"The images contain {int(bad.sum())} non-finite value(s) (NaN or inf) out of {x.numel()}; the first at "
            f"{where}. Fix the input (e.g. torch.nan_to_num(x), or check the normalisation: a division by a zero "
            "std gives inf)."
        )
