"""BatchTopK over the GLOBAL batch in data-parallel training, so that N ranks train the one-process SAE.

SAELens's ``BatchTopK`` keeps the ``k x rows`` largest activations of the batch it sees. With N ranks each
rank sees ``B / N`` rows, so a per-rank selection keeps the top ``k x B / N`` of each rank's part, which is
not the top ``k x B`` of the whole batch. Here each rank sends the candidates that can be in the global
selection, its own ``k x B`` largest values (no more can be chosen from one rank), to every rank
(``all_gather``; ``k x B`` floats per rank, not the ``B x d_sae`` pre-activations); the ``k x B``-th largest
of them is the global threshold, and each rank keeps its activations at or above it. The threshold estimate
the SAE keeps for inference moves by the smallest kept activation over all ranks, as in one process.
Ties at the threshold across ranks may keep a few more activations than one process would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.batchtopk_sae import BatchTopK, BatchTopKTrainingSAE

__all__ = ["GlobalBatchTopK", "global_batch_topk"]


class GlobalBatchTopK(torch.nn.Module):
    """``BatchTopK(k)`` whose selection is made over the batches of all ``world_size`` ranks together."""

    def __init__(self, k: float, world_size: int):
        super().__init__()
        self.k = k
        self.world_size = world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = x.relu()
        flat = acts.flatten()
        n_keep = int(self.k * acts.shape[:-1].numel() * self.world_size)  # k x the global batch's rows
        candidates = flat.detach().topk(min(n_keep, flat.numel())).values
        gathered = [torch.empty_like(candidates) for _ in range(self.world_size)]
        dist.all_gather(gathered, candidates)
        pooled = torch.cat(gathered)
        threshold = pooled.topk(min(n_keep, pooled.numel())).values[-1]
        return acts * (acts >= threshold)


def _global_threshold_update(sae: BatchTopKTrainingSAE) -> Any:
    """``sae.update_topk_threshold`` with the smallest positive kept activation over all ranks."""

    @torch.no_grad()
    def update_topk_threshold(acts_topk: torch.Tensor) -> None:
        positive = acts_topk > 0
        smallest = acts_topk[positive].min().double() if positive.any() else acts_topk.new_tensor(float("inf")).double()
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        if torch.isfinite(smallest):
            lr = sae.cfg.topk_threshold_lr
            with torch.autocast(sae.topk_threshold.device.type, enabled=False):
                sae.topk_threshold = (1 - lr) * sae.topk_threshold + lr * smallest.to(sae.topk_threshold.dtype)

    return update_topk_threshold


@contextlib.contextmanager
def global_batch_topk(sae: Any, world_size: int) -> Iterator[bool]:
    """While the block runs, a SAELens ``BatchTopKTrainingSAE`` selects over the global batch of ``world_size``
    ranks (module docstring). Yields whether it applied: not for one rank, other architectures, or a
    timestep-bucketed SAE's inner BatchTopK buckets (their rows per rank differ from bucket to bucket)."""
    applies = world_size > 1 and isinstance(sae, BatchTopKTrainingSAE) and isinstance(sae.activation_fn, BatchTopK)
    if not applies:
        yield False
        return
    original = sae.activation_fn
    sae.activation_fn = GlobalBatchTopK(sae.cfg.k, world_size)
    sae.__dict__["update_topk_threshold"] = _global_threshold_update(sae)
    try:
        yield True
    finally:
        sae.activation_fn = original
        sae.__dict__.pop("update_topk_threshold", None)
