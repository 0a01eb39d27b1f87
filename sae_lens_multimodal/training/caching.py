"""``cache_activations``: run an activation store and write (or resume) one on-disk cache per hook."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from sae_lens_multimodal.training.cache import ActivationCacheReader, ActivationCacheWriter, write_activation_caches

__all__ = ["cache_activations", "cache_dir_for_hook"]


def cache_dir_for_hook(root: Union[str, os.PathLike], hook: str) -> Path:
    """``<root>/<hook name>``: where ``cache_activations`` puts the cache of ``hook``."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", hook):
        raise ValueError(f"Hook name {hook!r} cannot be used as a directory name.")
    return Path(root) / hook


def cache_activations(store: Any, out_dir: Union[str, os.PathLike], *, items_per_shard: Optional[int] = None,
                      shard_size_mb: float = 256.0) -> dict[str, ActivationCacheReader]:
    """Write the activations of every hook of ``store`` under ``out_dir/<hook>/``; resume if interrupted.

    ``store`` is an :class:`ImageActivationStore` or a ``DiffusionActivationStore``. Shards hold
    ``items_per_shard`` source items (images or trajectories); by default that is chosen so a shard of
    the widest hook is about ``shard_size_mb``. A directory holding another model's / hook's cache is
    refused. Returns a reader per hook.
    """
    hooks = list(store.hook_names)
    if items_per_shard is None:
        existing = [cache_dir_for_hook(out_dir, h) / "metadata.json" for h in hooks]
        if any(p.exists() for p in existing):  # resume with the shard size chosen the first time
            items_per_shard = next(json.loads(p.read_text())["items_per_shard"] for p in existing if p.exists())
        else:
            items_per_shard = _items_per_shard(store, shard_size_mb)
    writers = {h: ActivationCacheWriter(cache_dir_for_hook(out_dir, h), store.describe(h), items_per_shard)
               for h in hooks}
    if len({w.items_per_shard for w in writers.values()}) != 1:
        raise ValueError("The caches under this directory were written with different shard sizes; use a new directory.")
    n_items = store.n_items
    start = min(w.first_missing_item(n_items) for w in writers.values())
    if n_items is None or start < n_items:
        write_activation_caches(store.iter_chunks(start_item=start), writers, n_items)
    return {h: ActivationCacheReader(w.directory) for h, w in writers.items()}


def _items_per_shard(store: Any, shard_size_mb: float) -> int:
    rows = getattr(store, "rows_per_item", None)
    rows_per_item = rows() if callable(rows) else None
    if not rows_per_item:
        return int(getattr(store, "default_items_per_shard", 64))
    widest = max(store.d_in(h) for h in store.hook_names)
    bytes_per_item = rows_per_item * widest * store.dtype.itemsize
    return max(1, int(shard_size_mb * 2**20 // max(1, bytes_per_item)))
