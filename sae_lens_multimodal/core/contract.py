"""The hook contract: what every hooked model says about each of its hooks.

Every model in this package (HookedViT, HookedText, HookedCLIP, HookedVLM, the hooked diffusion denoisers)
builds one :class:`HookSpec` per hook from its config, once (``model.hook_specs()``). Code that needs to know
what a hook is (its width, whether it has a head axis, how many prefix tokens precede the patches, which
tower it lives in) reads the spec instead of guessing from the hook name or the module tree. Adding a model
family means converting it into one of these model kinds, which then describe their hooks themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Optional

__all__ = ["HookSpec", "PARTS", "LAYOUTS", "STREAMS", "norm_specs", "transformer_block_specs", "nest_specs"]

#: The parts a hook can belong to: a vision tower, a text tower, a VLM's language model and projector,
#: a diffusion denoiser.
PARTS = ("vision", "text", "language_model", "projector", "denoiser")

#: Layout name -> the shape of the tensor the hook sees. ``width`` is always the last dimension's size
#: (None where the last dimension is not a feature dimension).
LAYOUTS: dict[str, str] = {
    "tokens": "[batch, pos, width]",
    "heads": "[batch, pos, n_heads, width]",
    "pattern": "[batch, n_heads, query_pos, key_pos] (width None)",
    "scale": "[batch, pos, 1] (a LayerNorm / RMSNorm scale; width None)",
    "pooled": "[batch, width]",
    "pooled_scale": "[batch, 1] (the scale of a LayerNorm applied to a pooled vector; width None)",
    "spatial": "[batch, height, width_px, channels] (a channel-last feature map; width = channels)",
    "flat_tokens": "[n_tokens, width] (the tokens of every image in one axis, e.g. HookedVLM.hook_image_features)",
}

#: Streams of a joint-attention (MM-DiT) block: the image tokens and the text tokens.
STREAMS = ("image", "text")


@dataclass(frozen=True)
class HookSpec:
    """What one hook is.

    ``name`` is the full hook name on the model that reported it; ``local_name`` the name within its part
    (the same on a standalone model; ``blocks.9.hook_resid_post`` for ``vision.blocks.9.hook_resid_post`` on
    a HookedCLIP). ``layout`` is a key of :data:`LAYOUTS`; ``width`` the size of the last dimension;
    ``n_heads`` the head axis' size (layouts ``heads`` and ``pattern``). For vision tokens,
    ``n_prefix_tokens`` tokens (CLS, distillation token, registers) precede the patches, which form ``grid``
    (rows, columns) at the model's native image size in row-major order; ``has_cls_token`` says whether the
    first of them is a CLS token. ``layer`` is the block index for
    block hooks, ``stream`` ``"image"`` / ``"text"`` in a joint-attention block.
    """

    name: str
    part: str
    layout: str
    width: Optional[int]
    n_heads: Optional[int] = None
    n_prefix_tokens: int = 0
    grid: Optional[tuple[int, int]] = None
    has_cls_token: bool = False
    layer: Optional[int] = None
    stream: Optional[str] = None
    local_name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"HookSpec {self.name!r}: part {self.part!r} is not one of {PARTS}.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"HookSpec {self.name!r}: layout {self.layout!r} is not one of {tuple(LAYOUTS)}.")
        if self.layout in ("heads", "pattern") and self.n_heads is None:
            raise ValueError(f"HookSpec {self.name!r}: layout {self.layout!r} needs n_heads.")
        if self.stream is not None and self.stream not in STREAMS:
            raise ValueError(f"HookSpec {self.name!r}: stream {self.stream!r} is not one of {STREAMS}.")
        if self.local_name is None:
            object.__setattr__(self, "local_name", self.name)

    @property
    def has_token_axis(self) -> bool:
        """Whether dimension 1 indexes token positions (layouts tokens, heads and scale)."""
        return self.layout in ("tokens", "heads", "scale")

    @property
    def has_image_tokens(self) -> bool:
        """Whether the token axis holds a vision tower's tokens (prefix tokens, then the patch grid)."""
        return self.grid is not None and self.has_token_axis

    @property
    def n_tokens(self) -> Optional[int]:
        """Positions per image at the native size (prefix tokens + patches), where there is a patch grid."""
        return None if self.grid is None else self.n_prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def flat_width(self) -> Optional[int]:
        """Width with the head axis flattened (what an SAE with ``reshape_activations="hook_z"`` reads)."""
        if self.width is None:
            return None
        return self.width * self.n_heads if self.layout == "heads" and self.n_heads else self.width


def nest_specs(specs: Iterable[HookSpec], prefix: str) -> dict[str, HookSpec]:
    """The specs of a sub-model as its host reports them: names under ``prefix.``, local names kept."""
    return {f"{prefix}.{s.name}": replace(s, name=f"{prefix}.{s.name}") for s in specs}


def norm_specs(name: str, width: int, layout: str = "tokens", **fields: Any) -> list[HookSpec]:
    """A LayerNorm / RMSNorm's two hooks, ``{name}.hook_scale`` (``[..., 1]``) and ``{name}.hook_normalized``,
    over the leading axes of ``layout`` (``tokens``, or ``pooled`` for a norm applied after pooling)."""
    scale = {"tokens": "scale", "pooled": "pooled_scale"}[layout]
    return [HookSpec(f"{name}.hook_scale", layout=scale, width=None, **fields),
            HookSpec(f"{name}.hook_normalized", layout=layout, width=width, **fields)]


def transformer_block_specs(
    layer: int,
    part: str,
    *,
    d_model: int,
    n_heads: int,
    d_head: int,
    d_mlp: int,
    n_key_value_heads: Optional[int] = None,
    gated_mlp: bool = False,
    rotary: bool = False,
    n_prefix_tokens: int = 0,
    grid: Optional[tuple[int, int]] = None,
    has_cls_token: bool = False,
    prefix: str = "blocks",
) -> dict[str, HookSpec]:
    """The hooks of one pre-norm transformer block with TransformerLens names (``blocks.{layer}.*``).

    Shared by every transformer in this package (HookedViT, HookedText, a VLM's language model): the
    residual hooks, ``ln1`` / ``ln2``, ``attn.hook_q/k/v/z/result/attn_scores/pattern`` (plus
    ``hook_rot_q/k`` with rotary embeddings) and ``mlp.hook_pre/post`` (plus ``hook_pre_linear`` when gated).
    Keys and values have ``n_key_value_heads`` heads under grouped-query attention.
    """
    base = f"{prefix}.{layer}"
    kv_heads = n_key_value_heads or n_heads
    token = dict(part=part, n_prefix_tokens=n_prefix_tokens, grid=grid, has_cls_token=has_cls_token, layer=layer)
    out: list[HookSpec] = []

    def add(local: str, layout: str, width: Optional[int], heads: Optional[int] = None) -> None:
        out.append(HookSpec(name=f"{base}.{local}", layout=layout, width=width, n_heads=heads, **token))  # type: ignore[arg-type]

    for local in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
        add(local, "tokens", d_model)
    for ln in ("ln1", "ln2"):
        out += norm_specs(f"{base}.{ln}", d_model, **token)
    add("attn.hook_q", "heads", d_head, n_heads)
    add("attn.hook_k", "heads", d_head, kv_heads)
    add("attn.hook_v", "heads", d_head, kv_heads)
    if rotary:
        add("attn.hook_rot_q", "heads", d_head, n_heads)
        add("attn.hook_rot_k", "heads", d_head, kv_heads)
    add("attn.hook_attn_scores", "pattern", None, n_heads)
    add("attn.hook_pattern", "pattern", None, n_heads)
    add("attn.hook_z", "heads", d_head, n_heads)
    add("attn.hook_result", "heads", d_model, n_heads)
    add("mlp.hook_pre", "tokens", d_mlp)
    if gated_mlp:
        add("mlp.hook_pre_linear", "tokens", d_mlp)
    add("mlp.hook_post", "tokens", d_mlp)
    return {s.name: s for s in out}
