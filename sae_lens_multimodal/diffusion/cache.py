"""DiffusionCache: activations keyed by (hook name, actual scheduler timestep, CFG branch).

A denoising run calls the denoiser once per scheduler step (twice for sequential CFG, and second-order
schedulers visit some timesteps twice), so a TransformerLens cache keyed by hook name alone would
overwrite or mix steps. Each entry here is one denoiser call's activation at one hook for one branch.
Entries live in memory, on the CPU, or in a directory (one safetensors file per entry, written
atomically, plus an ``index.json`` written atomically at the end of the run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_lens_multimodal.core.atomic import atomic_save, atomic_write_bytes
from sae_lens_multimodal.core.files import load_safetensors

__all__ = ["DiffusionCache"]

Key = tuple[str, Any, str]  # (hook name, timestep, branch)
INDEX_FILE = "index.json"


class DiffusionCache:
    """Activations of one denoising run.

    Indexing: ``cache[hook]`` stacks all recorded calls (like :meth:`stack`); ``cache[hook, t]`` and
    ``cache[hook, t, branch]`` return one entry (the branch may be omitted when only one was recorded).
    Hook names may be aliases (``up.1.1.hook_out``); keys are stored under canonical names.

    Attributes:
        timesteps: distinct recorded timesteps, in the order the run first visited them.
    """

    def __init__(self, resolve: Callable[[str], str] | None = None, directory: str | os.PathLike | None = None,
                 device: str | torch.device | None = None) -> None:
        self._resolve = resolve or (lambda name: name)
        self._entries: dict[Key, list[torch.Tensor | Path]] = {}
        self._order: list[tuple[Key, int]] = []  # recording order (key, visit)
        self.timesteps: list[Any] = []
        self.device = None if device is None else torch.device(device)
        self.directory = None if directory is None else Path(directory)
        self._meta: dict[Key, tuple[list[int], str]] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ recording
    def add(self, hook: str, timestep: Any, branch: str, activation: torch.Tensor, *, copy: bool = True) -> None:
        """Record one activation (copied: later in-place edits by the model cannot change the cache)."""
        key: Key = (hook, timestep, branch)
        visits = self._entries.setdefault(key, [])
        value = activation.detach()
        if self.directory is not None:
            path = self.directory / f"{len(self._order):06d}.safetensors"
            atomic_save(path, lambda tmp: save_file({"activation": value.to("cpu").contiguous()}, str(tmp)))
            self._meta[key] = (list(value.shape), str(value.dtype).replace("torch.", ""))
            stored: torch.Tensor | Path = path
        elif self.device is not None and value.device != self.device:
            stored = value.to(self.device)
        else:
            stored = value.clone() if copy else value
        visits.append(stored)
        self._order.append((key, len(visits) - 1))
        if timestep not in self.timesteps:
            self.timesteps.append(timestep)

    def finalize(self) -> None:
        """Write the on-disk index (atomically). Called by the pipeline at the end of a run."""
        if self.directory is None:
            return
        records = [
            {"hook": key[0], "timestep": key[1], "branch": key[2], "visit": visit,
             "file": Path(self._entries[key][visit]).name}
            for key, visit in self._order
        ]
        atomic_write_bytes(self.directory / INDEX_FILE, json.dumps({"entries": records}, indent=1).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike, resolve: Callable[[str], str] | None = None) -> DiffusionCache:
        """Open a cache a run wrote with ``offload=<directory>`` (tensors load lazily)."""
        directory = Path(directory)
        index = directory / INDEX_FILE
        if not index.is_file():
            raise FileNotFoundError(f"{directory} has no {INDEX_FILE}: it is not a finished DiffusionCache directory.")
        cache = cls(resolve=resolve)
        cache.directory = directory
        for rec in json.loads(index.read_text())["entries"]:
            key = (rec["hook"], rec["timestep"], rec["branch"])
            cache._entries.setdefault(key, []).append(directory / rec["file"])
            cache._order.append((key, rec["visit"]))
            if rec["timestep"] not in cache.timesteps:
                cache.timesteps.append(rec["timestep"])
        return cache

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _materialise(value: torch.Tensor | Path) -> torch.Tensor:
        if isinstance(value, Path):
            return load_safetensors(value, what="activation cache entry")["activation"]
        return value

    @property
    def hook_names(self) -> list[str]:
        return list(dict.fromkeys(key[0] for key, _ in self._order))

    @property
    def branches(self) -> list[str]:
        return list(dict.fromkeys(key[2] for key, _ in self._order))

    def keys(self) -> list[Key]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        try:
            self._match(key)
            return True
        except KeyError:
            return False

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._entries)

    def _match(self, key: Any) -> Key:
        if isinstance(key, str):
            raise KeyError(key)
        if not isinstance(key, tuple) or len(key) not in (2, 3):
            raise KeyError(f"Cache keys are (hook, timestep) or (hook, timestep, branch); got {key!r}")
        hook = self._resolve(key[0])
        t = key[1]
        if len(key) == 3:
            full = (hook, t, key[2])
            if full in self._entries:
                return full
            t_match = [k for k in self._entries if k[0] == hook and k[2] == key[2] and _same(k[1], t)]
            if t_match:
                return t_match[0]
        else:
            t_match = [k for k in self._entries if k[0] == hook and _same(k[1], t)]
            if len(t_match) == 1:
                return t_match[0]
            if len(t_match) > 1:
                raise KeyError(
                    f"{hook!r} at timestep {t} was cached for branches {[k[2] for k in t_match]}; "
                    f"ask for one: cache[{hook!r}, {t!r}, 'cond']"
                )
        recorded = sorted({k[1] for k in self._entries if k[0] == hook}, key=float, reverse=True)
        if not recorded:
            raise KeyError(f"Nothing cached for hook {key[0]!r}. Cached hooks: {self.hook_names}")
        raise KeyError(f"No cache entry {key!r}. Timesteps cached for {hook!r}: {recorded}")

    def get(self, hook: str, timestep: Any, branch: str | None = None, visit: int = 0) -> torch.Tensor:
        """One entry. ``visit`` picks among repeated visits of a timestep (second-order schedulers)."""
        key = self._match((hook, timestep) if branch is None else (hook, timestep, branch))
        visits = self._entries[key]
        if visit >= len(visits):
            raise KeyError(f"{key!r} was visited {len(visits)} time(s); visit={visit} does not exist.")
        return self._materialise(visits[visit])

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, str):
            return self.stack(key)
        key = self._match(key)
        visits = self._entries[key]
        if len(visits) > 1:
            raise KeyError(
                f"{key!r} was visited {len(visits)} times in this run (a second-order scheduler repeats "
                f"timesteps); use cache.get(hook, timestep, branch, visit=i) or cache.stack(hook)."
            )
        return self._materialise(visits[0])

    def entries(self, hook: str, branch: str | None = None) -> list[tuple[Key, int, torch.Tensor | Path]]:
        hook = self._resolve(hook)
        out = [(key, visit, self._entries[key][visit]) for key, visit in self._order if key[0] == hook]
        if not out:
            raise KeyError(f"Nothing cached for hook {hook!r}. Cached hooks: {self.hook_names}")
        branches = list(dict.fromkeys(key[2] for key, _, _ in out))
        if branch is None and len(branches) > 1:
            raise KeyError(f"{hook!r} was cached for branches {branches}; pass branch=...")
        if branch is not None:
            out = [e for e in out if e[0][2] == branch]
            if not out:
                raise KeyError(f"{hook!r} has no entries for branch {branch!r}; cached branches: {branches}")
        return out

    def stack(self, hook: str, branch: str | None = None) -> torch.Tensor:
        """All recorded calls of ``hook`` stacked in run order: shape [T, *activation shape]."""
        return torch.stack([self._materialise(v) for _, _, v in self.entries(hook, branch)])

    def timesteps_of(self, hook: str, branch: str | None = None) -> list[Any]:
        """Timestep of each row of :meth:`stack`."""
        return [key[1] for key, _, _ in self.entries(hook, branch)]

    def to_dict(self) -> dict[tuple, torch.Tensor]:
        """``{(hook, timestep, branch): tensor}``; repeated visits get keys ``(hook, timestep, branch, visit)``."""
        out: dict[tuple, torch.Tensor] = {}
        for key, visit in self._order:
            out[key if visit == 0 else (*key, visit)] = self._materialise(self._entries[key][visit])
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached activations (on disk for a disk-offloaded cache)."""
        total = 0
        for key, visit in self._order:
            value = self._entries[key][visit]
            total += value.stat().st_size if isinstance(value, Path) else value.numel() * value.element_size()
        return total

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory is not None else ""
        return (f"DiffusionCache({len(self._order)} entries, hooks={self.hook_names}, "
                f"timesteps={len(self.timesteps)}, branches={self.branches}{where})")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return a == b or abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
        return False
