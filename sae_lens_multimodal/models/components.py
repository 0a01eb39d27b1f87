"""Transformer building blocks with TransformerLens hook points and TransformerLens weight layouts.

Weights use TransformerLens shapes (``W_Q: [n_heads, d_model, d_head]``, ``W_in: [d_model, d_mlp]``...)
so TransformerLens-style analysis code reads them unchanged. Work that only exists to be observed
(attention patterns, per-head results, LayerNorm scales) is done only when a hook watches it; otherwise
the fused kernels run (SDPA, ``F.layer_norm``), which is what keeps an unhooked forward as fast as the
original library's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.hooked_root import is_observed

__all__ = ["ACT_FNS", "LayerNorm", "Attention", "MLP", "TransformerBlock", "AttentionPoolHead"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS = {
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def _empty(*shape: int, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))


def _heads_in(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [batch, pos, d_model] @ W [head, d_model, d_head] + b -> [batch, pos, head, d_head] (a permuted view).

    One batched GEMM over heads that reads the weights in place. einsum's "bpd,hdk->bphk" cloned an
    operand before its bmm and made the whole forward ~10-35% slower than open_clip with 2 CPU threads.
    """
    batch, pos, d = x.shape
    out = torch.matmul(x.reshape(batch * pos, d), W) + b[:, None, :]  # [head, batch*pos, d_head]
    return out.view(W.shape[0], batch, pos, W.shape[-1]).permute(1, 2, 0, 3)


def _linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [..., d_in] @ W [d_in, d_out] + b as one fused addmm (as nn.Linear does)."""
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[-1])


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens hooks ``hook_scale`` [..., 1] and ``hook_normalized`` [..., d].

    With ``has_weights=False`` it is TransformerLens's LNPre (used after ``fold_ln``).
    """

    def __init__(self, d_model: int, eps: float, has_weights: bool = True, device=None, dtype=None):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        if has_weights:
            self.w = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
            self.b = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        else:
            self.register_parameter("w", None)
            self.register_parameter("b", None)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def has_weights(self) -> bool:
        return self.w is not None

    def remove_weights(self) -> None:
        """Turn into LNPre (the caller has folded w and b into the next layer)."""
        self.w = None  # type: ignore[assignment]
        self.b = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_observed(self.hook_scale):
            x = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = x / scale
            if self.w is not None:
                x = x * self.w + self.b
        else:
            x = F.layer_norm(x, (self.d_model,), self.w, self.b, self.eps)
        return self.hook_normalized(x)


class Attention(nn.Module):
    """Multi-head attention, TransformerLens layout and hooks.

    Hooks: ``hook_q/hook_k/hook_v/hook_z`` [batch, pos, head, d_head], ``hook_attn_scores`` and
    ``hook_pattern`` [batch, head, query_pos, key_pos] (scores after masking, before softmax),
    ``hook_result`` [batch, pos, head, d_model] (per-head output before summing and adding b_O).
    Patterns and per-head results are materialised only when hooked; otherwise SDPA runs.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_head: int, causal: bool = False, scale: float | None = None,
        device=None, dtype=None,
    ):
        super().__init__()
        self.n_heads, self.d_head, self.causal = n_heads, d_head, causal
        self.scale = scale if scale is not None else 1.0 / math.sqrt(d_head)
        kw = dict(device=device, dtype=dtype)
        self.W_Q = _empty(n_heads, d_model, d_head, **kw)
        self.W_K = _empty(n_heads, d_model, d_head, **kw)
        self.W_V = _empty(n_heads, d_model, d_head, **kw)
        self.W_O = _empty(n_heads, d_head, d_model, **kw)
        self.b_Q = _empty(n_heads, d_head, **kw)
        self.b_K = _empty(n_heads, d_head, **kw)
        self.b_V = _empty(n_heads, d_head, **kw)
        self.b_O = _empty(d_model, **kw)
        for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())

    @staticmethod
    def _causal_mask(n_q: int, n_k: int, device, dtype) -> torch.Tensor:
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu(1 + n_k - n_q)
        return torch.zeros(n_q, n_k, device=device, dtype=dtype).masked_fill(future, float("-inf"))

    def forward(
        self,
        x: torch.Tensor,
        kv_input: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x`` [batch, pos, d_model] gives queries; ``kv_input`` (default ``x``) gives keys/values.

        ``attention_mask`` is an optional additive mask broadcastable to [batch, head, q, k].
        """
        kv_input = x if kv_input is None else kv_input
        q = self.hook_q(_heads_in(x, self.W_Q, self.b_Q))
        k = self.hook_k(_heads_in(kv_input, self.W_K, self.b_K))
        v = self.hook_v(_heads_in(kv_input, self.W_V, self.b_V))
        causal = self.causal
        if causal and attention_mask is not None:
            # SDPA takes either is_causal or a mask: fold the causal part into the additive mask.
            attention_mask = attention_mask + self._causal_mask(q.shape[1], k.shape[1], q.device, q.dtype)
            causal = False
        if is_observed(self.hook_attn_scores) or is_observed(self.hook_pattern):
            scores = torch.einsum("bqhk,bshk->bhqs", q, k) * self.scale
            if causal:
                scores = scores + self._causal_mask(q.shape[1], k.shape[1], q.device, scores.dtype)
            if attention_mask is not None:
                scores = scores + attention_mask
            scores = self.hook_attn_scores(scores)
            pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
            z = torch.einsum("bhqs,bshk->bqhk", pattern, v)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=attention_mask, is_causal=causal, scale=self.scale,
            ).transpose(1, 2)
        z = self.hook_z(z)
        if is_observed(self.hook_result):
            result = self.hook_result(torch.einsum("bqhk,hkm->bqhm", z, self.W_O))
            return result.sum(-2) + self.b_O
        b, p = z.shape[:2]
        return _linear(z.reshape(b, p, -1), self.W_O.reshape(-1, self.W_O.shape[-1]), self.b_O)


class MLP(nn.Module):
    """Two-layer MLP with ``hook_pre`` / ``hook_post`` [batch, pos, d_mlp]."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, device=None, dtype=None):
        super().__init__()
        if act_fn not in ACT_FNS:
            raise ValueError(f"Unknown act_fn {act_fn!r}; supported: {sorted(ACT_FNS)}")
        self.act_fn = act_fn
        kw = dict(device=device, dtype=dtype)
        self.W_in = _empty(d_model, d_mlp, **kw)
        self.b_in = _empty(d_mlp, **kw)
        self.W_out = _empty(d_mlp, d_model, **kw)
        self.b_out = _empty(d_model, **kw)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(_linear(x, self.W_in, self.b_in))
        post = self.hook_post(ACT_FNS[self.act_fn](pre))
        return _linear(post, self.W_out, self.b_out)


class TransformerBlock(nn.Module):
    """Pre-norm block: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(.)).

    ``hook_attn_out`` / ``hook_mlp_out`` are exactly what the block writes into the residual stream
    (a family's layer scale is folded into W_O / W_out at conversion), so decompositions sum exactly.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_head: int, d_mlp: int, act_fn: str, eps: float,
        causal: bool = False, device=None, dtype=None,
    ):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ln1 = LayerNorm(d_model, eps, **kw)
        self.attn = Attention(d_model, n_heads, d_head, causal=causal, **kw)
        self.ln2 = LayerNorm(d_model, eps, **kw)
        self.mlp = MLP(d_model, d_mlp, act_fn, **kw)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, resid_pre: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), attention_mask=attention_mask))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class AttentionPoolHead(nn.Module):
    """Multihead attention pooling (SigLIP's "MAP" head): a learned probe attends over all tokens.

    out = a + mlp(ln(a)), a = attn(probe, tokens); returns [batch, d_model] (the single probe's output).
    ``attn.hook_pattern`` [batch, head, 1, pos] is the probe's attention over tokens.
    """

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, act_fn: str, eps: float, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.probe = _empty(d_model, **kw)
        self.attn = Attention(d_model, n_heads, d_model // n_heads, **kw)
        self.ln = LayerNorm(d_model, eps, **kw)
        self.mlp = MLP(d_model, d_mlp, act_fn, **kw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(tokens.shape[0], 1, -1)
        a = self.attn(probe, kv_input=tokens)
        return (a + self.mlp(self.ln(a)))[:, 0]
