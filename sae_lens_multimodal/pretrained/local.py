"""SAEs saved on disk in SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``, written by
``save_model`` / ``save_inference_model``), loaded so that a damaged directory fails naming the file.

``SAE.load_from_disk`` on a truncated or garbage weights file raises safetensors' "incomplete metadata"
without the file's name, and a missing ``cfg.json`` a bare ``FileNotFoundError``; :func:`load_sae_dir`
checks the directory first (the command line's ``--sae-path`` goes through it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from sae_lens_multimodal.core.files import IncompleteCheckpointError, check_weight_files
from sae_lens_multimodal.pretrained._hub import read_json

__all__ = ["load_sae_dir"]

_FIX = "Re-save the SAE (sae.save_model(path)) or copy the directory again."


def load_sae_dir(path: Union[str, os.PathLike], device: str = "cpu", **kwargs: Any) -> SAE:
    """``SAE.load_from_disk(path, device, **kwargs)`` after checking that ``path`` holds a readable
    ``cfg.json`` and a complete weights file; an error names the file and the fix."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No SAE directory at {directory}: an SAE saved with SAELens (sae.save_model(path)) is a "
            f"directory holding {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}."
        )
    cfg = directory / SAE_CFG_FILENAME
    if not cfg.is_file():
        raise FileNotFoundError(f"SAE directory {directory} has no {SAE_CFG_FILENAME}. {_FIX}")
    read_json(cfg, f"SAE config {cfg}")
    weights = directory / SAE_WEIGHTS_FILENAME
    if not weights.is_file():
        raise FileNotFoundError(f"SAE directory {directory} has no weights file {SAE_WEIGHTS_FILENAME}. {_FIX}")
    check_weight_files(directory, what=f"SAE directory {directory}")
    try:
        return SAE.load_from_disk(str(directory), device=device, **kwargs)
    except RuntimeError as e:  # load_state_dict: weights missing from the file, or of other shapes
        if "Missing key(s)" not in str(e) and "size mismatch" not in str(e):
            raise
        raise IncompleteCheckpointError(
            f"SAE weights file {weights} does not fit its {SAE_CFG_FILENAME}: {str(e)[:400]} {_FIX}"
        ) from None
