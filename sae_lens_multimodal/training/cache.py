"""On-disk activation cache (format: docs/activation-cache.md).

One cache directory holds the activations of ONE hook of ONE model::

    <dir>/metadata.json                 what made the cache (model, hook, token policy, dtype, ...)
    <dir>/shard_00000.json              shard manifest: written last, so a shard exists only once complete
    <dir>/shard_00000.acts.npy          (rows, d_in) activations, memory-mapped on read
    <dir>/shard_00000.sample.npy        (rows,) int64 index of the source item (image / trajectory)
    <dir>/shard_00000.timestep.npy      (rows,) float64 scheduler timestep      (diffusion caches)
    <dir>/shard_00000.branch.npy        (rows,) int8 CFG branch 0 uncond, 1 cond, -1 none (diffusion)

Shard ``k`` holds source items ``[k * items_per_shard, (k + 1) * items_per_shard)``, so an interrupted
run resumes at the first missing shard. Every file is written under a temporary name and moved into
place with ``os.replace``; the manifest goes last.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from sae_lens_multimodal.core.atomic import atomic_save, atomic_write_json
from sae_lens_multimodal.core.files import UnreadableFileError, load_npy
from sae_lens_multimodal.core.names import expand_unet_alias
from sae_lens_multimodal.core.sae_metadata import model_identity  # defined with the SAE metadata it fills

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ActivationChunk",
    "ActivationCacheReader",
    "ActivationCacheWriter",
    "CacheMismatchError",
    "IncompleteCacheError",
    "model_identity",
    "same_hook",
]

FORMAT_NAME = "sae-lens-multimodal/activation-cache"
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^shard_(\d{5,})\.json$")
LABEL_COLUMNS = {"sample": np.int64, "timestep": np.float64, "branch": np.int8}
# numpy has no bfloat16: such caches store the raw 16 bits and say so in metadata.dtype.
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64}


class CacheMismatchError(ValueError):
    """The cache on disk was made by a different model / hook / setting than the one asked for."""


class IncompleteCacheError(ValueError):
    """Shards of the cache are missing (an interrupted run, or files deleted): reading it would silently use
    fewer rows. Re-running the command that made the cache computes only the missing shards."""


def same_hook(metadata: dict[str, Any], name: str) -> bool:
    """Whether hook ``name`` (canonical or an alias) is the hook the cache ``metadata`` records: its
    ``hook_name`` or ``hook_alias`` (the spelling it was cached under), or, for diffusion caches, the same
    UNet block after resolving short aliases (caches written before the canonical name was recorded)."""
    recorded = {metadata.get("hook_name"), metadata.get("hook_alias")} - {None}
    if name in recorded:
        return True
    expanded = {expand_unet_alias(str(r)) for r in recorded}
    return metadata.get("kind") == "diffusion" and expand_unet_alias(name) in expanded


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFileError(f"{what} {path} is damaged (not valid JSON: {e}). {fix}") from None


@dataclass
class ActivationChunk:
    """Activation rows of one hook from one forward batch, with per-row labels."""

    acts: torch.Tensor  # (rows, d_in)
    sample: torch.Tensor  # (rows,) int64 source item index
    timestep: Optional[torch.Tensor] = None  # (rows,) float64
    branch: Optional[torch.Tensor] = None  # (rows,) int8

    def __len__(self) -> int:
        return self.acts.shape[0]

    def select(self, mask: torch.Tensor) -> "ActivationChunk":
        return ActivationChunk(
            self.acts[mask], self.sample[mask],
            None if self.timestep is None else self.timestep[mask],
            None if self.branch is None else self.branch[mask],
        )

    @staticmethod
    def cat(chunks: Sequence["ActivationChunk"]) -> "ActivationChunk":
        def cat_opt(xs: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
            return None if xs[0] is None else torch.cat(xs)  # type: ignore[arg-type]

        return ActivationChunk(
            torch.cat([c.acts for c in chunks]), torch.cat([c.sample for c in chunks]),
            cat_opt([c.timestep for c in chunks]), cat_opt([c.branch for c in chunks]),
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, fsync=True, indent=1, sort_keys=True)


def _atomic_write_npy(path: Path, array: np.ndarray) -> int:
    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
        out[...] = array
        out.flush()
        del out

    atomic_save(path, write)
    return path.stat().st_size


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).numpy()


# ---------------------------------------------------------------------- writing
class ActivationCacheWriter:
    """Writes one hook's activations to ``directory`` shard by shard; resumes a partial cache.

    ``metadata`` describes what produces the activations (see ``docs/activation-cache.md``); when the
    directory already holds a cache, its metadata must match on every identifying key, otherwise
    :class:`CacheMismatchError` (a different model/hook never appends to an existing cache).
    ``clean_stale`` deletes the temporary files an interrupted writer left; pass False when other
    processes may be writing shards of this cache at the same time (their temporary files are live).
    """

    IDENTIFYING_KEYS = ("kind", "model", "hook_name", "d_in", "dtype", "token_policy", "source", "diffusion")

    def __init__(self, directory: Union[str, os.PathLike], metadata: dict[str, Any], items_per_shard: int,
                 *, clean_stale: bool = True):
        if items_per_shard <= 0:
            raise ValueError(f"items_per_shard must be positive, got {items_per_shard}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / "metadata.json"
        wanted = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "items_per_shard": items_per_shard,
                  **metadata}
        if meta_path.exists():
            existing = _read_json(meta_path, "The cache metadata", _DAMAGED_METADATA_FIX)
            _check_format(existing, self.directory)
            for key in self.IDENTIFYING_KEYS:
                if key == "hook_name" and (same_hook(existing, wanted["hook_name"])
                                           or ("hook_alias" in wanted and same_hook(existing, wanted["hook_alias"]))):
                    continue  # (a cache written before canonical names were recorded holds the alias)
                if existing.get(key) != wanted.get(key):
                    raise CacheMismatchError(
                        f"{self.directory} already holds a cache with {key}={existing.get(key)!r}, but this run "
                        f"has {key}={wanted.get(key)!r}. Use another directory, or delete this one to start over."
                    )
            self.metadata = existing
        else:
            _atomic_write_json(meta_path, wanted)
            self.metadata = wanted
        self.items_per_shard = int(self.metadata["items_per_shard"])
        if clean_stale:
            for stale in self.directory.glob("*.tmp"):  # leftovers of an interrupted write (hidden .*.tmp too)
                stale.unlink(missing_ok=True)
        self.completed = set(_completed_shards(self.directory))

    def shard_done(self, index: int) -> bool:
        return index in self.completed

    def empty_chunk(self) -> ActivationChunk:
        labelled = self.metadata.get("kind") == "diffusion"
        return ActivationChunk(
            torch.zeros(0, int(self.metadata["d_in"])), torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.float64) if labelled else None,
            torch.zeros(0, dtype=torch.int8) if labelled else None,
        )

    def first_missing_item(self, n_items: Optional[int]) -> int:
        """Source item to restart from: the start of the first missing shard."""
        k = 0
        while k in self.completed:
            k += 1
        start = k * self.items_per_shard
        return start if n_items is None else min(start, n_items)

    def write_shard(self, index: int, chunk: ActivationChunk, item_range: tuple[int, int]) -> None:
        if index in self.completed:
            return
        stem = self.directory / f"shard_{index:05d}"
        dtype = self.metadata["dtype"]
        files: dict[str, Any] = {}
        acts = _to_numpy(chunk.acts, dtype)
        size = _atomic_write_npy(Path(f"{stem}.acts.npy"), acts)
        files["acts"] = {"shape": list(acts.shape), "dtype": dtype, "bytes": size}
        for name, np_dtype in LABEL_COLUMNS.items():
            col = getattr(chunk, name)
            if col is None:
                continue
            arr = col.detach().cpu().numpy().astype(np_dtype)
            size = _atomic_write_npy(Path(f"{stem}.{name}.npy"), arr)
            files[name] = {"shape": list(arr.shape), "dtype": np.dtype(np_dtype).name, "bytes": size}
        manifest: dict[str, Any] = {"index": index, "items": list(item_range), "rows": int(acts.shape[0]),
                                    "files": files}
        if chunk.timestep is not None and len(chunk):
            manifest["timesteps"] = sorted({float(t) for t in chunk.timestep.unique().tolist()})
        _atomic_write_json(Path(f"{stem}.json"), manifest)  # the commit point
        self.completed.add(index)


def write_activation_caches(
    chunks: Iterator[tuple[int, int, dict[str, ActivationChunk]]],
    writers: dict[str, ActivationCacheWriter],
    n_items: Optional[int],
) -> dict[str, int]:
    """Group per-forward-batch chunks into item-aligned shards and write the missing ones.

    ``chunks`` yields ``(item_start, item_end, {hook: chunk})`` in item order; rows carry their item
    index in ``chunk.sample``. A shard is written once every one of its items has been processed (or
    the source ends). Returns the number of rows written per hook.
    """
    per_shard = next(iter(writers.values())).items_per_shard
    pending: dict[int, dict[str, list[ActivationChunk]]] = {}
    written = {h: 0 for h in writers}
    last_end = 0

    def flush(k: int) -> None:
        lo = k * per_shard
        hi = max(lo, min(lo + per_shard, n_items if n_items is not None else last_end))
        parts = pending.pop(k, {})
        for hook, writer in writers.items():
            if writer.shard_done(k):
                continue
            chunk = ActivationChunk.cat(parts[hook]) if parts.get(hook) else writer.empty_chunk()
            writer.write_shard(k, chunk, (lo, hi))
            written[hook] += len(chunk)

    for item_start, item_end, by_hook in chunks:
        for k in range(item_start // per_shard, (max(item_end, item_start + 1) - 1) // per_shard + 1):
            pending.setdefault(k, {})
        for hook, chunk in by_hook.items():
            if hook not in writers:
                continue
            # A forward batch may straddle a shard boundary: split its rows by item index.
            shard_of_row = torch.div(chunk.sample, per_shard, rounding_mode="floor")
            for k in shard_of_row.unique().tolist():
                pending.setdefault(k, {}).setdefault(hook, []).append(chunk.select(shard_of_row == k))
        last_end = item_end
        for k in sorted(pending):
            if (k + 1) * per_shard <= item_end:
                flush(k)
    for k in sorted(pending):  # the source ended: its last shard is complete as it is
        flush(k)
    return written


# ---------------------------------------------------------------------- reading
_DAMAGED_METADATA_FIX = ("Restore it from a copy, or delete the cache folder and run the `sae-lens-mm cache` command "
                         "again.")


def _rerun_fix(manifest: Path) -> str:
    return (f"Delete {manifest.name} (the shard's manifest) and run the same `sae-lens-mm cache` command (or "
            "cache_activations call) again: it resumes and recomputes only the missing shards.")


def _check_npy_header(path: Path, shape: Optional[list[int]], manifest: Path) -> None:
    """The ``.npy`` header of a shard file reads and agrees with its manifest (the file is opened, not loaded)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            found, _, _ = read_header(f)
    except Exception as e:  # numpy raises ValueError / SyntaxError / EOFError on a damaged header
        raise UnreadableFileError(f"Cache shard file {path} is damaged (its .npy header does not read: "
                                  f"{str(e) or type(e).__name__}). {_rerun_fix(manifest)}") from None
    if shape is not None and list(found) != list(shape):
        raise UnreadableFileError(f"Cache shard file {path} holds an array of shape {list(found)}, but its manifest "
                                  f"says {list(shape)}. {_rerun_fix(manifest)}")


def _check_format(meta: dict[str, Any], directory: Path) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise CacheMismatchError(f"{directory} is not an activation cache (metadata.json format={meta.get('format')!r}).")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise CacheMismatchError(
            f"{directory} uses activation-cache format version {meta['format_version']}; this sae-lens-multimodal "
            f"reads versions <= {FORMAT_VERSION}. Upgrade sae-lens-multimodal."
        )


def _completed_shards(directory: Path) -> list[int]:
    out = []
    for p in directory.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


@dataclass
class Shard:
    index: int
    rows: int
    items: tuple[int, int]
    paths: dict[str, Path] = field(default_factory=dict)
    timesteps: Optional[list[float]] = None


class ActivationCacheReader:
    """Read access to one hook's cache: memory-mapped shards, labels, shuffled batches."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = Path(directory)
        meta_path = self.directory / "metadata.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"No activation cache at {self.directory} (no metadata.json). Create one with "
                "`sae-lens-mm cache` or sae_lens_multimodal.training.cache_activations."
            )
        self.metadata: dict[str, Any] = _read_json(meta_path, "The cache metadata", _DAMAGED_METADATA_FIX)
        _check_format(self.metadata, self.directory)
        self.shards: list[Shard] = []
        for k in _completed_shards(self.directory):
            manifest_path = self.directory / f"shard_{k:05d}.json"
            manifest = _read_json(manifest_path, "Cache shard manifest", _rerun_fix(manifest_path))
            paths = {}
            for name, info in manifest["files"].items():
                path = self.directory / f"shard_{k:05d}.{name}.npy"
                if not path.exists():
                    raise FileNotFoundError(f"Shard file {path} is missing (shard {k}, items {manifest['items']}). "
                                            f"{_rerun_fix(manifest_path)}")
                if path.stat().st_size != info["bytes"]:
                    raise ValueError(f"Shard file {path} is truncated (expected {info['bytes']} bytes, found "
                                     f"{path.stat().st_size}). {_rerun_fix(manifest_path)}")
                _check_npy_header(path, info.get("shape"), manifest_path)
                paths[name] = path
            self.shards.append(Shard(k, int(manifest["rows"]), tuple(manifest["items"]), paths,  # type: ignore[arg-type]
                                     manifest.get("timesteps")))
        self.dtype = self.metadata["dtype"]

    # ------------------------------------------------------------------ facts
    @property
    def hook_name(self) -> str:
        """The hook's canonical name (caches written before canonical names were recorded: as given)."""
        return self.metadata["hook_name"]

    @property
    def n_items(self) -> Optional[int]:
        """Source items (images / trajectories) the cache covers when complete (None: a stream of unknown length)."""
        n = (self.metadata.get("source") or {}).get("n_items")
        return None if n is None else int(n)

    def missing_shards(self) -> list[int]:
        """Indices of the shards not on disk. For a source of unknown length only the holes before the last
        shard on disk can be seen."""
        per_shard = int(self.metadata["items_per_shard"])
        present = {s.index for s in self.shards}
        n = self.n_items
        expected = -(-n // per_shard) if n is not None else (max(present) + 1 if present else 0)
        return [k for k in range(expected) if k not in present]

    def missing_item_ranges(self) -> list[tuple[int, int]]:
        """The source items ``[start, end)`` of the missing shards, consecutive shards merged."""
        per_shard, n = int(self.metadata["items_per_shard"]), self.n_items
        ranges: list[tuple[int, int]] = []
        for k in self.missing_shards():
            lo, hi = k * per_shard, (k + 1) * per_shard if n is None else min((k + 1) * per_shard, n)
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        return ranges

    def require_complete(self) -> "ActivationCacheReader":
        """Refuse (:class:`IncompleteCacheError`) a cache with missing shards, naming the missing item ranges."""
        missing = self.missing_shards()
        if not missing:
            return self
        ranges = self.missing_item_ranges()
        shown = ", ".join(f"[{lo}, {hi})" for lo, hi in ranges[:8]) + (f" and {len(ranges) - 8} more" if len(ranges) > 8 else "")
        of = f" of {self.n_items}" if self.n_items is not None else ""
        raise IncompleteCacheError(
            f"The activation cache at {self.directory} is incomplete: {len(missing)} shard(s) missing, items {shown}"
            f"{of} (shard files or manifests deleted, or an interrupted run); reading it would silently use "
            f"{self.n_rows} rows from the other shards only. Run the same `sae-lens-mm cache` command (or "
            "cache_activations call) that made it again: it resumes and computes only the missing shards."
        )

    @property
    def d_in(self) -> int:
        return int(self.metadata["d_in"])

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def has_timesteps(self) -> bool:
        return bool(self.shards) and "timestep" in self.shards[0].paths

    def timesteps(self) -> list[float]:
        """Every timestep that has rows in the cache."""
        return sorted({t for s in self.shards for t in (s.timesteps or [])})

    def check(self, model: Optional[Union[torch.nn.Module, dict[str, str]]] = None, hook_name: Optional[str] = None,
              token_policy: Optional[str] = None, d_in: Optional[int] = None) -> "ActivationCacheReader":
        """Refuse (CacheMismatchError) a cache made by another model, at another hook or token policy."""
        made = self.metadata
        if model is not None:
            ident = model if isinstance(model, dict) else model_identity(model)
            if ident.get("fingerprint") != made["model"].get("fingerprint"):
                raise CacheMismatchError(
                    f"The cache at {self.directory} was made by model {made['model']['name']!r} "
                    f"({made['model']['fingerprint']}), not by this {ident.get('name')!r} "
                    f"({ident.get('fingerprint')}). Cache this model's activations first."
                )
        if hook_name is not None and not same_hook(made, hook_name):
            raise CacheMismatchError(
                f"The cache at {self.directory} has hook_name={made.get('hook_name')!r}, but {hook_name!r} was asked "
                "for. Use the cache of that hook (sae-lens-mm cache --hook ...), or the SAE trained for this one."
            )
        for key, want in (("token_policy", token_policy), ("d_in", d_in)):
            if want is not None and made.get(key) != want:
                raise CacheMismatchError(
                    f"The cache at {self.directory} has {key}={made.get(key)!r}, but {want!r} was asked for."
                )
        return self

    # ------------------------------------------------------------------ access
    def _acts(self, shard: Shard) -> np.ndarray:
        return load_npy(shard.paths["acts"], mmap_mode="r", what="activation cache shard")

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(arr))  # copies out of the memory map
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def shard_chunk(self, shard: Shard, rows: Optional[np.ndarray] = None) -> ActivationChunk:
        def col(name: str) -> Optional[torch.Tensor]:
            if name not in shard.paths:
                return None
            arr = load_npy(shard.paths[name], mmap_mode="r", what="activation cache shard")
            return torch.from_numpy(np.array(arr if rows is None else arr[rows]))

        acts = self._acts(shard)
        return ActivationChunk(self._to_torch(acts if rows is None else acts[rows]), col("sample"),  # type: ignore[arg-type]
                               col("timestep"), col("branch"))

    def read_all(self) -> ActivationChunk:
        """Every row on disk, in shard order. Also reads an incomplete cache (the shards it has): check
        :meth:`require_complete` first where every row matters; :meth:`iter_chunks` does."""
        if not self.shards:
            raise ValueError(f"The cache at {self.directory} has no complete shard yet.")
        return ActivationChunk.cat([self.shard_chunk(s) for s in self.shards])

    def iter_chunks(self, shuffle: bool = True, seed: int = 0, epochs: Optional[int] = 1,
                    allow_missing: bool = False) -> Iterator[ActivationChunk]:
        """Whole shards (memory-mapped, copied to memory one at a time), in random order per epoch. A cache
        with missing shards is refused (:class:`IncompleteCacheError`) unless ``allow_missing``."""
        if not self.shards:
            raise ValueError(f"The cache at {self.directory} has no complete shard yet.")
        if not allow_missing:
            self.require_complete()
        rng = np.random.default_rng(seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
            for i in order:
                yield self.shard_chunk(self.shards[int(i)])
            epoch += 1
