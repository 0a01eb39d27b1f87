"""What the open_clip vision and text families share: both towers are stacks of open_clip's
``ResidualAttentionBlock`` (fused q/k/v ``nn.MultiheadAttention``, ``mlp.c_fc`` / ``mlp.c_proj``, optional
layer scale ``ls_1`` / ``ls_2``), converted here once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sae_lens_multimodal.models.conversions import UnsupportedModelError
from sae_lens_multimodal.models.conversions._common import block_state, fused_qkv_to_heads


def check_resblocks(blocks: Sequence[torch.nn.Module]) -> None:
    """Refuse open_clip's custom attention blocks: only the plain ``ResidualAttentionBlock`` is converted."""
    from open_clip.transformer import ResidualAttentionBlock  # optional dependency: only when converting

    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise UnsupportedModelError(
            "open_clip custom attention blocks (qk_norm, scaled cosine attention, scale_heads...) are not supported."
        )


def resblocks_state(blocks: Sequence[torch.nn.Module], n_heads: int) -> dict[str, torch.Tensor]:
    """``blocks.{i}.*`` of every ``ResidualAttentionBlock``, layer scale folded into W_O / W_out."""
    sd: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(blocks):
        attn, mlp = blk.attn, blk.mlp
        sd.update(block_state(
            f"blocks.{i}.", blk.ln_1, blk.ln_2, fused_qkv_to_heads(attn.in_proj_weight, attn.in_proj_bias, n_heads),
            attn.out_proj, mlp.c_fc, mlp.c_proj, n_heads,
            (getattr(blk.ls_1, "gamma", None), getattr(blk.ls_2, "gamma", None)),
        ))
    return sd
