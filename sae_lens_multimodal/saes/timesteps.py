"""Timestep buckets: the half-open timestep ranges a timestep-aware SAE keeps one dictionary (or one
modulation) for.

Where such an SAE learns the timestep and CFG branch of the rows it sees is defined once, in
:mod:`sae_lens_multimodal.core.denoising` (``timestep_context``, ``current_timestep``, ``current_branch``);
labels handed over with ``sae.set_row_timesteps`` come first (saes/_shared.py). Timesteps are in the
scheduler's own units (e.g. ``scheduler.timesteps`` values, 0..999 for DDPM-style schedulers, sigma * 1000
for flow-matching ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

__all__ = ["TimestepBuckets"]


class TimestepBuckets:
    """Half-open timestep ranges ``[start, end)`` in scheduler units, sorted and non-overlapping.

    A timestep equal to ``num_train_timesteps`` (flow-matching schedulers start there) belongs to the
    range whose end is ``num_train_timesteps``.
    """

    def __init__(self, ranges: Sequence[Sequence[float]], num_train_timesteps: int):
        if num_train_timesteps is None or num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if not ranges:
            raise ValueError("timestep_ranges is empty: give at least one [start, end) range.")
        clean: list[tuple[float, float]] = []
        for r in ranges:
            if len(r) != 2:
                raise ValueError(f"Each timestep range must be [start, end), got {list(r)!r}")
            start, end = float(r[0]), float(r[1])
            if not 0 <= start < end <= num_train_timesteps:
                raise ValueError(
                    f"Timestep range [{r[0]}, {r[1]}) must satisfy 0 <= start < end <= num_train_timesteps "
                    f"({num_train_timesteps})."
                )
            clean.append((start, end))
        for (s0, e0), (s1, e1) in zip(clean, clean[1:]):
            if s1 < e0:
                raise ValueError(
                    f"Timestep ranges must be sorted and must not overlap: [{s0}, {e0}) and [{s1}, {e1})."
                )
        self.ranges = clean
        self.num_train_timesteps = int(num_train_timesteps)

    def __len__(self) -> int:
        return len(self.ranges)

    def to_list(self) -> list[list[float]]:
        return [[_num(s), _num(e)] for s, e in self.ranges]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def pooled(cls, num_train_timesteps: int) -> "TimestepBuckets":
        """One bucket over every timestep (one SAE pooled over all timesteps)."""
        return cls([[0, num_train_timesteps]], num_train_timesteps)

    @classmethod
    def uniform(cls, n_buckets: int, num_train_timesteps: int) -> "TimestepBuckets":
        """``n_buckets`` equal-width ranges covering ``[0, num_train_timesteps]``."""
        edges = torch.linspace(0, num_train_timesteps, n_buckets + 1).tolist()
        return cls([[edges[i], edges[i + 1]] for i in range(n_buckets)], num_train_timesteps)

    @classmethod
    def per_timestep(cls, timesteps: Sequence[float], num_train_timesteps: int) -> "TimestepBuckets":
        """One bucket per scheduler timestep (e.g. ``scheduler.timesteps``), so each listed timestep gets
        its own dictionary. Bucket edges are the midpoints between neighbouring timesteps (the first
        starts at 0, the last ends at ``num_train_timesteps``), so each bucket holds exactly one of them."""
        values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
        ts = sorted({float(t) for t in values})
        if not ts:
            raise ValueError("per_timestep needs at least one timestep")
        if ts[0] < 0 or ts[-1] > num_train_timesteps:
            raise ValueError(f"Timesteps must lie in [0, {num_train_timesteps}], got {ts[0]}..{ts[-1]}")
        edges = [0.0] + [(a + b) / 2 for a, b in zip(ts, ts[1:])] + [float(num_train_timesteps)]
        return cls([[edges[i], edges[i + 1]] for i in range(len(ts))], num_train_timesteps)

    # ------------------------------------------------------------------ lookup
    def bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        """Bucket index of each timestep (long tensor, same shape), -1 where no range contains it."""
        t = t.to(torch.float64)
        starts = torch.tensor([s for s, _ in self.ranges], dtype=torch.float64, device=t.device)
        ends = torch.tensor([e for _, e in self.ranges], dtype=torch.float64, device=t.device)
        idx = torch.searchsorted(starts, t.contiguous(), right=True) - 1
        safe = idx.clamp(min=0)
        end = ends[safe]
        inside = (idx >= 0) & ((t < end) | ((t == end) & (end == float(self.num_train_timesteps))))
        return torch.where(inside, idx, torch.full_like(idx, -1))

    def describe(self) -> str:
        return ", ".join(f"[{_num(s)}, {_num(e)})" for s, e in self.ranges)


def _num(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else float(x)
