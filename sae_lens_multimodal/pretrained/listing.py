"""Listing the registered releases: :func:`list_releases` and the table it prints (``sae-lens-mm releases``)."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Optional

from sae_lens_multimodal.pretrained.registry import registered_releases
from sae_lens_multimodal.pretrained.releases import Release, ReleaseSae

__all__ = ["ReleaseTable", "list_releases"]

#: (header, attribute) of each SAE's row; release, model and format are said once per release.
_COLUMNS = (
    ("sae_id", "sae_id"), ("hook", "hook_name"), ("tokens", "token_policy"), ("input", "input_kind"),
    ("arch", "architecture"), ("L0", "l0"), ("var_expl", "variance_explained"),
)


def _cell(row: ReleaseSae, attr: str) -> str:
    value = getattr(row, attr)
    if value is None:
        return "-"
    if attr == "l0":
        return f"{value:g}"
    if attr == "variance_explained":
        return f"{value:.2f}"
    return str(value)


class ReleaseTable(list):
    """The rows (:class:`ReleaseSae`) of :func:`list_releases`; prints as one block per release (its model
    and format once, then a row per SAE; the hook column only where a hook differs from its SAE id), so
    that it fits in about 120 columns."""

    def to_text(self) -> str:
        groups: dict[str, list[ReleaseSae]] = {}
        for row in self:
            groups.setdefault(row.release, []).append(row)
        lines: list[str] = []
        for release, rows in groups.items():
            columns = [(h, a) for h, a in _COLUMNS if a != "hook_name" or any(r.hook_name != r.sae_id for r in rows)]
            headers = [h for h, _ in columns]
            cells = [[_cell(r, a) for _, a in columns] for r in rows]
            widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
            formats = sorted({_cell(r, "source_format") for r in rows})
            models = sorted({_cell(r, "model") for r in rows})
            if lines:
                lines.append("")
            lines.append(f"release {release} ({len(rows)} SAE{'s' if len(rows) != 1 else ''}, "
                         f"format {', '.join(formats)})")
            lines.append(f"  model {', '.join(models)}")
            lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
            lines.append("  " + "  ".join("-" * w for w in widths))
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
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
    releases = list(registered_releases().values())
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
