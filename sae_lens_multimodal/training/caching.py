"""``cache_activations``: run an activation store and write (or resume) one on-disk cache per hook.

Shard ``k`` of a cache holds source items ``[k * items_per_shard, (k + 1) * items_per_shard)``
(docs/activation-cache.md) and is computed from exactly those items, in forward batches that never cross
a shard boundary. So the shards can be computed in any order, by any process: under ``torchrun`` every
rank takes its share of the shards still missing on disk (``missing[rank::world_size]``) and the cache
is the same, bit for bit on the CPU, as the one a single process writes (docs/distributed.md).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

from sae_lens_multimodal.training.cache import (
    ActivationCacheReader,
    ActivationCacheWriter,
    CacheMismatchError,
    write_activation_caches,
)
from sae_lens_multimodal.training.distributed import (
    barrier,
    broadcast_object,
    check_ranks_agree,
    node_progress_bar,
    rank,
    world_size,
)

__all__ = ["cache_activations", "cache_dir_for_hook", "missing_shards", "runs_of_rank", "shard_runs"]


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
    refused. Only the shards missing on disk are computed. Returns a reader per hook.

    In a torch.distributed job (``init_distributed`` under torchrun) every rank calls this with the same
    arguments: the ranks first check that they agree on what they cache (model, hooks, dtype, token
    policy, source, shard size; else ``RankMismatchError`` on every rank, before anything is written),
    rank 0 writes ``metadata.json``, then each rank writes its share of the missing shards.
    """
    hooks = list(store.hook_names)
    if items_per_shard is None:
        existing = [cache_dir_for_hook(out_dir, h) / "metadata.json" for h in hooks]
        if any(p.exists() for p in existing):  # resume with the shard size chosen the first time
            items_per_shard = next(json.loads(p.read_text())["items_per_shard"] for p in existing if p.exists())
        else:
            items_per_shard = _items_per_shard(store, shard_size_mb)
    plan: dict[str, Any] = {"hooks": hooks, "items_per_shard": items_per_shard, "n_items": store.n_items}
    plan.update({f"cache of {h}": store.describe(h) for h in hooks})
    check_ranks_agree(plan, "cache command")

    # Rank 0 opens the caches first: it writes metadata.json once, deletes the temporary files of a writer
    # that was killed, and lists the complete shards; the other ranks open them once that is done.
    opened: Any = None
    if rank() == 0:
        try:
            writers = _open_writers(store, out_dir, items_per_shard, clean_stale=True)
            opened = ("ok", sorted(set.intersection(*(w.completed for w in writers.values()))))
        except Exception as e:  # told to every rank, so no rank waits for a cache that will not come
            kind = CacheMismatchError if isinstance(e, CacheMismatchError) else \
                ValueError if isinstance(e, ValueError) else RuntimeError
            broadcast_object(("error", kind.__name__, str(e)))
            raise
    opened = broadcast_object(opened)
    if opened[0] == "error":
        kind = {"CacheMismatchError": CacheMismatchError, "ValueError": ValueError}.get(opened[1], RuntimeError)
        raise kind(f"Rank 0 could not open the cache: {opened[2]}")
    if rank() != 0:
        writers = _open_writers(store, out_dir, items_per_shard, clean_stale=False)
    done = set(opened[1])
    # A cache on disk keeps the shard size it was created with (the writers read it from metadata.json).
    items_per_shard = next(iter(writers.values())).items_per_shard

    n_items = store.n_items
    runs = runs_of_rank(done, n_items, items_per_shard, rank(), world_size())
    _write_shards(store, writers, runs, done, n_items, items_per_shard, cache_dir_for_hook(out_dir, hooks[0]))
    barrier()  # every rank's shards are on disk before anyone reads the cache
    return {h: ActivationCacheReader(w.directory) for h, w in writers.items()}


def missing_shards(done: set[int], n_items: Optional[int], items_per_shard: int) -> Iterator[int]:
    """Indices of the shards not in ``done``, in order (without end when the source's length is unknown)."""
    shards = range(-(-n_items // items_per_shard)) if n_items is not None else itertools.count()
    return (k for k in shards if k not in done)


def runs_of_rank(done: set[int], n_items: Optional[int], items_per_shard: int, rank: int,
                 world_size: int) -> Iterator[tuple[int, Optional[int]]]:
    """The missing shards rank ``rank`` of ``world_size`` computes, as runs ``[first, end)`` of consecutive
    shards in order (``end`` None: to the end of a source of unknown length).

    Known length: one contiguous block of the missing shards per rank (a stream is skipped into once
    per run). Unknown length: every ``world_size``-th missing shard, until the source ends. In one
    process: every missing shard.
    """
    if n_items is not None:
        todo = list(missing_shards(done, n_items, items_per_shard))
        yield from shard_runs(todo[rank * len(todo) // world_size:(rank + 1) * len(todo) // world_size])
    elif world_size == 1:
        horizon = max(done) + 1 if done else 0  # every shard from here on is missing
        yield from shard_runs(k for k in range(horizon) if k not in done)
        yield horizon, None
    else:
        yield from ((k, k + 1) for k in itertools.islice(missing_shards(done, None, items_per_shard), rank, None,
                                                         world_size))


def shard_runs(shards: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Group increasing shard indices into runs ``[first, last + 1)`` of consecutive shards."""
    first = last = -2
    for k in shards:
        if k != last + 1:
            if first >= 0:
                yield first, last + 1
            first = k
        last = k
    if first >= 0:
        yield first, last + 1


def _open_writers(store: Any, out_dir: Union[str, os.PathLike], items_per_shard: int,
                  clean_stale: bool) -> dict[str, ActivationCacheWriter]:
    writers = {h: ActivationCacheWriter(cache_dir_for_hook(out_dir, h), store.describe(h), items_per_shard,
                                        clean_stale=clean_stale)
               for h in store.hook_names}
    if len({w.items_per_shard for w in writers.values()}) != 1:
        raise ValueError("The caches under this directory were written with different shard sizes; use a new directory.")
    return writers


def _write_shards(store: Any, writers: dict[str, ActivationCacheWriter], runs: Iterator[tuple[int, Optional[int]]],
                  done: set[int], n_items: Optional[int], items_per_shard: int, progress_dir: Path) -> None:
    """Compute and write the shards of ``runs`` (consecutive shards ``[first, end)``), each from exactly its
    items, in batches cut at shard boundaries; stop at the end of a source of unknown length."""
    show = bool(getattr(store, "progress", False))
    diffusion = getattr(store, "kind", None) == "diffusion"
    bar = node_progress_bar(n_items, initial=_items_done(done, n_items, items_per_shard),
                            desc="Caching diffusion activations" if diffusion else "Caching activations",
                            unit="traj" if diffusion else "img", disable=not show)
    if show:
        store.progress = False  # the store's own bar would restart for every run; this one counts the job
    ended = [False]

    def chunks(lo: int, hi: Optional[int]) -> Iterator[Any]:
        finished, seen = 0, lo
        for start, end, by_hook in store.iter_chunks(start_item=lo, stop_item=hi, align=items_per_shard):
            if bar.shown:
                if start == lo or start % items_per_shard == 0:  # a new shard: count the job's shards on disk
                    finished = _items_done(_complete_on_disk(progress_dir), n_items, items_per_shard)
                bar.set_global(finished + end - start // items_per_shard * items_per_shard)
            seen = end
            yield start, end, by_hook
        ended[0] = hi is None or seen < hi  # the source ran out before the run's end

    try:
        for first, end in runs:
            hi = None if end is None else end * items_per_shard
            if n_items is not None and hi is not None:
                hi = min(hi, n_items)
            write_activation_caches(chunks(first * items_per_shard, hi), writers, n_items)
            if ended[0] and n_items is None:
                break
        if bar.shown:
            bar.set_global(_items_done(_complete_on_disk(progress_dir), n_items, items_per_shard))
    finally:
        if show:
            store.progress = True
        bar.close()


def _complete_on_disk(directory: Path) -> set[int]:
    return {int(m.group(1)) for p in directory.iterdir() if (m := re.match(r"^shard_(\d{5,})\.json$", p.name))}


def _items_done(done: set[int], n_items: Optional[int], items_per_shard: int) -> int:
    """Items in the shards ``done`` (the last shard of a source of unknown length counts as full)."""
    return sum(min(items_per_shard, n_items - k * items_per_shard) if n_items is not None else items_per_shard
               for k in done)


def _items_per_shard(store: Any, shard_size_mb: float) -> int:
    rows = getattr(store, "rows_per_item", None)
    rows_per_item = rows() if callable(rows) else None
    if not rows_per_item:
        return int(getattr(store, "default_items_per_shard", 64))
    widest = max(store.d_in(h) for h in store.hook_names)
    bytes_per_item = rows_per_item * widest * store.dtype.itemsize
    return max(1, int(shard_size_mb * 2**20 // max(1, bytes_per_item)))
