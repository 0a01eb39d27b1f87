"""Attention hooks: q/k/v, scores, pattern, z and per-head result inside diffusers attention processors.

The original processor stays in charge whenever none of an attention module's hook points is watched,
so an unwatched model runs diffusers' own code (bit-identical). When a hook is watched, a hooked copy of
the same computation runs: q/k/v/z hooks are views of the tensors the SDPA call uses; observing the
scores or the pattern replaces the single fused SDPA call by one explicit softmax(q k^T / sqrt(d)) v
(computed once, not in addition to SDPA); observing the per-head result computes
``z_h @ W_O[h]`` per head and, unless a hook changes it, still runs the original output projection.

Hook shapes (b = batch, s = sequence positions, h = heads, d = d_head):
``hook_q/k/v/z`` (b, s, h, d); ``hook_attn_scores``/``hook_pattern`` (b, h, s_q, s_k);
``hook_result`` (b, s, h, d_model) without the output bias.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.diffusion._hookutil import call_hook, observed

#: processor class name -> implementation kind. Other processors (IP-adapter, fused, legacy non-SDPA)
#: keep working but expose no attention hooks.
SUPPORTED_PROCESSORS = {
    "AttnProcessor2_0": "standard",
    "JointAttnProcessor2_0": "joint",
    "FluxAttnProcessor": "flux",
}


def _hook_segments(x: torch.Tensor, seq_dim: int, parts: list[tuple[int, int, nn.Module | None]]) -> torch.Tensor:
    """Show each sequence segment of ``x`` to its hook as (b, s, h, d); rebuild ``x`` only if one changed.

    ``x`` is (b, h, s, d) when ``seq_dim == 2`` and (b, s, h, d) when ``seq_dim == 1``.
    """
    if not any(observed(hp) for _, _, hp in parts):
        return x
    pieces: list[torch.Tensor] = []
    changed = False
    for start, stop, hp in parts:
        seg = x.narrow(seq_dim, start, stop - start)
        if observed(hp):
            view = seg.transpose(1, 2) if seq_dim == 2 else seg
            value, _ = call_hook(hp, view)
            if value is not view:
                changed = True
                seg = value.transpose(1, 2) if seq_dim == 2 else value
        pieces.append(seg)
    return torch.cat(pieces, dim=seq_dim) if changed else x


def _attend(
    hooks: dict[str, nn.Module],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    fused: Callable[[], torch.Tensor],
    seq_dim: int,
    cross: tuple[slice, slice] | None = None,
) -> torch.Tensor:
    """Attention output z in the layout of q; explicit softmax path only when scores/pattern are watched."""
    h_scores, h_pattern = hooks.get("hook_attn_scores"), hooks.get("hook_pattern")
    h_cross = hooks.get("hook_cross_pattern") if cross is not None else None
    if not (observed(h_scores) or observed(h_pattern) or observed(h_cross)):
        return fused()
    if seq_dim == 1:  # (b, s, h, d) -> (b, h, s, d)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # The processors call SDPA without a scale, i.e. with its default 1/sqrt(d_head).
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if observed(h_scores):
        scores, _ = call_hook(h_scores, scores)
    pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if observed(h_pattern):
        pattern, _ = call_hook(h_pattern, pattern)
    if observed(h_cross):
        q_slice, k_slice = cross
        view = pattern[:, :, q_slice, k_slice]
        value, _ = call_hook(h_cross, view)
        if value is not view:
            pattern = pattern.clone()
            pattern[:, :, q_slice, k_slice] = value
    z = torch.matmul(pattern, v)
    return z.transpose(1, 2) if seq_dim == 1 else z


def _project(hp: nn.Module | None, flat: torch.Tensor, linear: nn.Module, n_heads: int) -> torch.Tensor:
    """Output projection of concatenated heads, exposing per-head results (b, s, h, d_model) when watched."""
    if not observed(hp):
        return linear(flat)
    if type(linear) is not nn.Linear:
        raise NotImplementedError(
            f"hook_result needs a plain nn.Linear output projection, but this attention uses "
            f"{type(linear).__name__} (LoRA or quantised layers?). Merge/unload adapters first, or hook hook_z."
        )
    d_model = linear.weight.shape[0]
    z = flat.unflatten(-1, (n_heads, -1))
    w = linear.weight.view(d_model, n_heads, -1)
    result = torch.einsum("bshd,ohd->bsho", z, w)
    value, modified = call_hook(hp, result)
    if not modified:
        return linear(flat)  # unchanged: keep the original projection's exact numerics
    out = value.sum(dim=2)
    return out + linear.bias if linear.bias is not None else out


def _standard(self: HookedAttentionProcessor, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
              attention_mask=None, temb=None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Hooked twin of diffusers' AttnProcessor2_0 (UNet attn1/attn2, PixArt/DiT blocks)."""
    hooks = attn._modules
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query = _hook_segments(query, 2, [(0, query.shape[2], hooks.get("hook_q"))])
    key = _hook_segments(key, 2, [(0, key.shape[2], hooks.get("hook_k"))])
    value = _hook_segments(value, 2, [(0, value.shape[2], hooks.get("hook_v"))])
    mask = attention_mask
    z = _attend(
        hooks, query, key, value, mask,
        lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False),
        seq_dim=2,
    )
    z = _hook_segments(z, 2, [(0, z.shape[2], hooks.get("hook_z"))])
    hidden_states = z.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = _project(hooks.get("hook_result"), hidden_states, attn.to_out[0], attn.heads)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _joint(self: HookedAttentionProcessor, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
           attention_mask=None, *args: Any, **kwargs: Any) -> Any:
    """Hooked twin of diffusers' JointAttnProcessor2_0 (SD3). Sequence order: [image, text]."""
    hooks = attn._modules
    residual = hidden_states
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    inner_dim = key.shape[-1]
    head_dim = inner_dim // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    n_img = query.shape[2]
    query = _hook_segments(query, 2, [(0, n_img, hooks.get("hook_q"))])
    key = _hook_segments(key, 2, [(0, n_img, hooks.get("hook_k"))])
    value = _hook_segments(value, 2, [(0, n_img, hooks.get("hook_v"))])
    cross = None
    if encoder_hidden_states is not None:
        eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        n_txt = eq.shape[2]
        eq = _hook_segments(eq, 2, [(0, n_txt, hooks.get("hook_q_text"))])
        ek = _hook_segments(ek, 2, [(0, n_txt, hooks.get("hook_k_text"))])
        ev = _hook_segments(ev, 2, [(0, n_txt, hooks.get("hook_v_text"))])
        query = torch.cat([query, eq], dim=2)
        key = torch.cat([key, ek], dim=2)
        value = torch.cat([value, ev], dim=2)
        cross = (slice(0, n_img), slice(n_img, None))
    z = _attend(
        hooks, query, key, value, None,
        lambda: F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False),
        seq_dim=2, cross=cross,
    )
    total = z.shape[2]
    z = _hook_segments(z, 2, [(0, n_img, hooks.get("hook_z")), (n_img, total, hooks.get("hook_z_text"))])
    hidden_states = z.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    if encoder_hidden_states is not None:
        hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
        if not attn.context_pre_only:
            encoder_hidden_states = _project(
                hooks.get("hook_result_text"), encoder_hidden_states, attn.to_add_out, attn.heads
            )
    hidden_states = _project(hooks.get("hook_result"), hidden_states, attn.to_out[0], attn.heads)
    hidden_states = attn.to_out[1](hidden_states)
    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


def _flux(self: HookedAttentionProcessor, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None,
          attention_mask=None, image_rotary_emb=None) -> Any:
    """Hooked twin of diffusers' FluxAttnProcessor. Sequence order: [text, image].

    hook_q/hook_k are taken before the rotary embedding (as TransformerLens does); scores and patterns
    are those of the rotated queries and keys.
    """
    # diffusers' Flux internals: loaded only when a Flux attention runs
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    hooks = attn._modules
    query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:  # double-stream block: text arrives separately
        n_txt = encoder_hidden_states.shape[1]
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        n_img = query.shape[1]
        query = _hook_segments(query, 1, [(0, n_img, hooks.get("hook_q"))])
        key = _hook_segments(key, 1, [(0, n_img, hooks.get("hook_k"))])
        value = _hook_segments(value, 1, [(0, n_img, hooks.get("hook_v"))])
        eq = _hook_segments(eq, 1, [(0, n_txt, hooks.get("hook_q_text"))])
        ek = _hook_segments(ek, 1, [(0, n_txt, hooks.get("hook_k_text"))])
        ev = _hook_segments(ev, 1, [(0, n_txt, hooks.get("hook_v_text"))])
        query = torch.cat([eq, query], dim=1)
        key = torch.cat([ek, key], dim=1)
        value = torch.cat([ev, value], dim=1)
    else:  # single-stream block: [text, image] already concatenated; the block told us where text ends
        n_txt = attn.__dict__.get("_slm_text_len") or 0
        total = query.shape[1]

        def split(name: str) -> list[tuple[int, int, nn.Module | None]]:
            return [(0, n_txt, hooks.get(f"{name}_text")), (n_txt, total, hooks.get(name))]

        query = _hook_segments(query, 1, split("hook_q"))
        key = _hook_segments(key, 1, split("hook_k"))
        value = _hook_segments(value, 1, split("hook_v"))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    total = query.shape[1]
    cross = (slice(n_txt, None), slice(0, n_txt)) if n_txt else None
    z = _attend(
        hooks, query, key, value, attention_mask,
        lambda: dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        ),
        seq_dim=1, cross=cross,
    )
    z = _hook_segments(z, 1, [(0, n_txt, hooks.get("hook_z_text")), (n_txt, total, hooks.get("hook_z"))])
    hidden_states = z.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([n_txt, total - n_txt], dim=1)
        hidden_states = _project(hooks.get("hook_result"), hidden_states.contiguous(), attn.to_out[0], attn.heads)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = _project(
            hooks.get("hook_result_text"), encoder_hidden_states.contiguous(), attn.to_add_out, attn.heads
        )
        return hidden_states, encoder_hidden_states
    return hidden_states


_IMPLS = {"standard": _standard, "joint": _joint, "flux": _flux}


class HookedAttentionProcessor:
    """Wraps a diffusers attention processor; runs it unchanged unless one of the module's hooks is watched."""

    def __init__(self, original: Any, kind: str, hook_names: tuple[str, ...]) -> None:
        self.__dict__["original"] = original
        self.__dict__["kind"] = kind
        self.__dict__["hook_names"] = hook_names

    def _run(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        slots = attn._modules
        for name in self.hook_names:
            if observed(slots.get(name)):
                return _IMPLS[self.kind](self, attn, *args, **kwargs)
        return self.original(attn, *args, **kwargs)

    # diffusers sets/reads backend options on processors (set_attention_backend): keep them on the original.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["original"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["original"], name, value)

    def __repr__(self) -> str:
        return f"Hooked({self.original!r})"


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(original_cls: type) -> type:
    """A HookedAttentionProcessor subclass whose __call__ advertises the original's signature.

    diffusers' Attention.forward filters keyword arguments by ``inspect.signature(processor.__call__)``,
    so the wrapper must accept exactly what the original accepts.
    """
    cls = _WRAPPER_CLASSES.get(original_cls)
    if cls is None:
        def __call__(self: HookedAttentionProcessor, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self._run(attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(original_cls.__call__)  # type: ignore[attr-defined]
        cls = type(f"Hooked{original_cls.__name__}", (HookedAttentionProcessor,), {"__call__": __call__})
        _WRAPPER_CLASSES[original_cls] = cls
    return cls


def attention_hook_widths(attn: nn.Module, kind: str, single_stream: bool) -> dict[str, int | None]:
    """The hook points an attention module gets, with the width of their last dimension."""
    head_dim = getattr(attn, "head_dim", None) or attn.inner_dim // attn.heads
    widths: dict[str, int | None] = {
        "hook_q": head_dim, "hook_k": head_dim, "hook_v": head_dim,
        "hook_attn_scores": None, "hook_pattern": None, "hook_z": head_dim,
    }
    to_out = getattr(attn, "to_out", None)
    if to_out is not None and not getattr(attn, "pre_only", False):
        widths["hook_result"] = to_out[0].out_features
    two_streams = hasattr(attn, "add_q_proj") and getattr(attn, "added_kv_proj_dim", None) is not None
    if two_streams or (kind == "flux" and single_stream):
        widths.update({
            "hook_q_text": head_dim, "hook_k_text": head_dim, "hook_v_text": head_dim,
            "hook_z_text": head_dim, "hook_cross_pattern": None,
        })
        if two_streams and getattr(attn, "to_add_out", None) is not None and not getattr(attn, "context_pre_only", False):
            widths["hook_result_text"] = attn.to_add_out.out_features
    return widths


def attention_hook_specs(path: str, attn: nn.Module, widths: dict[str, int | None]) -> list[HookSpec]:
    """The contract (core/contract.py) for the attention hooks :func:`install_attention` added at ``path``
    (``widths`` is what it returned). In joint attention plain names are the image stream, ``*_text`` the text."""
    joint = "hook_z_text" in widths
    specs = []
    for name, width in widths.items():
        layout = "pattern" if name in ("hook_attn_scores", "hook_pattern", "hook_cross_pattern") else "heads"
        stream = None
        if joint and layout == "heads":
            stream = "text" if name.endswith("_text") else "image"
        specs.append(HookSpec(f"{path}.{name}", "denoiser", layout, width, n_heads=attn.heads, stream=stream))
    return specs


def install_attention(attn: nn.Module, single_stream: bool) -> dict[str, int | None] | None:
    """Wrap ``attn``'s processor and add its HookPoints. Returns hook widths, or None if unsupported."""
    original = attn.processor
    if isinstance(original, HookedAttentionProcessor):
        original = original.original
    kind = SUPPORTED_PROCESSORS.get(type(original).__name__)
    if kind is None or isinstance(original, nn.Module):
        return None
    widths = attention_hook_widths(attn, kind, single_stream)
    for name in widths:
        if not isinstance(attn._modules.get(name), nn.Module):
            attn.add_module(name, HookPoint())
    attn.set_processor(_wrapper_class(type(original))(original, kind, tuple(widths)))
    return widths


def uninstall_attention(attn: nn.Module, names: list[str]) -> None:
    if isinstance(attn.processor, HookedAttentionProcessor):
        attn.set_processor(attn.processor.original)
    for name in names:
        attn._modules.pop(name, None)
