"""A CLIP logit lens: read each layer's residual stream out into the joint text-image space.

For every layer, the residual stream (at the CLS token, any other token, or through the model's whole
pooling head) goes through the vision tower's final LayerNorm (with that residual's own scale) and the
projection, giving an "embedding at layer l" that is classified zero-shot with the model's logit scale.

Limits (see docs/clip.md): the readout is the final layer's *direct path* applied to an intermediate
residual. Earlier layers write in bases that later layers read and transform, not in the basis the final
LN and projection expect, so early-layer predictions are usually near chance even when the information is
present (a linear probe would find it). The lens says what the residual would mean if the remaining layers
were skipped; it is most informative in the last few layers, and for models that pool by attention
(SigLIP's MAP head) or mean pooling the "pooled" readout also runs that (non-linear / all-token) head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["CLIPLogitLensResult", "clip_logit_lens", "residual_names", "readout_residual"]


def residual_names(vision: Any) -> tuple[list[str], list[str]]:
    """(labels, hook names) of the vision tower's residual stream: its start, then each block's output."""
    start = "ln_pre.hook_normalized" if vision.cfg.has_ln_pre else "hook_full_embed"
    labels = ["embed"] + [f"blocks.{i}" for i in range(vision.cfg.n_layers)]
    names = [start] + [f"blocks.{i}.hook_resid_post" for i in range(vision.cfg.n_layers)]
    return labels, names


def _final_ln(vision: Any, x: torch.Tensor) -> torch.Tensor:
    ln = vision.ln_final
    return F.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)


def _head(vision: Any, pooled: torch.Tensor) -> torch.Tensor:
    return vision.head(pooled) if vision.cfg.head_type != "none" else pooled


def readout_residual(vision: Any, resid: torch.Tensor, position: Optional[int] = 0) -> torch.Tensor:
    """Read a residual stream [batch, pos, d_model] out into the joint space [batch, d_embed].

    ``position=int``: that token through the final LN (its own scale) and the projection.
    ``position=None``: the model's own ending on all tokens (final LN, pooling, head), so the readout of
    the last layer is exactly the image embedding for every pooling type.
    """
    cfg = vision.cfg
    if not cfg.has_ln_final:
        raise ValueError("This vision tower has no final LayerNorm, so there is no direct path to read out.")
    if position is not None:
        if cfg.head_type == "linear_tanh" or cfg.pool_type == "cls_dist":
            raise ValueError(f"A single-token readout needs a linear head on one pooled token (pool {cfg.pool_type!r}).")
        return _head(vision, _final_ln(vision, resid[:, position]))
    x = resid
    if not cfg.final_ln_after_pool:
        x = _final_ln(vision, x)
    pooled = x if cfg.pool_type == "none" else vision._pool(x)
    if cfg.final_ln_after_pool:
        pooled = _final_ln(vision, pooled)
    return _head(vision, pooled)


@dataclass
class CLIPLogitLensResult:
    """Per-layer readouts. ``layers[i]`` labels row i ("embed", "blocks.0", ...)."""

    layers: list[str]
    #: [n_layers + 1, batch, d_embed] unnormalised readouts in the joint space.
    embeddings: torch.Tensor
    #: [n_layers + 1, batch, n_classes] zero-shot logits (logit scale applied).
    logits: torch.Tensor
    class_names: list[str]

    @property
    def predictions(self) -> torch.Tensor:
        """[n_layers + 1, batch] predicted class index per layer."""
        return self.logits.argmax(dim=-1)

    def probs(self) -> torch.Tensor:
        return self.logits.softmax(dim=-1)

    def accuracy(self, labels: torch.Tensor) -> torch.Tensor:
        """[n_layers + 1] zero-shot accuracy per layer."""
        return (self.predictions == labels.to(self.logits.device)[None]).float().mean(dim=1)

    def predicted_names(self, image: int = 0) -> list[tuple[str, str]]:
        """(layer, predicted class name) for one image."""
        return [(layer, self.class_names[int(i)]) for layer, i in zip(self.layers, self.predictions[:, image])]


@torch.no_grad()
def clip_logit_lens(
    model: Any,
    images: Any,
    classifier: Any,
    position: Optional[Union[int, str]] = "pooled",
) -> CLIPLogitLensResult:
    """Per-layer zero-shot predictions of a HookedCLIP's vision tower.

    ``classifier`` is a :class:`~sae_lens_multimodal.analysis.zero_shot.ZeroShotClassifier` (or anything
    with ``logits_from_embeddings`` and ``class_names``). ``position``: ``"pooled"`` (the model's own
    pooling head on every layer, default), ``"cls"`` (token 0) or a token index.
    """
    vision = model.part("vision")  # a HookedViT is its own vision part; a HookedCLIP has one
    labels, names = residual_names(vision)
    if position == "pooled":
        pos: Optional[int] = None
    elif position == "cls":
        if not vision.cfg.has_cls_token:
            raise ValueError("This vision tower has no CLS token; use position='pooled' or a token index.")
        pos = 0
    elif isinstance(position, int):
        pos = position
    else:
        raise ValueError(f"position must be 'pooled', 'cls' or a token index, got {position!r}.")
    _, cache = vision.run_with_cache(images, names_filter=names, return_type=None)
    emb = torch.stack([readout_residual(vision, cache[n], pos) for n in names])
    logits = torch.stack([classifier.logits_from_embeddings(e) for e in emb])
    return CLIPLogitLensResult(layers=labels, embeddings=emb, logits=logits, class_names=list(classifier.class_names))
