"""Exact decomposition of a CLIP image embedding into what each layer, head, source position and MLP wrote.

The image embedding is ``head(pool(LN_final(resid_final)))``. With the final LayerNorm's scale frozen at
its value in the real forward pass (as in TextSpan, Gandelsman et al. 2024), it is affine in the final
residual stream, which is a sum of the embedding stream and every attention and MLP output. Each
attention output further splits over heads and, through the attention pattern, over source positions:
``attn_out[q] = sum_h sum_p pattern[h, q, p] * v[p, h] @ W_O[h] + b_O``. So

    embedding = embed + sum_{l,h,p} heads[l, h, p] + sum_l attn_bias[l] + sum_l mlp[l] + bias

exactly (up to float rounding), where ``bias`` is the final LN's bias and the head's bias projected.

Supported poolings: CLS token (open_clip and transformers CLIP) and mean over patch tokens (with the
final LN before or after pooling). Attention pooling (SigLIP's MAP head) is not affine in the residual,
so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["EmbeddingDecomposition", "decompose_image_embedding", "read_weights", "direct_path_matrix"]


@dataclass
class EmbeddingDecomposition:
    """Contributions to image embeddings [batch, d_embed] (unnormalised, as the model outputs them)."""

    #: The model's real image embedding [batch, d_embed].
    embedding: torch.Tensor
    #: The embedding stream (ln_pre output, or patch + position embeddings without ln_pre) [batch, d_embed].
    embed: torch.Tensor
    #: Per layer, head and source position [batch, n_layers, n_heads, n_pos, d_embed]
    #: (or [batch, n_layers, n_heads, d_embed] when decomposed with ``per_position=False``).
    heads: torch.Tensor
    #: The attention output bias b_O of each layer [batch, n_layers, d_embed].
    attn_bias: torch.Tensor
    #: Each MLP's output [batch, n_layers, d_embed].
    mlp: torch.Tensor
    #: Final LN bias and head bias, projected [batch, d_embed].
    bias: torch.Tensor
    #: The frozen final-LN scale(s) used: [batch, n_pos] (LN before pooling) or [batch, 1].
    ln_scale: torch.Tensor

    @property
    def per_position(self) -> bool:
        return self.heads.ndim == 5

    def head_contributions(self) -> torch.Tensor:
        """[batch, n_layers, n_heads, d_embed]: each head summed over source positions."""
        return self.heads.sum(dim=3) if self.per_position else self.heads

    def attn_contributions(self) -> torch.Tensor:
        """[batch, n_layers, d_embed]: each attention layer's whole output (heads + b_O)."""
        return self.head_contributions().sum(dim=2) + self.attn_bias

    def layer_contributions(self) -> torch.Tensor:
        """[batch, n_layers, d_embed]: attention + MLP of each layer."""
        return self.attn_contributions() + self.mlp

    def position_contributions(self) -> torch.Tensor:
        """[batch, n_pos, d_embed]: everything the attention heads moved from each source position."""
        if not self.per_position:
            raise ValueError("Decomposed with per_position=False; decompose again with per_position=True.")
        return self.heads.sum(dim=(1, 2))

    def total(self) -> torch.Tensor:
        """The sum of all contributions, which equals :attr:`embedding` up to float rounding."""
        return self.embed + self.layer_contributions().sum(dim=1) + self.bias

    def components(self) -> tuple[torch.Tensor, list[str]]:
        """All components as a stack [n_components, batch, d_embed] with labels (heads summed over
        positions), summing to the embedding: embed, L{l}H{h}, L{l}_attn_bias, L{l}_mlp, bias."""
        parts, labels = [self.embed], ["embed"]
        heads = self.head_contributions()
        n_layers, n_heads = heads.shape[1], heads.shape[2]
        for layer in range(n_layers):
            for h in range(n_heads):
                parts.append(heads[:, layer, h])
                labels.append(f"L{layer}H{h}")
            parts += [self.attn_bias[:, layer], self.mlp[:, layer]]
            labels += [f"L{layer}_attn_bias", f"L{layer}_mlp"]
        parts.append(self.bias)
        labels.append("bias")
        return torch.stack(parts), labels


def direct_path_matrix(vision: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(M [d_model, d_embed], c [d_embed]): with the final-LN scale s frozen, a residual vector x read by
    the head contributes ``centre(x) @ M / s``, and the constant part is ``c`` (LN bias and head bias)."""
    cfg = vision.cfg
    ln = vision.ln_final
    d = cfg.d_model
    w = ln.w if ln.w is not None else torch.ones(d, dtype=cfg.dtype, device=cfg.device)
    b = ln.b if ln.b is not None else torch.zeros(d, dtype=cfg.dtype, device=cfg.device)
    if cfg.head_type == "linear":
        W, hb = vision.head.W, vision.head.b
    elif cfg.head_type == "none":
        W, hb = torch.eye(d, dtype=cfg.dtype, device=cfg.device), torch.zeros(d, dtype=cfg.dtype, device=cfg.device)
    else:
        raise ValueError(f"head_type {cfg.head_type!r} is not affine; the direct path needs a linear head.")
    return w[:, None] * W, b @ W + hb


def _check_supported(vision: Any) -> None:
    cfg = vision.cfg
    if not cfg.has_ln_final:
        raise ValueError("This vision tower has no final LayerNorm; the frozen-scale decomposition needs one.")
    if cfg.pool_type not in ("cls", "mean"):
        raise ValueError(
            f"pool_type {cfg.pool_type!r} is not supported: the image embedding must be affine in the residual "
            "stream once the final LN scale is frozen (CLS or mean pooling). Attention pooling (SigLIP) is not."
        )


def read_weights(vision: Any, ln_scale: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[batch, n_tokens]: how much each token's centred final residual counts in the embedding, i.e. the
    pooling weight divided by the frozen final-LN scale that applies to it."""
    _check_supported(vision)
    cfg = vision.cfg
    scale = ln_scale.squeeze(-1)  # [batch, n_tokens] (LN before pooling) or [batch] (after)
    batch = scale.shape[0]
    pool_w = torch.zeros(batch, n_tokens, dtype=scale.dtype, device=scale.device)
    if cfg.pool_type == "cls":
        pool_w[:, 0] = 1.0
    else:
        n_prefix = cfg.n_prefix_tokens
        pool_w[:, n_prefix:] = 1.0 / (n_tokens - n_prefix)
    if cfg.final_ln_after_pool or scale.ndim == 1:
        return pool_w / scale.reshape(batch, 1)
    return pool_w / scale


@torch.no_grad()
def decompose_image_embedding(model: Any, images: Any, per_position: bool = True) -> EmbeddingDecomposition:
    """Decompose the image embeddings of a HookedCLIP (or a HookedViT with a linear head) exactly.

    One real forward pass caches the attention patterns, values, MLP outputs and the final LN's scale;
    every contribution is then projected through the frozen-scale direct path. ``per_position=False``
    sums heads over source positions early (less memory for large batches).
    """
    vision = model.part("vision")  # a HookedViT is its own vision part; a HookedCLIP has one
    _check_supported(vision)
    cfg = vision.cfg
    start = "ln_pre.hook_normalized" if cfg.has_ln_pre else "hook_full_embed"
    names = [start, "ln_final.hook_scale", "hook_out"]
    for layer in range(cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v", f"blocks.{layer}.hook_mlp_out"]
    _, cache = vision.run_with_cache(images, names_filter=names)
    M, const = direct_path_matrix(vision)
    M = M - M.mean(dim=0, keepdim=True)  # centre(x) @ M == x @ (M - mean over d_model)
    x0 = cache[start]
    n_tokens = x0.shape[1]
    w = read_weights(vision, cache["ln_final.hook_scale"], n_tokens)  # [batch, tokens]

    def read(resid: torch.Tensor) -> torch.Tensor:  # [batch, tokens, d_model] -> [batch, d_embed]
        return torch.einsum("bq,bqd,de->be", w, resid, M)

    heads, attn_bias, mlp = [], [], []
    for layer, block in enumerate(vision.blocks):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, p]
        v = cache[f"blocks.{layer}.attn.hook_v"]  # [batch, p, head, d_head]
        W_OM = torch.einsum("hkd,de->hke", block.attn.W_O, M)  # [head, d_head, d_embed]
        a = torch.einsum("bq,bhqp->bhp", w, pattern)
        if per_position:
            heads.append(torch.einsum("bhp,bphk,hke->bhpe", a, v, W_OM))
        else:
            heads.append(torch.einsum("bhp,bphk,hke->bhe", a, v, W_OM))
        attn_bias.append(w.sum(-1, keepdim=True) * (block.attn.b_O @ M)[None])
        mlp.append(read(cache[f"blocks.{layer}.hook_mlp_out"]))
    batch = x0.shape[0]
    return EmbeddingDecomposition(
        embedding=cache["hook_out"],
        embed=read(x0),
        heads=torch.stack(heads, dim=1),
        attn_bias=torch.stack(attn_bias, dim=1),
        mlp=torch.stack(mlp, dim=1),
        bias=const.expand(batch, -1).clone(),
        ln_scale=cache["ln_final.hook_scale"].squeeze(-1).reshape(batch, -1),
    )
