"""Timestep buckets, and where a timestep-aware SAE learns the current timestep and CFG branch.

SAELens's splicing wrapper calls ``sae.encode(x)`` with the activation only, so a timestep-aware SAE
has to read the timestep from state that the running model sets. The lookup order for each call is:

1. labels handed to the SAE for the next training batch (``sae.set_row_timesteps``; used by the
   training data providers, which yield plain activation tensors to SAELens's ``SAETrainer``);
2. an explicit :func:`timestep_context` (for applying an SAE to cached activations);
3. the diffusion pipeline's accessor ``sae_lens_multimodal.diffusion.current_timestep()`` (and
   ``current_branch()``), set while ``HookedDiffusionPipeline`` runs the denoiser.

Timesteps are in the scheduler's own units (e.g. ``scheduler.timesteps`` values, 0..999 for DDPM-style
schedulers, sigma * 1000 for flow-matching ones).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, Optional, Union

import torch

__all__ = [
    "BRANCH_CODES",
    "CFGBranch",
    "TimestepLike",
    "TimestepBuckets",
    "current_branch",
    "current_timesteps",
    "timestep_context",
]

TimestepLike = Union[int, float, torch.Tensor, Sequence[float]]
CFGBranch = Literal["cond", "uncond", "both"]
#: Integer codes used for per-row branch labels in caches and tensors.
BRANCH_CODES: dict[str, int] = {"uncond": 0, "cond": 1}
UNKNOWN_BRANCH = -1

_explicit_timesteps: ContextVar[Optional[Any]] = ContextVar("slm_explicit_timesteps", default=None)
_explicit_branch: ContextVar[Optional[Any]] = ContextVar("slm_explicit_branch", default=None)


@contextmanager
def timestep_context(timesteps: TimestepLike, branch: Optional[Any] = None) -> Iterator[None]:
    """Tell timestep-aware SAEs which timestep (and CFG branch) the activations they see come from.

    ``timesteps`` is a scalar (all rows), a (batch,) tensor (one per sample) or a tensor with the
    activation's leading shape (one per row). ``branch`` is ``"cond"``, ``"uncond"``, or per-row codes
    (0 = uncond, 1 = cond, see :data:`BRANCH_CODES`). Takes precedence over the diffusion pipeline.
    """
    t_token = _explicit_timesteps.set(timesteps)
    b_token = _explicit_branch.set(branch)
    try:
        yield
    finally:
        _explicit_timesteps.reset(t_token)
        _explicit_branch.reset(b_token)


_DIFFUSION_MODULES = ("sae_lens_multimodal.diffusion.context", "sae_lens_multimodal.diffusion")


def _diffusion_accessor(name: str) -> Any:
    # Only consult the diffusion package if something already imported it (a pipeline is in use):
    # importing it here would pull in diffusers for every image-only user.
    for module_name in _DIFFUSION_MODULES:
        fn = getattr(sys.modules.get(module_name), name, None)
        if callable(fn):
            return fn()
    return None


def current_timesteps() -> Optional[Any]:
    """The timestep(s) set by :func:`timestep_context`, else by the running diffusion pipeline, else None."""
    explicit = _explicit_timesteps.get()
    return explicit if explicit is not None else _diffusion_accessor("current_timestep")


def current_branch() -> Optional[Any]:
    """The CFG branch set by :func:`timestep_context`, else by the running diffusion pipeline, else None.

    For a batched classifier-free-guidance call (branch ``"both"``) this is the per-sample list of
    branches when the pipeline reports it, else ``"both"`` (unconditional half first, as in diffusers).
    """
    explicit = _explicit_branch.get()
    if explicit is not None:
        return explicit
    branch = _diffusion_accessor("current_branch")
    if branch == "both":
        state = _diffusion_accessor("current_denoising_state")
        per_sample = getattr(state, "batch_branches", None)
        if per_sample:
            return list(per_sample)
    return branch


def broadcast_rows(value: Any, rows: torch.Size, device: torch.device, what: str,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Broadcast a scalar, a per-sample (batch,) or a per-row value to the activation's row shape."""
    t = torch.as_tensor(value, device=device).to(dtype)
    if t.ndim == 0:
        return t.expand(rows)
    if t.shape == rows:
        return t
    if t.ndim == 1 and len(rows) >= 1 and t.shape[0] == rows[0]:
        return t.reshape((rows[0],) + (1,) * (len(rows) - 1)).expand(rows)
    raise ValueError(
        f"Got {what} of shape {tuple(t.shape)} for activations whose leading shape is {tuple(rows)}. "
        f"Pass a scalar, one value per sample ({rows[0] if len(rows) else 1},) or one per row {tuple(rows)}."
    )


def branch_codes(value: Any, rows: torch.Size, device: torch.device) -> Optional[torch.Tensor]:
    """Per-row branch codes (0 uncond, 1 cond, -1 unknown) from a branch name or codes; None if unknown."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "both":  # batched CFG: unconditional rows first, conditional rows second
            n = rows[0] if len(rows) else 0
            if n % 2:
                raise ValueError(f"CFG branch 'both' needs an even batch, got {n} rows.")
            value = [BRANCH_CODES["uncond"]] * (n // 2) + [BRANCH_CODES["cond"]] * (n // 2)
            return broadcast_rows(value, rows, device, "CFG branch labels", dtype=torch.long)
        if value not in BRANCH_CODES:
            raise ValueError(f"Unknown CFG branch {value!r}; expected one of {sorted(BRANCH_CODES)} or 'both'.")
        value = BRANCH_CODES[value]
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        value = [BRANCH_CODES.get(v, UNKNOWN_BRANCH) for v in value]
    return broadcast_rows(value, rows, device, "CFG branch labels", dtype=torch.long)


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
