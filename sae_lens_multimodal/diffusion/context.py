"""Where in the denoising loop a denoiser call happens: timestep, CFG branch, step.

SAELens's SAE wrapper calls ``sae.encode(x)`` with the activation only, so anything that depends on the
timestep (timestep-bucketed SAEs, scheduled interventions) must read it from state that the model sets.
The hooked denoisers set it for the duration of every denoiser call; read it from anywhere with
:func:`current_timestep`, :func:`current_branch` or :func:`current_denoising_state`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch

__all__ = [
    "DenoisingState",
    "current_denoising_state",
    "current_timestep",
    "current_branch",
    "CFG_BRANCHES",
]

#: Values a CFG branch can take. "both" means the call processes a batch holding the unconditional
#: half first and the conditional half second (the diffusers layout for batched guidance).
CFG_BRANCHES = ("cond", "uncond", "both")


@dataclass(frozen=True)
class DenoisingState:
    """State of one denoiser call.

    Attributes:
        timestep: the scheduler timestep of this call, in the scheduler's own units (e.g. ``981`` for
            DDPM-style schedules, ``1000.0`` for flow matching; Flux's ``timestep / 1000`` input is scaled
            back). Inside a :class:`HookedDiffusionPipeline` run it is the exact entry of
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


_STATE: ContextVar[DenoisingState | None] = ContextVar("sae_lens_multimodal_denoising_state", default=None)


def current_denoising_state() -> DenoisingState | None:
    """The :class:`DenoisingState` of the denoiser call in progress, or ``None`` outside one."""
    return _STATE.get()


def current_timestep() -> int | float | torch.Tensor | None:
    """Scheduler timestep of the denoiser call in progress (``None`` outside a denoiser call)."""
    state = _STATE.get()
    return None if state is None else state.timestep


def current_branch() -> str | None:
    """CFG branch (``"cond"``, ``"uncond"``, ``"both"``) of the activation being processed, or ``None``.

    Inside a hook registered with ``cfg_branch="cond"`` this is ``"cond"`` even though the denoiser call
    itself processes both halves of a batched CFG batch.
    """
    state = _STATE.get()
    return None if state is None else state.branch


@contextmanager
def denoising_state(state: DenoisingState | None) -> Iterator[DenoisingState | None]:
    """Set the denoising state for the duration of the block (restored even if the block raises)."""
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


@contextmanager
def branch_override(branch: str) -> Iterator[None]:
    """Report ``branch`` as the current branch while a branch-restricted hook runs."""
    state = _STATE.get() or DenoisingState()
    token = _STATE.set(replace(state, branch=branch))
    try:
        yield
    finally:
        _STATE.reset(token)
