"""The model contract, hook roots and the small shared pieces every subpackage uses.

The two names below load on first use: they need SAELens and torch, and the light modules here
(``names``, ``sae_metadata``, ``denoising_names`` ...) must import without them (``sae-lens-mm --help``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MultimodalHookedRootModule", "is_observed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sae_lens_multimodal.core.hooked_root"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
