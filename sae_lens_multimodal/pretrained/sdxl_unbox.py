"""sdxl-unbox / SDLens SAEs (``surokpro2/sdxl-saes``, ``antoniomari/SAE_flux_18``) -> SAELens.

Source format (docs/releases.md, "sdxl-unbox"): a folder with ``config.json`` (``n_dirs_local`` = d_sae,
``d_model`` = d_in, ``k``, ``auxk``, ``dead_steps_threshold``), ``state_dict.pth`` =
``torch.save({"state_dict": {pre_bias (d_in), latent_bias (d_sae), stats_last_nonzero (d_sae, int64),
encoder.weight (d_sae,d_in), decoder.weight (d_in,d_sae)}})``, and optional ``mean.pt`` / ``std.pt``: per-latent
activation statistics (d_sae,) the demo uses as steering magnitudes (not input normalisation).

Math: ``z = encoder(x − pre_bias) + latent_bias``; keep the top-k, ReLU on the kept; ``x̂ = z·decoder.weightᵀ +
pre_bias``. SAELens ``topk`` exactly: ``W_enc = encoder.weightᵀ``, ``b_enc = latent_bias``, ``W_dec =
decoder.weightᵀ``, ``b_dec = pre_bias``, ``apply_b_dec_to_input=True``; ``stats_last_nonzero`` (a training
statistic) is dropped. The statistics files are recorded in ``metadata.latent_stats`` and read back with
:func:`load_latent_stats`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import torch

from sae_lens_multimodal.pretrained._common import ReleaseFormatError, build_cfg_dict, check_state_dict, join_path
from sae_lens_multimodal.pretrained._formats import register_format_loader
from sae_lens_multimodal.core.files import load_torch_weights
from sae_lens_multimodal.pretrained._hub import fetch_file, read_json
from sae_lens_multimodal.pretrained.registry import resolve
from sae_lens_multimodal.pretrained.releases import ReleaseSae

__all__ = ["convert_sdxl_unbox", "hook_from_folder", "load_latent_stats", "load_sae", "get_config"]

_FOLDER = re.compile(r"^(?:unet|transformer)\.(?P<module>[A-Za-z0-9_.]+?)_k\d+_hidden\d+")
_STAT_FILES = ("mean.pt", "std.pt")


def hook_from_folder(folder: str) -> Optional[str]:
    """Our hook for an sdxl-unbox folder name (``unet.<path>_k.._hidden..`` -> ``<path>.hook_update``)."""
    m = _FOLDER.match(folder.strip("/").split("/")[0])
    return f"{m['module']}.hook_update" if m else None


def convert_sdxl_unbox(
    config: Mapping[str, Any], checkpoint: Any, *, what: str = "sdxl-unbox SAE"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(cfg fields, SAELens state dict, facts)`` from ``config.json`` and the loaded ``state_dict.pth``."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        state = dict(checkpoint["state_dict"])
    else:
        raise ReleaseFormatError(f"{what}: expected torch.save({{'state_dict': ...}}), got {type(checkpoint).__name__}.")
    for key in ("n_dirs_local", "d_model", "k"):
        if not isinstance(config.get(key), int):
            raise ReleaseFormatError(f"{what}: config.json needs an integer {key!r}.")
    d_in, d_sae, k = config["d_model"], config["n_dirs_local"], config["k"]
    if not 0 < k <= d_sae:
        raise ReleaseFormatError(f"{what}: k={k} must be in 1..n_dirs_local={d_sae}.")
    check_state_dict(
        state,
        {"pre_bias": (d_in,), "latent_bias": (d_sae,), "encoder.weight": (d_sae, d_in), "decoder.weight": (d_in, d_sae)},
        what, ignored=("stats_last_nonzero",),
    )
    f32 = torch.float32
    sae_state = {
        "W_enc": state["encoder.weight"].detach().to(f32).T.contiguous(),
        "b_enc": state["latent_bias"].detach().to(f32).contiguous(),
        "W_dec": state["decoder.weight"].detach().to(f32).T.contiguous(),
        "b_dec": state["pre_bias"].detach().to(f32).contiguous(),
    }
    facts = {
        "source_format_version": "sdxl-unbox (config.json + state_dict.pth)",
        "source_config": dict(config),
    }
    fields = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True,
              "normalize_activations": "none", "extra": {"k": k, "rescale_acts_by_decoder_norm": False}}
    return fields, sae_state, facts


def _metadata(entry: Optional[ReleaseSae], facts: dict[str, Any], hub_path: str) -> dict[str, Any]:
    meta = entry.metadata() if entry is not None else {
        "source_format": "sdxl_unbox", "hook_name": hook_from_folder(hub_path), "input_kind": "residual_update",
        "token_policy": "all", "model_class_name": "HookedUNet",
    }
    meta.update(facts)
    return meta


def get_config(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """SAELens config getter (config.json only)."""
    hub_repo, hub_path, entry, _ = resolve(repo_id, folder_name)
    cfg_file = join_path(hub_path, "config.json")
    config = read_json(fetch_file(hub_repo, cfg_file, force_download=force_download), f"{hub_repo}/{cfg_file}")
    d_in, d_sae = config["d_model"], config["n_dirs_local"]
    fake = {"state_dict": {"pre_bias": torch.empty(d_in, device="meta"), "latent_bias": torch.empty(d_sae, device="meta"),
                           "encoder.weight": torch.empty(d_sae, d_in, device="meta"),
                           "decoder.weight": torch.empty(d_in, d_sae, device="meta")}}
    fields, _, facts = convert_sdxl_unbox(config, fake, what=f"{hub_repo}/{hub_path}")
    return build_cfg_dict(
        architecture=fields["architecture"], d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True,
        metadata=_metadata(entry, facts, hub_path), cfg_overrides=cfg_overrides, device=device, extra=fields["extra"],
    )


def load_sae(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens loader (``conversion_func: mm_sdxl_unbox``)."""
    hub_repo, hub_path, entry, _ = resolve(repo_id, folder_name)
    what = f"{hub_repo}/{hub_path or '.'}"
    cfg_file = join_path(hub_path, "config.json")
    config = read_json(fetch_file(hub_repo, cfg_file, force_download=force_download), f"{hub_repo}/{cfg_file}")
    weights_file = join_path(hub_path, "state_dict.pth")
    checkpoint = load_torch_weights(fetch_file(hub_repo, weights_file, force_download=force_download),
                                    what=f"{hub_repo}/{weights_file}")
    fields, sae_state, facts = convert_sdxl_unbox(config, checkpoint, what=what)
    stats: dict[str, Any] = {}
    for name in _STAT_FILES:
        path = join_path(hub_path, name)
        local = fetch_file(hub_repo, path, force_download=force_download, required=False)
        if local is None:
            continue
        tensor = load_torch_weights(local, what=f"{hub_repo}/{path}")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (fields["d_sae"],):
            raise ReleaseFormatError(
                f"{hub_repo}/{path} should be a tensor of shape ({fields['d_sae']},) (one value per latent), got "
                f"{getattr(tensor, 'shape', type(tensor).__name__)}."
            )
        stats[name.removesuffix(".pt")] = path
    if stats:
        facts["latent_stats"] = {
            "repo_id": hub_repo, "files": stats,
            "meaning": "per-latent activation statistics used by the sdxl-unbox demo as steering magnitudes; "
                       "not input normalisation (exact definition unverified)",
        }
    cfg = build_cfg_dict(
        architecture=fields["architecture"], d_in=fields["d_in"], d_sae=fields["d_sae"], apply_b_dec_to_input=True,
        metadata=_metadata(entry, facts, hub_path), cfg_overrides=cfg_overrides, device=device, extra=fields["extra"],
    )
    return cfg, {k: v.to(device) for k, v in sae_state.items()}, None


def load_latent_stats(sae: Any) -> dict[str, torch.Tensor]:
    """The per-latent ``mean``/``std`` tensors (d_sae,) shipped with an sdxl-unbox SAE (from the HF cache)."""
    info = sae.cfg.metadata.get("latent_stats")
    if not info:
        raise ValueError("This SAE has no latent statistics (metadata.latent_stats): its release ships no mean.pt/std.pt.")
    out = {}
    for name, path in info["files"].items():
        local = fetch_file(info["repo_id"], path)
        out[name] = load_torch_weights(local, what=f"{info['repo_id']}/{path}")
    return out


register_format_loader("sdxl_unbox", load_sae, get_config)
