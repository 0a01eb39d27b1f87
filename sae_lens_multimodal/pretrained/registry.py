"""The release directory: our YAML of public vision/diffusion SAE releases, injected into SAELens.

``SAE.from_pretrained(release, sae_id)`` looks ``release`` up in SAELens's
``get_pretrained_saes_directory()`` (a cached dict) and calls ``NAMED_PRETRAINED_SAE_LOADERS[conversion_func]``
with ``(repo_id, folder_name, ...)``. We add one ``PretrainedSAELookup`` per release and one loader per source
format (``mm_prisma``, ``mm_saev``, ``mm_sdxl_unbox``, ``mm_sparsify``). SAELens's directory function is
wrapped so that our releases come back after ``get_pretrained_saes_directory.cache_clear()``.

A loader only receives ``(repo_id, folder_name)``, so the per-SAE facts SAELens has no field for (hook name
in our namespace, token policy, input kind, CFG branch, normalisation...) are found again here by
``resolve(repo_id, folder_name)``.

Conventions of the YAML (``releases.yaml``):

* ``repo_id`` is a Hugging Face repo, or an organisation (no ``/``) when every SAE lives in its own repo;
  then each ``path`` starts with that repo's name (``<repo>/<file>``).
* ``path`` points at what the format's loader needs: the weights file (prisma: ``config.json`` sits
  beside it; saev: ``sae.pt``) or the SAE's folder (sdxl_unbox, sparsify; ``""`` = repo root).
* ``defaults`` hold facts shared by a release's SAEs; each SAE may override them. ``hook_name`` defaults to
  the SAE id.
* A ``manifest`` release (saev DINOv3) lists its runs in a ``manifest.jsonl`` on the hub: SAE ids are
  ``sae_id_template`` filled with a layer of ``layers`` and a run id of the manifest.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import Any, Callable, Optional

__all__ = [
    "ReleaseSae",
    "Release",
    "ReleaseTable",
    "TOKEN_POLICIES",
    "INPUT_KINDS",
    "FORMATS",
    "load_release_file",
    "register_release",
    "unregister_release",
    "register_releases",
    "get_release",
    "registered_releases",
    "resolve",
    "list_releases",
    "expand_manifest_release",
]

TOKEN_POLICIES = ("all", "cls", "patches")
INPUT_KINDS = ("block_output", "residual_update", "mlp_output")
#: source format -> SAELens loader name
FORMATS = {
    "prisma": "mm_prisma",
    "saev": "mm_saev",
    "sdxl_unbox": "mm_sdxl_unbox",
    "sparsify": "mm_sparsify",
    "bundled": "mm_bundled",  # SAEs shipped inside a package (pretrained/bundled.py)
}
_SAE_KEYS = {
    "id", "path", "hook_name", "token_policy", "input_kind", "cfg_branch", "architecture", "d_in", "d_sae",
    "k", "l0", "variance_explained", "normalization", "notes", "unverified", "guidance_scale", "timesteps",
    "source_model", "context_size",
}
_RELEASE_KEYS = {
    "format", "repo_id", "model", "model_class_name", "description", "defaults", "saes", "manifest",
    "layers", "sae_id_template", "hook_name_template", "path_template", "regenerate",
}


@dataclass(frozen=True)
class ReleaseSae:
    """One SAE of a release, with the facts needed to use it on OUR hooked models."""

    release: str
    sae_id: str
    path: str  # as in SAELens's saes_map: relative to the release's repo_id (or organisation)
    hub_repo: str  # the Hugging Face repo holding the files
    hub_path: str  # path inside hub_repo
    source_format: str
    model: str  # a name our HookedViT / HookedUNet / HookedDiT .from_pretrained accepts
    model_class_name: str
    hook_name: str  # in our namespace
    token_policy: str  # "all" | "cls" | "patches": which tokens the SAE was trained on
    input_kind: str  # "block_output" | "residual_update" | "mlp_output"
    cfg_branch: Optional[str] = None  # diffusion: "cond" (CFG off or conditional half), "uncond"
    architecture: Optional[str] = None  # expected SAELens architecture (the file decides)
    d_in: Optional[int] = None
    d_sae: Optional[int] = None
    k: Optional[int] = None
    l0: Optional[float] = None  # published average L0 (None = not published)
    variance_explained: Optional[float] = None  # published, as a fraction
    normalization: Mapping[str, Any] = field(default_factory=lambda: {"kind": "none"})
    guidance_scale: Optional[float] = None
    timesteps: Optional[str] = None
    source_model: Optional[str] = None  # the model as the authors named it
    context_size: Optional[int] = None
    notes: Optional[str] = None
    unverified: tuple[str, ...] = ()

    def metadata(self) -> dict[str, Any]:
        """The facts a converter puts into ``cfg_dict["metadata"]`` (JSON-serialisable)."""
        meta: dict[str, Any] = {
            "model_name": self.model,
            "model_class_name": self.model_class_name,
            "hook_name": self.hook_name,
            "token_policy": self.token_policy,
            "input_kind": self.input_kind,
            "cfg_branch": self.cfg_branch,
            "normalization": dict(self.normalization),
            "source_format": self.source_format,
            "release": self.release,
            "sae_id": self.sae_id,
            "repo_id": self.hub_repo,
            "repo_path": self.hub_path,
            "expected_l0": self.l0,
            "expected_variance_explained": self.variance_explained,
        }
        optional = {
            "guidance_scale": self.guidance_scale,
            "timesteps": self.timesteps,
            "source_model": self.source_model,
            "context_size": self.context_size,
            "release_notes": self.notes,
            "unverified": list(self.unverified) or None,
        }
        meta.update({k: v for k, v in optional.items() if v is not None})
        return meta


@dataclass
class Release:
    """A release: a set of SAEs of one format for one model."""

    name: str
    source_format: str
    repo_id: str
    model: str
    model_class_name: str
    description: str
    saes: dict[str, ReleaseSae]
    manifest: Optional[str] = None  # manifest file in the repo (saev DINOv3 layout)
    layers: tuple[int, ...] = ()
    sae_id_template: Optional[str] = None
    hook_name_template: Optional[str] = None
    path_template: Optional[str] = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    regenerate: Optional[str] = None  # command that rebuilds a bundled release's files (named in errors)

    @property
    def conversion_func(self) -> str:
        return FORMATS[self.source_format]

    def manifest_sae(self, layer: int, run_id: str, **facts: Any) -> ReleaseSae:
        """The SAE of a manifest release for one run (facts from the template and ``defaults``)."""
        assert self.sae_id_template and self.path_template and self.hook_name_template
        sae_id = self.sae_id_template.format(layer=layer, run_id=run_id)
        raw = {**self.defaults, **facts, "id": sae_id, "path": self.path_template.format(layer=layer, run_id=run_id),
               "hook_name": self.hook_name_template.format(layer=layer)}
        return _make_sae(self, raw)

    def parse_manifest_id(self, sae_id: str) -> Optional[tuple[int, str]]:
        """(layer, run_id) if ``sae_id`` has this manifest release's id form and a listed layer."""
        if not self.sae_id_template:
            return None
        pattern = re.escape(self.sae_id_template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(
            r"\{run_id\}", r"(?P<run_id>[A-Za-z0-9_\-]+)"
        )
        m = re.fullmatch(pattern, sae_id)
        if not m or int(m["layer"]) not in self.layers:
            return None
        return int(m["layer"]), m["run_id"]


# ----------------------------------------------------------------------------------------- parsing
def _split_repo(repo_id: str, path: str) -> tuple[str, str]:
    """(hub repo, path inside it): an organisation-level repo_id takes the repo name from the path."""
    if "/" in repo_id:
        return repo_id, path
    head, _, rest = path.partition("/")
    if not head:
        raise ValueError(f"Path {path!r} of organisation-level repo_id {repo_id!r} must start with the repo name.")
    return f"{repo_id}/{head}", rest


def _check_choice(release: str, key: str, value: Any, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ValueError(f"Release {release!r}: {key}={value!r} is not one of {tuple(choices)}.")


def _make_sae(release: Release, raw: Mapping[str, Any]) -> ReleaseSae:
    unknown = set(raw) - _SAE_KEYS
    if unknown:
        raise ValueError(f"Release {release.name!r}, SAE {raw.get('id')!r}: unknown keys {sorted(unknown)}.")
    for required in ("id", "path", "token_policy", "input_kind"):
        if raw.get(required) is None:
            raise ValueError(f"Release {release.name!r}, SAE {raw.get('id')!r}: {required!r} is required.")
    _check_choice(release.name, "token_policy", raw["token_policy"], TOKEN_POLICIES)
    _check_choice(release.name, "input_kind", raw["input_kind"], INPUT_KINDS)
    path = str(raw["path"])
    hub_repo, hub_path = _split_repo(release.repo_id, path)
    normalization = raw.get("normalization") or {"kind": "none"}
    if not isinstance(normalization, Mapping) or "kind" not in normalization:
        raise ValueError(f"Release {release.name!r}: normalization must be a mapping with a 'kind'.")
    return ReleaseSae(
        release=release.name,
        sae_id=str(raw["id"]),
        path=path,
        hub_repo=hub_repo,
        hub_path=hub_path,
        source_format=release.source_format,
        model=release.model,
        model_class_name=release.model_class_name,
        hook_name=str(raw.get("hook_name") or raw["id"]),
        token_policy=raw["token_policy"],
        input_kind=raw["input_kind"],
        cfg_branch=raw.get("cfg_branch"),
        architecture=raw.get("architecture"),
        d_in=raw.get("d_in"),
        d_sae=raw.get("d_sae"),
        k=raw.get("k"),
        l0=None if raw.get("l0") is None else float(raw["l0"]),
        variance_explained=None if raw.get("variance_explained") is None else float(raw["variance_explained"]),
        normalization=dict(normalization),
        guidance_scale=raw.get("guidance_scale"),
        timesteps=raw.get("timesteps"),
        source_model=raw.get("source_model"),
        context_size=raw.get("context_size"),
        notes=raw.get("notes"),
        unverified=tuple(raw.get("unverified") or ()),
    )


def parse_release(name: str, spec: Mapping[str, Any]) -> Release:
    """Validate one release's YAML mapping and build its :class:`Release`."""
    unknown = set(spec) - _RELEASE_KEYS
    if unknown:
        raise ValueError(f"Release {name!r}: unknown keys {sorted(unknown)}.")
    for required in ("format", "repo_id", "model", "model_class_name"):
        if not spec.get(required):
            raise ValueError(f"Release {name!r}: {required!r} is required.")
    if spec["format"] not in FORMATS:
        raise ValueError(f"Release {name!r}: format {spec['format']!r} is not one of {sorted(FORMATS)}.")
    defaults = dict(spec.get("defaults") or {})
    release = Release(
        name=name,
        source_format=spec["format"],
        repo_id=spec["repo_id"],
        model=spec["model"],
        model_class_name=spec["model_class_name"],
        description=str(spec.get("description") or "").strip(),
        saes={},
        manifest=spec.get("manifest"),
        layers=tuple(int(x) for x in spec.get("layers") or ()),
        sae_id_template=spec.get("sae_id_template"),
        hook_name_template=spec.get("hook_name_template"),
        path_template=spec.get("path_template"),
        defaults=defaults,
        regenerate=spec.get("regenerate"),
    )
    if release.manifest:
        missing = [k for k in ("layers", "sae_id_template", "hook_name_template", "path_template") if not spec.get(k)]
        if missing:
            raise ValueError(f"Release {name!r}: a manifest release needs {missing}.")
    elif not spec.get("saes"):
        raise ValueError(f"Release {name!r}: 'saes' (a list of SAEs) is required.")
    for raw in spec.get("saes") or ():
        sae = _make_sae(release, {**defaults, **raw})
        if sae.sae_id in release.saes:
            raise ValueError(f"Release {name!r}: SAE id {sae.sae_id!r} appears twice.")
        release.saes[sae.sae_id] = sae
    return release


def load_release_file(path: Any = None) -> dict[str, Release]:
    """Parse a release YAML (default: the one shipped in this package)."""
    import yaml

    if path is None:
        text = files("sae_lens_multimodal.pretrained").joinpath("releases.yaml").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(data, Mapping):
        raise ValueError("A release file must map release names to release specs.")
    return {name: parse_release(name, spec) for name, spec in data.items()}


# ----------------------------------------------------------------------------------------- registry
_LOCK = threading.RLock()
_RELEASES: dict[str, Release] = {}
#: (lookup repo_id, path) -> ReleaseSae, for the loaders (SAELens only passes these two).
_BY_LOCATION: dict[tuple[str, str], ReleaseSae] = {}
_SHIPPED_LOADED = False
_ORIGINAL_ATTR = "_sae_lens_multimodal_original"
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
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

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
    from sae_lens.loading import pretrained_saes_directory as psd

    directory = psd.get_pretrained_saes_directory()
    if name in directory and _is_ours(directory[name]):
        del directory[name]


def _install_directory_hook() -> None:
    """Wrap SAELens's cached ``get_pretrained_saes_directory`` so every call returns our releases too.

    Modules that imported the function by name (``sae_lens.saes.sae``, the loaders, evals) are re-pointed
    at the wrapper; ``cache_clear``/``cache_info`` still reach SAELens's cache.
    """
    from sae_lens.loading import pretrained_saes_directory as psd

    current = psd.get_pretrained_saes_directory
    original = getattr(current, _ORIGINAL_ATTR, current)

    if getattr(current, _ORIGINAL_ATTR, None) is None:

        def get_pretrained_saes_directory() -> dict[str, Any]:
            directory = original()
            # Look the registry up by module name so a reloaded registry module is the one injected.
            sys.modules[__name__]._inject(directory)
            return directory

        get_pretrained_saes_directory.__doc__ = original.__doc__
        get_pretrained_saes_directory.cache_clear = original.cache_clear  # type: ignore[attr-defined]
        get_pretrained_saes_directory.cache_info = original.cache_info  # type: ignore[attr-defined]
        setattr(get_pretrained_saes_directory, _ORIGINAL_ATTR, original)
        wrapper: Callable[[], dict[str, Any]] = get_pretrained_saes_directory
    else:
        wrapper = current
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("sae_lens") or module is None:
            continue
        bound = getattr(module, "get_pretrained_saes_directory", None)
        if bound is original or (bound is not None and bound is not wrapper and getattr(bound, _ORIGINAL_ATTR, None)):
            setattr(module, "get_pretrained_saes_directory", wrapper)
    psd.get_pretrained_saes_directory = wrapper  # type: ignore[assignment]


def _register_loaders() -> None:
    from sae_lens.loading import pretrained_sae_loaders as psl

    from sae_lens_multimodal.pretrained import bundled, prisma, saev, sdxl_unbox, sparsify

    for module, name in ((prisma, "mm_prisma"), (saev, "mm_saev"), (sdxl_unbox, "mm_sdxl_unbox"),
                         (sparsify, "mm_sparsify"), (bundled, "mm_bundled")):
        psl.NAMED_PRETRAINED_SAE_LOADERS[name] = module.load_sae  # type: ignore[assignment]
        psl.NAMED_PRETRAINED_SAE_CONFIG_GETTERS[name] = module.get_config  # type: ignore[assignment]


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
        _install_directory_hook()
        if release.manifest:
            expand_manifest_release(name, download=False)
        from sae_lens.loading import pretrained_saes_directory as psd

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
        _install_directory_hook()
        from sae_lens.loading import pretrained_saes_directory as psd

        _inject(psd.get_pretrained_saes_directory())


def registered_releases() -> dict[str, Release]:
    """Our registered releases by name (a copy)."""
    with _LOCK:
        return dict(_RELEASES)


def get_release(name: str) -> Release:
    with _LOCK:
        if name not in _RELEASES:
            import difflib

            close = difflib.get_close_matches(name, list(_RELEASES), n=3)
            raise KeyError(f"No multimodal release {name!r}." + (f" Did you mean {close}?" if close else ""))
        return _RELEASES[name]


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
    hub_repo, hub_path = _split_repo(repo_id, folder_name)
    return hub_repo, hub_path, None, release


# ----------------------------------------------------------------------------------------- manifests
def read_manifest(text: str, what: str) -> list[dict[str, Any]]:
    """Parse a saev ``manifest.jsonl`` (one JSON object per line)."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{what}, line {i}: not JSON ({e}).") from e
        missing = [k for k in ("run_id", "layer", "path") if k not in row]
        if missing:
            raise ValueError(f"{what}, line {i}: missing {missing} (a manifest row has run_id, layer, l0, mse, sha256, path).")
        rows.append(row)
    return rows


def expand_manifest_release(name: str, *, download: bool = True) -> list[ReleaseSae]:
    """List the runs of a manifest release (saev DINOv3) and add them to its SAE ids.

    Reads ``manifest.jsonl`` from the local Hugging Face cache, or downloads it when ``download`` and not
    offline. Without the manifest (and ``download=False``) returns the runs already known.
    """
    from sae_lens_multimodal.pretrained._hub import fetch_file

    release = get_release(name)
    if not release.manifest:
        raise ValueError(f"Release {name!r} has no manifest.")
    local: Optional[str]
    if download:
        local = fetch_file(release.repo_id, release.manifest)
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(release.repo_id, release.manifest)
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
        from sae_lens.loading import pretrained_saes_directory as psd

        directory = psd.get_pretrained_saes_directory()
        if name in directory and _is_ours(directory[name]):
            del directory[name]
        _inject(directory)
    return list(release.saes.values())


# ----------------------------------------------------------------------------------------- listing
_COLUMNS = (
    ("release", "release"), ("sae_id", "sae_id"), ("model", "model"), ("hook", "hook_name"),
    ("tokens", "token_policy"), ("input", "input_kind"), ("arch", "architecture"), ("L0", "l0"),
    ("var_expl", "variance_explained"), ("format", "source_format"),
)


class ReleaseTable(list):
    """The rows (:class:`ReleaseSae`) of :func:`list_releases`; prints as a table."""

    def to_text(self) -> str:
        def cell(row: ReleaseSae, attr: str) -> str:
            value = getattr(row, attr)
            if value is None:
                return "-"
            if attr == "l0":
                return f"{value:g}"
            if attr == "variance_explained":
                return f"{value:.2f}"
            return str(value)

        headers = [h for h, _ in _COLUMNS]
        cells = [[cell(r, a) for _, a in _COLUMNS] for r in self]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.append(f"({len(self)} SAEs)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()


def _pattern_rows(release: Release) -> list[ReleaseSae]:
    """One placeholder row per layer of a manifest release whose runs are not known yet."""
    known_layers = {s.hook_name for s in release.saes.values()}
    rows = []
    for layer in release.layers:
        hook = release.hook_name_template.format(layer=layer)  # type: ignore[union-attr]
        if hook in known_layers:
            continue
        template = release.manifest_sae(layer, "RUN")
        rows.append(replace(
            template,
            sae_id=release.sae_id_template.format(layer=layer, run_id="<run_id>"),  # type: ignore[union-attr]
            path=release.path_template.format(layer=layer, run_id="<run_id>"),  # type: ignore[union-attr]
        ))
    return rows


def list_releases(model: Optional[str] = None, hook: Optional[str] = None, release: Optional[str] = None) -> ReleaseTable:
    """The registered multimodal SAEs, optionally filtered; prints as a table.

    ``model``: case-insensitive substring of the model name (e.g. ``"sdxl"``, ``"CLIP-ViT-B-32"``).
    ``hook``: a hook name, a substring of one, or a glob (``"blocks.*.hook_resid_post"``).
    ``release``: substring of the release name. Manifest releases whose run list has not been read yet
    show one ``.../<run_id>`` row per layer (see :func:`expand_manifest_release`).
    """
    import fnmatch

    with _LOCK:
        releases = list(_RELEASES.values())
    rows: list[ReleaseSae] = []
    for rel in releases:
        if release and release.lower() not in rel.name.lower():
            continue
        if model and model.lower() not in rel.model.lower():
            continue
        candidates = list(rel.saes.values())
        if rel.manifest:
            candidates += _pattern_rows(rel)
        for sae in candidates:
            if hook and not (hook in sae.hook_name or fnmatch.fnmatchcase(sae.hook_name, hook)):
                continue
            rows.append(sae)
    return ReleaseTable(rows)
