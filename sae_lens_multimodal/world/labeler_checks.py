"""Every labeler of :mod:`sae_lens_multimodal.analysis.labelers` scored side by side on the shapes world (issue 16).

The ground truth says what a feature's top images share: a feature is *pure* in a factor when at least
``purity`` of its ``top_k`` top-activating images (on the scoring images) have one value of it. The labelers
never see it: they get the CLIP, the SAE, the vocabulary of the world's factor values (embedded in the
world's captions, :func:`~sae_lens_multimodal.analysis.labelers.context_text_embeddings`) and a *separate*
sample of reference images, so a label must hold beyond the images it is scored on.

Scoring (the ground truth maps each term to its factor; nothing else uses it):

* a term is right when at least half of the feature's top scoring images have that value;
* a labelled feature is **named correctly** when every term of its label is right; per labeler,
  accuracy = named correctly / pure features, coverage = labelled / pure features, precision =
  named correctly / labelled;
* per factor, over the features pure in it: accuracy = the label has a term of that factor and it is the
  shared value; coverage = the label has a term of that factor; precision = accuracy / coverage.
* multi-factor slots: features at the 90% bar are rarely pure in two factors (1-4 per SAE), too few to
  score, so slots are scored on the features whose top images share a value in two factors or more at the
  lower bar ``multi_purity`` (75%): each such factor is a slot, right when the label has a term of that
  factor and it is the shared value; reported as slots right / slots and the count of features.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sae_lens_multimodal.analysis.labelers import LABELERS, FeatureLabel, prepare_inputs
from sae_lens_multimodal.world.shapes import ShapesWorld

__all__ = ["LabelerScore", "LabelerComparison", "compare_labelers"]

FACTORS: tuple[str, ...] = ("color", "shape", "position")


@dataclass
class LabelerScore:
    """Counts of one labeler: overall [pure, labelled, correct] and per factor [pure, labelled, correct]."""

    overall: list[int] = field(default_factory=lambda: [0, 0, 0])
    per_factor: dict[str, list[int]] = field(default_factory=lambda: {f: [0, 0, 0] for f in FACTORS})
    #: multi-factor features: [features, features with every slot right, slots, slots right]
    slots: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    @staticmethod
    def _rates(n: int, labelled: int, correct: int) -> tuple[float, float, float]:
        return correct / max(1, n), labelled / max(1, n), correct / max(1, labelled)

    def accuracy(self, factor: Optional[str] = None) -> float:
        return self._rates(*(self.overall if factor is None else self.per_factor[factor]))[0]

    def coverage(self, factor: Optional[str] = None) -> float:
        return self._rates(*(self.overall if factor is None else self.per_factor[factor]))[1]

    def precision(self, factor: Optional[str] = None) -> float:
        return self._rates(*(self.overall if factor is None else self.per_factor[factor]))[2]

    def slot_accuracy(self) -> float:
        """Right slots / slots over the multi-factor features (0 when there are none)."""
        return self.slots[3] / max(1, self.slots[2])


@dataclass
class LabelerComparison:
    """All labelers on one SAE, with the labels for inspection."""

    hook_name: str
    n_features: int  # features active on at least top_k scoring images
    n_pure: int
    n_multi: int  # pure in two factors or more
    scores: dict[str, LabelerScore]
    labels: dict[str, list[FeatureLabel]] = field(default_factory=dict)
    pure: list[dict[str, str]] = field(default_factory=list)
    multi_purity: float = 0.75  # the bar of the multi-factor slot scoring

    def to_table(self) -> str:
        head = (f"labelers at {self.hook_name}: {self.n_pure} of {self.n_features} features pure (>= 90% of top-20 "
                f"images share a value; {self.n_multi} in two factors); cells: accuracy / coverage / precision")
        n_slot = next(iter(self.scores.values())).slots if self.scores else [0, 0, 0, 0]
        head += (f"; slots: {n_slot[0]} features share a value in two factors or more at "
                 f">= {self.multi_purity:.0%} ({n_slot[2]} slots): slots right / slots, all slots right")
        lines = [head, f"{'labeler':<19} {'overall':<16} " + " ".join(f"{f:<16}" for f in FACTORS) + " slots"]
        for name, s in self.scores.items():
            cells = [f"{s.accuracy(f):.0%} / {s.coverage(f):.0%} / {s.precision(f):.0%}" for f in (None, *FACTORS)]
            slots = f"{s.slots[3]}/{s.slots[2]}, {s.slots[1]}/{s.slots[0]}"
            lines.append(f"{name:<19} " + " ".join(f"{c:<16}" for c in cells) + " " + slots)
        return "\n".join(lines)

    __str__ = to_table


def _shares(factors: Sequence[Any], top: list[int]) -> dict[str, dict[str, float]]:
    return {f: {v: c / len(top) for v, c in Counter(getattr(factors[i], f) for i in top).items()} for f in FACTORS}


@torch.no_grad()
def compare_labelers(
    model: Any,
    sae: Any,
    images: torch.Tensor,
    factors: Sequence[Any],
    reference_images: torch.Tensor,
    text: tuple[list[str], torch.Tensor],
    *,
    labelers: Optional[dict[str, Any]] = None,
    top_k: int = 20,
    purity: float = 0.9,
    n_effect_images: int = 64,
    multi_purity: float = 0.75,
) -> LabelerComparison:
    """Score ``labelers`` (default: every one in ``LABELERS``) on the features of ``sae`` pure in a factor on
    ``images`` / ``factors``; the labelers use ``reference_images`` and the vocabulary ``text`` = (terms,
    embeddings). ``n_effect_images``: reference images on which the causal effects are measured;
    ``multi_purity``: the bar for the multi-factor slot scoring (module docs)."""
    if len(images) != len(factors):
        raise ValueError(f"{len(images)} images but {len(factors)} factor sets.")
    words, emb = text
    term_factor = {v: f for f in FACTORS for v in ShapesWorld.factor_values[f]}  # for scoring only
    scoring = prepare_inputs(model, sae, words, images, text_embeds=emb)
    acts = scoring.acts
    ids, pure, multi, shares = [], [], [], []
    for feat in ((acts > 0).sum(0) >= top_k).nonzero()[:, 0].tolist():
        top = acts[:, feat].topk(top_k).indices.tolist()
        sh = _shares(factors, top)
        modal = {f: max(sh[f].items(), key=lambda kv: kv[1]) for f in FACTORS}
        p = {f: v for f, (v, share) in modal.items() if share >= purity}
        m = {f: v for f, (v, share) in modal.items() if share >= multi_purity}
        if p or len(m) >= 2:
            ids.append(feat)
            pure.append(p)
            multi.append(m if len(m) >= 2 else {})
            shares.append(sh)
    n_features = int(((acts > 0).sum(0) >= top_k).sum())
    inputs = prepare_inputs(model, sae, words, reference_images, text_embeds=emb)
    inputs.cache["n_effect_images"] = n_effect_images
    makers = labelers if labelers is not None else {name: make() for name, make in LABELERS.items()}
    result = LabelerComparison(hook_name=f"vision.{scoring.hook}", n_features=n_features, n_pure=sum(map(bool, pure)),
                               n_multi=sum(len(p) > 1 for p in pure), multi_purity=multi_purity, scores={}, pure=pure)
    if not ids:
        return result
    for name, labeler in makers.items():
        labels = labeler.label(model, sae, ids, inputs=inputs)
        s = LabelerScore()
        for lab, p, m, sh in zip(labels, pure, multi, shares):
            terms = [t.term for t in lab.terms]
            if m:
                right = sum(v in terms for v in m.values())
                s.slots[0] += 1
                s.slots[1] += right == len(m)
                s.slots[2] += len(m)
                s.slots[3] += right
            if not p:
                continue
            s.overall[0] += 1
            if terms:
                s.overall[1] += 1
                s.overall[2] += all(t in term_factor and sh[term_factor[t]].get(t, 0) >= 0.5 for t in terms)
            for f, v in p.items():
                named = [t for t in terms if term_factor.get(t) == f]
                c = s.per_factor[f]
                c[0] += 1
                c[1] += bool(named)
                c[2] += v in named
        result.scores[name] = s
        result.labels[name] = labels
    return result
