"""Image activation store: images -> HookedViT / HookedCLIP-vision activations at any hook, as rows.

Rows are selected by a token policy: ``"all"`` tokens, ``"cls"`` (the CLS token only) or ``"patches"``
(patch tokens only, no CLS/distillation/register tokens). Pooled hooks ((batch, d) activations such
as ``hook_pooled``) give one row per image. Per-head hooks (layout ``heads``: ``hook_q/k/v/z/result``) are
flattened to ``n_heads * width`` as SAELens's ``hook_z`` SAEs expect. What a hook is (its layout, width and
prefix tokens) comes from the model's hook contract (``model.locate(hook)``, core/contract.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal, Optional, Union

import torch
from tqdm.auto import tqdm

from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.core.sae_metadata import TOKEN_POLICIES
from sae_lens_multimodal.training.cache import ActivationChunk, dtype_name, model_identity
from sae_lens_multimodal.training.sources import ImageSource, image_source

__all__ = ["TOKEN_POLICIES", "TokenPolicy", "ImageActivationStore", "apply_token_policy"]

TokenPolicy = Literal["all", "cls", "patches"]  # the values of TOKEN_POLICIES (core/sae_metadata.py)
_FEATURE_LAYOUTS = ("tokens", "heads", "pooled")


def vision_tower(model: Any) -> Any:
    """The HookedViT of ``model`` (``model.part("vision")``: itself, or a HookedCLIP's / HookedVLM's tower)."""
    if not has_parts(model, "vision"):
        raise TypeError(
            f"{type(model).__name__} has no vision tower; image activation stores read a HookedViT, or the vision "
            "tower of a HookedCLIP / HookedVLM."
        )
    return model.part("vision")


def vision_hook_spec(model: Any, hook: str) -> HookSpec:
    """The spec of ``hook`` (a full name, or one relative to the vision tower), refused outside the vision tower."""
    spec = model.locate(hook)
    if spec.part != "vision":
        tower = "text tower" if spec.part == "text" else f"{spec.part} part"
        raise ValueError(f"Hook {hook!r} is in the {tower}; image activation stores read the vision tower.")
    return spec


def local_hook_name(model: Any, hook: str) -> str:
    """A hook name relative to the vision tower (``vision.blocks.3...`` -> ``blocks.3...``)."""
    return vision_hook_spec(model, hook).local_name  # type: ignore[return-value]


def apply_token_policy(act: torch.Tensor, policy: str, spec: HookSpec, has_cls: bool) -> torch.Tensor:
    """(batch, ...) activation at the hook ``spec`` describes -> (batch, rows_per_image, d), following the
    token policy (``n_prefix_tokens`` from the spec)."""
    hook = spec.name
    if spec.layout not in _FEATURE_LAYOUTS:
        raise ValueError(
            f"Hook {hook!r} (layout {spec.layout!r}) holds attention scores/patterns or a norm's scale, not feature "
            "vectors: no SAE reads it."
        )
    if spec.layout == "heads":
        act = act.flatten(-2)  # (batch, tokens, heads * width)
    if act.ndim == 2:  # pooled: one vector per image
        if policy == "patches":
            raise ValueError(f"Hook {hook!r} has one vector per image (no tokens); use token_policy='all' or 'cls'.")
        return act[:, None]
    if act.ndim != 3:
        raise ValueError(f"Hook {hook!r} gives activations of shape {tuple(act.shape)}; expected (batch, tokens, d).")
    if policy == "all":
        return act
    if policy == "cls":
        if not has_cls:
            raise ValueError("This model has no CLS token; use token_policy='patches' or 'all'.")
        return act[:, :1]
    if policy == "patches":
        return act[:, spec.n_prefix_tokens:]
    raise ValueError(f"Unknown token_policy {policy!r}; expected one of {TOKEN_POLICIES}.")


class ImageActivationStore:
    """Runs images through a HookedViT (or a HookedCLIP's vision tower) and yields activation rows.

    ``images``: a (N, C, H, W) tensor, a list of PIL images / tensors, an image folder, or a Hugging Face
    ``datasets`` Dataset / IterableDataset with an image column (``image_column``, found automatically
    when it has the ``Image`` feature type). Images that are not tensors go through ``preprocess``
    (default: ``model.preprocess``). ``batch_size`` is images per forward pass. The forward pass stops
    after the last block that a hook needs.
    """

    kind = "image"

    def __init__(
        self,
        model: Any,
        hook_names: Union[str, Sequence[str]],
        images: Any,
        *,
        token_policy: TokenPolicy = "all",
        batch_size: int = 32,
        preprocess: Any = None,
        image_column: Optional[str] = None,
        dtype: Union[str, torch.dtype] = "float32",
        model_name: Optional[str] = None,
        progress: bool = True,
    ):
        self.model = model
        self.vit = vision_tower(model)
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not names:
            raise ValueError("Give at least one hook name.")
        self.hook_names = names
        self.specs = {h: vision_hook_spec(model, h) for h in names}
        self.local_names = {h: spec.local_name for h, spec in self.specs.items()}
        if token_policy not in TOKEN_POLICIES:
            raise ValueError(f"Unknown token_policy {token_policy!r}; expected one of {TOKEN_POLICIES}.")
        self.token_policy = token_policy
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.source: ImageSource = image_source(
            images, preprocess if preprocess is not None else getattr(self.vit, "preprocess", None), image_column
        )
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.progress = progress
        self.identity = model_identity(self.vit, model_name)
        layers = [spec.layer for spec in self.specs.values()]
        self.stop_at_layer = max(layers) + 1 if None not in layers else None  # type: ignore[operator]
        self._d_in = {h: self._width(spec) for h, spec in self.specs.items()}

    # ------------------------------------------------------------------ facts
    @staticmethod
    def _width(spec: HookSpec) -> int:
        width = spec.flat_width
        if spec.layout not in _FEATURE_LAYOUTS or width is None:
            raise ValueError(
                f"Hook {spec.name!r} (layout {spec.layout!r}) holds no feature vectors for an SAE (attention "
                "scores/patterns, or a norm's scale)."
            )
        return width

    def d_in(self, hook: str) -> int:
        return self._d_in[hook]

    @property
    def n_items(self) -> Optional[int]:
        return self.source.n_items

    def rows_per_item(self) -> int:
        """Most rows one image gives at any of the hooks (at the model's native image size)."""
        cfg = self.vit.cfg
        per_policy = {"all": cfg.n_ctx, "cls": 1, "patches": cfg.n_patches}[self.token_policy]
        return max(1 if spec.layout == "pooled" else per_policy for spec in self.specs.values())

    def describe(self, hook: str) -> dict[str, Any]:
        """Cache metadata for ``hook`` (see docs/activation-cache.md)."""
        return {
            "kind": self.kind, "model": self.identity, "hook_name": hook, "d_in": self.d_in(hook),
            "dtype": dtype_name(self.dtype), "token_policy": self.token_policy, "source": self.source.describe(),
            "diffusion": None,
        }

    # ------------------------------------------------------------------ activations
    @torch.no_grad()
    def iter_chunks(self, start_item: int = 0, stop_item: Optional[int] = None,
                    align: Optional[int] = None) -> Iterator[tuple[int, int, dict[str, ActivationChunk]]]:
        """``(item_start, item_end, {hook: chunk})`` per forward batch of items ``[start_item, stop_item)``
        (``stop_item`` None: to the end of the source), in source order; with ``align`` (a cache's
        items per shard) no batch crosses a shard boundary."""
        has_cls = self.vit.cfg.has_cls_token
        captured: dict[str, torch.Tensor] = {}

        def capture_for(spec: HookSpec) -> Any:
            # (bound per hook: inside a HookedCLIP, hook.name carries the tower prefix)
            def capture(act: torch.Tensor, hook: Any) -> None:
                rows = apply_token_policy(act, self.token_policy, spec, has_cls)
                captured[spec.local_name] = rows.detach().to(self.dtype)  # type: ignore[index]

            return capture

        fwd_hooks = [(spec.local_name, capture_for(spec)) for spec in self.specs.values()]
        bar = tqdm(total=self.n_items, initial=start_item, unit="img", desc="Caching activations",
                   disable=not self.progress)
        try:
            for start, pixels in self.source.batches(self.batch_size, start_item, stop_item, align):
                captured.clear()
                with self.vit.hooks(fwd_hooks=fwd_hooks):
                    self.vit(pixels, return_type=None, stop_at_layer=self.stop_at_layer)
                n = pixels.shape[0]
                out = {}
                for hook, local in self.local_names.items():
                    rows = captured[local]  # (batch, rows_per_image, d)
                    sample = torch.arange(start, start + n).repeat_interleave(rows.shape[1])
                    out[hook] = ActivationChunk(rows.reshape(-1, rows.shape[-1]), sample)
                bar.update(n)
                yield start, start + n, out
        finally:
            bar.close()

    def activation_batches(self, hook: str) -> Iterator[torch.Tensor]:
        """Unshuffled (rows, d_in) tensors of one hook, one per forward batch."""
        for _, _, chunks in self.iter_chunks():
            yield chunks[hook].acts
