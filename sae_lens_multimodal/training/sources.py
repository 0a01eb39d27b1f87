"""Image sources for activation stores: tensors, image folders, Hugging Face ``datasets``.

Each source yields ``(item_start, pixels)`` batches of preprocessed (B, C, H, W) tensors, can start at
any item (to resume a cache), and describes itself for cache metadata.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["IMAGE_EXTENSIONS", "FolderImages", "ImageSource", "image_files", "image_source"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Preprocess = Callable[[Any], torch.Tensor]


class ImageSource:
    """Base: a sequence of images with an optional known length."""

    kind = "images"

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} has no known length")

    @property
    def n_items(self) -> Optional[int]:
        try:
            return len(self)
        except TypeError:
            return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_items": self.n_items}

    def batches(self, batch_size: int, start: int = 0, stop: Optional[int] = None,
                align: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(item_start, pixels)`` batches of items ``[start, stop)`` (``stop`` None: to the end); with
        ``align``, no batch crosses a multiple of ``align`` (a cache shard's boundary), so a shard's
        batches are the same whichever item a run starts from."""
        raise NotImplementedError


def _end(n: int, stop: Optional[int]) -> int:
    return n if stop is None else min(n, stop)


def batch_ranges(start: int, end: int, batch_size: int, align: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """``[i, j)`` item ranges of at most ``batch_size`` items from ``start`` to ``end``, cut at multiples of ``align``."""
    i = start
    while i < end:
        j = min(i + batch_size, end)
        if align:
            j = min(j, (i // align + 1) * align)
        yield i, j
        i = j


def _needs_preprocess(preprocess: Optional[Preprocess], what: str) -> Preprocess:
    if preprocess is None:
        raise ValueError(
            f"{what} must be preprocessed into tensors, and no preprocess function is known. Pass "
            "preprocess=<callable PIL image -> (C, H, W) tensor> (models from from_pretrained carry "
            "their own as model.preprocess)."
        )
    return preprocess


class TensorImages(ImageSource):
    """A (N, C, H, W) tensor of preprocessed images, or a list of PIL images / (C, H, W) tensors."""

    kind = "tensor"

    def __init__(self, images: Union[torch.Tensor, Sequence[Any]], preprocess: Optional[Preprocess] = None):
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"An image tensor must be (N, C, H, W), got shape {tuple(images.shape)}")
        elif any(not isinstance(im, torch.Tensor) for im in images):
            _needs_preprocess(preprocess, "PIL images")
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if isinstance(self.images, torch.Tensor):
            sample = self.images.reshape(-1)[:4096].float().numpy().tobytes()
            d["fingerprint"] = hashlib.sha256(sample + str(tuple(self.images.shape)).encode()).hexdigest()[:16]
        return d

    def batches(self, batch_size: int, start: int = 0, stop: Optional[int] = None,
                align: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        for i, j in batch_ranges(start, _end(len(self.images), stop), batch_size, align):
            part = self.images[i:j]
            if isinstance(part, torch.Tensor):
                yield i, part
            else:
                yield i, torch.stack([p if isinstance(p, torch.Tensor)
                                      else _needs_preprocess(self.preprocess, "PIL images")(p) for p in part])


def _listing(paths: Sequence[Path], root: Path, limit: int = 5) -> str:
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _unreadable_image(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable image (None when it is): its header is checked, and PNG/GIF data verified."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, struct.error...
        return str(e) or type(e).__name__
    return None


def image_files(root: Union[str, os.PathLike], limit: Optional[int] = None) -> list[Path]:
    """The image files under ``root`` (recursively, sorted; the first ``limit``), after checking the folder:
    any other file (a README, labels, a cache) and any image file that does not open as an image are refused
    with a ValueError naming them. Hidden files (``.DS_Store``, ``.git/...``) are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist." if not root.exists() else
                                f"{root} is a file, not an image folder: give the folder that holds the images.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}.")
    found = sorted(p for p in root.rglob("*") if p.is_file())
    others = [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS
              and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if others:
        raise ValueError(
            f"Image folder {root} holds {len(others)} file(s) that are not images ({_listing(others, root)}; "
            f"images end in {', '.join(IMAGE_EXTENSIONS)}). Move them out of the folder, or give a folder of "
            "images only. Nothing was written."
        )
    files = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS][:limit]
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
    bad = [(p, why) for p in files if (why := _unreadable_image(p)) is not None]
    if bad:
        raise ValueError(
            f"{len(bad)} file(s) in {root} do not open as images ({_listing([p for p, _ in bad], root)}: "
            f"{bad[0][1]}). Replace them with readable images or remove them. Nothing was written."
        )
    return files


class FolderImages(ImageSource):
    """Every image file under a directory (recursively, sorted by path); at most ``limit`` of them.

    The folder is checked first (:func:`image_files`), so that no cache is half-written from a folder that
    cannot be read. An image whose data turns out to be damaged when it is decoded raises naming the file.
    """

    kind = "folder"

    def __init__(self, root: Union[str, os.PathLike], preprocess: Optional[Preprocess] = None,
                 limit: Optional[int] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist." if not self.root.exists() else
                                    f"{self.root} is a file, not an image folder: give the folder that holds the images.")
        self.files = image_files(self.root, limit)
        self.preprocess = preprocess  # (None: the model's, set by image_source)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        names = "\n".join(str(p.relative_to(self.root)) for p in self.files).encode()
        return {**super().describe(), "root": str(self.root.resolve()),
                "fingerprint": hashlib.sha256(names).hexdigest()[:16]}

    def batches(self, batch_size: int, start: int = 0, stop: Optional[int] = None,
                align: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        from PIL import Image

        preprocess = _needs_preprocess(self.preprocess, f"Images in {self.root}")
        for i, j in batch_ranges(start, _end(len(self.files), stop), batch_size, align):
            tensors = []
            for path in self.files[i:j]:
                try:
                    with Image.open(path) as im:
                        rgb = im.convert("RGB")
                except (OSError, SyntaxError, ValueError) as e:  # a truncated or damaged image's data
                    raise ValueError(
                        f"Image file {path} cannot be decoded ({e}). Replace it with a readable image of the same "
                        "name and run the same command again (a cache resumes), or remove it and cache into a new "
                        "--out (the file list is part of the cache's identity)."
                    ) from None
                tensors.append(preprocess(rgb))
            yield i, torch.stack(tensors)


class DatasetImages(ImageSource):
    """A Hugging Face ``datasets`` Dataset or IterableDataset (streaming) with an image column."""

    kind = "dataset"

    def __init__(self, dataset: Any, image_column: Optional[str] = None, preprocess: Optional[Preprocess] = None):
        self.dataset = dataset
        self.image_column = image_column or self._find_image_column(dataset)
        self.preprocess = preprocess

    @staticmethod
    def _find_image_column(dataset: Any) -> str:
        features = getattr(dataset, "features", None) or {}
        try:
            from datasets import Image as ImageFeature
        except ImportError:  # pragma: no cover - datasets always ships with sae_lens
            ImageFeature = ()  # type: ignore[assignment]
        image_cols = [name for name, feat in features.items() if isinstance(feat, ImageFeature)]
        if image_cols:
            return image_cols[0]
        if "image" in features or "img" in features:
            return "image" if "image" in features else "img"
        raise ValueError(
            f"Could not find an image column in the dataset (columns: {list(features)}). "
            "Pass image_column=<name>."
        )

    def __len__(self) -> int:
        return len(self.dataset)  # IterableDataset raises TypeError: unknown length

    def describe(self) -> dict[str, Any]:
        info = getattr(self.dataset, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
        return {**super().describe(), "dataset": name, "split": str(getattr(self.dataset, "split", None)),
                "fingerprint": getattr(self.dataset, "_fingerprint", None), "image_column": self.image_column}

    def _to_tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        return _needs_preprocess(self.preprocess, "Dataset images")(value.convert("RGB") if hasattr(value, "convert") else value)

    def batches(self, batch_size: int, start: int = 0, stop: Optional[int] = None,
                align: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        if hasattr(self.dataset, "__len__") and hasattr(self.dataset, "select"):
            for i, j in batch_ranges(start, _end(len(self.dataset), stop), batch_size, align):
                rows = self.dataset[i:j][self.image_column]
                yield i, torch.stack([self._to_tensor(v) for v in rows])
            return
        # A stream is read from its beginning: skip to item `start` (IterableDataset.skip when it has it).
        if start and hasattr(self.dataset, "skip"):
            stream = iter(self.dataset.skip(start))
        else:
            stream = iter(self.dataset)
            for _ in range(start):
                if next(stream, None) is None:
                    return
        if stop is not None:
            stream = itertools.islice(stream, max(0, stop - start))
        buf: list[torch.Tensor] = []
        i = start
        for row in stream:
            buf.append(self._to_tensor(row[self.image_column]))
            if len(buf) == batch_size or (align and (i + len(buf)) % align == 0):
                yield i, torch.stack(buf)
                i += len(buf)
                buf = []
        if buf:
            yield i, torch.stack(buf)


def image_source(images: Any, preprocess: Optional[Preprocess] = None, image_column: Optional[str] = None) -> ImageSource:
    """Wrap what the user gave: a tensor or list of images, a folder path, or a ``datasets`` dataset."""
    if isinstance(images, ImageSource):
        if preprocess is not None and isinstance(images, FolderImages) and images.preprocess is None:
            images.preprocess = preprocess  # a folder checked before the model was loaded
        return images
    if isinstance(images, (str, os.PathLike)):
        return FolderImages(images, preprocess)
    if type(images).__module__.startswith("datasets"):
        return DatasetImages(images, image_column, preprocess)
    if isinstance(images, (torch.Tensor, list, tuple)):
        return TensorImages(images, preprocess)
    raise TypeError(
        f"Unsupported image source {type(images).__name__}: pass a (N, C, H, W) tensor, a list of images, "
        "an image folder path, or a datasets.Dataset / IterableDataset with an image column."
    )
