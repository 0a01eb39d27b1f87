"""The canonical circuit of the shapes CLIP (issue 17 part 3), checked against the world's ground truth.

How does the shapes CLIP tell the **colour**, the **shape** and the **position** of the drawn object? For each
factor: image pairs that differ in that one factor (:func:`contrast_pairs`), the metric logit(true caption) -
logit(foil caption, the corrupted image's), SAEs at the residual stream after every block of the vision tower
(release ``shapes-clip-layer-saes``), and a sparse feature circuit (:func:`canonical_circuit`): the fewest
top nodes (SAE feature x position, and error nodes) whose mean-ablated complement keeps ``target`` of the
metric, with the edges between nodes of consecutive blocks.

The ground truth of the world checks the circuit three ways (:func:`ground_truth_checks`):

* **purity** (:func:`feature_purity`): a circuit feature's top images (its activation at the node's
  position, over fresh images in which every factor varies) share one value of the circuit's factor;
* **where** (:func:`node_locations`): the share of each block's circuit attribution on the object's
  patches, on CLS, elsewhere (the existing patching result: the object's patches at block 0, CLS by block 3);
* **ablation** (:func:`ablation_effects`): mean-ablating the circuit's features (the SAEs spliced with their
  error terms) moves the zero-shot prediction (162 caption classes) of that factor and not of the others,
  against as many random features at the same hooks and positions.

>>> result = canonical_circuit("color")          # shapes-clip + shapes-clip-layer-saes
>>> result.circuit.faithfulness, len(result.circuit.nodes)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sae_lens_multimodal.analysis.circuits import (
    ERROR,
    Circuit,
    CircuitNode,
    completeness,
    faithfulness,
    faithfulness_curve,
    find_circuit,
    mean_activations,
)
from sae_lens_multimodal.world.causal import shape_patch_mask
from sae_lens_multimodal.world.clip import clip_pixels
from sae_lens_multimodal.world.shapes import COLORS, POSITIONS, SHAPES, ShapeFactors, ShapesWorld, all_captions, caption

__all__ = [
    "FACTORS",
    "LAYER_RELEASE",
    "LAYER_HOOKS",
    "ContrastPairs",
    "CanonicalCircuit",
    "load_layer_saes",
    "contrast_pairs",
    "canonical_circuit",
    "feature_purity",
    "node_locations",
    "ablation_effects",
    "top_images",
    "probe_set",
    "evaluation_set",
    "node_activations",
    "GroundTruth",
    "ground_truth_checks",
    "ground_truth_line",
    "plot_circuit",
    "main",
]

FACTORS: tuple[str, ...] = ("color", "shape", "position")
LAYER_RELEASE = "shapes-clip-layer-saes"
LAYER_HOOKS: tuple[str, ...] = tuple(f"blocks.{i}.hook_resid_post" for i in range(4))
#: colour and shape pairs draw the object in this cell; position pairs move it from here to the mirrored cell
HOME = "left"
#: a feature is pure in a factor when this share of its top images has one value (as the labeler checks)
PURE = 0.9
IMAGE_SIZE, PATCH = 32, 4
#: the sizes faithfulness_curve measures when choosing the circuit (the smallest reaching the target wins)
SIZES: tuple[int, ...] = (0, 1, 2, 3, 5, 8, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200)
#: The canonical contrasts (``contrast_pairs`` arguments): red -> blue objects (the setting of the CLIP patching
#: result, every shape), circles -> squares (every colour), left -> right (every colour and shape).
CANONICAL: dict[str, dict[str, Any]] = {
    "color": {"colors": ("red",), "foil": "blue"},
    "shape": {"shapes": ("circle",), "foil": "square"},
    "position": {},
}


def load_layer_saes(hooks: Sequence[str] = LAYER_HOOKS, release: str = LAYER_RELEASE) -> list[Any]:
    """The bundled SAEs at ``hooks`` (default: the residual stream after every block), in eval mode."""
    from sae_lens import SAE

    out = []
    for hook in hooks:
        sae = SAE.from_pretrained(release, hook, device="cpu")
        out.append((sae[0] if isinstance(sae, tuple) else sae).eval())  # older SAELens returned a tuple
    return out


def _pixels(images: np.ndarray) -> torch.Tensor:
    return clip_pixels(images)  # the CLIP's own mean / std


# ------------------------------------------------------------------------------------------ pairs
@dataclass
class ContrastPairs:
    """Image pairs that differ in ``factor``; ``metric(logits)`` = mean over pairs of logit(true caption) -
    logit(foil caption). ``clean`` / ``corrupted``: HookedCLIP inputs (``{"images", "texts"}``)."""

    factor: str
    clean: dict[str, Any]
    corrupted: dict[str, Any]
    metric: Callable[[torch.Tensor], torch.Tensor]
    clean_factors: list[ShapeFactors]
    foil_factors: list[ShapeFactors]

    @property
    def object_tokens(self) -> set[int]:
        """Token positions (CLS = 0) of the patches the object covers in any clean or foil image."""
        return {t for f in self.clean_factors + self.foil_factors for t in shape_patch_mask(f, IMAGE_SIZE, PATCH)}


def _mirror(f: ShapeFactors) -> ShapeFactors:
    row, col = divmod(POSITIONS.index(f.position), 3)
    if col == 1:
        raise ValueError(f"{f.position!r} has no left-right mirror cell; use a left or right position.")
    return replace(f, position=POSITIONS[3 * row + 2 - col], center=(IMAGE_SIZE - f.center[0], f.center[1]))


def contrast_pairs(factor: str, n_pairs: int = 12, seed: int = 0, position: str = HOME,
                   colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES,
                   foil: Optional[str] = None) -> ContrastPairs:
    """``n_pairs`` large plain objects at ``position`` (``colors`` and ``shapes`` cycled); the foil changes
    ``factor``: to ``foil``, or to another colour / shape drawn at random, or (position) to the mirrored cell
    (left <-> right)."""
    if factor not in FACTORS:
        raise ValueError(f"Unknown factor {factor!r}; the canonical circuits are for {list(FACTORS)}.")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1; got {n_pairs}.")
    world = ShapesWorld(image_size=IMAGE_SIZE, seed=seed)
    rng = np.random.default_rng(seed + 1)
    colors, shapes = list(colors), list(shapes)
    bases = [world.sample_factors(1, color=colors[i % len(colors)], shape=shapes[(i // len(colors) + i) % len(shapes)],
                                  position=position, size="large", texture="plain", text_prob=0)[0]
             for i in range(n_pairs)]
    foils = []
    for f in bases:
        if factor == "color":
            c = foil or str(rng.choice([c for c in COLORS if c != f.color]))
            foils.append(replace(f, color=c, rgb=COLORS[c]))
        elif factor == "shape":
            foils.append(replace(f, shape=foil or str(rng.choice([s for s in SHAPES if s != f.shape]))))
        else:
            foils.append(_mirror(f))
    x = _pixels(world.render(bases + foils))
    texts = [caption(f) for f in bases] + [caption(f) for f in foils]
    rows = torch.arange(n_pairs)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[rows, rows] - logits[rows, rows + n_pairs]).mean()

    return ContrastPairs(factor, {"images": x[:n_pairs], "texts": texts}, {"images": x[n_pairs:], "texts": texts},
                         metric, bases, foils)


# ------------------------------------------------------------------------------------------ the circuit
@dataclass
class CanonicalCircuit:
    """A factor's circuit, the pairs it was found on and the SAEs (by full hook name) it lives in."""

    factor: str
    circuit: Circuit
    pairs: ContrastPairs
    saes: dict[str, Any] = field(repr=False)
    target: float = 0.8

    @property
    def feature_nodes(self) -> list[CircuitNode]:
        return [n for n in self.circuit.nodes if n.feature != ERROR]


def canonical_circuit(factor: str, *, clip: Any = None, saes: Any = None, pairs: Optional[ContrastPairs] = None,
                      n_pairs: int = 6, seed: int = 0, target: float = 0.8, sizes: Sequence[int] = SIZES,
                      edges: bool = True, edge_threshold: float = 0.0) -> CanonicalCircuit:
    """The smallest top-``n`` node set (by |attribution|, over every SAE hook) whose faithfulness reaches
    ``target`` (mean ablation over the clean and corrupted images), with its edges; ``circuit.curve`` holds
    (n, faithfulness, completeness) for every ``n`` in ``sizes``. Raises if no size reaches the target."""
    from sae_lens_multimodal.analysis.circuits import _ordered_saes  # hooks in the order they run

    if clip is None:
        from sae_lens_multimodal.models.hooked_clip import HookedCLIP

        clip = HookedCLIP.from_pretrained("shapes-clip")
    by_hook = _ordered_saes(clip, load_layer_saes() if saes is None else saes)
    pairs = pairs or contrast_pairs(factor, n_pairs=n_pairs, seed=seed, **CANONICAL.get(factor, {}))
    clean, corrupted, metric = pairs.clean, pairs.corrupted, pairs.metric
    ranking = find_circuit(clip, clean, corrupted, metric, saes=by_hook, node_threshold=0.0, max_nodes=0, edges=False)
    means = mean_activations(clip, by_hook, [clean, corrupted])
    curve = faithfulness_curve(clip, ranking, clean, metric, saes=by_hook, means=means, sizes=sorted(set(sizes)))
    reached = [n for n, f, _ in curve if n > 0 and f >= target]
    if not reached:
        raise RuntimeError(f"No circuit of the sizes {list(sizes)} reaches faithfulness {target} for {factor!r} "
                           f"(curve: {[(n, round(f, 3)) for n, f, _ in curve]}); give larger sizes.")
    circuit = find_circuit(clip, clean, corrupted, metric, saes=by_hook, node_threshold=0.0, max_nodes=min(reached),
                           edges=edges, edge_threshold=edge_threshold)
    circuit.faithfulness = faithfulness(clip, circuit, clean, metric, saes=by_hook, means=means)
    circuit.completeness = completeness(clip, circuit, clean, metric, saes=by_hook, means=means)
    circuit.curve = curve
    return CanonicalCircuit(factor, circuit, pairs, by_hook, target)


# ------------------------------------------------------------------------------------------ checks
def probe_set(n: int = 3000, seed: int = 99) -> tuple[np.ndarray, list[ShapeFactors]]:
    """Fresh images (no text, every other factor varies) for top images and purity: not the pairs' images."""
    return ShapesWorld(image_size=IMAGE_SIZE, seed=seed, text_prob=0.0).sample(n)


@torch.no_grad()
def node_activations(clip: Any, saes: dict[str, Any], nodes: Sequence[CircuitNode], images: np.ndarray,
                     batch_size: int = 500, pixels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[n_images, n_nodes]: each feature node's SAE activation at its position (error nodes: the error norm).
    ``pixels``: the model's input for ``images`` when it is not shapes-clip's preprocessing."""
    by_hook: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        by_hook.setdefault(n.hook, []).append(i)
    out = torch.zeros(len(images), len(nodes))
    x = _pixels(images) if pixels is None else pixels
    for start in range(0, len(images), batch_size):
        batch: dict[str, torch.Tensor] = {}

        def make(name: str) -> Callable:
            def keep(act: torch.Tensor, hook: Any) -> None:
                batch[name] = act.detach()
            return keep

        with clip.hooks(fwd_hooks=[(h, make(h)) for h in by_hook]):
            clip.encode_image(x[start:start + batch_size])
        for hook, idx in by_hook.items():
            sae, act = saes[hook], batch[hook]
            f = sae.encode(act)
            err = (act - sae.decode(f)).norm(dim=-1)
            for i in idx:
                n = nodes[i]
                col = err[(slice(None),) + n.position] if n.feature == ERROR else f[(slice(None),) + n.position + (int(n.feature),)]
                out[start:start + batch_size, i] = col
    return out


def top_images(activations: torch.Tensor, k: int = 20) -> list[list[int]]:
    """Per node (column), the indices of the ``k`` images with the largest positive activation."""
    out = []
    for col in activations.T:
        order = col.argsort(descending=True)[:k]
        out.append([int(i) for i in order if col[i] > 0])
    return out


def feature_purity(tops: Sequence[Sequence[int]], factors: Sequence[ShapeFactors],
                   names: Sequence[str] = FACTORS + ("size", "texture")) -> list[dict[str, tuple[str, float]]]:
    """Per node: factor -> (modal value among its top images, share of them with it); empty for no images."""
    out = []
    for idx in tops:
        row = {}
        for name in names:
            if idx:
                value, count = Counter(getattr(factors[i], name) for i in idx).most_common(1)[0]
                row[name] = (value, count / len(idx))
        out.append(row)
    return out


def node_locations(circuit: Circuit, object_tokens: set[int]) -> dict[str, dict[str, float]]:
    """hook -> share of the circuit's |attribution| there on CLS (token 0), on the object's patches, elsewhere."""
    out: dict[str, dict[str, float]] = {}
    for hook in circuit.hooks:
        mass = {"cls": 0.0, "object": 0.0, "other": 0.0}
        for n in circuit.nodes:
            if n.hook == hook:
                token = n.position[0]
                mass["cls" if token == 0 else "object" if token in object_tokens else "other"] += abs(n.attribution)
        total = sum(mass.values())
        out[hook] = {k: (v / total if total else float("nan")) for k, v in mass.items()}
    return out


def evaluation_set(pairs: ContrastPairs, n: int = 300, seed: int = 4242,
                   vary: Optional[str] = None) -> tuple[np.ndarray, list[ShapeFactors]]:
    """Fresh images of the pairs' clean kind (large plain objects, the clean images' colours, shapes, position),
    with factor ``vary`` over all its values (the reference of the mean ablation: a feature's mean over every
    value of the factor carries no information about it)."""
    values = {k: sorted({getattr(f, k) for f in pairs.clean_factors}) for k in FACTORS}
    if vary is not None:
        values[vary] = list(ShapesWorld.factor_values[vary])
    return ShapesWorld(image_size=IMAGE_SIZE, seed=seed, text_prob=0.0).sample(
        n, color=values["color"], shape=values["shape"], position=values["position"], size="large", texture="plain")


@torch.no_grad()
def _factor_accuracy(clip: Any, classifier: Any, x: torch.Tensor, factors: Sequence[ShapeFactors],
                     hooks: Sequence[tuple[str, Callable]]) -> dict[str, float]:
    from sae_lens_multimodal.world.shapes import class_factor_combinations

    classes = class_factor_combinations(FACTORS)
    with clip.hooks(fwd_hooks=list(hooks)):
        pred = classifier.logits(x).argmax(-1).tolist()
    return {k: float(np.mean([classes[p][k] == getattr(f, k) for p, f in zip(pred, factors)])) for k in FACTORS}


def _ablation_hooks(saes: dict[str, Any], nodes: Sequence[CircuitNode],
                    means: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[str, Callable]]:
    """Splice each SAE with its error term and put the given feature nodes at their mean (per position)."""
    hooks = []
    for hook, sae in saes.items():
        mine = [n for n in nodes if n.hook == hook and n.feature != ERROR]
        if not mine:
            continue
        mask = torch.zeros(means[hook][0].shape, dtype=torch.bool)
        for n in mine:
            mask[n.position + (int(n.feature),)] = True

        def ablate(act: torch.Tensor, hook: Any, sae: Any = sae, mask: torch.Tensor = mask,
                   mean: torch.Tensor = means[hook][0]) -> torch.Tensor:
            f = sae.encode(act)
            err = act - sae.decode(f)
            return sae.decode(torch.where(mask, mean, f)) + err

        hooks.append((hook, ablate))
    return hooks


def ablation_effects(clip: Any, saes: dict[str, Any], nodes: Sequence[CircuitNode], pairs: ContrastPairs, *,
                     n_images: int = 300, seed: int = 4242, n_random: int = 3,
                     subsets: Optional[dict[str, Sequence[CircuitNode]]] = None) -> dict[str, Any]:
    """Zero-shot factor accuracy (162 caption classes) on fresh images of the clean pairs' kind: clean, with the
    ``nodes``' features mean-ablated (means over these images), and with as many random features at the same
    hooks and positions (``n_random`` draws, averaged), with one hook's circuit features at a time, and with each
    of ``subsets`` (name -> nodes). The means are over other images of the same kind in which the circuit's
    factor takes every value. ``{"clean", "circuit", "random", <subset>: {factor: accuracy}, "per_hook": {hook:
    {factor: accuracy}}, "n_features"}``."""
    from sae_lens_multimodal.analysis.zero_shot import ZeroShotClassifier

    images, factors = evaluation_set(pairs, n_images, seed)
    x = _pixels(images)
    classifier = ZeroShotClassifier(clip, all_captions(), templates=("{}",))
    reference = _pixels(evaluation_set(pairs, n_images, seed + 1, vary=pairs.factor)[0])
    means = mean_activations(clip, saes, [{"images": reference, "return_type": "embeddings"}])  # the vision tower
    feats = [n for n in nodes if n.feature != ERROR]
    out = {"clean": _factor_accuracy(clip, classifier, x, factors, []),
           "circuit": _factor_accuracy(clip, classifier, x, factors, _ablation_hooks(saes, feats, means))}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_random):
        random_nodes = [replace(n, feature=int(rng.integers(saes[n.hook].cfg.d_sae))) for n in feats]
        draws.append(_factor_accuracy(clip, classifier, x, factors, _ablation_hooks(saes, random_nodes, means)))
    out["random"] = {k: float(np.mean([d[k] for d in draws])) for k in FACTORS}
    # one block at a time: the early blocks' features carry the whole object, the late ones the factor
    out["per_hook"] = {hook: _factor_accuracy(clip, classifier, x, factors,
                                              _ablation_hooks(saes, [n for n in feats if n.hook == hook], means))
                       for hook in saes if any(n.hook == hook for n in feats)}
    for name, subset in (subsets or {}).items():
        out[name] = _factor_accuracy(clip, classifier, x, factors, _ablation_hooks(saes, list(subset), means))
    out["n_features"] = len(feats)
    return out


@dataclass
class GroundTruth:
    """The three checks of one canonical circuit."""

    factor: str
    #: per feature node (in circuit order): factor -> (modal value, share of the top images)
    purity: list[dict[str, tuple[str, float]]]
    locations: dict[str, dict[str, float]]
    ablation: dict[str, Any]
    top: list[list[int]] = field(repr=False, default_factory=list)

    def pure_share(self, bar: float = 0.9, factor: Optional[str] = None) -> float:  # 0.9: PURE
        """Share of feature nodes whose top images share one value of ``factor`` (default: the circuit's)."""
        name = factor or self.factor
        rows = [p for p in self.purity if p]
        return float(np.mean([p[name][1] >= bar for p in rows])) if rows else float("nan")


def ground_truth_checks(result: CanonicalCircuit, clip: Any, *, probe: Optional[tuple[np.ndarray, list]] = None,
                        k: int = 20, n_images: int = 300) -> GroundTruth:
    """Purity of the circuit's features, where its attribution sits per block, and the ablation effects."""
    images, factors = probe if probe is not None else probe_set()
    feats = result.feature_nodes
    acts = node_activations(clip, result.saes, feats, images)
    tops = top_images(acts, k)
    purity = feature_purity(tops, factors)
    pure = [n for n, p in zip(feats, purity) if p and p[result.factor][1] >= PURE]
    ablation = ablation_effects(clip, result.saes, feats, result.pairs, n_images=n_images, subsets={"pure": pure})
    ablation["n_pure"] = len(pure)
    return GroundTruth(result.factor, purity, node_locations(result.circuit, result.pairs.object_tokens), ablation, tops)


# ------------------------------------------------------------------------------------------ figure
def plot_circuit(result: CanonicalCircuit, path: Any, *, images: Optional[np.ndarray] = None,
                 tops: Optional[Sequence[Sequence[int]]] = None, n_thumbs: int = 3, max_edges: int = 60) -> Any:
    """A PNG of the circuit graph: one column per block, nodes by |attribution| (blue raises, red lowers the
    metric; grey: error nodes), the ``max_edges`` largest edges, and each feature node's top images (``images``
    indexed by ``tops``, in the order of ``result.feature_nodes``) next to it."""
    import matplotlib  # only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    c = result.circuit
    cols = {h: i for i, h in enumerate(c.hooks)}
    rows: dict[str, list[CircuitNode]] = {h: [] for h in c.hooks}
    for n in c.nodes:
        rows[n.hook].append(n)
    height = max(len(v) for v in rows.values())
    where = {n.id: (cols[h] * 3.0, -r) for h, col in rows.items() for r, n in enumerate(col)}
    fig, ax = plt.subplots(figsize=(3.2 * len(c.hooks), 0.42 * height + 1.2))
    biggest = max((abs(n.attribution) for n in c.nodes), default=1.0) or 1.0
    edges = sorted(c.edges, key=lambda e: -abs(e.attribution))[:max_edges]
    top_edge = max((abs(e.attribution) for e in edges), default=1.0) or 1.0
    for e in edges:
        (x1, y1), (x2, y2) = where[e.source], where[e.target]
        ax.plot([x1, x2], [y1, y2], color="#3b6fd6" if e.attribution >= 0 else "#d64b3b",
                lw=0.3 + 3 * abs(e.attribution) / top_edge, alpha=0.45, zorder=1)
    feature_index = {n.id: i for i, n in enumerate(result.feature_nodes)}
    for n in c.nodes:
        x, y = where[n.id]
        colour = "#999999" if n.feature == ERROR else "#3b6fd6" if n.attribution >= 0 else "#d64b3b"
        ax.scatter([x], [y], s=30 + 300 * abs(n.attribution) / biggest, color=colour, zorder=2)
        where_text = "CLS" if n.position == (0,) else f"patch {n.position[0] - 1}"
        ax.text(x + 0.12, y, f"{'err' if n.feature == ERROR else '#' + str(n.feature)} {where_text}", fontsize=7,
                va="center", zorder=3)
        i = feature_index.get(n.id)
        if images is not None and tops is not None and i is not None:
            for j, k in enumerate(list(tops[i])[:n_thumbs]):
                box = AnnotationBbox(OffsetImage(images[k], zoom=0.45), (x + 1.45 + 0.42 * j, y), frameon=False)
                ax.add_artist(box)
    for h, i in cols.items():
        ax.text(i * 3.0, 1.0, h.replace("vision.", ""), fontsize=9, fontweight="bold", ha="left")
    ax.set_xlim(-0.4, 3.0 * len(c.hooks))
    ax.set_ylim(-height, 1.6)
    ax.axis("off")
    ax.set_title(f"{_NAMES.get(result.factor, result.factor)} circuit: {len(c.nodes)} nodes, faithfulness "
                 f"{c.faithfulness:.2f}, completeness {c.completeness:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_NAMES = {"color": "colour"}


# ------------------------------------------------------------------------------------------ the report
def _summary_rows(factor: str, result: CanonicalCircuit, truth: GroundTruth) -> dict[str, str]:
    c, a = result.circuit, truth.ablation
    per_hook = {h.split(".")[2]: sum(1 for n in c.nodes if n.hook == h) for h in c.hooks}
    where = {h.split(".")[2]: f"{v['object']:.2f} / {v['cls']:.2f}" for h, v in truth.locations.items()}
    acc = " / ".join(f"{a['clean'][k]:.2f}->{a['circuit'][k]:.2f}" for k in FACTORS)
    pure_acc = " / ".join(f"{a['pure'][k]:.2f}" for k in FACTORS)
    rand = " / ".join(f"{a['random'][k]:.2f}" for k in FACTORS)
    return {
        "circuit": f"| {_NAMES.get(factor, factor)} | {len(c.nodes)} ({sum(n.feature == ERROR for n in c.nodes)}) | "
                   f"{', '.join(f'{k}: {v}' for k, v in per_hook.items())} | {len(c.edges)} | {c.faithfulness:.3f} | "
                   f"{c.completeness:.3f} | {c.clean_metric:.2f} / {c.corrupted_metric:.2f} |",
        "truth": f"| {_NAMES.get(factor, factor)} | {truth.pure_share():.2f} ({a['n_pure']} of {a['n_features']}) | "
                 f"{', '.join(f'{k}: {v}' for k, v in where.items())} | {acc} | {pure_acc} | {rand} |",
        "curve": f"| {_NAMES.get(factor, factor)} | " + ", ".join(f"{n}: {f:.2f} / {cc:.2f}" for n, f, cc in c.curve
                                                             if n in (1, 2, 5, 10, 20, 25, 50, 100, 150, 200)) + " |",
    }


def ground_truth_line(clip: Any = None, quick: bool = False) -> tuple[str, dict[str, Any]]:
    """The ``circuit`` line of ``sae-lens-mm ground-truth``: size and faithfulness of each canonical circuit,
    and what ablating its factor-pure features does to the zero-shot accuracy of its factor and of the others
    (``quick``: the colour circuit only, fewer images)."""
    if clip is None:
        from sae_lens_multimodal.models.hooked_clip import HookedCLIP

        clip = HookedCLIP.from_pretrained("shapes-clip")
    saes = load_layer_saes()
    probe = probe_set(1000 if quick else 3000)
    parts, results = [], {}
    for factor in (("color",) if quick else FACTORS):
        result = canonical_circuit(factor, clip=clip, saes=saes)
        truth = ground_truth_checks(result, clip, probe=probe, n_images=100 if quick else 300)
        a, c = truth.ablation, result.circuit
        others = min(a["pure"][k] for k in FACTORS if k != factor)
        parts.append(f"{_NAMES.get(factor, factor)} {len(c.nodes)} nodes, faithfulness {c.faithfulness:.2f}, ablating "
                     f"its {a['n_pure']} pure features: {_NAMES.get(factor, factor)} accuracy {a['clean'][factor]:.2f}->"
                     f"{a['pure'][factor]:.2f}, others >= {others:.2f}")
        results[factor] = (result, truth)
    return "; ".join(parts), results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Find the three canonical circuits, run the checks, write JSON, HTML (top images in the nodes) and PNG
    files to ``--out`` and print the tables of docs/circuits.md."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default="circuits-canonical", help="folder for the files")
    parser.add_argument("--factors", default=",".join(FACTORS))
    args = parser.parse_args(argv)
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = HookedCLIP.from_pretrained("shapes-clip")
    saes = load_layer_saes()
    probe = probe_set()
    rows, results = [], {}
    for factor in args.factors.split(","):
        result = canonical_circuit(factor, clip=clip, saes=saes)
        truth = ground_truth_checks(result, clip, probe=probe)
        feats = result.feature_nodes
        purity = {n.id: p for n, p in zip(feats, truth.purity)}
        thumbs = {n.id: [probe[0][i] for i in top[:4]] for n, top in zip(feats, truth.top)}

        def label(node_id: str) -> str:
            p = purity.get(node_id) or {}
            return ", ".join(f"{v} {s:.0%}" for k, (v, s) in p.items() if k in FACTORS and s >= PURE) or "mixed"

        labels = {h: {} for h in result.circuit.hooks}
        for n in feats:
            labels[n.hook].setdefault(int(n.feature), label(n.id))  # the first (largest) node's label per feature
        result.circuit.to_json(out / f"{factor}.json")
        result.circuit.to_html(out / f"{factor}.html", images=thumbs, labels=labels,
                               title=f"shapes-clip {_NAMES.get(factor, factor)} circuit")
        plot_circuit(result, out / f"{factor}.png", images=probe[0], tops=truth.top)
        (out / f"{factor}_checks.json").write_text(json.dumps(
            {"locations": truth.locations, "ablation": truth.ablation, "pure_share": truth.pure_share(),
             "purity": {n.id: p for n, p in zip(feats, truth.purity)}}, indent=1))
        rows.append(_summary_rows(factor, result, truth))
        results[factor] = (result, truth)
        print(rows[-1]["circuit"], flush=True)
    print("| factor | nodes (error) | per block | edges | faithfulness | completeness | metric clean / corrupted |")
    print("\n".join(r["circuit"] for r in rows))
    print("| factor | pure features (>= 90% of top-20 share a value) | object / CLS share per block | zero-shot "
          "accuracy colour / shape / position: clean -> circuit ablated | pure features ablated | random ablated |")
    print("\n".join(r["truth"] for r in rows))
    print("| factor | faithfulness / completeness at n nodes |")
    print("\n".join(r["curve"] for r in rows))
    return results


if __name__ == "__main__":
    main()
