"""Typographic attacks on a CLIP vision tower, and their suppression through an SAE.

A typographic attack writes a misleading word on an image (a red circle with "blue" written beside it);
a CLIP that learned to read then calls the circle blue. On the shapes world the ground truth is known,
so the whole loop can be measured:

1. :func:`build_attack_set`: shapes-world images, each clean and with a wrong colour name written in a
   row the shape is not in (same shape, colour, position, jitter), with its zero-shot class and the
   pixels the word covers.
2. :func:`find_text_features`: SAE features whose activation rises when the word is added to the same
   image, ranked by that rise (times the feature's decoder norm: how far it moves the residual stream),
   with where they fire (per patch) and the share of the rise on patches the word covers.
3. :func:`suppression_predictions`: zero-shot predictions with chosen features ablated through the
   steering API (``FeatureSteer(..., "ablate")``) with the SAE's error term kept, so the only change to
   the residual stream is removing those features' decoder contributions.
4. :func:`typographic_analysis`: the whole study. Features are found on one split, the number of
   features to suppress is chosen on a second (the most attacked-image accuracy whose clean-accuracy
   cost stays within ``max_clean_cost``), and accuracy is reported on a third: clean, under attack,
   under attack with suppression, and clean with suppression (the cost).

>>> from sae_lens import SAE
>>> from sae_lens_multimodal import HookedCLIP
>>> model = HookedCLIP.from_pretrained("shapes-clip-typographic")
>>> sae = SAE.from_pretrained("shapes-clip-typographic-saes", "blocks.0.hook_resid_post")
>>> result = typographic_analysis(model, sae)
>>> print(result.to_table()); result.plot("typographic.png")
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens import SAE
from tqdm.auto import tqdm

from sae_lens_multimodal.core.atomic import atomic_save
from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.steering import FeatureSteer, steer
from sae_lens_multimodal.world.shapes import (
    CLASS_FACTORS,
    COLORS,
    POSITIONS,
    TEXT_ROWS,
    ShapeFactors,
    ShapesWorld,
    all_captions,
    class_factor_combinations,
    to_tensor,
)

__all__ = [
    "ATTACK_CONDITIONS",
    "TypographicAttackSet",
    "TextFeature",
    "TypographicResult",
    "build_attack_set",
    "class_text_weights",
    "zero_shot_predictions",
    "find_text_features",
    "suppression_predictions",
    "typographic_analysis",
]

#: The four conditions every result reports, in order.
ATTACK_CONDITIONS: tuple[str, ...] = ("clean", "attacked", "attacked_suppressed", "clean_suppressed")
_CONDITION_LABELS = {
    "clean": "clean",
    "attacked": "under attack",
    "attacked_suppressed": "under attack + suppression",
    "clean_suppressed": "clean + suppression",
}


# ---------------------------------------------------------------------------------------------- attack set
@dataclass
class TypographicAttackSet:
    """Paired shapes-world images: each clean and with a misleading colour word written on it.

    ``clean`` / ``attacked``: uint8 [n, H, W, 3]; ``factors``: the clean images' ground truth;
    ``words``: the written (wrong) colour names; ``labels``: each image's class index among
    ``class_factor_combinations()`` (colour x shape x position); ``text_masks``: bool [n, H, W], the
    pixels the word changed.
    """

    clean: np.ndarray
    attacked: np.ndarray
    factors: list[ShapeFactors]
    words: list[str]
    labels: torch.Tensor
    text_masks: np.ndarray

    def __len__(self) -> int:
        return len(self.factors)

    @property
    def colors(self) -> list[str]:
        return [f.color for f in self.factors]

    def tensors(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clean, attacked)`` as float32 [n, 3, H, W] normalised with the model's mean / std."""
        return to_tensor(self.clean, mean, std), to_tensor(self.attacked, mean, std)

    def patch_coverage(self, patch_size: int) -> torch.Tensor:
        """[n, n_patches] fraction of each patch's pixels that the word changed (row-major patches)."""
        n, h, w = self.text_masks.shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"Images of {h}x{w} do not split into {patch_size}x{patch_size} patches.")
        m = torch.from_numpy(self.text_masks).float().reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
        return m.mean(dim=(2, 4)).reshape(n, -1)


def build_attack_set(
    n: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    words: Sequence[str] = tuple(COLORS),
) -> TypographicAttackSet:
    """``n`` fresh shapes-world images (no text), each also drawn with a wrong colour name from ``words``
    written in white in a row the shape is not in. Reproducible by ``seed``."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive int; got {n!r}.")
    bad = [w for w in words if w not in COLORS]
    if bad or len(set(words)) < 2:
        raise ValueError(f"words must be at least two colour names from {list(COLORS)}; got {list(words)}.")
    world = ShapesWorld(image_size=image_size, seed=seed)
    clean = world.sample_factors(n, text_prob=0.0)
    word_list = list(words)
    out_words: list[str] = []
    attacked: list[ShapeFactors] = []
    for f in clean:
        # A misleading word: any listed colour but the shape's own (uniformly), in another row.
        choices = [w for w in word_list if w != f.color]
        word = choices[int(world.rng.integers(0, len(choices)))]
        row = TEXT_ROWS[(POSITIONS.index(f.position) // 3 + int(world.rng.integers(1, 3))) % 3]
        out_words.append(word)
        attacked.append(dataclasses.replace(f, text=word, text_row=row))
    clean_images, attacked_images = world.render(clean), world.render(attacked)
    index = {tuple(c[k] for k in CLASS_FACTORS): i for i, c in enumerate(class_factor_combinations())}
    labels = torch.tensor([index[tuple(getattr(f, k) for k in CLASS_FACTORS)] for f in clean])
    masks = (clean_images != attacked_images).any(axis=-1)
    return TypographicAttackSet(clean_images, attacked_images, clean, out_words, labels, masks)


# ---------------------------------------------------------------------------------------------- zero-shot
def _check_clip(model: Any) -> None:
    if not has_parts(model, "vision", "text"):
        raise TypeError(
            f"Typographic analysis needs a HookedCLIP (image and text towers); got {type(model).__name__}. "
            "Load one with HookedCLIP.from_pretrained('shapes-clip-typographic')."
        )


def _normalisation(model: Any) -> tuple[Sequence[float], Sequence[float]]:
    """The vision tower's preprocessing mean / std (the shapes CLIPs use 0.5 / 0.5)."""
    pre = getattr(model.vision, "preprocess", None)
    for t in getattr(pre, "transforms", []) or []:
        if type(t).__name__ == "Normalize":
            return tuple(t.mean), tuple(t.std)
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@torch.no_grad()
def class_text_weights(model: Any, captions: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Normalised text embeddings [n_classes, d_embed] of the class captions (default: the 162 colour x
    shape x position captions, aligned with ``TypographicAttackSet.labels``)."""
    _check_clip(model)
    return F.normalize(model.encode_text(list(captions if captions is not None else all_captions())), dim=-1)


def _batches(x: torch.Tensor, batch_size: int, desc: str, progress: bool) -> Iterator[torch.Tensor]:
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        yield x[i:i + batch_size]


@torch.no_grad()
def zero_shot_predictions(
    model: Any,
    images: torch.Tensor,
    text_weights: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "zero-shot",
) -> torch.Tensor:
    """Predicted class indices [n] for preprocessed images [n, 3, H, W]: argmax of
    ``exp(logit_scale) * cos(image, class)`` (the model's own scale; argmax does not depend on it)."""
    _check_clip(model)
    preds = []
    for x in _batches(images, batch_size, desc, progress):
        emb = model.encode_image(x)
        preds.append(model.logits_from_embeddings(emb, text_weights).argmax(-1))
    return torch.cat(preds)


@torch.no_grad()
def suppression_predictions(
    model: Any,
    sae: Any,
    images: torch.Tensor,
    text_weights: torch.Tensor,
    features: Sequence[int],
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "zero-shot with suppression",
) -> torch.Tensor:
    """Zero-shot predictions with ``features`` of ``sae`` ablated (set to 0) at every token of its hook,
    through the steering API (``FeatureSteer(sae, features, "ablate")``), which keeps the SAE's error
    term: the residual stream becomes ``x + decode(f') - decode(f) = x - sum_f a_f(x) W_dec[f]``, so
    exactly the suppressed features' contributions are removed. Hooks are removed afterwards, also on
    errors."""
    _check_clip(model)
    feats = [int(f) for f in features]
    if not feats:
        return zero_shot_predictions(model, images, text_weights, batch_size=batch_size, progress=progress, desc=desc)
    preds = []
    with steer(model, FeatureSteer(sae, feats, "ablate", positions="all")):
        for x in _batches(images, batch_size, desc, progress):
            emb = model.encode_image(x)
            preds.append(model.logits_from_embeddings(emb, text_weights).argmax(-1))
    return torch.cat(preds)


# ---------------------------------------------------------------------------------------------- features
@dataclass
class TextFeature:
    """An SAE feature that responds to rendered text."""

    index: int
    #: Mean over images of the rise in the feature's activation summed over tokens when the word is
    #: added, times its decoder norm (how far the rise moves the residual stream).
    score: float
    #: Mean rise of the summed activation (without the decoder norm).
    activation_rise: float
    #: Share of the rise (over patch tokens, where positive) on patches the word covers.
    text_patch_share: float
    #: Mean rise per patch, [grid_h, grid_w]: where the feature fires on text.
    patch_map: np.ndarray = field(repr=False)
    #: Mean activation (summed over tokens) on clean and attacked images.
    clean_activation: float = 0.0
    attacked_activation: float = 0.0


@torch.no_grad()
def _sae_token_acts(model: Any, sae: Any, images: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    """SAE feature activations [batch, tokens, d_sae] at the SAE's hook, batch by batch."""
    location = model.locate(sae).name
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        captured["x"] = act

    with model.hooks(fwd_hooks=[(location, grab)]):
        for x in _batches(images, batch_size, desc, progress):
            model.encode_image(x)
            yield sae.encode(captured.pop("x"))


@torch.no_grad()
def find_text_features(
    model: Any,
    sae: Any,
    attack_set: TypographicAttackSet,
    *,
    top_k: Optional[int] = 32,
    min_text_patch_share: float = 0.5,
    batch_size: int = 256,
    progress: bool = True,
) -> list[TextFeature]:
    """Rank ``sae``'s features by how much writing the word raises them on the same image.

    The score of a feature is the mean over images of (its activation summed over tokens on the attacked
    image minus the same on the clean image) times its decoder norm. Only features whose activation rises
    and whose rise lands mostly where the word is (at least ``min_text_patch_share`` of it on patches the
    word covers) count as text features: a feature that rises elsewhere (the CLS token, the shape) carries
    what the model concluded from the word, and often the real colour too. Returns the ``top_k`` best
    (None: all), each with its per-patch map and its share of the rise on word patches.
    """
    _check_clip(model)
    vit = model.vision
    cfg = vit.cfg
    n_prefix = cfg.n_prefix_tokens
    grid = (cfg.image_size[0] // cfg.patch_size[0], cfg.image_size[1] // cfg.patch_size[1])
    mean, std = _normalisation(model)
    clean, attacked = attack_set.tensors(mean, std)
    coverage = attack_set.patch_coverage(cfg.patch_size[0])  # [n, n_patches]
    on_text = coverage > 0
    d_sae = sae.cfg.d_sae
    sum_clean = torch.zeros(d_sae, dtype=torch.float64)
    sum_att = torch.zeros(d_sae, dtype=torch.float64)
    patch_rise = torch.zeros(grid[0] * grid[1], d_sae, dtype=torch.float64)
    rise_on_text = torch.zeros(d_sae, dtype=torch.float64)
    rise_positive = torch.zeros(d_sae, dtype=torch.float64)
    start = 0
    pairs = zip(
        _sae_token_acts(model, sae, clean, batch_size, progress, "text features (clean)"),
        _sae_token_acts(model, sae, attacked, batch_size, False, ""),
    )
    for a_clean, a_att in pairs:
        b = a_clean.shape[0]
        sum_clean += a_clean.sum(dim=(0, 1)).double()
        sum_att += a_att.sum(dim=(0, 1)).double()
        rise = (a_att - a_clean)[:, n_prefix:].double()  # [b, patches, d_sae]
        patch_rise += rise.sum(0)
        pos = rise.clamp(min=0)
        rise_positive += pos.sum(dim=(0, 1))
        rise_on_text += (pos * on_text[start:start + b, :, None]).sum(dim=(0, 1))
        start += b
    n = len(attack_set)
    rise_total = (sum_att - sum_clean) / n
    dec_norm = sae.W_dec.detach().norm(dim=-1).double().cpu()
    score = rise_total * dec_norm
    share = torch.where(rise_positive > 0, rise_on_text / rise_positive.clamp(min=1e-12), torch.zeros_like(rise_positive))
    order = torch.argsort(score, descending=True)
    order = order[(score[order] > 0) & (share[order] >= min_text_patch_share)]
    if top_k is not None:
        order = order[:top_k]
    return [
        TextFeature(
            index=int(i),
            score=float(score[i]),
            activation_rise=float(rise_total[i]),
            text_patch_share=float(share[i]),
            patch_map=(patch_rise[:, i] / n).reshape(grid).float().numpy(),
            clean_activation=float(sum_clean[i] / n),
            attacked_activation=float(sum_att[i] / n),
        )
        for i in order.tolist()
    ]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TypographicResult:
    """Zero-shot accuracy under a typographic attack, with and without SAE suppression of text features.

    ``accuracy`` / ``color_accuracy``: per condition in :data:`ATTACK_CONDITIONS`, on the test split;
    ``accuracy`` is top-1 over the 162 colour x shape x position captions, ``color_accuracy`` whether the
    predicted caption has the right colour. ``written_word_rate``: fraction of attacked images whose
    predicted colour is the written word (without / with suppression). ``selection``: per candidate
    number of suppressed features, the accuracies on the selection split that chose ``n_suppressed``.
    """

    model_name: str
    hook_name: str
    n_test: int
    accuracy: dict[str, float]
    color_accuracy: dict[str, float]
    written_word_rate: dict[str, float]
    n_suppressed: int
    suppressed_features: list[int]
    features: list[TextFeature]
    selection: list[dict[str, float]]
    max_clean_cost: float
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def attack_drop(self) -> float:
        """Accuracy lost to the attack (clean - attacked)."""
        return self.accuracy["clean"] - self.accuracy["attacked"]

    @property
    def recovered_fraction(self) -> float:
        """Share of the attack's accuracy drop that suppression wins back (nan if there is no drop)."""
        drop = self.attack_drop
        return (self.accuracy["attacked_suppressed"] - self.accuracy["attacked"]) / drop if drop > 0 else float("nan")

    @property
    def clean_cost(self) -> float:
        """Clean accuracy lost to suppression (clean - clean with suppression)."""
        return self.accuracy["clean"] - self.accuracy["clean_suppressed"]

    def to_table(self) -> str:
        """A Markdown table of the four conditions plus the summary figures."""
        lines = [
            f"Typographic attack on {self.model_name} ({self.n_test} test images; {self.n_suppressed} SAE features "
            f"suppressed at {self.hook_name})",
            "",
            "| condition | accuracy (162 classes) | colour accuracy | predicted colour = written word |",
            "|---|---|---|---|",
        ]
        for c in ATTACK_CONDITIONS:
            word = self.written_word_rate.get(c)
            lines.append(
                f"| {_CONDITION_LABELS[c]} | {self.accuracy[c]:.1%} | {self.color_accuracy[c]:.1%} | "
                f"{'' if word is None else f'{word:.1%}'} |"
            )
        lines += [
            "",
            f"attack drop {self.attack_drop:.1%}; suppression recovers {self.recovered_fraction:.0%} of it; "
            f"clean cost {self.clean_cost:.1%} (allowed {self.max_clean_cost:.1%} on the selection split)",
            "suppressed features: " + ", ".join(str(i) for i in self.suppressed_features),
        ]
        return "\n".join(lines)

    __str__ = to_table

    def plot(self, path: Union[str, os.PathLike]) -> Path:
        """Bar chart (PNG) of accuracy and colour accuracy in the four conditions; written atomically."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        labels = [_CONDITION_LABELS[c] for c in ATTACK_CONDITIONS]
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=120)
        try:
            for offset, (name, values) in zip((-0.2, 0.2), (("accuracy (162 classes)", self.accuracy),
                                                           ("colour accuracy", self.color_accuracy))):
                bars = ax.bar(x + offset, [values[c] for c in ATTACK_CONDITIONS], width=0.4, label=name)
                ax.bar_label(bars, labels=[f"{values[c]:.0%}" for c in ATTACK_CONDITIONS], fontsize=8)
            ax.set_xticks(x, labels, fontsize=8)
            ax.set_ylim(0, 1.3)
            ax.set_ylabel("zero-shot accuracy")
            ax.set_title(f"Typographic attack on {self.model_name}: {self.n_suppressed} SAE features suppressed",
                         fontsize=9)
            ax.legend(fontsize=8, loc="upper center", ncol=2)
            fig.tight_layout()
            atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=path.suffix)
        finally:
            plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------- study
def _rates(preds: torch.Tensor, attack_set: TypographicAttackSet) -> tuple[float, float, float]:
    """(accuracy, colour accuracy, share predicting the written word) of class predictions."""
    classes = class_factor_combinations()
    colors = [classes[p]["color"] for p in preds.tolist()]
    acc = float((preds.cpu() == attack_set.labels).float().mean())
    col = float(np.mean([c == t for c, t in zip(colors, attack_set.colors)]))
    word = float(np.mean([c == w for c, w in zip(colors, attack_set.words)]))
    return acc, col, word


def typographic_analysis(
    model: Any,
    sae: Any,
    *,
    n_discover: int = 500,
    n_select: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    candidate_counts: Sequence[int] = (0, 1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96),
    max_clean_cost: float = 0.05,
    min_text_patch_share: float = 0.5,
    batch_size: int = 256,
    progress: bool = True,
    model_name: Optional[str] = None,
) -> TypographicResult:
    """Measure a typographic attack and its suppression through ``sae`` (at its own hook).

    Three disjoint attack sets (seeds ``seed``, ``seed + 1``, ``seed + 2``): text features are ranked on
    the discovery split; the number of top features to ablate is chosen on the selection split as the
    count in ``candidate_counts`` with the best attacked-image accuracy whose clean accuracy falls by at
    most ``max_clean_cost`` (ties: fewer features); the four accuracies are reported on the test split.
    ``min_text_patch_share``: see :func:`find_text_features`. ``model_name`` labels the result (default:
    the model's ``cfg.model_name``).
    """
    _check_clip(model)
    if not candidate_counts or min(candidate_counts) < 0:
        raise ValueError(f"candidate_counts must be non-negative feature counts; got {list(candidate_counts)}.")
    if not 0 <= max_clean_cost <= 1:
        raise ValueError(f"max_clean_cost is an accuracy difference in [0, 1]; got {max_clean_cost!r}.")
    size = model.vision.cfg.image_size[0]
    mean, std = _normalisation(model)
    weights = class_text_weights(model)
    discover = build_attack_set(n_discover, seed=seed, image_size=size)
    select = build_attack_set(n_select, seed=seed + 1, image_size=size)
    test = build_attack_set(n_test, seed=seed + 2, image_size=size)

    features = find_text_features(model, sae, discover, top_k=max(candidate_counts),
                                  min_text_patch_share=min_text_patch_share, batch_size=batch_size, progress=progress)
    ranked = [f.index for f in features]
    counts = sorted({min(k, len(ranked)) for k in candidate_counts})

    sel_clean, sel_att = select.tensors(mean, std)
    selection = []
    for k in tqdm(counts, desc="choosing how many features to suppress", disable=not progress):
        chosen = ranked[:k]
        att = _rates(suppression_predictions(model, sae, sel_att, weights, chosen, batch_size=batch_size), select)
        cln = _rates(suppression_predictions(model, sae, sel_clean, weights, chosen, batch_size=batch_size), select)
        selection.append({"n_features": k, "attacked_accuracy": att[0], "clean_accuracy": cln[0]})
    base_clean = selection[0]["clean_accuracy"] if counts[0] == 0 else _rates(
        zero_shot_predictions(model, sel_clean, weights, batch_size=batch_size), select)[0]
    allowed = [s for s in selection if base_clean - s["clean_accuracy"] <= max_clean_cost + 1e-12]
    best = max(allowed or selection[:1], key=lambda s: (s["attacked_accuracy"], -s["n_features"]))
    k = int(best["n_features"])
    chosen = ranked[:k]

    test_clean, test_att = test.tensors(mean, std)
    runs = {
        "clean": zero_shot_predictions(model, test_clean, weights, batch_size=batch_size, progress=progress,
                                       desc="test: clean"),
        "attacked": zero_shot_predictions(model, test_att, weights, batch_size=batch_size, progress=progress,
                                          desc="test: attacked"),
        "attacked_suppressed": suppression_predictions(model, sae, test_att, weights, chosen, batch_size=batch_size,
                                                       progress=progress, desc="test: attacked + suppression"),
        "clean_suppressed": suppression_predictions(model, sae, test_clean, weights, chosen, batch_size=batch_size,
                                                    progress=progress, desc="test: clean + suppression"),
    }
    rates = {c: _rates(p, test) for c, p in runs.items()}
    return TypographicResult(
        model_name=model_name or str(getattr(model.cfg, "model_name", "custom")),
        hook_name=model.locate(sae).name,
        n_test=n_test,
        accuracy={c: rates[c][0] for c in ATTACK_CONDITIONS},
        color_accuracy={c: rates[c][1] for c in ATTACK_CONDITIONS},
        written_word_rate={c: rates[c][2] for c in ("attacked", "attacked_suppressed")},
        n_suppressed=k,
        suppressed_features=chosen,
        features=features,
        selection=selection,
        max_clean_cost=max_clean_cost,
        splits={"discover": n_discover, "select": n_select, "test": n_test, "seed": seed},
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m sae_lens_multimodal.world.typographic [--plot out.png]``: the study on the shipped
    typographic shapes CLIP and its bundled SAE (the figures of docs/typographic.md)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="shapes-clip-typographic")
    parser.add_argument("--release", default="shapes-clip-typographic-saes")
    parser.add_argument("--sae-id", default="blocks.0.hook_resid_post")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-clean-cost", type=float, default=0.05)
    parser.add_argument("--plot", type=Path, default=None, help="write the bar chart (PNG) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = HookedCLIP.from_pretrained(args.model)
    sae = SAE.from_pretrained(args.release, args.sae_id)
    result = typographic_analysis(model, sae, n_test=args.n_test, seed=args.seed, max_clean_cost=args.max_clean_cost,
                                  model_name=args.model)
    print(result.to_table())
    print("\nselection split (features suppressed -> accuracy attacked / clean):")
    for s in result.selection:
        print(f"  {int(s['n_features']):3d} -> {s['attacked_accuracy']:.1%} / {s['clean_accuracy']:.1%}")
    print("\ntop text features (index, score, activation clean -> attacked, share of the rise on word patches):")
    for f in result.features[:10]:
        print(f"  {f.index:4d}  {f.score:7.2f}  {f.clean_activation:6.2f} -> {f.attacked_activation:6.2f}  "
              f"{f.text_patch_share:.0%}")
    if args.plot is not None:
        print(f"wrote {result.plot(args.plot)}")


if __name__ == "__main__":
    main()
