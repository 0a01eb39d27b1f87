"""Hub access and safe deserialisation shared by the release converters.

* :func:`fetch_file` wraps ``huggingface_hub.hf_hub_download`` so that a file that is neither cached nor
  downloadable (``HF_HUB_OFFLINE=1``, no network, wrong name) fails with an error naming the repository, the
  file and the command that gets it.
* :func:`safe_torch_load` is :func:`sae_lens_multimodal.core.files.load_torch_weights` (moved there with
  :class:`UnsafePickleError` and :class:`PickledConfigStub`; re-exported here so existing imports work).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import huggingface_hub
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from sae_lens_multimodal.core.files import (
    KNOWN_PICKLED_CONFIGS,
    PickledConfigStub,
    UnsafePickleError,
    load_torch_weights,
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


# Pickles are read by core/files.py (the one reader of weight files); re-exported here for old imports.
safe_torch_load = load_torch_weights
_KNOWN_PICKLED_CONFIGS = KNOWN_PICKLED_CONFIGS


def read_json(path: Union[str, Path], what: str) -> dict[str, Any]:
    """Parse a JSON object file, with an error naming the file when it is not valid JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(data).__name__}.")
    return data
