"""Architecture configs. Field names follow TransformerLens where a field exists there, because
TransformerLens utilities (ActivationCache, patching) read ``model.cfg.n_layers``, ``n_heads``, ``d_mlp``...
Only architecture lives here: no training, logging or weight-source settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal, Optional, TypeVar

import torch

__all__ = ["HookedViTConfig", "TransformerTowerConfig"]

PoolType = Literal["cls", "mean", "attn", "cls_dist", "none"]
HeadType = Literal["none", "linear", "linear_tanh"]


def _pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


_Config = TypeVar("_Config", bound="TransformerTowerConfig")


@dataclass
class TransformerTowerConfig:
    """What every hooked transformer tower shares (:class:`HookedViTConfig`, ``HookedTextConfig``): the
    shape of its pre-norm blocks, which the shared ``TransformerBlock`` reads, and the fields TransformerLens
    utilities read from ``model.cfg``. Fields after ``d_mlp`` are keyword-only, so that each tower's config
    can add its own fields (required ones included) after these."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    _: KW_ONLY
    d_head: int = 0  # 0 means d_model // n_heads
    act_fn: str = "gelu"
    eps: float = 1e-5
    normalization_type: Literal["LN", "LNPre"] = "LN"
    model_name: str = "custom"
    original_architecture: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    # Read by TransformerLens utilities; fixed for these towers.
    n_key_value_heads: Optional[int] = None
    attn_only: bool = False
    positional_embedding_type: str = "standard"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_head == 0:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.d_head = self.d_model // self.n_heads
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype.replace("torch.", ""))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d

    @classmethod
    def from_dict(cls: type[_Config], d: dict[str, Any]) -> _Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class HookedViTConfig(TransformerTowerConfig):
    """A vision transformer: patch embedding, prefix tokens, pre-norm blocks, pooling and a head.

    Token order in the residual stream is ``[CLS?, distillation?, registers..., patches...]`` with
    patches in row-major order. The first ``n_pos_prefix_tokens`` prefix tokens carry a learned
    position embedding (e.g. CLIP: CLS; DINOv2: CLS but not registers; SigLIP: none).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    n_channels: int = 3
    patch_embed_bias: bool = False
    has_cls_token: bool = True
    has_dist_token: bool = False
    n_registers: int = 0
    n_pos_prefix_tokens: int = 1
    #: How to resize position embeddings for another image size: None refuses other sizes.
    pos_embed_interpolation: Optional[Literal["bicubic", "bicubic_antialias", "bilinear"]] = None
    has_ln_pre: bool = False
    has_ln_final: bool = True
    pool_type: PoolType = "cls"
    final_ln_after_pool: bool = False
    head_type: HeadType = "none"
    d_out: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.image_size = _pair(self.image_size)
        self.patch_size = _pair(self.patch_size)
        if self.n_pos_prefix_tokens > self.n_prefix_tokens:
            raise ValueError(
                f"n_pos_prefix_tokens={self.n_pos_prefix_tokens} > number of prefix tokens {self.n_prefix_tokens}"
            )
        if self.head_type != "none" and not self.d_out:
            raise ValueError(f"head_type={self.head_type!r} needs d_out")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.has_cls_token) + int(self.has_dist_token) + self.n_registers

    @property
    def n_ctx(self) -> int:
        """Tokens per image at the native image size."""
        return self.n_prefix_tokens + self.n_patches

    @property
    def d_pooled(self) -> int:
        return self.d_model

    @property
    def output_dim(self) -> int:
        return self.d_out if self.head_type != "none" and self.d_out else self.d_model
