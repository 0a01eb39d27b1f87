"""SAEs shipped inside a Python package (``format: bundled``, loader ``mm_bundled``).

Format ``bundled`` v1 (docs/releases.md, "Bundled SAEs"): SAELens's own on-disk layout, as written by
``SAE.save_model`` / ``TrainingSAE.save_inference_model``: one folder per SAE holding ``cfg.json`` (a
SAELens 6.x config dict, ``metadata.sae_lens_version`` set) and ``sae_weights.safetensors``. The release's
``repo_id`` is ``bundled:<package>/<folder inside the package>`` and each SAE's ``path`` is its folder
in there (by convention the SAE id). Files are read from the installed package with
``importlib.resources``: no hub, no network, ``HF_HUB_OFFLINE`` irrelevant.

The release entry's facts fill in metadata the file lacks; where both give the hook name, they must
agree. A missing or unreadable file raises an error naming the file and the release's ``regenerate``
command.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from sae_lens import SAE
from sae_lens import __version__ as sae_lens_version
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

import sae_lens_multimodal.saes  # noqa: F401  (registers the timestep-aware architectures a bundled SAE may use)
from sae_lens_multimodal.core.files import UnreadableFileError, load_safetensors
from sae_lens_multimodal.core.sae_metadata import normalize_sae_metadata
from sae_lens_multimodal.pretrained._common import ReleaseFormatError
from sae_lens_multimodal.pretrained._formats import register_format_loader
from sae_lens_multimodal.pretrained._hub import MissingReleaseFileError
from sae_lens_multimodal.pretrained.registry import get_release, resolve
from sae_lens_multimodal.pretrained.releases import ReleaseSae

__all__ = ["BUNDLED_PREFIX", "FORMAT_VERSION", "BundledFileError", "bundled_folder", "get_config", "load_sae"]

BUNDLED_PREFIX = "bundled:"
FORMAT_VERSION = 1
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


class BundledFileError(MissingReleaseFileError):
    """A file of a bundled SAE is missing from the installed package."""


def _regenerate_hint(entry: Optional[ReleaseSae]) -> str:
    command = None
    if entry is not None:
        try:
            command = get_release(entry.release).regenerate
        except KeyError:
            command = None
    if command:
        return f"Regenerate it with `{command}` (or reinstall the package)."
    return "Reinstall the package that ships it."


def bundled_folder(repo_id: str, folder_name: str) -> Path:
    """The local folder of a bundled SAE: ``repo_id`` = ``bundled:<package>/<dir>``, ``folder_name`` inside."""
    if not repo_id.startswith(BUNDLED_PREFIX):
        raise ReleaseFormatError(
            f"A bundled release's repo_id must look like 'bundled:<package>/<folder>', got {repo_id!r}."
        )
    package, _, inner = repo_id[len(BUNDLED_PREFIX):].partition("/")
    parts = [p for p in (inner.strip("/"), folder_name.strip("/")) if p]
    if not package or any(".." in p.split("/") for p in parts):
        raise ReleaseFormatError(f"Bad bundled location {repo_id!r} / {folder_name!r} (no '..', a package first).")
    try:
        root = resources.files(package)
    except ModuleNotFoundError as e:
        raise ReleaseFormatError(f"Bundled release {repo_id!r}: package {package!r} is not installed.") from e
    # The package is installed as files (the wheel is not zipped), so this is a real path.
    return Path(str(root.joinpath(*"/".join(parts).split("/"))))


def _read_cfg(path: Path, entry: Optional[ReleaseSae]) -> dict[str, Any]:
    if not path.is_file():
        raise BundledFileError(f"Bundled SAE file {path} is missing. {_regenerate_hint(entry)}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ReleaseFormatError(f"Bundled SAE file {path} is not valid JSON ({e}). {_regenerate_hint(entry)}") from e
    if not isinstance(cfg, dict) or "architecture" not in cfg or "d_in" not in cfg or "d_sae" not in cfg:
        raise ReleaseFormatError(
            f"Bundled SAE file {path} is not a SAELens config (needs 'architecture', 'd_in', 'd_sae'). "
            f"{_regenerate_hint(entry)}"
        )
    return cfg


def _merge(cfg: dict[str, Any], entry: Optional[ReleaseSae], where: Path,
           cfg_overrides: Optional[dict[str, Any]], device: str) -> dict[str, Any]:
    """Release facts under the file's metadata; SAELens's overrides (device, dtype, ...) on top."""
    meta = dict(cfg.get("metadata") or {})
    meta.setdefault("sae_lens_version", sae_lens_version)  # a 6.x layout: keep SAELens from "upgrading" it
    if entry is not None:
        facts = entry.metadata()
        file_hook = meta.get("hook_name")
        if file_hook is not None and file_hook != entry.hook_name:
            raise ReleaseFormatError(
                f"{where} says hook_name={file_hook!r} but release {entry.release!r} lists SAE {entry.sae_id!r} at "
                f"{entry.hook_name!r}; fix the release entry or regenerate the SAE."
            )
        for key, value in facts.items():
            if meta.get(key) is None and value is not None:
                meta[key] = value
        meta["release"], meta["sae_id"] = entry.release, entry.sae_id
    meta["source_format"] = "bundled"
    meta["source_format_version"] = FORMAT_VERSION
    meta["repo_path"] = str(where)
    out = {**cfg, "device": device}
    for key, value in (cfg_overrides or {}).items():
        if key in out or key in ("dtype", "device"):
            out[key] = value
        elif value is not None:
            meta[key] = value
    out["metadata"] = normalize_sae_metadata(meta, source=f"bundled SAE {where}")
    return out


def get_config(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """SAELens config getter (``cfg.json`` only). ``force_download`` has no meaning here and is ignored."""
    _, _, entry, _ = resolve(repo_id, folder_name)
    folder = bundled_folder(repo_id, folder_name)
    return _merge(_read_cfg(folder / CFG_FILENAME, entry), entry, folder, cfg_overrides, device)


def _check_state(cfg: dict[str, Any], state: dict[str, torch.Tensor], path: Path, entry: Optional[ReleaseSae]) -> None:
    """Tensor names and shapes must be those of the architecture built from ``cfg``."""
    probe_cfg = handle_config_defaulting({**cfg, "device": "meta"})
    try:
        sae_cls = SAE.get_sae_class_for_architecture(probe_cfg["architecture"])
        sae_cfg = SAE.get_sae_config_class_for_architecture(probe_cfg["architecture"]).from_dict(probe_cfg)
        sae_cfg.device = "meta"
        probe = sae_cls(sae_cfg)
        expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
        given = dict(state)
        probe.process_state_dict_for_loading(given)
    except (KeyError, ValueError, TypeError) as e:
        raise ReleaseFormatError(f"{path.parent / CFG_FILENAME}: cannot build the SAE it describes ({e}). "
                                 f"{_regenerate_hint(entry)}") from e
    got = {k: tuple(v.shape) for k, v in given.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ReleaseFormatError(
            f"{path} does not match its cfg.json: missing {missing or 'none'}, unexpected {unexpected or 'none'}, "
            f"wrong shapes {[(k, got[k], expected[k]) for k in wrong] or 'none'}. {_regenerate_hint(entry)}"
        )


def load_sae(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens loader (``conversion_func: mm_bundled``): reads the package's files, never the network."""
    _, _, entry, _ = resolve(repo_id, folder_name)
    folder = bundled_folder(repo_id, folder_name)
    cfg = _merge(_read_cfg(folder / CFG_FILENAME, entry), entry, folder, cfg_overrides, device)
    weights = folder / WEIGHTS_FILENAME
    if not weights.is_file():
        raise BundledFileError(f"Bundled SAE file {weights} is missing. {_regenerate_hint(entry)}")
    try:
        state = load_safetensors(weights, what=f"Bundled SAE file {weights}")
    except UnreadableFileError as e:
        raise ReleaseFormatError(f"{e} {_regenerate_hint(entry)}") from None
    _check_state(cfg, state, weights, entry)
    dtype = getattr(torch, str(cfg.get("dtype", "float32")).replace("torch.", ""), torch.float32)
    return cfg, {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, None


register_format_loader("bundled", load_sae, get_config)
