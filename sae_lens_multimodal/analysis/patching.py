"""Activation-patching helpers for image models, for use with ``transformer_lens.patching``.

TransformerLens's ``get_act_patch_*`` functions infer the number of positions from the last dimension of
``corrupted_tokens``. For images that dimension is the image width, not the number of tokens, so any
function that iterates over positions needs an explicit ``index_df``; :func:`image_patching_index`
builds it from the model's config. The ``get_act_patch_*`` partials preset ``index_axis_names``, which
TransformerLens refuses together with ``index_df``, so pass ``index_axis_names=None`` as well::

    from transformer_lens import patching
    index_df = image_patching_index(model, ("layer", "pos"))
    results = patching.get_act_patch_resid_pre(
        model, corrupted_images, clean_cache, metric, index_axis_names=None, index_df=index_df
    )
    results = results.reshape(patching_shape(index_df))  # [n_layers, n_tokens]

Functions over layers and heads only (e.g. ``get_act_patch_attn_head_out_all_pos``) need no index_df.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import pandas as pd
import torch
from transformer_lens.patching import make_df_from_ranges

__all__ = ["image_patching_index", "patching_shape", "tokens_per_image"]

_POS_AXES = ("pos", "src_pos", "dest_pos")
_HEAD_AXES = ("head", "head_index")
_KNOWN_AXES = ("layer",) + _POS_AXES + _HEAD_AXES


def tokens_per_image(model: Any, images: Optional[Union[torch.Tensor, tuple[int, int]]] = None) -> int:
    """Residual-stream positions per image: prefix tokens (CLS, distillation, registers) plus patches.

    ``images`` (a (B, C, H, W) tensor or an (H, W) size) is only needed for a size other than the
    model's native one (models with interpolated position embeddings).
    """
    cfg = model.cfg
    if images is None:
        return int(cfg.n_ctx)
    h, w = (images.shape[-2], images.shape[-1]) if isinstance(images, torch.Tensor) else images
    ph, pw = cfg.patch_size
    return int(cfg.n_prefix_tokens + (h // ph) * (w // pw))


def image_patching_index(
    model: Any,
    axes: Sequence[str] = ("layer", "pos"),
    images: Optional[Union[torch.Tensor, tuple[int, int]]] = None,
) -> pd.DataFrame:
    """Every combination of ``axes`` as a DataFrame, for ``transformer_lens.patching``'s ``index_df``.

    Axes (TransformerLens's names): ``layer`` (0..n_layers-1), ``pos`` / ``src_pos`` / ``dest_pos``
    (0..tokens per image - 1, see :func:`tokens_per_image`), ``head`` / ``head_index`` (0..n_heads-1).
    The first axis must be ``layer`` (TransformerLens reads the layer from the first column).
    Results come back flattened in this DataFrame's row order; reshape with :func:`patching_shape`.
    """
    axes = list(axes)
    unknown = [a for a in axes if a not in _KNOWN_AXES]
    if unknown:
        raise ValueError(f"Unknown patching axes {unknown}; known axes: {list(_KNOWN_AXES)}.")
    if not axes or axes[0] != "layer":
        raise ValueError(
            f"The first axis must be 'layer' (transformer_lens.patching takes the layer from the first "
            f"column), got {axes}."
        )
    n_pos = tokens_per_image(model, images)
    sizes = {"layer": model.cfg.n_layers, **{a: n_pos for a in _POS_AXES}, **{a: model.cfg.n_heads for a in _HEAD_AXES}}
    return make_df_from_ranges([sizes[a] for a in axes], axes)


def patching_shape(index_df: pd.DataFrame) -> tuple[int, ...]:
    """The unflattened shape of patching results computed over a full grid ``index_df``."""
    return tuple(int(index_df[c].max()) + 1 for c in index_df.columns)
