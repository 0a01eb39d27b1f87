"""The one way this package reads weight and array files, so a damaged file always fails the same way.

* :func:`load_safetensors`: a ``.safetensors`` file as a dict of tensors. A truncated, empty or garbage file
  raises :class:`UnreadableFileError` naming the file, saying it is incomplete or not a safetensors file,
  and how to fix it (re-download / re-save), instead of safetensors' bare "incomplete metadata".
* :func:`load_npy`: a ``.npy`` array (optionally memory-mapped), never unpickling; a damaged header or
  an object array fails naming the file.
* :func:`load_torch_weights`: a torch pickle through ``torch.load(weights_only=True)`` only. Classes a
  known release format pickles (ViT-Prisma's config) are mapped to inert stand-ins; anything else that
  would run code is refused with :class:`UnsafePickleError` (nothing from the file is executed).
* :func:`require_complete`: the check every model loader makes after loading a state dict: missing
  weights are an error naming the file, never a silently random-initialised model.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import numpy as np
import torch

__all__ = [
    "WEIGHT_SUFFIXES",
    "IncompleteCheckpointError",
    "PickledConfigStub",
    "UnreadableFileError",
    "UnsafePickleError",
    "check_weight_files",
    "damaged_download_error",
    "load_npy",
    "load_safetensors",
    "load_torch_weights",
    "refuse_partial_loads",
    "require_complete",
]

PathLike = Union[str, os.PathLike]

#: file endings of weight files (safetensors and torch pickles) that :func:`check_weight_files` checks
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class UnreadableFileError(ValueError):
    """A file exists but cannot be read as the format it should have (truncated, empty, garbage)."""


class IncompleteCheckpointError(ValueError):
    """A checkpoint was read but lacks weights the model needs: loading it would leave them random."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle references code we refuse to run (or classes we do not know); nothing was executed."""


def _describe(path: PathLike, what: Optional[str]) -> str:
    return f"{what} ({path})" if what and str(path) not in what else (what or f"file {path}")


def _require_file(path: PathLike, what: Optional[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{_describe(p, what)} is a directory, not a file. Pass the file inside it.")
    if not p.is_file():
        raise FileNotFoundError(f"{_describe(p, what)} does not exist. Check the path, or re-download / re-save it.")
    return p


# ------------------------------------------------------------------------------------ safetensors
def load_safetensors(
    path: PathLike, *, what: Optional[str] = None, device: Union[str, torch.device] = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file ``path`` (on ``device``); ``what`` names the file in errors
    (e.g. ``"SAE weights"``)."""
    from safetensors.torch import load_file

    p = _require_file(path, what)
    try:
        return load_file(str(p), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (not exported everywhere) or OSError
        raise _not_safetensors(p, what, e) from None


def _not_safetensors(p: Path, what: Optional[str], error: Exception) -> UnreadableFileError:
    return UnreadableFileError(
        f"{_describe(p, what)} is incomplete or not a safetensors file ({p.stat().st_size} bytes; safetensors says: "
        f"{error}). It was probably cut short by an interrupted download or save, or is another format under this "
        "name: re-download it, or re-save it with safetensors.torch.save_file."
    )


# ------------------------------------------------------------------------------------------- numpy
_NPY_MAGIC = b"\x93NUMPY"


def load_npy(path: PathLike, mmap_mode: Optional[str] = None, *, what: Optional[str] = None) -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (``mmap_mode`` as for ``np.load``). Never unpickles: a file
    holding Python objects, a damaged header or a truncated body raises :class:`UnreadableFileError`."""
    p = _require_file(path, what)
    with open(p, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    fix = "Re-create it (re-run the command that wrote it) or restore it from a good copy."
    if head != _NPY_MAGIC:
        raise UnreadableFileError(
            f"{_describe(p, what)} is not a .npy file (it does not start with the NumPy magic bytes; "
            f"{p.stat().st_size} bytes). {fix}"
        )
    try:
        return np.load(p, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as e:  # a damaged header raises SyntaxError / tokenize errors, a short body ValueError
        reason = str(e) or type(e).__name__
        if "allow_pickle" in reason or "Python objects" in reason or "pickled" in reason:
            reason = "it holds Python objects (pickled data), which are never loaded"
        raise UnreadableFileError(f"{_describe(p, what)} is damaged or incomplete ({reason}). {fix}") from None


# ----------------------------------------------------------------------------------------- pickles
class PickledConfigStub:
    """Inert stand-in for a config object found in a pickle: keeps the pickled attributes as a dict.

    It runs no code of the original class; ``state`` is whatever the pickle's BUILD step provided
    (for a dataclass, its ``__dict__``).
    """

    pickled_class = "unknown"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.state = dict(state) if isinstance(state, dict) else {"state": state}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def __repr__(self) -> str:
        return f"PickledConfigStub({self.pickled_class}, {len(self.state)} fields)"


def _stub_for(qualified_name: str) -> type:
    return type(
        "PickledConfigStub_" + qualified_name.replace(".", "_"),
        (PickledConfigStub,),
        {"pickled_class": qualified_name},
    )


#: Classes that known release formats pickle, mapped to stubs (qualified name -> stub class).
KNOWN_PICKLED_CONFIGS: dict[str, type] = {
    name: _stub_for(name)
    for name in (
        "vit_prisma.sae.config.VisionModelSAERunnerConfig",
    )
}

# Phrases of torch's weights-only refusal (as opposed to a damaged file, which fails differently).
_REFUSAL_MARKERS = ("Weights only load failed", "Unsupported global", "weights_only", "was not an allowed global")


def load_torch_weights(
    source: Union[PathLike, bytes, BinaryIO],
    *,
    what: str,
    allow_configs: tuple[str, ...] = (),
    device: Union[str, torch.device] = "cpu",
) -> Any:
    """``torch.load(weights_only=True)`` onto ``device``, with known config classes mapped to inert stubs.

    ``what`` names the file in errors. ``allow_configs`` lists qualified class names (keys of
    :data:`KNOWN_PICKLED_CONFIGS`) this format may contain. A pickle that would run any other code is
    refused with :class:`UnsafePickleError` (nothing from it runs); a truncated or garbage file raises
    :class:`UnreadableFileError`.
    """
    stubs = []
    for name in allow_configs:
        if name not in KNOWN_PICKLED_CONFIGS:
            raise KeyError(f"No stub registered for pickled class {name!r}; known: {sorted(KNOWN_PICKLED_CONFIGS)}")
        stubs.append((KNOWN_PICKLED_CONFIGS[name], name))
    if isinstance(source, (str, os.PathLike)):
        _require_file(source, what)
        what = _describe(source, what)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(source, map_location=device, weights_only=True)
    except Exception as e:
        # "Unsupported operand": bytes that are no pickle at all (a damaged file), not a reference to code
        if any(m in str(e) for m in _REFUSAL_MARKERS) and "Unsupported operand" not in str(e):
            raise UnsafePickleError(_refusal_message(source, what, e)) from None
        raise UnreadableFileError(
            f"{what} is incomplete or not a torch checkpoint ({type(e).__name__}: {_first_line(e)}). It was probably "
            "cut short by an interrupted download or save: re-download it, or re-save it with torch.save (or, "
            "better, as safetensors)."
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else "no detail"
    return first.split(". ")[0][:200]  # torch appends paragraphs of generic advice after the first sentence


def _refusal_message(source: Any, what: str, error: Exception) -> str:
    # Quote only torch's reason: its message starts with advice we do not give (loading without the allow-list).
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    markers = ("Unpickler error", "Unsupported", "unsupported", "blocked", "Can only", "unrecognized")
    reason = next((ln for ln in lines if any(w in ln for w in markers)), "")
    detail = reason.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "").rstrip(".")
    detail = detail or "not a plain state dict"
    unsafe: list[str] = []
    try:
        if isinstance(source, (str, os.PathLike)):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        elif hasattr(source, "seek"):
            source.seek(0)
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # the listing is a courtesy; the refusal stands without it
        unsafe = []
    unknown = [u for u in unsafe if u not in KNOWN_PICKLED_CONFIGS]
    listed = f" It references {', '.join(unknown)}." if unknown else ""
    return (
        f"Refused to load {what}: the file holds code (pickled references to functions or classes outside the "
        f"tensor allow-list: {detail}), and loading it would run that code.{listed} Nothing from the file was "
        f"executed. Only plain state dicts (and the known config classes of supported formats) are loaded. If you "
        f"trust the file's source, convert it in an environment that has its library: load it there and re-save "
        f"the tensors with safetensors.torch.save_file (or torch.save of the plain state dict) and the config as JSON."
    )


# -------------------------------------------------------------------------------- completeness
def require_complete(
    missing: Iterable[str],
    *,
    what: str,
    fix: str = "Re-download or re-save the checkpoint, or point at the right directory.",
) -> None:
    """Raise :class:`IncompleteCheckpointError` when a loaded checkpoint lacks any of ``missing`` keys,
    naming up to ten of them and ``what`` (the file or directory)."""
    missing = sorted(dict.fromkeys(str(m) for m in missing))
    if not missing:
        return
    shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
    raise IncompleteCheckpointError(
        f"{what} does not hold all the model's weights: missing {shown}. Loading it would leave them randomly "
        f"initialised, so it was refused. {fix}"
    )


# ------------------------------------------------------------------------ checkpoint directories
def _check_weight_file(p: Path, what: str) -> None:
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:  # reads the header only; safetensors checks that the header's tensors cover the whole file
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise _not_safetensors(p, f"{what}: weights file", e) from None
    elif zipfile.is_zipfile(p):  # torch's zip format: opening reads the central directory at the end
        try:
            zipfile.ZipFile(p).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise UnreadableFileError(
                f"{what}: weights file {p} is incomplete or damaged ({e}). Re-download or re-save it."
            ) from None
    else:  # a legacy torch pickle (or garbage): only a weights-only load tells
        load_torch_weights(p, what=f"{what}: weights file {p}")


def check_weight_files(directory: PathLike, *, what: Optional[str] = None, recursive: bool = False,
                       required: bool = True) -> list[Path]:
    """Check that every weight file in ``directory`` (and its subdirectories when ``recursive``, as in a
    diffusers pipeline) is complete and readable, and that every shard a ``*.index.json`` names exists.

    Libraries either fail on such files with messages that do not name the file (safetensors' "incomplete
    metadata") or, like open_clip, log a warning and return a randomly initialised model; call this before
    handing them a local directory. ``required``: no weight file at all is an error. Returns the files.
    """
    root = Path(directory)
    what = what or f"checkpoint directory {root}"
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for index in sorted(root.glob(f"{pattern}.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (ValueError, AttributeError) as e:
            raise UnreadableFileError(f"{what}: shard index {index} is not valid JSON ({e}). Re-download it.") from None
        absent = sorted({str(v) for v in weight_map.values()} - {p.name for p in index.parent.iterdir()})
        if absent:
            raise FileNotFoundError(
                f"{what}: shard index {index} names weight files that are not there: {', '.join(absent)}. "
                "Re-download the checkpoint (all shards)."
            )
    if required and not files:
        raise FileNotFoundError(
            f"{what} holds no weights file ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); loading it would give a "
            "randomly initialised model, so it was refused. Re-download the checkpoint, or re-save it with its weights."
        )
    for p in files:
        _check_weight_file(p, what)
    return files


def damaged_download_error(error: Exception, source: str) -> Optional[UnreadableFileError]:
    """For a library's error on a damaged safetensors file of a hub repo (already in the local cache), an
    :class:`UnreadableFileError` naming the repo and how to re-download it; None for any other error."""
    if "deserializing header" not in str(error):
        return None
    return UnreadableFileError(
        f"A weights file of {source!r} in the local Hugging Face cache is incomplete or not a safetensors file "
        f"(safetensors says: {error}). Re-download it: `huggingface-cli download {source} --force-download` "
        "(or delete the repo's folder in the cache and load it again online)."
    )


#: loggers through which diffusers and transformers report (only report) weights they initialised randomly
_PARTIAL_LOAD_LOGGERS = ("diffusers.models.modeling_utils", "transformers.modeling_utils")


class _PartialLoadCatcher(logging.Filter):
    def __init__(self, show_from: int) -> None:
        super().__init__()
        self.show_from = show_from
        self.reports: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "newly initialized" in message or ("LOAD REPORT" in message and "MISSING" in message):
            self.reports.append(message)
        return record.levelno >= self.show_from  # show only what the logger showed before


@contextmanager
def refuse_partial_loads(what: str) -> Iterator[None]:
    """Within this block, a diffusers / transformers ``from_pretrained`` that initialises weights missing from
    the checkpoint (those libraries only log it) raises :class:`IncompleteCheckpointError` naming ``what``."""
    catchers = []
    for name in _PARTIAL_LOAD_LOGGERS:
        logger = logging.getLogger(name)
        catcher = _PartialLoadCatcher(logger.getEffectiveLevel())
        catchers.append((logger, logger.level, catcher))
        logger.setLevel(min(logger.getEffectiveLevel(), logging.WARNING))  # so the report reaches the filter
        logger.addFilter(catcher)
    try:
        yield
    finally:
        for logger, level, catcher in catchers:
            logger.removeFilter(catcher)
            logger.setLevel(level)
    reports = [r for _, _, c in catchers for r in c.reports]
    if reports:
        detail = reports[0].split("You should probably")[0].strip()
        raise IncompleteCheckpointError(
            f"{what} does not hold all the model's weights; loading it would leave them randomly initialised, so it "
            f"was refused. The library reported: {detail[:1500]} Re-download or re-save the checkpoint."
        )
