"""Registering releases with SAELens: ``SAE.from_pretrained(release, sae_id)`` for our releases.

SAELens looks ``release`` up in its cached ``get_pretrained_saes_directory()`` and calls
``NAMED_PRETRAINED_SAE_LOADERS[conversion_func]`` with ``(repo_id, folder_name, ...)``. We add one
``PretrainedSAELookup`` per release (:func:`register_release`, :func:`register_releases`) and one loader per
source format (registered by the converter modules in _formats.py). compat.py wraps SAELens's directory
function so that our releases come back after ``get_pretrained_saes_directory.cache_clear()``.

A loader only receives ``(repo_id, folder_name)``, so the per-SAE facts SAELens has no field for are found
again here by :func:`resolve`. The release table itself (parsing ``releases.yaml``) is releases.py.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

import huggingface_hub
from sae_lens.loading import pretrained_sae_loaders as psl
from sae_lens.loading import pretrained_saes_directory as psd
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

from sae_lens_multimodal import compat
from sae_lens_multimodal.core.names import unknown_name_message
from sae_lens_multimodal.pretrained._formats import FORMATS, format_loaders
from sae_lens_multimodal.pretrained import _hub
from sae_lens_multimodal.pretrained.releases import (
    Release,
    ReleaseSae,
    split_repo,
    load_release_file,
    parse_release,
    read_manifest,
)

__all__ = [
    "register_release",
    "unregister_release",
    "register_releases",
    "get_release",
    "check_pretrained_name",
    "registered_releases",
    "resolve",
    "expand_manifest_release",
]

_LOCK = threading.RLock()
_RELEASES: dict[str, Release] = {}
#: (lookup repo_id, path) -> ReleaseSae, for the loaders (SAELens only passes these two).
_BY_LOCATION: dict[tuple[str, str], ReleaseSae] = {}
_SHIPPED_LOADED = False
_warned_collisions: set[str] = set()


class _ManifestSaesMap(dict):
    """saes_map of a manifest release: ids of runs already seen are listed; any id of the release's form
    (a listed layer and a run id) is accepted, and the loader checks the run against the manifest."""

    def __init__(self, release: Release, known: Mapping[str, str]):
        super().__init__(known)
        self._release = release

    def _path(self, key: Any) -> Optional[str]:
        parsed = self._release.parse_manifest_id(key) if isinstance(key, str) else None
        if parsed is None:
            return None
        assert self._release.path_template
        return self._release.path_template.format(layer=parsed[0], run_id=parsed[1])

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._path(key) is not None

    def __getitem__(self, key: Any) -> str:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        path = self._path(key)
        if path is None:
            raise KeyError(key)
        return path

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default


def _lookup_for(release: Release) -> Any:
    saes_map = {sid: s.path for sid, s in release.saes.items()}
    if release.manifest:
        saes_map = _ManifestSaesMap(release, saes_map)
    return PretrainedSAELookup(
        release=release.name,
        repo_id=release.repo_id,
        model=release.model,
        conversion_func=release.conversion_func,
        saes_map=saes_map,
        expected_var_explained={sid: s.variance_explained for sid, s in release.saes.items()
                                if s.variance_explained is not None},
        expected_l0={sid: s.l0 for sid, s in release.saes.items() if s.l0 is not None},
        neuronpedia_id={},
        norm_scaling_factor={},
        config_overrides=None,
    )


def _is_ours(lookup: Any) -> bool:
    return str(getattr(lookup, "conversion_func", "") or "").startswith("mm_")


def _inject(directory: dict[str, Any]) -> None:
    """Put every registered release into SAELens's directory dict (no-op when already there)."""
    with _LOCK:
        for name, release in _RELEASES.items():
            present = directory.get(name)
            if present is not None and getattr(present, "_mm_release", None) is release:
                continue
            if present is not None and not _is_ours(present):
                if name not in _warned_collisions:
                    _warned_collisions.add(name)
                    warnings.warn(
                        f"SAELens already has a release named {name!r}; sae-lens-multimodal's release of that name "
                        "is not registered.",
                        stacklevel=2,
                    )
                continue
            lookup = _lookup_for(release)
            lookup._mm_release = release  # type: ignore[attr-defined]  # marks the lookup as current
            directory[name] = lookup


def _remove_from_directory(name: str) -> None:
    directory = psd.get_pretrained_saes_directory()
    if name in directory and _is_ours(directory[name]):
        del directory[name]


def _register_loaders() -> None:
    """Give SAELens each source format's loader and config getter, and have compat's directory wrapper
    add our releases whenever SAELens reads its directory."""
    loaders = format_loaders()
    missing = sorted(set(FORMATS) - set(loaders))
    if missing:
        raise RuntimeError(
            f"No loader is registered for the release formats {missing}; their converter modules "
            "(sae_lens_multimodal/pretrained/<format>.py) register them when imported by sae_lens_multimodal.pretrained."
        )
    for loader in loaders.values():
        psl.NAMED_PRETRAINED_SAE_LOADERS[loader.loader_name] = loader.load_sae  # type: ignore[assignment]
        psl.NAMED_PRETRAINED_SAE_CONFIG_GETTERS[loader.loader_name] = loader.get_config  # type: ignore[assignment]
    # Registered by module-qualified name, so a reloaded registry module replaces its own extender.
    compat.add_directory_extender(f"{__name__}._inject", _inject)
    compat.patch_pretrained_directory()


def _index(release: Release) -> None:
    for sae in release.saes.values():
        _BY_LOCATION.setdefault((release.repo_id, sae.path), sae)


def _reindex() -> None:
    _BY_LOCATION.clear()
    for release in _RELEASES.values():
        _index(release)


def register_release(name: str, spec: Mapping[str, Any] | Release, *, replace_existing: bool = False) -> Release:
    """Add one release (a YAML-style mapping, see ``releases.yaml``) to SAELens's directory.

    Afterwards ``SAE.from_pretrained(name, sae_id)`` loads its SAEs. Raises if ``name`` exists unless
    ``replace_existing``.
    """
    release = spec if isinstance(spec, Release) else parse_release(name, spec)
    with _LOCK:
        if name in _RELEASES and not replace_existing:
            raise ValueError(f"Release {name!r} is already registered; pass replace_existing=True to replace it.")
        _RELEASES[name] = release
        _reindex()
        _register_loaders()
        if release.manifest:
            expand_manifest_release(name, download=False)
        _inject(psd.get_pretrained_saes_directory())
    return release


def unregister_release(name: str) -> None:
    """Remove a release registered with :func:`register_release` (no error if absent)."""
    with _LOCK:
        if _RELEASES.pop(name, None) is not None:
            _reindex()
            _remove_from_directory(name)


def register_releases() -> None:
    """Register the shipped releases and our loaders with SAELens (idempotent, offline, cheap)."""
    global _SHIPPED_LOADED
    with _LOCK:
        if not _SHIPPED_LOADED:
            for name, release in load_release_file().items():
                _RELEASES.setdefault(name, release)
            _SHIPPED_LOADED = True
            _reindex()
            for name, release in _RELEASES.items():
                if release.manifest:
                    expand_manifest_release(name, download=False)
        _register_loaders()
        _inject(psd.get_pretrained_saes_directory())


def registered_releases() -> dict[str, Release]:
    """Our registered releases by name (a copy)."""
    with _LOCK:
        return dict(_RELEASES)


def get_release(name: str) -> Release:
    with _LOCK:
        if name not in _RELEASES:
            raise KeyError(unknown_name_message("multimodal release", name, _RELEASES,
                                                see="List them with: sae-lens-mm releases."))
        return _RELEASES[name]


def check_pretrained_name(release: str, sae_id: Optional[str] = None) -> None:
    """Refuse, before anything is downloaded, a ``release`` / ``sae_id`` that ``SAE.from_pretrained`` would
    not find: a KeyError naming the close matches among SAELens's releases (ours included) and the
    release's SAE ids. A Hugging Face repo id (``owner/name``) passes (SAELens loads those directly), and so
    does any id of a manifest release (its runs are known only after its manifest is read)."""
    directory = psd.get_pretrained_saes_directory()
    if release not in directory:
        if "/" in release:
            return
        raise KeyError(unknown_name_message("SAE release", release, directory,
                                            see="List this package's releases with: sae-lens-mm releases."))
    with _LOCK:
        ours = _RELEASES.get(release)
    if sae_id is None or (ours is not None and ours.manifest) or sae_id in directory[release].saes_map:
        return
    raise KeyError(unknown_name_message(f"SAE id in release {release!r}:", sae_id, directory[release].saes_map,
                                        see=f"List them with: sae-lens-mm releases --release {release}."))


def _manifest_release_for(repo_id: str) -> Optional[Release]:
    for release in _RELEASES.values():
        if release.manifest and release.repo_id == repo_id:
            return release
    return None


def resolve(repo_id: str, folder_name: str) -> tuple[str, str, Optional[ReleaseSae], Optional[Release]]:
    """What a loader called with SAELens's ``(repo_id, folder_name)`` should read.

    Returns ``(hub repo, path in it, registered SAE facts or None, manifest release or None)``. Unknown
    locations (a user passing our loader as ``converter=`` for an unregistered repo) still resolve, without
    facts.
    """
    with _LOCK:
        sae = _BY_LOCATION.get((repo_id, folder_name))
        if sae is not None:
            return sae.hub_repo, sae.hub_path, sae, None
        release = _manifest_release_for(repo_id)
    hub_repo, hub_path = split_repo(repo_id, folder_name)
    return hub_repo, hub_path, None, release


# ----------------------------------------------------------------------------------------- manifests
def expand_manifest_release(name: str, *, download: bool = True) -> list[ReleaseSae]:
    """List the runs of a manifest release (saev DINOv3) and add them to its SAE ids.

    Reads ``manifest.jsonl`` from the local Hugging Face cache, or downloads it when ``download`` and not
    offline. Without the manifest (and ``download=False``) returns the runs already known.
    """
    release = get_release(name)
    if not release.manifest:
        raise ValueError(f"Release {name!r} has no manifest.")
    local: Optional[str]
    if download:
        local = _hub.fetch_file(release.repo_id, release.manifest)
    else:
        cached = huggingface_hub.try_to_load_from_cache(release.repo_id, release.manifest)
        local = cached if isinstance(cached, str) else None
    if local is None:
        return list(release.saes.values())
    with open(local, encoding="utf-8") as f:
        rows = read_manifest(f.read(), f"{release.repo_id}/{release.manifest}")
    with _LOCK:
        for row in rows:
            layer = int(row["layer"])
            if layer not in release.layers:
                continue
            sae = release.manifest_sae(
                layer, str(row["run_id"]), **({"l0": row["l0"]} if row.get("l0") is not None else {})
            )
            expected_path = release.path_template.format(layer=layer, run_id=row["run_id"])  # type: ignore[union-attr]
            if str(row["path"]) != expected_path:
                sae = replace(sae, path=str(row["path"]), hub_path=str(row["path"]))
            release.saes[sae.sae_id] = sae
        _reindex()
        directory = psd.get_pretrained_saes_directory()
        if name in directory and _is_ours(directory[name]):
            del directory[name]
        _inject(directory)
    return list(release.saes.values())
