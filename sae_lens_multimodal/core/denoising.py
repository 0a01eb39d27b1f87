"""Where in the denoising loop an activation comes from: timestep, CFG branch, and the rows of each branch.

SAELens's SAE wrapper calls ``sae.encode(x)`` with the activation only, so anything that depends on the
timestep (timestep-aware SAEs, scheduled interventions, per-timestep caches) reads it from state set
around the computation. This module is that state, in one place, and imports no diffusers.

Two writers, one reader per quantity:

* :func:`denoising_state` -- the state of the denoiser call in progress. The hooked denoisers
  (``HookedUNet``, ``HookedDiT``, ``HookedDiffusionPipeline``) enter it for the duration of every
  denoiser call; it is the only way that state is written (:func:`branch_override` goes through it).
* :func:`timestep_context` -- an explicit timestep (and optional CFG branch) for activations processed
  outside a denoiser call, e.g. an SAE applied to cached activations.

:func:`current_timestep` and :func:`current_branch` answer with, in this order of precedence:

1. the value given to the innermost :func:`timestep_context` (its branch only if one was given);
2. the running denoiser call (:func:`current_denoising_state`);
3. ``None``.

(A timestep-aware SAE checks one thing before these: per-row labels handed to it for its next training
batch with ``sae.set_row_timesteps``; that is the SAE's own state, see ``saes/_shared.py``.)

What reads which: code that labels activations with the timestep they come from (timestep-aware SAEs,
the diffusion activation store, evaluation) reads :func:`current_timestep` / :func:`current_branch` /
:func:`current_branch_codes`. Code that decides *which denoiser call and which batch rows* to act on
(``run_with_hooks(at_timesteps=, cfg_branch=)``, ``run_with_cache``, steering's ``timesteps=`` /
``cfg_branch=``, patching and ablation) reads the call itself, :func:`current_denoising_state`, so that
an explicit label cannot change which rows a hook edits.

Under batched classifier-free guidance a denoiser call processes the unconditional rows first and the
conditional rows second (the diffusers layout); :func:`cfg_row_split`, :func:`branch_rows` and
:func:`cfg_row_labels` are the one definition of that split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

import torch

__all__ = [
    "BRANCH_CODES",
    "CFG_BATCH_ORDER",
    "CFG_BRANCHES",
    "CFGBranch",
    "DenoisingState",
    "TimestepLike",
    "UNKNOWN_BRANCH",
    "branch_codes",
    "branch_override",
    "branch_rows",
    "broadcast_rows",
    "cfg_row_labels",
    "cfg_row_split",
    "check_cfg_branch",
    "current_branch",
    "current_branch_codes",
    "current_denoising_state",
    "current_timestep",
    "denoising_state",
    "timestep_context",
]

#: Values a CFG branch can take. "both" means the call processes a batch holding the unconditional
#: rows first and the conditional rows second (the diffusers layout for batched guidance).
CFG_BRANCHES: tuple[str, ...] = ("cond", "uncond", "both")
CFGBranch = Literal["cond", "uncond", "both"]
#: Order of the two halves of a batched classifier-free-guidance call (diffusers concatenates
#: ``[negative/unconditional, conditional]``); :func:`cfg_row_split` returns the rows in this order.
CFG_BATCH_ORDER: tuple[str, str] = ("uncond", "cond")
#: Integer codes for per-row branch labels in caches and tensors; UNKNOWN_BRANCH where not known.
BRANCH_CODES: dict[str, int] = {"uncond": 0, "cond": 1}
UNKNOWN_BRANCH = -1

TimestepLike = Union[int, float, torch.Tensor, Sequence[float]]


@dataclass(frozen=True)
class DenoisingState:
    """State of one denoiser call.

    Attributes:
        timestep: the scheduler timestep of this call, in the scheduler's own units (e.g. ``981`` for
            DDPM-style schedules, ``1000.0`` for flow matching; Flux's ``timestep / 1000`` input is scaled
            back). Inside a ``HookedDiffusionPipeline`` run it is the exact entry of
            ``scheduler.timesteps``. A tensor when the batch holds different timesteps.
        branch: ``"cond"``, ``"uncond"``, ``"both"`` (batched classifier-free guidance: unconditional rows
            first, conditional rows second) or ``None`` when unknown (a bare denoiser call).
        step_index: index of ``timestep`` in ``scheduler.timesteps`` (first occurrence), or ``None``.
        call_index: number of denoiser calls made before this one in the current pipeline run.
        batch_branches: the branch of every batch row when known (e.g. ``("uncond", "cond")``).
    """

    timestep: int | float | torch.Tensor | None = None
    branch: str | None = None
    step_index: int | None = None
    call_index: int = 0
    batch_branches: tuple[str, ...] | None = None


# The running denoiser call (written only by `denoising_state`) and the explicit override
# (written only by `timestep_context`): kept apart so that an explicit value wins even when the
# denoiser call starts inside the `timestep_context` block.
_STATE: ContextVar[DenoisingState | None] = ContextVar("sae_lens_multimodal_denoising_state", default=None)
_EXPLICIT: ContextVar[tuple[Any, Any] | None] = ContextVar("sae_lens_multimodal_explicit_timestep", default=None)


# ---------------------------------------------------------------------------------------------- readers
def current_denoising_state() -> DenoisingState | None:
    """The :class:`DenoisingState` of the denoiser call in progress, or ``None`` outside one.

    This is the running call only; :func:`current_timestep` / :func:`current_branch` also see
    :func:`timestep_context`.
    """
    return _STATE.get()


def current_timestep() -> int | float | torch.Tensor | Sequence[float] | None:
    """Timestep of the activation being processed: the innermost :func:`timestep_context` if any, else
    the running denoiser call's, else ``None``. Scalar, or one value per sample / per row."""
    explicit = _EXPLICIT.get()
    if explicit is not None and explicit[0] is not None:
        return explicit[0]
    state = _STATE.get()
    return None if state is None else state.timestep


def current_branch() -> Any:
    """CFG branch of the activation being processed, or ``None`` when unknown.

    The branch given to the innermost :func:`timestep_context` (a name, or per-row labels as given there),
    else the running denoiser call's: ``"cond"``, ``"uncond"`` or ``"both"`` (batched guidance; the rows
    of each half are :func:`branch_rows`). Inside a hook registered with ``cfg_branch="cond"`` this is
    ``"cond"`` even though the denoiser call itself processes both halves.
    """
    explicit = _EXPLICIT.get()
    if explicit is not None and explicit[1] is not None:
        return explicit[1]
    state = _STATE.get()
    return None if state is None else state.branch


def current_branch_codes(rows: torch.Size, device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """Per-row branch codes (:data:`BRANCH_CODES`, -1 unknown) of an activation with leading shape ``rows``,
    or ``None`` when no branch is known. For the running call's ``"both"`` the call's own
    ``batch_branches`` are used when it reports them."""
    branch = current_branch()
    explicit = _EXPLICIT.get()
    state = _STATE.get()
    from_call = explicit is None or explicit[1] is None
    if branch == "both" and from_call and state is not None and state.batch_branches:
        branch = list(state.batch_branches)
    return branch_codes(branch, rows, torch.device(device))


# ---------------------------------------------------------------------------------------------- writers
@contextmanager
def denoising_state(state: DenoisingState | None) -> Iterator[DenoisingState | None]:
    """Set the denoising state of the call in progress for the duration of the block (restored even if the
    block raises). The only writer of that state; code driven by torch pre/post hooks enters and leaves it
    with a :class:`contextlib.ExitStack`."""
    if state is not None and not isinstance(state, DenoisingState):
        raise TypeError(f"denoising_state expects a DenoisingState or None, got {type(state).__name__}.")
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


@contextmanager
def branch_override(branch: str) -> Iterator[None]:
    """Report ``branch`` as the current branch while a branch-restricted hook runs on that branch's rows."""
    check_cfg_branch(branch, allow_both=False, allow_none=False, name="branch")
    with denoising_state(replace(_STATE.get() or DenoisingState(), branch=branch)):
        yield


@contextmanager
def timestep_context(timesteps: TimestepLike, branch: Optional[Any] = None) -> Iterator[None]:
    """Tell timestep-aware code which timestep (and CFG branch) the activations it sees come from.

    ``timesteps`` is a scalar (all rows), a (batch,) tensor (one per sample) or a tensor with the
    activation's leading shape (one per row). ``branch`` is ``"cond"``, ``"uncond"``, ``"both"``, or per-row
    labels (names, or codes 0 = uncond, 1 = cond, see :data:`BRANCH_CODES`). Both take precedence over the
    running denoiser call (see the module docstring); ``None`` leaves that value to the running call.
    """
    token = _EXPLICIT.set((timesteps, branch))
    try:
        yield
    finally:
        _EXPLICIT.reset(token)


# ---------------------------------------------------------------------------------------------- vocabulary
def check_cfg_branch(branch: Any, *, allow_both: bool = True, allow_none: bool = True,
                     name: str = "cfg_branch") -> Optional[str]:
    """Return ``branch`` if it is a valid CFG branch name, else raise a ValueError naming the choices."""
    allowed: tuple[Any, ...] = tuple(b for b in CFG_BRANCHES if allow_both or b != "both")
    if branch is None and allow_none:
        return None
    if branch not in allowed:
        choices = ", ".join(repr(b) for b in allowed) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be one of {choices}; got {branch!r}.")
    return branch


def cfg_row_split(batch_size: int) -> tuple[slice, slice]:
    """``(unconditional rows, conditional rows)`` of a batched classifier-free-guidance call
    (:data:`CFG_BATCH_ORDER`: the first half of the rows is unconditional, the second conditional)."""
    if batch_size < 0 or batch_size % 2:
        raise ValueError(
            f"A batched classifier-free-guidance call needs an even batch (unconditional half, then "
            f"conditional half); got {batch_size} rows."
        )
    half = batch_size // 2
    return slice(0, half), slice(half, batch_size)


def branch_rows(branch: str, batch_size: int) -> slice:
    """Rows of ``branch`` in a batched CFG call of ``batch_size`` rows (``"both"``: every row)."""
    check_cfg_branch(branch, allow_none=False, name="branch")
    return dict(zip(CFG_BATCH_ORDER, cfg_row_split(batch_size))).get(branch, slice(0, batch_size))


def cfg_row_labels(batch_size: int) -> tuple[str, ...]:
    """Branch name of every row of a batched CFG call: ``("uncond", ..., "cond", ...)``."""
    return tuple(b for b, rows in zip(CFG_BATCH_ORDER, cfg_row_split(batch_size)) for _ in range(rows.start, rows.stop))


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
    """Per-row branch codes (0 uncond, 1 cond, -1 unknown) from a branch name or labels; None if unknown."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "both":
            n = rows[0] if len(rows) else 0
            value = [BRANCH_CODES[b] for b in cfg_row_labels(n)]
            return broadcast_rows(value, rows, device, "CFG branch labels", dtype=torch.long)
        if value not in BRANCH_CODES:
            raise ValueError(f"Unknown CFG branch {value!r}; expected one of {sorted(BRANCH_CODES)} or 'both'.")
        value = BRANCH_CODES[value]
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        value = [BRANCH_CODES.get(v, UNKNOWN_BRANCH) for v in value]
    return broadcast_rows(value, rows, device, "CFG branch labels", dtype=torch.long)
