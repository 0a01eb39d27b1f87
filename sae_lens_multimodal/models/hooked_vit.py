"""HookedViT: a vision transformer with TransformerLens hook points, converted exactly from
open_clip, transformers or timm weights (see ``models/conversions``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.contract import HookSpec, norm_specs, transformer_block_specs
from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule
from sae_lens_multimodal.core.images import as_image_batch, check_finite_pixels
from sae_lens_multimodal.core.sae_metadata import record_model_names
from sae_lens_multimodal.models.components import AttentionPoolHead, LayerNorm, TransformerBlock
from sae_lens_multimodal.models.config import HookedViTConfig
from sae_lens_multimodal.models.registry import model_name_aliases

__all__ = ["HookedViT", "ViTActivationCache", "ImageInput"]

# a preprocessed float tensor / array (B, C, H, W), a PIL image, a uint8 (H, W, C) / (N, H, W, C) array, or a list
ImageInput = Union[torch.Tensor, Any, Sequence[Any]]
ReturnType = Optional[Literal["output", "pooled", "tokens"]]


class ViTEmbed(nn.Module):
    """Patch embedding, prefix tokens and learned position embeddings (parameters only; the hooks
    ``hook_embed``/``hook_pos_embed``/``hook_full_embed`` live on the model, as in TransformerLens)."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=cfg.device, dtype=cfg.dtype)
        d = cfg.d_model
        self.W_patch = nn.Parameter(torch.zeros(d, cfg.n_channels, *cfg.patch_size, **kw))
        self.b_patch = nn.Parameter(torch.zeros(d, **kw))
        if cfg.has_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(d, **kw))
        if cfg.has_dist_token:
            self.dist_token = nn.Parameter(torch.zeros(d, **kw))
        if cfg.n_registers:
            self.registers = nn.Parameter(torch.zeros(cfg.n_registers, d, **kw))
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_pos_prefix_tokens + cfg.n_patches, d, **kw))

    def prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        parts = []
        if self.cfg.has_cls_token:
            parts.append(self.cls_token[None])
        if self.cfg.has_dist_token:
            parts.append(self.dist_token[None])
        if self.cfg.n_registers:
            parts.append(self.registers)
        return [p.unsqueeze(0).expand(batch, -1, -1) for p in parts]

    def token_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.conv2d(pixels, self.W_patch, self.b_patch, stride=self.cfg.patch_size)
        patches = patches.flatten(2).transpose(1, 2)
        prefix = self.prefix_tokens(pixels.shape[0])
        return torch.cat(prefix + [patches], dim=1) if prefix else patches

    def pos_embed(self, grid: tuple[int, int], batch: int) -> torch.Tensor:
        cfg = self.cfg
        n_pos_prefix = cfg.n_pos_prefix_tokens
        patch_pos = self.W_pos[n_pos_prefix:]
        if grid != cfg.grid_size:
            patch_pos = self._interpolate(patch_pos, grid)
        d = cfg.d_model
        zeros = patch_pos.new_zeros(cfg.n_prefix_tokens - n_pos_prefix, d)
        pos = torch.cat([self.W_pos[:n_pos_prefix], zeros, patch_pos], dim=0)
        return pos.unsqueeze(0).expand(batch, -1, -1).clone()

    def _interpolate(self, patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        mode = self.cfg.pos_embed_interpolation
        g0, g1 = self.cfg.grid_size
        x = patch_pos.reshape(1, g0, g1, -1).permute(0, 3, 1, 2).float()
        x = F.interpolate(
            x, size=grid, mode="bilinear" if mode == "bilinear" else "bicubic",
            align_corners=False, antialias=mode == "bicubic_antialias",
        )
        return x.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)


class ViTHead(nn.Module):
    """Linear head on the pooled representation (projection, classifier or ViT pooler).

    For DeiT-distilled models the pooled input is [batch, 2, d] (CLS, distillation token) and the
    output is the mean of the two heads' outputs, as in the original's inference path.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        kw = dict(device=cfg.device, dtype=cfg.dtype)
        assert cfg.d_out is not None
        self.tanh = cfg.head_type == "linear_tanh"
        self.W = nn.Parameter(torch.zeros(cfg.d_pooled, cfg.d_out, **kw))
        self.b = nn.Parameter(torch.zeros(cfg.d_out, **kw))
        self.distilled = cfg.pool_type == "cls_dist"
        if self.distilled:
            self.W_dist = nn.Parameter(torch.zeros(cfg.d_pooled, cfg.d_out, **kw))
            self.b_dist = nn.Parameter(torch.zeros(cfg.d_out, **kw))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.distilled:
            out = (pooled[:, 0] @ self.W + self.b + pooled[:, 1] @ self.W_dist + self.b_dist) / 2
        else:
            out = pooled @ self.W + self.b
        return torch.tanh(out) if self.tanh else out


class ViTActivationCache(ActivationCache):
    """TransformerLens ActivationCache for ViTs.

    Where the family has ``ln_pre`` (CLIP), the residual stream starts at ``ln_pre``'s output rather than
    at ``embed + pos_embed``, so :meth:`decompose_resid` reports that as its first component
    (label ``"ln_pre"``) and the components still sum to the residual stream.
    """

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                        incl_embeds=True, return_labels=False):
        if not (incl_embeds and getattr(self.model.cfg, "has_ln_pre", False)):
            return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        from transformer_lens.utilities import Slice

        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        first = pos_slice.apply(self["ln_pre.hook_normalized"], dim=-2)[None]
        n_layers = self.model.cfg.n_layers
        layer = n_layers if layer is None or layer == -1 else layer
        if layer == 0 and not mlp_input:
            components, labels = first, ["ln_pre"]
        else:
            rest, labels = super().decompose_resid(
                layer, mlp_input, mode, False, pos_slice, incl_embeds=False, return_labels=True
            )
            components, labels = torch.cat([first, rest]), ["ln_pre"] + labels
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    def _get_cached_ln_scale(self, layer, mlp_input, pos_slice, batch_slice=None):
        cfg = self.model.cfg
        if not (getattr(cfg, "final_ln_after_pool", False) and (layer is None or layer in (-1, cfg.n_layers))):
            return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)
        # Here ln_final saw only the pooled vector, so its cached scale has no position dimension and
        # TransformerLens's pos_slice on dim -2 would index the batch instead (silently wrong).
        from transformer_lens.utilities import Slice

        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        if not (cfg.pool_type == "cls" and pos_slice.mode == "int" and pos_slice.slice == 0):
            raise ValueError(
                f"This model's ln_final normalises only the pooled vector (final_ln_after_pool, "
                f"pool_type={cfg.pool_type!r}), so its cached scale applies to the CLS token alone. "
                "Pass pos_slice=0 (with pool_type 'cls'), or use accumulated_resid(apply_ln=True), which "
                "recomputes the normalisation."
            )
        scale = self["ln_final.hook_scale"]
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale


class HookedViT(MultimodalHookedRootModule):
    """A vision transformer whose every intermediate activation is a TransformerLens HookPoint.

    Build one with :meth:`from_pretrained` (open_clip, transformers and timm models, by name or object)
    or from a :class:`HookedViTConfig`. ``forward`` takes a (B, C, H, W) tensor that is already
    preprocessed, or PIL images (run through the source model's own preprocessing).
    Hook names and shapes: docs/hooks.md.
    """

    activation_cache_class = ViTActivationCache
    PART = "vision"

    def __init__(self, cfg: HookedViTConfig, preprocess: Optional[Callable[[Any], torch.Tensor]] = None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=cfg.device, dtype=cfg.dtype)
        self.embed = ViTEmbed(cfg)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.hook_full_embed = HookPoint()
        if cfg.has_ln_pre:
            self.ln_pre = LayerNorm(cfg.d_model, cfg.eps, **kw)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.act_fn, cfg.eps, **kw)
            for _ in range(cfg.n_layers)
        )
        if cfg.has_ln_final:
            self.ln_final = LayerNorm(cfg.d_model, cfg.eps, **kw)
        if cfg.pool_type == "attn":
            self.attn_pool = AttentionPoolHead(cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.act_fn, cfg.eps, **kw)
        self.hook_pooled = HookPoint()
        if cfg.head_type != "none":
            self.head = ViTHead(cfg)
        self.hook_out = HookPoint()
        #: Callable turning one PIL image into a (C, H, W) tensor: the source model's preprocessing.
        self.preprocess = preprocess
        self.setup()
        if cfg.normalization_type == "LNPre":
            for ln in self._block_lns():
                ln.remove_weights()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, nn.Module],
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        **source_kwargs: Any,
    ) -> "HookedViT":
        """Convert a vision transformer into a HookedViT, exactly.

        ``model`` is a source model object (open_clip CLIP / VisionTransformer, transformers
        CLIPVisionModel(WithProjection) / CLIPModel / ViTModel / ViTForImageClassification / Dinov2Model /
        SiglipVisionModel / SiglipModel, timm VisionTransformer / DeiT) or a name:
        ``"open-clip:ViT-B-32/laion2b_s34b_b79k"``, ``"open-clip:hf-hub:org/repo"``, ``"timm:<name>"``, a
        Hugging Face repo id, or a local directory saved by any of these libraries. ``source_kwargs`` go
        to the source library's loader. ``fold_ln`` / ``center_writing_weights`` apply TransformerLens's
        output-preserving weight processing.
        """
        from sae_lens_multimodal.models.conversions import convert_vision_model

        cfg, state_dict, preprocess = convert_vision_model(model, **source_kwargs)
        if dtype is not None:
            cfg.dtype = dtype
        if device is not None:
            cfg.device = str(device)
        hooked = cls(cfg, preprocess=preprocess)
        hooked.load_state_dict({k: v.to(cfg.dtype) for k, v in state_dict.items()}, strict=True)
        if fold_ln:
            hooked.fold_layer_norm()
        if center_writing_weights:
            hooked.center_writing_weights()
        if isinstance(model, str):  # the names an SAE's recorded model_name is checked against when spliced in
            record_model_names(hooked, model_name_aliases(model))
        return hooked.eval()

    # ------------------------------------------------------------------ forward
    def to_pixels(self, images: ImageInput) -> torch.Tensor:
        """Validate and batch an input: a preprocessed float (B, C, H, W) tensor or array, or PIL images /
        uint8 (H, W, C) arrays through ``preprocess`` (core/images.py ``as_image_batch``)."""
        cfg = self.cfg
        x = as_image_batch(images, cfg.n_channels, self.preprocess, owner="this HookedViT")
        if x.ndim == 3 and x.shape[0] == cfg.n_channels:
            raise ValueError(
                f"Expected a batch of images (B, {cfg.n_channels}, H, W), got one image of shape "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)."
            )
        if x.ndim != 4 or x.shape[1] != cfg.n_channels:
            raise ValueError(
                f"Expected images of shape (B, {cfg.n_channels}, H, W), got {tuple(x.shape)}"
                + (" (channel-last? use x.permute(0, 3, 1, 2))" if x.ndim == 4 and x.shape[-1] == cfg.n_channels else "")
            )
        h, w = x.shape[-2:]
        ph, pw = cfg.patch_size
        if (h, w) != cfg.image_size and (cfg.pos_embed_interpolation is None or h % ph or w % pw):
            expected = f"{cfg.image_size[0]}x{cfg.image_size[1]}"
            raise ValueError(
                f"Expected {expected} images, got {h}x{w}. "
                + (
                    "This model's position embeddings are fixed: resize the images (model.preprocess does)."
                    if cfg.pos_embed_interpolation is None
                    else f"Sizes other than {expected} must be multiples of the patch size {ph}x{pw}."
                )
            )
        check_finite_pixels(x)
        return x.to(device=self.embed.W_patch.device, dtype=self.embed.W_patch.dtype)

    def forward(
        self,
        images: ImageInput,
        return_type: ReturnType = "output",
        stop_at_layer: Optional[int] = None,
    ) -> Optional[torch.Tensor]:
        """Run the model.

        ``return_type``: ``"output"`` (projected embedding / class logits / pooled output: what the source
        model returns), ``"pooled"`` (before the head), ``"tokens"`` (final normalised tokens) or None.
        ``stop_at_layer=n`` runs blocks 0..n-1 and returns the residual stream [batch, pos, d_model]
        (TransformerLens semantics; negative values count from the end).
        """
        cfg = self.cfg
        pixels = self.to_pixels(images)
        grid = (pixels.shape[-2] // cfg.patch_size[0], pixels.shape[-1] // cfg.patch_size[1])
        with self._special_token_masks(cfg.n_prefix_tokens + grid[0] * grid[1], pixels.device):
            embed = self.hook_embed(self.embed.token_embed(pixels))
            pos = self.hook_pos_embed(self.embed.pos_embed(grid, pixels.shape[0]))
            x = self.hook_full_embed(embed + pos)
            if cfg.has_ln_pre:
                x = self.ln_pre(x)
            blocks = self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]
            for block in blocks:
                x = block(x)
        if stop_at_layer is not None:
            return x
        if cfg.has_ln_final and not cfg.final_ln_after_pool:
            x = self.ln_final(x)
        if return_type == "tokens":
            return x
        if cfg.pool_type == "none":
            pooled = self.hook_pooled(x)  # fires for every pool type, so it is never a dead hook
        else:
            pooled = self._pool(x)
            if cfg.has_ln_final and cfg.final_ln_after_pool:
                pooled = self.ln_final(pooled)
            pooled = self.hook_pooled(pooled)
        if return_type == "pooled":
            return pooled
        out = self.head(pooled) if cfg.head_type != "none" else pooled
        out = self.hook_out(out)
        return out if return_type == "output" else None

    @contextlib.contextmanager
    def _special_token_masks(self, n_tokens: int, device: torch.device) -> Iterator[None]:
        """SAELens's ``add_sae(..., exclude_special_tokens=...)`` for images: spliced SAEs pass the prefix tokens
        (CLS, registers, distillation token) through unchanged when it is True, or the token positions it
        lists (for images a list names positions, not token ids), for this forward pass."""
        from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper

        wrappers = [(name, m) for name, m in self.named_modules()
                    if isinstance(m, _SAEWrapper) and m.exclude_special_tokens is not False]
        for name, wrapper in wrappers:
            if not (name.startswith("blocks.") or name == "hook_full_embed"):
                raise ValueError(
                    f"exclude_special_tokens was given for the SAE at {name!r}, which has no token axis; it applies "
                    "to token hooks (blocks.*, hook_full_embed). Splice this SAE without it."
                )
            spec = wrapper.exclude_special_tokens
            mask = torch.zeros(1, n_tokens, dtype=torch.bool, device=device)  # broadcast over the batch
            if spec is True:
                mask[:, : self.cfg.n_prefix_tokens] = True
            else:
                positions = torch.as_tensor(list(spec), dtype=torch.long)
                if len(positions) and not bool(((positions >= -n_tokens) & (positions < n_tokens)).all()):
                    raise ValueError(
                        f"exclude_special_tokens={list(spec)} for the SAE at {name!r}: positions must be in "
                        f"[0, {n_tokens}) for these images (prefix tokens + patches)."
                    )
                mask[:, positions.to(device)] = True
            wrapper.set_token_mask(mask)
        try:
            yield
        finally:
            for _, wrapper in wrappers:
                wrapper.set_token_mask(None)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = self.cfg.pool_type
        if pool == "cls":
            return tokens[:, 0]
        if pool == "cls_dist":
            return tokens[:, :2]
        if pool == "mean":
            return tokens[:, self.cfg.n_prefix_tokens:].mean(dim=1)
        if pool == "attn":
            return self.attn_pool(tokens)
        raise ValueError(f"Unknown pool_type {pool!r}")

    # ------------------------------------------------------------------ hook contract (core/contract.py)
    def _build_hook_specs(self) -> dict[str, HookSpec]:
        cfg = self.cfg
        tokens: dict[str, Any] = dict(part="vision", n_prefix_tokens=cfg.n_prefix_tokens, grid=cfg.grid_size,
                                      has_cls_token=cfg.has_cls_token)
        specs = [HookSpec(name, layout="tokens", width=cfg.d_model, **tokens)
                 for name in ("hook_embed", "hook_pos_embed", "hook_full_embed")]
        if cfg.has_ln_pre:
            specs += norm_specs("ln_pre", cfg.d_model, "tokens", **tokens)
        for layer in range(cfg.n_layers):
            specs += transformer_block_specs(
                layer, "vision", d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
                n_prefix_tokens=cfg.n_prefix_tokens, grid=cfg.grid_size, has_cls_token=cfg.has_cls_token,
            ).values()
        # What pooling leaves: one vector (cls, mean, attn), CLS + distillation token (cls_dist: [b, 2, d],
        # no patch grid), or every token (none).
        pooled: dict[str, Any] = dict(part="vision")
        pooled_layout = {"none": "tokens", "cls_dist": "tokens"}.get(cfg.pool_type, "pooled")
        if cfg.pool_type == "none":
            pooled.update(tokens)
        if cfg.has_ln_final:
            after_pool = cfg.final_ln_after_pool and cfg.pool_type != "none"
            specs += norm_specs("ln_final", cfg.d_model, pooled_layout if after_pool else "tokens",
                                **(pooled if after_pool else tokens))
        if cfg.pool_type == "attn":  # the probe is one query attending over every token
            d_head, n_heads = cfg.d_model // cfg.n_heads, cfg.n_heads
            specs += [
                HookSpec("attn_pool.attn.hook_q", "vision", "heads", d_head, n_heads=n_heads),
                HookSpec("attn_pool.attn.hook_k", layout="heads", width=d_head, n_heads=n_heads, **tokens),
                HookSpec("attn_pool.attn.hook_v", layout="heads", width=d_head, n_heads=n_heads, **tokens),
                HookSpec("attn_pool.attn.hook_attn_scores", "vision", "pattern", None, n_heads=n_heads),
                HookSpec("attn_pool.attn.hook_pattern", "vision", "pattern", None, n_heads=n_heads),
                HookSpec("attn_pool.attn.hook_z", "vision", "heads", d_head, n_heads=n_heads),
                HookSpec("attn_pool.attn.hook_result", "vision", "heads", cfg.d_model, n_heads=n_heads),
                HookSpec("attn_pool.mlp.hook_pre", "vision", "tokens", cfg.d_mlp),
                HookSpec("attn_pool.mlp.hook_post", "vision", "tokens", cfg.d_mlp),
                *norm_specs("attn_pool.ln", cfg.d_model, "tokens", part="vision"),
            ]
        specs += [
            HookSpec("hook_pooled", layout=pooled_layout, width=cfg.d_model, **pooled),
            HookSpec("hook_out", layout="tokens" if cfg.pool_type == "none" else "pooled", width=cfg.output_dim,
                     **pooled),
        ]
        return {s.name: s for s in specs}

    def _apply(self, fn, *args, **kwargs):  # keep cfg.device/dtype in step with .to()/.cuda()/.half()
        out = super()._apply(fn, *args, **kwargs)
        p = self.embed.W_patch
        self.cfg.device, self.cfg.dtype = str(p.device), p.dtype
        return out

    # ------------------------------------------------------------------ weight processing
    def _block_lns(self) -> list[LayerNorm]:
        return [ln for b in self.blocks for ln in (b.ln1, b.ln2)]

    @torch.no_grad()
    def fold_layer_norm(self) -> None:
        """Fold every block LayerNorm's weight and bias into the linear maps that read it (TransformerLens
        ``fold_ln``); the LayerNorms become LNPre. ``ln_final`` is folded into the head (or the attention
        pooler's keys and values) where one reads it; otherwise it keeps its weights. Output is unchanged."""
        for block in self.blocks:
            w, b = block.ln1.w, block.ln1.b
            if w is None:
                continue
            attn = block.attn
            for W, bias in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)):
                bias += torch.einsum("d,hdk->hk", b, W)
                W *= w[None, :, None]
            block.ln1.remove_weights()
            w, b = block.ln2.w, block.ln2.b
            block.mlp.b_in += b @ block.mlp.W_in
            block.mlp.W_in *= w[:, None]
            block.ln2.remove_weights()
        self.cfg.normalization_type = "LNPre"
        ln = getattr(self, "ln_final", None)
        if ln is None or ln.w is None:
            return
        if self.cfg.pool_type == "attn":
            attn = self.attn_pool.attn
            for W, bias in ((attn.W_K, attn.b_K), (attn.W_V, attn.b_V)):
                bias += torch.einsum("d,hdk->hk", ln.b, W)
                W *= ln.w[None, :, None]
            ln.remove_weights()
        elif self.cfg.head_type == "linear" and self.cfg.pool_type != "none":
            head = self.head
            for W, bias in [(head.W, head.b)] + ([(head.W_dist, head.b_dist)] if head.distilled else []):
                bias += ln.b @ W
                W *= ln.w[:, None]
            ln.remove_weights()

    @torch.no_grad()
    def center_writing_weights(self) -> None:
        """Make every write into the residual stream mean-zero over d_model (TransformerLens
        ``center_writing_weights``). Output is unchanged because every reader of the residual stream is
        a LayerNorm, which removes the mean."""

        def center(t: torch.Tensor, dim: int = -1) -> None:
            t -= t.mean(dim, keepdim=True)

        for block in self.blocks:
            center(block.attn.W_O)
            center(block.attn.b_O)
            center(block.mlp.W_out)
            center(block.mlp.b_out)
        if not self.cfg.has_ln_pre:  # with ln_pre, its output (not the embeddings) is what is written
            e = self.embed
            center(e.W_patch, dim=0)
            center(e.b_patch)
            center(e.W_pos)
            for name in ("cls_token", "dist_token", "registers"):
                if hasattr(e, name):
                    center(getattr(e, name))
