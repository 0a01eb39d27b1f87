"""Pieces every release converter shares: the SAELens 6.x config dict, and state-dict checks."""

from __future__ import annotations

from typing import Any, Optional

import torch
from sae_lens import __version__ as sae_lens_version

from sae_lens_multimodal.core.sae_metadata import normalize_sae_metadata

__all__ = ["ReleaseFormatError", "build_cfg_dict", "check_state_dict", "join_path"]


class ReleaseFormatError(ValueError):
    """A release file does not match its documented format (missing keys, wrong shapes, unsupported option)."""


def join_path(folder: str, filename: str) -> str:
    """``folder/filename`` as a hub path ('' or '.' folder = repo root)."""
    folder = folder.strip("/")
    return filename if folder in ("", ".") else f"{folder}/{filename}"


def build_cfg_dict(
    *,
    architecture: str,
    d_in: int,
    d_sae: int,
    apply_b_dec_to_input: bool,
    normalize_activations: str = "none",
    metadata: dict[str, Any],
    cfg_overrides: Optional[dict[str, Any]] = None,
    device: str = "cpu",
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """A SAELens 6.x ``cfg_dict`` (as ``SAE.from_pretrained`` expects from a loader).

    Facts about the model/hook go into ``metadata`` (6.x drops unknown top-level keys), which always
    carries ``sae_lens_version`` so SAELens does not rebuild it as a pre-6.0 config, and whose schema
    fields (input kind, token policy, CFG branch) are checked against core/sae_metadata.py. Of ``cfg_overrides``
    (SAELens passes device, dtype, a neuronpedia id and release-level overrides at the top level), config
    fields stay top-level and everything else goes into metadata.
    """
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": bool(apply_b_dec_to_input),
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
    }
    if extra:
        cfg.update(extra)
    meta = {"sae_lens_version": sae_lens_version, "sae_lens_training_version": None}
    meta.update(metadata)
    top_level = set(cfg) | {"k", "rescale_acts_by_decoder_norm"}
    for key, value in (cfg_overrides or {}).items():
        if key in top_level:
            cfg[key] = value
        elif value is not None:
            meta[key] = value
    cfg["metadata"] = normalize_sae_metadata(meta, source=f"{meta.get('source_format') or 'release'} SAE metadata")
    return cfg


def check_state_dict(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    what: str,
    optional: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> None:
    """Require exactly the ``expected`` keys (plus ``optional``/``ignored``) with the expected shapes."""
    if not isinstance(state, dict):
        raise ReleaseFormatError(f"{what} should hold a state dict (a mapping of tensors), got {type(state).__name__}.")
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected and k not in optional and k not in ignored]
    if missing or unknown:
        raise ReleaseFormatError(
            f"{what} does not have the documented tensors: missing {missing or 'none'}, unexpected "
            f"{unknown or 'none'} (found {sorted(state)})."
        )
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise ReleaseFormatError(f"{what}: {key!r} is a {type(tensor).__name__}, not a tensor.")
        if tuple(tensor.shape) != tuple(shape):
            raise ReleaseFormatError(
                f"{what}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from the config."
            )
