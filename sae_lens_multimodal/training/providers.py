"""Data providers for SAELens's ``SAETrainer``: shuffled (batch, d_in) tensors from our stores, caches
or in-memory tensors.

``SAETrainer`` consumes an iterator of plain activation tensors. For timestep-aware SAEs the provider
hands each batch's per-row timesteps (and CFG branches) to ``sae.set_row_timesteps`` just before
returning the batch, and drops rows the SAE does not cover (timesteps outside its ranges, the other
CFG branch) before shuffling.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union

import torch
from sae_lens.training.prefetch import PrefetchingIterator

from sae_lens_multimodal.training.cache import ActivationCacheReader, ActivationChunk

__all__ = ["ActivationProvider", "activation_provider", "chunks_from_tensor", "chunk_stream", "mixing_batches"]


def chunks_from_tensor(acts: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                       branch: Optional[torch.Tensor] = None, rows_per_chunk: int = 65536,
                       epochs: Optional[int] = None) -> Iterator[ActivationChunk]:
    """An in-memory (rows, d_in) tensor (+ optional per-row labels) as a stream of chunks."""
    if acts.ndim != 2:
        raise ValueError(f"Activations must be (rows, d_in), got shape {tuple(acts.shape)}")
    n = acts.shape[0]
    epoch = 0
    while epochs is None or epoch < epochs:
        for i in range(0, n, rows_per_chunk):
            sl = slice(i, i + rows_per_chunk)
            yield ActivationChunk(acts[sl], torch.arange(i, min(i + rows_per_chunk, n)),
                                  None if timesteps is None else timesteps[sl],
                                  None if branch is None else branch[sl])
        epoch += 1


def chunk_stream(data: Any, hook: Optional[str] = None, epochs: Optional[int] = None, seed: int = 0,
                 shuffle_shards: bool = True) -> Iterator[ActivationChunk]:
    """Chunks from an activation store (image / diffusion), a cache reader, a cache directory, or a tensor.

    ``epochs=None`` repeats the data forever (SAETrainer stops at ``total_training_samples``).
    """
    if isinstance(data, torch.Tensor):
        yield from chunks_from_tensor(data, epochs=epochs)
        return
    if isinstance(data, ActivationChunk):
        yield from chunks_from_tensor(data.acts, data.timestep, data.branch, epochs=epochs)
        return
    if isinstance(data, (str, os.PathLike)):
        data = ActivationCacheReader(data)
    if isinstance(data, ActivationCacheReader):
        yield from data.iter_chunks(shuffle=shuffle_shards, seed=seed, epochs=epochs)
        return
    if hasattr(data, "iter_chunks"):  # ImageActivationStore / DiffusionActivationStore
        names = list(data.hook_names)
        hook = hook or (names[0] if len(names) == 1 else None)
        if hook is None:
            raise ValueError(f"The store records hooks {names}; say which one to train on (hook=...).")
        epoch = 0
        while epochs is None or epoch < epochs:
            produced = False
            for _, _, chunks in data.iter_chunks():
                produced = produced or len(chunks[hook]) > 0
                yield chunks[hook]
            if not produced:
                raise ValueError("The activation store produced no rows.")
            epoch += 1
        return
    raise TypeError(
        f"Cannot train from {type(data).__name__}: pass an ImageActivationStore / DiffusionActivationStore, "
        "an ActivationCacheReader or cache directory, or a (rows, d_in) tensor."
    )


def mixing_batches(chunks: Iterable[ActivationChunk], batch_size: int, buffer_rows: int,
                   mix_fraction: float = 0.5, generator: Optional[torch.Generator] = None) -> Iterator[ActivationChunk]:
    """Shuffled fixed-size batches through a mixing buffer (as SAELens's ``mixing_buffer``, but the
    per-row labels travel with their rows under the same permutation, and incoming chunks are only
    concatenated once the buffer is full)."""
    if buffer_rows < batch_size:
        raise ValueError(f"buffer_rows ({buffer_rows}) must be >= batch_size ({batch_size})")
    keep = int(buffer_rows * mix_fraction)
    pending: list[ActivationChunk] = []
    n_pending = 0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        pending.append(chunk)
        n_pending += len(chunk)
        if n_pending < buffer_rows:
            continue
        buffer = ActivationChunk.cat(pending) if len(pending) > 1 else pending[0]
        buffer = buffer.select(torch.randperm(len(buffer), generator=generator))
        n_serve = max(1, (len(buffer) - keep) // batch_size) * batch_size
        for i in range(0, n_serve, batch_size):
            yield buffer.select(slice(i, i + batch_size))  # type: ignore[arg-type]
        rest = buffer.select(slice(n_serve, None))  # type: ignore[arg-type]
        pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
    if n_pending >= batch_size:
        buffer = ActivationChunk.cat(pending) if len(pending) > 1 else pending[0]
        buffer = buffer.select(torch.randperm(len(buffer), generator=generator))
        for i in range(0, len(buffer) - batch_size + 1, batch_size):
            yield buffer.select(slice(i, i + batch_size))  # type: ignore[arg-type]


def coverage_filter(sae: Any) -> Optional[Callable[[ActivationChunk], ActivationChunk]]:
    """For a timestep-aware SAE: drop rows outside its timestep ranges / of the other CFG branch."""
    if not hasattr(sae, "set_row_timesteps"):
        return None

    def keep(chunk: ActivationChunk) -> ActivationChunk:
        if chunk.timestep is None:
            if sae._is_pooled_over_all():
                return chunk
            raise ValueError(
                "This SAE is timestep-aware but the activations carry no timestep labels: train it on a "
                "diffusion activation store or cache (rows labelled with their timestep)."
            )
        # Rows outside the SAE's ranges are skipped for training, whatever the splice-time policy is.
        plan = sae.plan_rows(chunk.timestep.shape, chunk.timestep.device, labels=(chunk.timestep, chunk.branch),
                             out_of_range="passthrough")
        return chunk.select(plan.bucket >= 0)

    return keep


class ActivationProvider(Iterator[torch.Tensor]):
    """Iterator of (batch, d_in) tensors for ``SAETrainer``; hands timestep labels to ``sae``."""

    def __init__(self, batches: Iterator[ActivationChunk], sae: Any = None,
                 device: Optional[Union[str, torch.device]] = None, on_close: Optional[Callable[[], None]] = None):
        self.batches = batches
        self._on_close = on_close
        self.sae = sae if hasattr(sae, "set_row_timesteps") else None
        self.device = device
        self.rows_served = 0

    def __iter__(self) -> "ActivationProvider":
        return self

    def __next__(self) -> torch.Tensor:
        try:
            chunk = next(self.batches)
        except StopIteration:
            raise StopIteration(
                f"The activation data ran out after {self.rows_served} rows; lower total_training_samples "
                "or allow more epochs."
            ) from None
        self.rows_served += len(chunk)
        if self.sae is not None and chunk.timestep is not None:
            self.sae.set_row_timesteps(chunk.timestep, chunk.branch)
        return chunk.acts if self.device is None else chunk.acts.to(self.device)

    def close(self) -> None:
        """Stop the background reader (if any) and release the data."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()


def activation_provider(data: Any, batch_size: int, *, sae: Any = None, hook: Optional[str] = None,
                        buffer_rows: Optional[int] = None, epochs: Optional[int] = None, seed: int = 0,
                        prefetch: int = 2, device: Optional[Union[str, torch.device]] = None) -> ActivationProvider:
    """A shuffled ``SAETrainer`` data provider over ``data`` (store, cache reader/directory or tensor).

    ``buffer_rows`` (default ``64 * batch_size``) is the mixing-buffer size; ``prefetch`` chunks are read
    ahead on a background thread (0 to disable).
    """
    stream: Iterator[ActivationChunk] = chunk_stream(data, hook=hook, epochs=epochs, seed=seed)
    keep = coverage_filter(sae)
    if keep is not None:
        stream = (keep(c) for c in stream)
    prefetcher = PrefetchingIterator(stream, prefetch=prefetch) if prefetch else None
    gen = torch.Generator().manual_seed(seed)
    batches = mixing_batches(prefetcher or stream, batch_size, buffer_rows or 64 * batch_size, generator=gen)
    return ActivationProvider(batches, sae=sae, device=device, on_close=prefetcher.close if prefetcher else None)
