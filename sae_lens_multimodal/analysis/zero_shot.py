"""Zero-shot classification in a CLIP model's shared text-image space.

Class weights are the averaged, normalised text embeddings of ``template.format(class name)`` over the
templates (the CLIP paper's prompt ensembling). Logits always carry the model's own logit scale (and
SigLIP's logit bias): metrics computed without the scale (cosine similarities fed to a softmax) squeeze
cross-entropy into a narrow band and make ratios such as "% CE recovered" meaningless.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_TEMPLATES",
    "text_embeddings",
    "class_text_embeddings",
    "ZeroShotClassifier",
    "ZeroShotMetrics",
    "zero_shot_classifier",
    "ce_recovered",
]

#: A small prompt ensemble (written for this package) for natural images.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def text_embeddings(model: Any, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """Text embeddings [n, d_embed] of strings through ``model.encode_text`` (HookedCLIP), in batches."""
    if isinstance(texts, str) or not len(texts):
        raise ValueError("Expected a non-empty list of strings.")
    outs = [model.encode_text(list(chunk), normalize=normalize) for chunk in _batches(list(texts), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def class_text_embeddings(
    model: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-class text embeddings [n_classes, d_embed]: for each class, the mean of the normalised
    embeddings of every template filled with its name, normalised again."""
    if isinstance(templates, str):
        templates = (templates,)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"Every template needs a '{{}}' placeholder for the class name; got {list(templates)}.")
    if isinstance(class_names, str) or not len(class_names):
        raise ValueError("Expected a non-empty list of class names.")
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = text_embeddings(model, prompts, batch_size=batch_size, normalize=True)
    emb = emb.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@dataclass
class ZeroShotMetrics:
    """Accuracy and mean cross-entropy (nats) of zero-shot logits that include the model's logit scale."""

    accuracy: float
    cross_entropy: float
    n: int

    def __str__(self) -> str:
        return f"accuracy {self.accuracy:.4f}, cross-entropy {self.cross_entropy:.4f} nats (n={self.n})"


class ZeroShotClassifier:
    """Zero-shot classifier over a fixed set of classes for a HookedCLIP.

    ``logits = exp(model.logit_scale) * cos(image, class weight) (+ model.logit_bias)``; the scale is read
    from the model at call time, so it is never dropped. Call it on images (anything
    ``model.encode_image`` takes) or use :meth:`logits_from_embeddings` on image embeddings.
    """

    def __init__(
        self,
        model: Any,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        weights: Optional[torch.Tensor] = None,
        batch_size: int = 256,
    ):
        self.model = model
        self.class_names = list(class_names)
        self.templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if weights is None:
            weights = class_text_embeddings(model, self.class_names, self.templates, batch_size=batch_size)
        elif weights.shape[0] != len(self.class_names):
            raise ValueError(f"weights has {weights.shape[0]} rows for {len(self.class_names)} classes.")
        #: Normalised class embeddings [n_classes, d_embed].
        self.weights = F.normalize(weights.detach(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The multiplier applied to cosine similarities: ``exp(model.logit_scale)``."""
        return self.model.logit_scale.detach().exp()

    def logits_from_embeddings(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[batch, n_classes] logits from image embeddings [batch, d_embed] (normalised here)."""
        w = self.weights.to(image_embeds.device, image_embeds.dtype)
        logits = self.logit_scale.to(image_embeds.device) * F.normalize(image_embeds, dim=-1) @ w.T
        bias = getattr(self.model, "logit_bias", None)
        return logits + bias.detach() if bias is not None else logits

    def logits(self, images: Any) -> torch.Tensor:
        return self.logits_from_embeddings(self.model.encode_image(images))

    __call__ = logits

    def predict(self, images: Any) -> torch.Tensor:
        return self.logits(images).argmax(dim=-1)

    @torch.no_grad()
    def evaluate(
        self,
        images: Union[torch.Tensor, Sequence[Any]],
        labels: torch.Tensor,
        *,
        saes: Sequence[Any] = (),
        fwd_hooks: Sequence[tuple[Any, Any]] = (),
        batch_size: int = 64,
    ) -> ZeroShotMetrics:
        """Accuracy and cross-entropy on labelled images, optionally with SAEs spliced (``run_with_saes``
        semantics: error term off unless the SAE says otherwise) and/or forward hooks on the model."""
        labels = torch.as_tensor(labels)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        correct, ce, n = 0, 0.0, 0
        model = self.model
        for i in range(0, len(labels), batch_size):
            x, y = images[i : i + batch_size], labels[i : i + batch_size]
            with model.saes(saes=list(saes)) if saes else _null():
                with model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else _null():
                    logits = self.logits(x)
            y = y.to(logits.device)
            correct += int((logits.argmax(-1) == y).sum())
            ce += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            n += len(y)
        return ZeroShotMetrics(accuracy=correct / n, cross_entropy=ce / n, n=n)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def zero_shot_classifier(
    model: Any, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256
) -> ZeroShotClassifier:
    """Build a :class:`ZeroShotClassifier` (class names x templates, averaged normalised text embeddings)."""
    return ZeroShotClassifier(model, class_names, templates, batch_size=batch_size)


def ce_recovered(clean: float, spliced: float, ablated: float) -> float:
    """Fraction of cross-entropy recovered by a spliced SAE: (CE_ablated - CE_spliced) / (CE_ablated - CE_clean).

    All three must come from logits with the model's logit scale (e.g. :meth:`ZeroShotClassifier.evaluate`);
    without it the denominator collapses and the ratio can exceed 1 for no real reason.
    """
    denom = ablated - clean
    if abs(denom) < 1e-12:
        raise ValueError("Ablating changes the cross-entropy by nothing, so the recovered fraction is undefined.")
    return (ablated - spliced) / denom
