"""torch.distributed for caching and training: who this process is, the process group, a few collectives.

Processes are started by ``torchrun`` (``python -m torch.distributed.run``), which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (the node) and the rendezvous address
in the environment. :func:`init_distributed` joins the process group those variables describe: NCCL with
the GPU ``cuda:LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise. Without torchrun every
helper here answers for a single process (rank 0 of 1) and the collectives return at once, so code
written with them runs unchanged in one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

__all__ = [
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "distributed_session",
    "init_distributed",
    "is_distributed",
    "launched_by_torchrun",
    "local_rank",
    "local_world_size",
    "node_progress_bar",
    "node_rank",
    "rank",
    "world_size",
    "NodeProgressBar",
    "RankMismatchError",
    "check_ranks_agree",
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)  # type: ignore[arg-type]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or anything else that sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """Global rank of this process (0 without torchrun)."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes in the job (1 without torchrun)."""
    return dist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank of this process on its machine (``LOCAL_RANK``; also the index of its GPU)."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Number of processes on this machine (``LOCAL_WORLD_SIZE``)."""
    return _env_int("LOCAL_WORLD_SIZE", 1)


def node_rank() -> int:
    """Index of this machine in the job (torchrun's ``GROUP_RANK``)."""
    return _env_int("GROUP_RANK", rank() // max(1, local_world_size()))


def is_distributed() -> bool:
    """Whether a process group of more than one process is running (collectives do something)."""
    return _initialized() and dist.get_world_size() > 1


def init_distributed(device: Union[str, torch.device, None] = None, *, backend: Optional[str] = None,
                     timeout_s: Optional[float] = None) -> torch.device:
    """Join the process group torchrun describes (once; later calls only return the device).

    Returns this rank's device: ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is None or
    ``"cuda"``; ``device`` itself when it names something else; the CPU otherwise. The backend is NCCL
    for a CUDA device and gloo otherwise, unless ``backend`` says which. Without torchrun this joins
    nothing and only resolves the device.
    """
    wanted = None if device is None else torch.device(device)
    if wanted is None or (wanted.type == "cuda" and wanted.index is None):
        if torch.cuda.is_available() and (wanted is not None or launched_by_torchrun()):
            wanted = torch.device("cuda", local_rank() if launched_by_torchrun() else 0)
        else:
            wanted = wanted or torch.device("cpu")
    if wanted.type == "cuda":
        torch.cuda.set_device(wanted)  # NCCL's object collectives use the current device
    if launched_by_torchrun() and not _initialized():
        if not dist.is_available():
            raise RuntimeError("This torch build has no torch.distributed; install one that has it to run under torchrun.")
        backend = backend or ("nccl" if wanted.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = wanted
        dist.init_process_group(**kwargs)
    return wanted


@contextlib.contextmanager
def distributed_session(device: Union[str, torch.device, None] = None, *, backend: Optional[str] = None,
                        timeout_s: Optional[float] = None) -> Iterator[torch.device]:
    """``with distributed_session(device) as dev:`` joins the process group (:func:`init_distributed`) and
    leaves it at the end, unless it was joined before (then whoever joined it leaves it)."""
    joined_here = launched_by_torchrun() and not _initialized()
    dev = init_distributed(device, backend=backend, timeout_s=timeout_s)
    try:
        yield dev
    finally:
        if joined_here:
            destroy_distributed()


def destroy_distributed() -> None:
    """Leave the process group (if this process joined one)."""
    if _initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (a picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankMismatchError(ValueError):
    """The ranks of one job were started with different settings (model, hook, dtype, ...)."""


def _first_difference(a: Any, b: Any, path: tuple[str, ...] = ()) -> Optional[tuple[tuple[str, ...], Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), (*path, str(key)))
            if found:
                return found
        return None
    return None if a == b else (path, a, b)


def check_ranks_agree(settings: Any, what: str = "settings") -> None:
    """Refuse to go on unless every rank has the same ``settings`` (a picklable dict, nested allowed).

    Gathers every rank's ``settings`` and compares them with rank 0's; if any rank differs, every rank
    raises the same :class:`RankMismatchError`, naming the first rank that differs and the field (a
    path of keys). Collective: every rank must call it. Nothing to compare in one process.
    """
    gathered = all_gather_object(settings)
    for other, theirs in enumerate(gathered[1:], start=1):
        found = _first_difference(gathered[0], theirs)
        if found:
            path, ours, different = found
            field = " / ".join(path) or what
            others = [r for r, s in enumerate(gathered) if r and _first_difference(gathered[0], s)]
            raise RankMismatchError(
                f"Rank {other} disagrees with rank 0 on {field}: rank 0 has {ours!r}, rank {other} has {different!r} "
                f"(ranks that differ from rank 0: {others}). Every rank must run the same command on the same model, "
                f"hooks and data; fix the {what} of rank {other} (or of rank 0) and start again."
            )


class NodeProgressBar:
    """One progress bar per machine, shown by its local rank 0, counting the whole job's progress.

    ``update(n)``: this rank did ``n`` units; the bar adds ``n * world_size`` (exact when ranks move in
    lockstep, as data-parallel training steps do). ``set_global(n)``: the job as a whole has done ``n``
    units (for work the ranks split unevenly, counted e.g. on the shared output directory). Other ranks
    show nothing, so N processes do not print N interleaved bars.
    """

    def __init__(self, total: Optional[int], *, initial: int = 0, desc: str = "", unit: str = "it",
                 disable: bool = False):
        self.shown = not disable and local_rank() == 0
        self.scale = world_size()
        if self.shown and world_size() > 1:
            desc = f"{desc} [node {node_rank()}, {world_size()} ranks]".strip()
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) if self.shown else None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n * self.scale)

    def set_global(self, n: int) -> None:
        if self._bar is not None and n != self._bar.n:
            self._bar.update(n - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "NodeProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def node_progress_bar(total: Optional[int], *, initial: int = 0, desc: str = "", unit: str = "it",
                      disable: bool = False) -> NodeProgressBar:
    """A :class:`NodeProgressBar` (tqdm on local rank 0 of each machine, nothing elsewhere)."""
    return NodeProgressBar(total, initial=initial, desc=desc, unit=unit, disable=disable)
