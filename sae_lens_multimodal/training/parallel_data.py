"""Data for data-parallel SAE training: one global row order of a cache, read in disjoint slices by rank.

The rows of a cache are put in an order that depends on the seed only, never on the number of ranks:

1. epoch ``e`` visits the shards in a seeded random order (``numpy`` seed ``[seed, e]``);
2. the rows, in that shard order, are cut into windows of ``window_rows`` consecutive rows; the rows of
   window ``w`` are shuffled (seed ``[seed, e, w]``) -- a shuffle buffer of ``window_rows`` rows, done on
   row indices, so no rank reads rows it does not train on;
3. for timestep-aware SAEs, rows the SAE does not cover are dropped (from the labels, which are small);
4. the windows are concatenated over epochs into one stream, and global batch ``s`` is rows
   ``[s * B, (s + 1) * B)`` of the stream.

Rank ``r`` of ``N`` trains on the ``r``-th of the ``N`` equal parts of every global batch and reads only
those rows' activations from the memory-mapped shards. So the union of the ranks' batches at step ``s``
is exactly the batch one process with batch ``B`` gets at step ``s``, and the data position of a run is
one number, the count of global batches served, which resumes with any ``N``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from sae_lens.training.prefetch import PrefetchingIterator

from sae_lens_multimodal.core.files import load_npy
from sae_lens_multimodal.training.cache import ActivationCacheReader, ActivationChunk
from sae_lens_multimodal.training.providers import ActivationProvider, coverage_filter

__all__ = ["GlobalRowOrder", "rank_batches", "data_parallel_provider"]


class GlobalRowOrder:
    """The seeded order of a cache's rows described in the module docstring, as (shard, row) index pairs."""

    def __init__(self, reader: ActivationCacheReader, *, seed: int = 0, window_rows: int = 1 << 18,
                 keep: Optional[Callable[[ActivationChunk], ActivationChunk]] = None):
        if not reader.shards:
            raise ValueError(f"The cache at {reader.directory} has no complete shard yet.")
        reader.require_complete()  # a cache with holes would silently train on fewer rows
        if window_rows <= 0:
            raise ValueError(f"window_rows must be positive, got {window_rows}")
        self.reader = reader
        self.seed = int(seed)
        self.window_rows = int(window_rows)
        self.keep = keep
        self.rows_per_shard = np.array([s.rows for s in reader.shards], dtype=np.int64)

    def _filter(self, shard_pos: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop the rows ``keep`` refuses (timestep-aware SAEs), reading only the rows' labels."""
        if self.keep is None:
            return shard_pos, rows
        mask = np.zeros(len(rows), dtype=bool)
        for k in np.unique(shard_pos):
            at = np.nonzero(shard_pos == k)[0]
            shard = self.reader.shards[int(k)]
            labels = {name: torch.from_numpy(np.array(load_npy(shard.paths[name], mmap_mode="r")[rows[at]]))
                      for name in ("timestep", "branch") if name in shard.paths}
            probe = ActivationChunk(torch.zeros(len(at), 0), torch.from_numpy(rows[at]),
                                    labels.get("timestep"), labels.get("branch"))
            probe.sample = torch.arange(len(at))  # which of ``at`` survive
            kept = self.keep(probe).sample.numpy()
            mask[at[kept]] = True
        return shard_pos[mask], rows[mask]

    def windows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every window of every epoch, forever: (shard position, row in shard) arrays, shuffled."""
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows_per_shard))
            sizes = self.rows_per_shard[order]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            total = int(starts[-1])
            produced = 0
            for w, lo in enumerate(range(0, total, self.window_rows)):
                hi = min(lo + self.window_rows, total)
                flat = np.arange(lo, hi, dtype=np.int64)
                slot = np.searchsorted(starts, flat, side="right") - 1  # index into ``order``
                shard_pos, rows = order[slot], flat - starts[slot]
                shard_pos, rows = self._filter(shard_pos, rows)
                perm = np.random.default_rng([self.seed, epoch, w]).permutation(len(rows))
                produced += len(rows)
                yield shard_pos[perm], rows[perm]
            if produced == 0:
                raise ValueError(
                    f"No row of the cache at {self.reader.directory} is covered by this SAE (its timestep "
                    "ranges / CFG branch select none): nothing to train on."
                )
            epoch += 1

    def global_batches(self, batch_size: int, start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Global batches of ``batch_size`` (shard, row) pairs, from global batch ``start_batch`` on."""
        pending_s: list[np.ndarray] = []
        pending_r: list[np.ndarray] = []
        n_pending = 0
        skip = start_batch * batch_size  # resuming: rows already served, skipped without reading them
        for shard_pos, rows in self.windows():
            if skip >= len(rows):
                skip -= len(rows)
                continue
            pending_s.append(shard_pos[skip:])
            pending_r.append(rows[skip:])
            n_pending += len(rows) - skip
            skip = 0
            if n_pending < batch_size:
                continue
            all_s, all_r = np.concatenate(pending_s), np.concatenate(pending_r)
            n_full = (len(all_s) // batch_size) * batch_size
            for i in range(0, n_full, batch_size):
                yield all_s[i:i + batch_size], all_r[i:i + batch_size]
            pending_s, pending_r = [all_s[n_full:]], [all_r[n_full:]]
            n_pending = len(all_s) - n_full

    def read(self, shard_pos: np.ndarray, rows: np.ndarray) -> ActivationChunk:
        """The activations and labels of these (shard, row) pairs, in this order (each shard read once,
        rows in increasing order, from the memory map)."""
        parts: list[ActivationChunk] = []
        where: list[np.ndarray] = []
        for k in np.unique(shard_pos):
            at = np.nonzero(shard_pos == k)[0]
            at = at[np.argsort(rows[at], kind="stable")]
            parts.append(self.reader.shard_chunk(self.reader.shards[int(k)], rows=rows[at]))
            where.append(at)
        chunk = ActivationChunk.cat(parts) if len(parts) > 1 else parts[0]
        back = np.empty(len(rows), dtype=np.int64)
        back[np.concatenate(where)] = np.arange(len(rows))
        return chunk.select(torch.from_numpy(back))


def rank_batches(order: GlobalRowOrder, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0) -> Iterator[ActivationChunk]:
    """This rank's part of every global batch of ``batch_size`` rows (``batch_size / world_size`` rows)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of a world of {world_size} processes")
    if batch_size % world_size:
        raise ValueError(
            f"The global batch size {batch_size} does not split evenly over {world_size} ranks; use a multiple "
            f"of {world_size} (each rank trains on batch_size / world_size rows per step)."
        )
    local = batch_size // world_size
    for shard_pos, rows in order.global_batches(batch_size, start_batch):
        sl = slice(rank * local, (rank + 1) * local)
        yield order.read(shard_pos[sl], rows[sl])


def data_parallel_provider(data: Union[str, Any], batch_size: int, *, rank: int = 0, world_size: int = 1,
                           sae: Any = None, seed: int = 0, window_rows: Optional[int] = None,
                           start_batch: int = 0, prefetch: int = 2,
                           device: Optional[Union[str, torch.device]] = None,
                           row_filter: Optional[Callable[[ActivationChunk], ActivationChunk]] = None,
                           ) -> ActivationProvider:
    """``SAETrainer`` data provider of this rank's rows of every global batch of ``batch_size`` (module
    docstring). ``data``: a cache directory or ``ActivationCacheReader``. ``window_rows`` (default
    ``64 * batch_size``) is the shuffle window. ``start_batch`` resumes after that many global batches.
    The position of the provider is ``start_batch + provider.rows_served // (batch_size // world_size)``.
    ``row_filter`` (default: the rows a timestep-aware ``sae`` covers) keeps only some rows, from their labels.
    """
    reader = data if isinstance(data, ActivationCacheReader) else ActivationCacheReader(data)
    order = GlobalRowOrder(reader, seed=seed, window_rows=window_rows or 64 * batch_size, keep=row_filter or coverage_filter(sae))
    stream = rank_batches(order, batch_size, rank, world_size, start_batch)
    prefetcher = PrefetchingIterator(stream, prefetch=prefetch) if prefetch else None
    return ActivationProvider(prefetcher or stream, sae=sae, device=device,
                              on_close=prefetcher.close if prefetcher else None)
