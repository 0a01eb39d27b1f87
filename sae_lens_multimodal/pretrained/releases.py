"""The release table: releases of public vision/diffusion SAEs, as parsed from ``releases.yaml``.

A :class:`Release` is a set of SAEs of one source format for one model; a :class:`ReleaseSae` holds the
facts SAELens has no field for (hook name in our namespace, token policy, input kind, CFG branch,
normalisation...), checked against the metadata schema (core/sae_metadata.py). registry.py registers
releases with SAELens; listing.py prints them.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Optional

import yaml

from sae_lens_multimodal.core.sae_metadata import normalize_cfg_branch, normalize_input_kind, normalize_token_policy
from sae_lens_multimodal.pretrained._formats import FORMATS

__all__ = [
    "ReleaseSae",
    "Release",
    "FORMATS",
    "parse_release",
    "load_release_file",
    "read_manifest",
    "split_repo",
]

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
    token_policy: str  # core/sae_metadata.TOKEN_POLICIES: which tokens the SAE was trained on
    input_kind: str  # core/sae_metadata.INPUT_KINDS: which activation it reads
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
def split_repo(repo_id: str, path: str) -> tuple[str, str]:
    """(hub repo, path inside it): an organisation-level repo_id takes the repo name from the path."""
    if "/" in repo_id:
        return repo_id, path
    head, _, rest = path.partition("/")
    if not head:
        raise ValueError(f"Path {path!r} of organisation-level repo_id {repo_id!r} must start with the repo name.")
    return f"{repo_id}/{head}", rest


def _make_sae(release: Release, raw: Mapping[str, Any]) -> ReleaseSae:
    unknown = set(raw) - _SAE_KEYS
    if unknown:
        raise ValueError(f"Release {release.name!r}, SAE {raw.get('id')!r}: unknown keys {sorted(unknown)}.")
    for required in ("id", "path", "token_policy", "input_kind"):
        if raw.get(required) is None:
            raise ValueError(f"Release {release.name!r}, SAE {raw.get('id')!r}: {required!r} is required.")
    where = f"Release {release.name!r}, SAE {raw.get('id')!r}"
    token_policy = normalize_token_policy(raw["token_policy"], source=where)
    input_kind = normalize_input_kind(raw["input_kind"], source=where)
    cfg_branch = normalize_cfg_branch(raw.get("cfg_branch"), source=where)
    path = str(raw["path"])
    hub_repo, hub_path = split_repo(release.repo_id, path)
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
        token_policy=token_policy,
        input_kind=input_kind,
        cfg_branch=cfg_branch,
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
    if path is None:
        text = files("sae_lens_multimodal.pretrained").joinpath("releases.yaml").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(data, Mapping):
        raise ValueError("A release file must map release names to release specs.")
    return {name: parse_release(name, spec) for name, spec in data.items()}


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
