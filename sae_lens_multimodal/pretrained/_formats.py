"""Source formats of pretrained releases, and the SAELens loader functions of each.

Each converter module (prisma.py, saev.py, sdxl_unbox.py, sparsify.py, bundled.py) registers its two
functions here when it is imported; registry.py hands them to SAELens. The converters import the
registry (to resolve SAELens's ``(repo_id, folder_name)``), and the registry reads this table instead of
importing them, so there is no import cycle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMATS", "FormatLoader", "register_format_loader", "format_loaders"]

#: source format (``format:`` in releases.yaml) -> the SAELens loader name (``conversion_func``)
FORMATS: dict[str, str] = {
    "prisma": "mm_prisma",
    "saev": "mm_saev",
    "sdxl_unbox": "mm_sdxl_unbox",
    "sparsify": "mm_sparsify",
    "bundled": "mm_bundled",  # SAEs shipped inside a package (pretrained/bundled.py)
}


@dataclass(frozen=True)
class FormatLoader:
    """A source format's SAELens loader (``load_sae``) and config getter (``get_config``), both called by
    SAELens as ``f(repo_id, folder_name, device=..., force_download=..., cfg_overrides=...)``."""

    source_format: str
    loader_name: str
    load_sae: Callable[..., tuple[dict[str, Any], dict[str, Any], Any]]
    get_config: Callable[..., dict[str, Any]]


_LOCK = threading.Lock()
_LOADERS: dict[str, FormatLoader] = {}


def register_format_loader(source_format: str, load_sae: Callable[..., Any], get_config: Callable[..., Any]) -> FormatLoader:
    """Register the loader of a source format listed in :data:`FORMATS` (re-registering replaces it)."""
    if source_format not in FORMATS:
        raise ValueError(
            f"Unknown release source format {source_format!r}; the formats are {sorted(FORMATS)}. A new format "
            "needs an entry in FORMATS (sae_lens_multimodal/pretrained/_formats.py)."
        )
    loader = FormatLoader(source_format, FORMATS[source_format], load_sae, get_config)
    with _LOCK:
        _LOADERS[source_format] = loader
    return loader


def format_loaders() -> dict[str, FormatLoader]:
    """The registered loaders by source format (a copy)."""
    with _LOCK:
        return dict(_LOADERS)
