"""Layout helpers shared by the per-family converters: torch ``nn.Linear`` layouts to TransformerLens
layouts. Each returns new contiguous tensors (never views of the source model's parameters)."""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def _c(t: Tensor) -> Tensor:
    return t.detach().clone().contiguous()


def linear_to_heads_in(weight: Tensor, bias: Optional[Tensor], n_heads: int) -> tuple[Tensor, Tensor]:
    """nn.Linear (h*dh, d) producing q/k/v -> W [h, d, dh], b [h, dh] (zeros when bias is None)."""
    out_dim, d = weight.shape
    dh = out_dim // n_heads
    W = weight.reshape(n_heads, dh, d).transpose(1, 2)
    b = bias.reshape(n_heads, dh) if bias is not None else weight.new_zeros(n_heads, dh)
    return _c(W), _c(b)


def fused_qkv_to_heads(weight: Tensor, bias: Optional[Tensor], n_heads: int) -> dict[str, Tensor]:
    """A fused in-projection (3*h*dh, d) in q, k, v order -> W_Q/W_K/W_V, b_Q/b_K/b_V."""
    ws = weight.chunk(3, dim=0)
    bs = bias.chunk(3, dim=0) if bias is not None else (None, None, None)
    out = {}
    for name, w, b in zip("QKV", ws, bs):
        out[f"W_{name}"], out[f"b_{name}"] = linear_to_heads_in(w, b, n_heads)
    return out


def linear_to_heads_out(weight: Tensor, bias: Optional[Tensor], n_heads: int) -> tuple[Tensor, Tensor]:
    """nn.Linear (d, h*dh) output projection -> W_O [h, dh, d], b_O [d]."""
    d, in_dim = weight.shape
    W = weight.T.reshape(n_heads, in_dim // n_heads, d)
    b = bias if bias is not None else weight.new_zeros(d)
    return _c(W), _c(b)


def linear_to_matrix(weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """nn.Linear (out, in) -> W [in, out], b [out] (zeros when bias is None)."""
    b = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return _c(weight.T), _c(b)


def qkv_to_heads(q: torch.nn.Linear, k: torch.nn.Linear, v: torch.nn.Linear, n_heads: int) -> dict[str, Tensor]:
    """Separate q/k/v Linears -> W_Q/W_K/W_V, b_Q/b_K/b_V (the same keys as :func:`fused_qkv_to_heads`)."""
    out = {}
    for name, lin in zip("QKV", (q, k, v)):
        out[f"W_{name}"], out[f"b_{name}"] = linear_to_heads_in(lin.weight, lin.bias, n_heads)
    return out


def mlp_state(prefix: str, fc1: tuple, fc2: tuple) -> dict[str, Tensor]:
    """State-dict entries ``{prefix}W_in, b_in, W_out, b_out`` from (weight, bias) of two Linears."""
    sd = {}
    sd[f"{prefix}W_in"], sd[f"{prefix}b_in"] = linear_to_matrix(*fc1)
    sd[f"{prefix}W_out"], sd[f"{prefix}b_out"] = linear_to_matrix(*fc2)
    return sd


def block_state(
    prefix: str,
    ln1: torch.nn.Module,
    ln2: torch.nn.Module,
    qkv: dict[str, Tensor],
    out: torch.nn.Linear,
    fc1: torch.nn.Linear,
    fc2: torch.nn.Linear,
    n_heads: int,
    layer_scale: tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
) -> dict[str, Tensor]:
    """One pre-norm block (LN, attention, LN, two-layer MLP) in our TransformerLens layout under ``prefix``
    (``"blocks.3."``). Every source family here has this block; they differ in where the parts live and in
    whether q/k/v are one fused projection (``qkv`` from :func:`fused_qkv_to_heads`) or three
    (:func:`qkv_to_heads`). ``layer_scale`` (attention, MLP) is folded into W_O / W_out."""
    sd = {}
    sd.update(ln_state(prefix + "ln1.", ln1))
    sd.update(ln_state(prefix + "ln2.", ln2))
    sd.update({f"{prefix}attn.{k}": v for k, v in qkv.items()})
    sd[prefix + "attn.W_O"], sd[prefix + "attn.b_O"] = linear_to_heads_out(out.weight, out.bias, n_heads)
    sd.update(mlp_state(prefix + "mlp.", (fc1.weight, fc1.bias), (fc2.weight, fc2.bias)))
    fold_layer_scale(sd, prefix + "attn.W_O", prefix + "attn.b_O", layer_scale[0])
    fold_layer_scale(sd, prefix + "mlp.W_out", prefix + "mlp.b_out", layer_scale[1])
    return sd


def ln_state(prefix: str, ln: torch.nn.Module) -> dict[str, Tensor]:
    w = ln.weight if ln.weight is not None else torch.ones(ln.normalized_shape)
    b = ln.bias if ln.bias is not None else torch.zeros(ln.normalized_shape)
    return {f"{prefix}w": _c(w), f"{prefix}b": _c(b)}


def fold_layer_scale(sd: dict[str, Tensor], W_key: str, b_key: str, gamma: Optional[Tensor]) -> None:
    """Fold a per-channel layer scale applied after a sublayer into its output weights, in place, so the
    sublayer's hook_*_out is exactly what is written into the residual stream."""
    if gamma is None:
        return
    gamma = gamma.detach()
    sd[W_key] = (sd[W_key] * gamma).contiguous()
    sd[b_key] = (sd[b_key] * gamma).contiguous()


def layer_norm_eps(ln: torch.nn.Module, default: float = 1e-5) -> float:
    return float(getattr(ln, "eps", getattr(ln, "variance_epsilon", default)))
