"""saev SAEs (OSU-NLP-Group/saev; HF ``osunlp/SAE_*``) -> SAELens.

Source format (docs/releases.md, "saev"): ``sae.pt`` = one UTF-8 JSON header line ending in ``\\n``, then the
bytes of ``torch.save(state_dict)``. Header schemas: none (flat cfg, <= Apr 2025), 1 (1A: ``cls`` names the
activation, ``cfg.top_k``; 1B: ``cls "SparseAutoencoderConfig"``, ``cfg.activation``), 2-5 (``cfg.activation =
{"cls", "params"}``; ``d_vit``/``d_model``; ``exp_factor`` or, from 4, ``d_sae``).

Math: ``h = (x − b_dec)·W_enc + b_enc`` for files without schema and schema 1 (how they were trained), and
``h = x·W_enc + b_enc`` from schema 2 on; ReLU: ``relu(h)``; TopK: top-k of ``h`` (no ReLU); BatchTopK with a
stored ``activation.threshold`` θ: ``h·(h > θ)``; ``x̂ = f·W_dec + b_dec``.

SAELens: ReLU -> ``standard``; TopK -> ``topk`` (SAELens also ReLUs the kept values: identical unless fewer than
k pre-activations are positive, recorded in ``metadata.deviations``); BatchTopK with θ > 0 -> ``jumprelu``
(threshold filled with θ; exact), θ <= 0 -> ``standard``; BatchTopK without θ -> ``topk``.
``apply_b_dec_to_input`` = True for no-schema / schema-1 files, False from schema 2.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from sae_lens_multimodal.pretrained._common import ReleaseFormatError, build_cfg_dict, check_state_dict
from sae_lens_multimodal.pretrained._formats import register_format_loader
from sae_lens_multimodal.core.files import load_torch_weights
from sae_lens_multimodal.pretrained._hub import fetch_file, read_json
from sae_lens_multimodal.pretrained.registry import registered_releases, resolve
from sae_lens_multimodal.pretrained.releases import Release, ReleaseSae, read_manifest

__all__ = [
    "SaevHeader",
    "parse_saev_header",
    "read_saev_file",
    "convert_saev",
    "fold_saev_normalization",
    "load_sae",
    "get_config",
]

SUPPORTED_SCHEMAS = (None, 1, 2, 3, 4, 5)


class SaevHeader:
    """The parts of a saev header that decide the math."""

    def __init__(self, schema: Optional[int], d_in: int, d_sae: int, activation: str, top_k: Optional[int],
                 params: dict[str, Any], raw: dict[str, Any]):
        self.schema = schema
        self.d_in = d_in
        self.d_sae = d_sae
        self.activation = activation  # "Relu" | "TopK" | "BatchTopK"
        self.top_k = top_k
        self.params = params
        self.raw = raw

    @property
    def subtracts_b_dec(self) -> bool:
        """Files from before 2025-07-31 (no schema, schema 1) were trained on ``x − b_dec``."""
        return self.schema is None or self.schema == 1

    @property
    def era(self) -> str:
        return "no schema (<= Apr 2025)" if self.schema is None else f"schema {self.schema}"


def _activation_name(value: Any, what: str) -> str:
    name = re.sub(r"[^a-z]", "", str(value).lower())
    for canonical in ("BatchTopK", "TopK", "Relu"):
        if name == canonical.lower():
            return canonical
    raise ReleaseFormatError(f"{what}: unknown activation {value!r} (supported: Relu, TopK, BatchTopK).")


def parse_saev_header(header: Mapping[str, Any], what: str = "saev header") -> SaevHeader:
    """Interpret any documented header schema."""
    schema = header.get("schema")
    if schema not in SUPPORTED_SCHEMAS:
        raise ReleaseFormatError(
            f"{what}: header schema {schema!r} is not supported (supported: none, 1-5). It may be newer than "
            "this converter; please report it."
        )
    if schema is None:
        cfg: Mapping[str, Any] = header
        activation: dict[str, Any] = {"cls": "Relu", "params": {}}
    else:
        cfg = header.get("cfg") or {}
        if not isinstance(cfg, Mapping):
            raise ReleaseFormatError(f"{what}: 'cfg' must be an object.")
        if schema == 1 and header.get("cls") != "SparseAutoencoderConfig":  # schema 1A
            activation = {"cls": header.get("cls", "Relu"), "params": {"top_k": cfg.get("top_k")}}
        else:  # schema 1B and 2-5
            activation = dict(cfg.get("activation") or {"cls": "Relu", "params": {}})
    params = dict(activation.get("params") or {})
    if "kind" in params and "key" not in params:  # legacy spelling
        params["key"] = params.pop("kind")
    act = _activation_name(activation.get("cls"), what)
    d_in = cfg.get("d_model", cfg.get("d_vit"))
    if not isinstance(d_in, int):
        raise ReleaseFormatError(f"{what}: header has no integer 'd_model'/'d_vit'.")
    if cfg.get("d_sae") is not None:
        d_sae = int(cfg["d_sae"])
    elif cfg.get("exp_factor") is not None:
        d_sae = d_in * int(cfg["exp_factor"])
    else:
        raise ReleaseFormatError(f"{what}: header has neither 'd_sae' nor 'exp_factor'.")
    top_k = params.get("top_k", cfg.get("top_k"))
    if act in ("TopK", "BatchTopK") and not isinstance(top_k, int):
        raise ReleaseFormatError(f"{what}: activation {act} needs an integer top_k, got {top_k!r}.")
    return SaevHeader(schema, d_in, d_sae, act, top_k if act != "Relu" else None, params, dict(header))


def read_saev_file(data: Union[bytes, str], what: str = "sae.pt") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON header, state dict) of a saev ``sae.pt`` (bytes or a path); the tensors load weights-only."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            data = f.read()
    newline = data.find(b"\n")
    if newline < 0 or data[:2] == b"PK":
        raise ReleaseFormatError(
            f"{what} does not start with saev's JSON header line (a torch zip without header was given?)."
        )
    try:
        header = json.loads(data[:newline].decode("utf-8"))
    except ValueError as e:
        raise ReleaseFormatError(f"{what}: the first line is not a JSON header ({e}).") from e
    if not isinstance(header, dict):
        raise ReleaseFormatError(f"{what}: the header line must be a JSON object.")
    state = load_torch_weights(data[newline + 1:], what=what)
    if not isinstance(state, Mapping):
        raise ReleaseFormatError(f"{what}: expected a state dict after the header, got {type(state).__name__}.")
    return header, dict(state)


def convert_saev(
    header: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, what: str = "saev sae.pt"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a saev header + state dict: ``(cfg fields, SAELens state dict, facts for metadata)``."""
    h = parse_saev_header(header, what)
    d_in, d_sae = h.d_in, h.d_sae
    optional = ("activation.threshold",) if h.activation == "BatchTopK" else ()
    check_state_dict(
        dict(state), {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        what, optional=optional,
    )
    sae_state = {k: state[k].detach().to(torch.float32).contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    deviations: list[str] = []
    extra: dict[str, Any] = {}
    threshold: Optional[float] = None
    if h.activation == "Relu":
        arch = "standard"
    elif h.activation == "TopK" or (h.activation == "BatchTopK" and "activation.threshold" not in state):
        arch = "topk"
        extra = {"k": h.top_k, "rescale_acts_by_decoder_norm": False}
        deviations.append(
            "saev TopK keeps the top-k pre-activations without ReLU; SAELens topk also ReLUs them, so the two "
            "differ only on tokens with fewer than k positive pre-activations."
        )
    else:
        t = state["activation.threshold"]
        if t.numel() != 1:
            raise ReleaseFormatError(f"{what}: activation.threshold should be a scalar, has shape {tuple(t.shape)}.")
        threshold = float(t.reshape(()))
        if threshold > 0:
            arch = "jumprelu"
            sae_state["threshold"] = torch.full((d_sae,), threshold, dtype=torch.float32)
        else:
            arch = "standard"  # release-formats: a threshold <= 0 acts as a plain ReLU
    facts: dict[str, Any] = {
        "source_format_version": h.era,
        "activation": h.activation,
        "b_dec_subtracted_in_encoder": h.subtracts_b_dec,
        "source_config": h.raw.get("cfg", h.raw) if h.schema is not None else h.raw,
    }
    if h.top_k is not None:
        facts["top_k"] = h.top_k
    if threshold is not None:
        facts["batch_topk_threshold"] = threshold
    for key in ("commit", "lib"):
        if key in h.raw:
            facts[f"saev_{key}"] = h.raw[key]
    if deviations:
        facts["deviations"] = deviations
    fields = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": h.subtracts_b_dec,
              "normalize_activations": "none", "extra": extra}
    return fields, sae_state, facts


@torch.no_grad()
def fold_saev_normalization(sae: Any, mean: torch.Tensor, scale: Union[float, torch.Tensor]) -> Any:
    """Fold saev's input normalisation ``x' = (x − mean)/scale`` into a loaded SAE, in place.

    SAE-V releases (CLIP, DINOv2, BioCLIP) were trained on normalised activations whose ``mean`` (d_in,)
    and ``scale`` (scalar ``s = E‖x − μ‖₂/√d_in``, or per-dimension) are not stored in ``sae.pt``; compute them
    from your own activations the way saev does, then call this so the SAE reads raw activations:
    ``W_enc/s``, ``s·W_dec``, ``b_dec' = s·b_dec + μ`` (and ``b_enc' = b_enc − μ·W_enc/s`` when the encoder does
    not subtract ``b_dec``). saev's ``clamp(x, ±1e5)`` before normalising is not reproduced.
    """
    d_in = sae.cfg.d_in
    mean = torch.as_tensor(mean, dtype=sae.W_enc.dtype, device=sae.W_enc.device).reshape(-1)
    scale_t = torch.as_tensor(scale, dtype=sae.W_enc.dtype, device=sae.W_enc.device).reshape(-1)
    if mean.numel() != d_in or scale_t.numel() not in (1, d_in):
        raise ValueError(f"mean must have {d_in} values and scale 1 or {d_in}; got {mean.numel()} and {scale_t.numel()}.")
    if (scale_t <= 0).any():
        raise ValueError("scale must be positive.")
    if getattr(sae.cfg, "normalize_activations", "none") != "none":
        raise ValueError("This SAE already normalises its input; fold saev's normalisation only into a plain SAE.")
    s_col = scale_t.reshape(-1, 1) if scale_t.numel() == d_in else scale_t
    s_row = scale_t.reshape(1, -1) if scale_t.numel() == d_in else scale_t
    W_enc = sae.W_enc / s_col
    if not sae.cfg.apply_b_dec_to_input:
        sae.b_enc.sub_(mean @ W_enc)
    sae.W_enc.copy_(W_enc)
    sae.W_dec.mul_(s_row)
    sae.b_dec.copy_(sae.b_dec * scale_t + mean)
    norm = dict(sae.cfg.metadata.get("normalization") or {})
    norm.update({"kind": "saev_mean_scale", "status": "folded into the weights",
                 "scale": scale_t.tolist() if scale_t.numel() == 1 else "per-dimension",
                 "mean_norm": float(mean.norm())})
    sae.cfg.metadata["normalization"] = norm
    return sae


# ----------------------------------------------------------------------------------------- loaders
def _manifest_row(release: Release, hub_path: str, force_download: bool) -> dict[str, Any]:
    assert release.manifest
    local = fetch_file(release.repo_id, release.manifest, force_download=force_download)
    with open(local, encoding="utf-8") as f:
        rows = read_manifest(f.read(), f"{release.repo_id}/{release.manifest}")
    for row in rows:
        if str(row["path"]) == hub_path:
            return row
    listed = [f"layer {r['layer']}: {r['run_id']} (l0 {r.get('l0')})" for r in rows]
    raise ReleaseFormatError(
        f"{release.repo_id}/{release.manifest} lists no SAE at {hub_path!r}. Runs in the manifest: "
        f"{'; '.join(listed) or 'none'}."
    )


def _entry_and_row(repo_id: str, folder_name: str, force_download: bool) -> tuple[str, str, Optional[ReleaseSae], Optional[dict[str, Any]]]:
    hub_repo, hub_path, entry, manifest_release = resolve(repo_id, folder_name)
    row = None
    if manifest_release is not None or (entry is not None and entry.release and _manifest_of(entry)):
        release = manifest_release or _manifest_of(entry)  # type: ignore[arg-type]
        assert release is not None
        row = _manifest_row(release, hub_path, force_download)
        if entry is None:
            entry = release.manifest_sae(int(row["layer"]), str(row["run_id"]),
                                         **({"l0": row["l0"]} if row.get("l0") is not None else {}))
    return hub_repo, hub_path, entry, row


def _manifest_of(entry: Optional[ReleaseSae]) -> Optional[Release]:
    if entry is None:
        return None
    release = registered_releases().get(entry.release)
    return release if release is not None and release.manifest else None


def _metadata(entry: Optional[ReleaseSae], facts: dict[str, Any], row: Optional[dict[str, Any]]) -> dict[str, Any]:
    meta = entry.metadata() if entry is not None else {"source_format": "saev"}
    meta.update(facts)
    if row is not None:
        meta["manifest"] = {k: row[k] for k in ("run_id", "layer", "l0", "mse", "sha256") if k in row}
        if row.get("l0") is not None:
            meta["expected_l0"] = float(row["l0"])
    if entry is None:
        meta["hook_name"] = None  # sae.pt does not say where it was trained: set cfg.metadata.hook_name
    meta.setdefault("model_class_name", "HookedViT")
    return meta


def get_config(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """SAELens config getter (reads sae.pt: its header is inside the weights file)."""
    return load_sae(repo_id, folder_name, device, force_download, cfg_overrides)[0]


def load_sae(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens loader (``conversion_func: mm_saev``)."""
    hub_repo, hub_path, entry, row = _entry_and_row(repo_id, folder_name, force_download)
    if not hub_path.endswith(".pt"):
        hub_path = f"{hub_path.rstrip('/')}/sae.pt" if hub_path.strip("/") else "sae.pt"
    what = f"{hub_repo}/{hub_path}"
    local = fetch_file(hub_repo, hub_path, force_download=force_download)
    with open(local, "rb") as f:
        data = f.read()
    if row is not None and row.get("sha256"):
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            raise ReleaseFormatError(
                f"{what}: sha256 {digest} does not match the manifest's {row['sha256']} (corrupt or partial download; "
                f"re-download it with `huggingface-cli download {hub_repo} {hub_path} --force-download`)."
            )
    header, state = read_saev_file(data, what)
    fields, sae_state, facts = convert_saev(header, state, what=what)
    if entry is not None and entry.d_in is not None and entry.d_in != fields["d_in"]:
        raise ReleaseFormatError(
            f"{what}: the release directory says d_in={entry.d_in} but the header says {fields['d_in']}."
        )
    cfg = build_cfg_dict(
        architecture=fields["architecture"], d_in=fields["d_in"], d_sae=fields["d_sae"],
        apply_b_dec_to_input=fields["apply_b_dec_to_input"], normalize_activations="none",
        metadata=_metadata(entry, facts, row), cfg_overrides=cfg_overrides, device=device, extra=fields["extra"],
    )
    return cfg, {k: v.to(device) for k, v in sae_state.items()}, None


def read_saev_config_json(repo_id: str, path: str = "config.json") -> Optional[dict[str, Any]]:
    """The training ``config.json`` some saev repos carry beside ``sae.pt`` (None if absent)."""
    local = fetch_file(repo_id, path, required=False)
    return None if local is None else read_json(local, f"{repo_id}/{path}")


register_format_loader("saev", load_sae, get_config)
