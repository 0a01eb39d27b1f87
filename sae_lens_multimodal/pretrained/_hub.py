"""Hub access and safe deserialisation shared by the release converters.

* :func:`fetch_file` wraps ``huggingface_hub.hf_hub_download`` so that a file that is neither cached nor
  downloadable (``HF_HUB_OFFLINE=1``, no network, wrong name) fails with an error naming the repository, the
  file and the command that gets it.
* :func:`safe_torch_load` reads torch pickles with ``torch.load(weights_only=True)`` only. Classes a format
  is known to pickle (ViT-Prisma's config class) are mapped to inert stand-ins through torch's own
  allow-list, so no code from a file is ever executed; anything else is refused with an explanation.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import huggingface_hub
import torch
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

__all__ = [
    "MissingReleaseFileError",
    "UnsafePickleError",
    "PickledConfigStub",
    "fetch_file",
    "safe_torch_load",
]


class MissingReleaseFileError(FileNotFoundError):
    """A file a release needs is not in the local Hugging Face cache and cannot be downloaded now."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle references code we refuse to run (or classes we do not know); nothing was executed."""


def _hf_constants() -> Any:
    return huggingface_hub.constants  # read at call time: HF_HUB_OFFLINE / HF_HUB_CACHE may change


def _how_to_get(repo_id: str, filename: str) -> str:
    cache = _hf_constants().HF_HUB_CACHE
    return (
        f"Get it on a machine with network access with `huggingface-cli download {repo_id} {filename}` "
        f"(or `hf download {repo_id} {filename}`) into this cache ({cache}; set HF_HUB_CACHE to use another), "
        "or unset HF_HUB_OFFLINE so it downloads on first use."
    )


def fetch_file(
    repo_id: str,
    filename: str,
    *,
    force_download: bool = False,
    required: bool = True,
) -> Optional[str]:
    """Local path of ``filename`` in Hugging Face repo ``repo_id`` (downloaded unless offline).

    Respects ``HF_HUB_OFFLINE`` (never downloads then). ``required=False`` returns None for a file that
    does not exist (or, offline, is not cached) instead of raising :class:`MissingReleaseFileError`.
    """
    offline = bool(_hf_constants().HF_HUB_OFFLINE)
    if force_download and offline:
        raise ValueError(
            f"force_download=True cannot re-download {filename!r} from {repo_id!r} while HF_HUB_OFFLINE=1 is set. "
            "Unset HF_HUB_OFFLINE, or drop force_download to use the cached copy."
        )
    try:
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, force_download=force_download)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if not required:
            return None
        why = (
            "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
            if offline
            else "is not in the local Hugging Face cache and could not be downloaded (no connection?)"
        )
        raise MissingReleaseFileError(
            f"File {filename!r} of Hugging Face repo {repo_id!r} {why}. {_how_to_get(repo_id, filename)}"
        ) from e
    except EntryNotFoundError as e:  # the repo exists online but has no such file
        if not required:
            return None
        raise MissingReleaseFileError(
            f"Hugging Face repo {repo_id!r} has no file {filename!r}. Check the release entry's path "
            f"(list the repo's files with `huggingface-cli ls-files {repo_id}` or HfApi().list_repo_files)."
        ) from e
    except RepositoryNotFoundError as e:
        raise MissingReleaseFileError(
            f"Hugging Face repo {repo_id!r} was not found (or is private/gated: log in with "
            f"`huggingface-cli login`), so {filename!r} cannot be loaded."
        ) from e


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
_KNOWN_PICKLED_CONFIGS: dict[str, type] = {
    name: _stub_for(name)
    for name in (
        "vit_prisma.sae.config.VisionModelSAERunnerConfig",
    )
}


def safe_torch_load(
    source: Union[str, os.PathLike, bytes, BinaryIO],
    *,
    what: str,
    allow_configs: tuple[str, ...] = (),
) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with known config classes mapped to inert stubs.

    ``what`` names the file in errors. ``allow_configs`` lists qualified class names (keys of the known
    config table) this format may contain. Any other global in the pickle is refused with
    :class:`UnsafePickleError`; nothing from the file runs.
    """
    stubs = []
    for name in allow_configs:
        if name not in _KNOWN_PICKLED_CONFIGS:
            raise KeyError(f"No stub registered for pickled class {name!r}")
        stubs.append((_KNOWN_PICKLED_CONFIGS[name], name))
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(_refusal_message(source, what, e)) from None
    except RuntimeError as e:  # torch wraps the weights-only refusal in a RuntimeError in some versions
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UnsafePickleError(_refusal_message(source, what, e)) from None
        raise


def _refusal_message(source: Any, what: str, error: Exception) -> str:
    # torch's message starts with advice to retry with weights_only=False; quote only the reason.
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if any(w in ln for w in ("Unpickler error", "Unsupported", "unsupported", "blocked",
                                                                 "Can only", "unrecognized"))), "")
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
    unknown = [u for u in unsafe if u not in _KNOWN_PICKLED_CONFIGS]
    listed = f" It references {', '.join(unknown)}." if unknown else ""
    return (
        f"Refused to unpickle {what}: it needs code outside the tensor/weights allow-list "
        f"({detail}).{listed} Nothing from the file was executed. Only plain state dicts (and the known "
        f"config classes of supported formats) are loaded. If you trust the file, convert it yourself in "
        f"an environment that has its library: load it there and re-save the plain state dict with "
        f"`torch.save(obj['state_dict'], 'weights.pt')` (and the config as JSON), or as safetensors."
    )


def read_json(path: Union[str, Path], what: str) -> dict[str, Any]:
    """Parse a JSON object file, with an error naming the file when it is not valid JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(data).__name__}.")
    return data
