"""EleutherAI sparsify-format SAEs (SAeUron: ``bcywinski/SAeUron``) -> SAELens.

Source format (docs/releases.md, "sparsify / SAeUron"): one folder per hookpoint holding ``cfg.json``
(``expansion_factor``, ``num_latents`` (0 = d_in·expansion_factor), ``k``, ``d_in``, ``normalize_decoder``,
``multi_topk``, ``skip_connection``, ``transcode``, ``activation``; SAeUron adds ``batch_topk``, ``sample_topk``,
``input_unit_norm``) and ``sae.safetensors`` (``encoder.weight (d_sae,d_in)``, ``encoder.bias``, ``W_dec
(d_sae,d_in)``, ``b_dec``, ``W_skip (d_in,d_in)`` with a skip connection).

Math: ``pre = ReLU(encoder(x − b_dec))`` (no subtraction for transcoders); keep the top-k per token;
``x̂ = acts·W_dec + b_dec``; SAeUron ``input_unit_norm``: per-token ``(x − mean)/(std_unbiased + 1e-5)``, inverted
on output. SAeUron's own loader forces per-token TopK at inference (``batch_topk``/``sample_topk`` off).

SAELens ``topk`` exactly (ReLU-then-TopK = TopK-then-ReLU): ``W_enc = encoder.weightᵀ``, ``b_enc =
encoder.bias``, ``W_dec``, ``b_dec``, ``apply_b_dec_to_input = not transcode``, ``normalize_activations =
"layer_norm"`` iff ``input_unit_norm``. A ``W_skip`` has no slot in an SAELens SAE and is refused.

(SAELens's own ``sparsify`` loader rejects diffusers hookpoints and mis-handles ``num_latents: 0``, the ``W_dec``
orientation and ``apply_b_dec_to_input``, hence this converter.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from sae_lens_multimodal.core.files import load_safetensors
from sae_lens_multimodal.pretrained._common import ReleaseFormatError, build_cfg_dict, check_state_dict, join_path
from sae_lens_multimodal.pretrained._formats import register_format_loader
from sae_lens_multimodal.pretrained._hub import fetch_file, read_json
from sae_lens_multimodal.pretrained.registry import resolve
from sae_lens_multimodal.pretrained.releases import ReleaseSae

__all__ = ["convert_sparsify", "hook_from_folder", "load_sae", "get_config"]


def hook_from_folder(folder: str) -> Optional[str]:
    """Our hook for a diffusers hookpoint folder (``[coco/]unet.<path>`` -> ``<path>.hook_out``)."""
    last = folder.strip("/").split("/")[-1]
    for prefix in ("unet.", "transformer."):
        if last.startswith(prefix):
            return f"{last[len(prefix):]}.hook_out"
    return None


def _dims(config: Mapping[str, Any], what: str) -> tuple[int, int, int]:
    d_in, k = config.get("d_in"), config.get("k")
    if not isinstance(d_in, int) or not isinstance(k, int):
        raise ReleaseFormatError(f"{what}: cfg.json needs integer 'd_in' and 'k'.")
    num_latents = int(config.get("num_latents") or 0)
    d_sae = num_latents if num_latents > 0 else d_in * int(config.get("expansion_factor") or 0)
    if d_sae <= 0:
        raise ReleaseFormatError(f"{what}: cfg.json gives no width (num_latents 0 and no expansion_factor).")
    if not 0 < k <= d_sae:
        raise ReleaseFormatError(f"{what}: k={k} must be in 1..{d_sae}.")
    return d_in, d_sae, k


def convert_sparsify(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, what: str = "sparsify SAE"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(cfg fields, SAELens state dict, facts)`` from ``cfg.json`` and the ``sae.safetensors`` tensors."""
    activation = config.get("activation", "topk")
    if activation != "topk":
        raise ReleaseFormatError(f"{what}: activation {activation!r} has no SAELens equivalent (only 'topk' converts).")
    if config.get("skip_connection") or "W_skip" in state:
        raise ReleaseFormatError(
            f"{what}: this SAE has a skip connection (W_skip, x̂ += x·W_skipᵀ), which an SAELens SAE cannot "
            "represent; it is not converted. Use sparsify itself to run it."
        )
    d_in, d_sae, k = _dims(config, what)
    check_state_dict(
        dict(state), {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        what,
    )
    f32 = torch.float32
    sae_state = {
        "W_enc": state["encoder.weight"].detach().to(f32).T.contiguous(),
        "b_enc": state["encoder.bias"].detach().to(f32).contiguous(),
        "W_dec": state["W_dec"].detach().to(f32).contiguous(),
        "b_dec": state["b_dec"].detach().to(f32).contiguous(),
    }
    transcode = bool(config.get("transcode"))
    unit_norm = bool(config.get("input_unit_norm"))
    facts: dict[str, Any] = {
        "source_format_version": "sparsify (cfg.json + sae.safetensors)",
        "source_config": dict(config),
        "normalization": {"kind": "layer_norm", "status": "applied by the SAE (normalize_activations='layer_norm')",
                          "formula": "(x - mean) / (std_unbiased + 1e-5) per token, inverted on output"}
        if unit_norm else {"kind": "none"},
    }
    if config.get("batch_topk") or config.get("sample_topk"):
        facts["inference_note"] = "trained with batch/sample TopK; inference uses per-token TopK, as SAeUron's loader does"
    if transcode:
        facts["transcode"] = True
        facts["deviations"] = ["a sparsify transcoder: its input and output hooks differ; spliced at one hook it "
                               "does not reconstruct that hook's activation"]
    fields = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": not transcode,
              "normalize_activations": "layer_norm" if unit_norm else "none",
              "extra": {"k": k, "rescale_acts_by_decoder_norm": False}}
    return fields, sae_state, facts


def _metadata(entry: Optional[ReleaseSae], facts: dict[str, Any], hub_path: str,
              training: Optional[dict[str, Any]]) -> dict[str, Any]:
    meta = entry.metadata() if entry is not None else {
        "source_format": "sparsify", "hook_name": hook_from_folder(hub_path), "input_kind": "block_output",
        "token_policy": "all", "model_class_name": "HookedUNet",
    }
    meta.update(facts)
    if training is not None:
        meta["training_config"] = {k: training[k] for k in ("model", "dataset", "ctx_len") if k in training} or None
    return meta


def _parent(hub_path: str) -> str:
    return hub_path.strip("/").rpartition("/")[0]


def get_config(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """SAELens config getter (cfg.json only)."""
    hub_repo, hub_path, entry, _ = resolve(repo_id, folder_name)
    cfg_file = join_path(hub_path, "cfg.json")
    what = f"{hub_repo}/{cfg_file}"
    config = read_json(fetch_file(hub_repo, cfg_file, force_download=force_download), what)
    d_in, d_sae, _ = _dims(config, what)
    fake = {"encoder.weight": torch.empty(d_sae, d_in, device="meta"), "encoder.bias": torch.empty(d_sae, device="meta"),
            "W_dec": torch.empty(d_sae, d_in, device="meta"), "b_dec": torch.empty(d_in, device="meta")}
    fields, _, facts = convert_sparsify(config, fake, what=what)
    return build_cfg_dict(
        architecture="topk", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=fields["apply_b_dec_to_input"],
        normalize_activations=fields["normalize_activations"], metadata=_metadata(entry, facts, hub_path, None),
        cfg_overrides=cfg_overrides, device=device, extra=fields["extra"],
    )


def load_sae(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens loader (``conversion_func: mm_sparsify``)."""
    hub_repo, hub_path, entry, _ = resolve(repo_id, folder_name)
    cfg_file = join_path(hub_path, "cfg.json")
    config = read_json(fetch_file(hub_repo, cfg_file, force_download=force_download), f"{hub_repo}/{cfg_file}")
    weights_file = join_path(hub_path, "sae.safetensors")
    state = load_safetensors(fetch_file(hub_repo, weights_file, force_download=force_download),
                             what=f"SAE weights {hub_repo}/{weights_file}")
    fields, sae_state, facts = convert_sparsify(config, state, what=f"{hub_repo}/{weights_file}")
    training_file = join_path(_parent(hub_path), "config.json")
    training_local = fetch_file(hub_repo, training_file, force_download=force_download, required=False)
    training = read_json(training_local, f"{hub_repo}/{training_file}") if training_local else None
    cfg = build_cfg_dict(
        architecture="topk", d_in=fields["d_in"], d_sae=fields["d_sae"],
        apply_b_dec_to_input=fields["apply_b_dec_to_input"], normalize_activations=fields["normalize_activations"],
        metadata=_metadata(entry, facts, hub_path, training), cfg_overrides=cfg_overrides, device=device,
        extra=fields["extra"],
    )
    return cfg, {k: v.to(device) for k, v in sae_state.items()}, None


register_format_loader("sparsify", load_sae, get_config)
