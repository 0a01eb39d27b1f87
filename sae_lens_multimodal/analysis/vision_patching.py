"""Activation patching between a clean and a corrupted image in a CLIP vision tower, scored zero-shot.

Every run goes through ``transformer_lens.patching`` (with :func:`image_patching_index` supplying the
token axis, which TransformerLens cannot infer from an image batch). The metric is the **normalised
logit difference** of zero-shot logits that carry the model's logit scale::

    LD(x)  = logit(x, clean class) - logit(x, corrupt class)          (mean over the batch of pairs)
    score  = (LD(patched) - LD(corrupt)) / (LD(clean) - LD(corrupt))

so 0 means "as corrupt" and 1 "as clean". Results:

* per layer x token for residual-stream (or attention / MLP output) activations, token 0.. the prefix
  tokens (CLS) then the patch grid in row-major order; :meth:`VisionPatchingResult.patch_grid` folds a
  layer's row back onto the image grid;
* per layer x head (``hook_z``, all positions);
* per layer with every position patched, and per layer with only a chosen set of tokens (e.g. the
  patches an object covers) patched.

>>> result = clip_activation_patching(clip, clean_x, corrupt_x, classifier, clean_class, corrupt_class)
>>> result.plot("patching.png"); result.to_table()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import pandas as pd
import torch
from transformer_lens import patching

from sae_lens_multimodal.analysis.patching import image_patching_index, patching_shape, tokens_per_image
from sae_lens_multimodal.analysis.plotting import PathLike, blank_figure, heatmap, save_figure, to_numpy
from sae_lens_multimodal.core.hooked_root import has_parts

__all__ = [
    "PATCHABLE_ACTIVATIONS",
    "VisionPatchingResult",
    "clip_activation_patching",
    "normalised_logit_diff_metric",
    "token_names",
]

#: Activations patchable per (layer, token), with the TransformerLens function used for each.
PATCHABLE_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "resid_mid": patching.get_act_patch_resid_mid,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
}
_FULL_LAYER_ACTIVATIONS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

ClassSpec = Union[int, str, Sequence[Union[int, str]], torch.Tensor]


def _vision_tower(model: Any) -> Any:
    if has_parts(model, "vision"):
        return model.part("vision")
    raise TypeError(
        f"Expected a HookedCLIP (patched through its .vision tower) or a HookedViT whose output is the image "
        f"embedding; got {type(model).__name__}."
    )


def _class_indices(spec: ClassSpec, classifier: Any, batch: int, what: str) -> torch.Tensor:
    names = list(classifier.class_names)

    def one(c: Union[int, str]) -> int:
        if isinstance(c, str):
            if c not in names:
                close = [n for n in names if c.split()[0] in n][:5]
                raise ValueError(f"{what} {c!r} is not one of the classifier's classes (e.g. {close or names[:5]}).")
            return names.index(c)
        c = int(c)
        if not 0 <= c < len(names):
            raise ValueError(f"{what} index {c} is out of range for {len(names)} classes.")
        return c

    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if isinstance(spec, (int, str)) or (isinstance(spec, (np.integer,))):
        idx = [one(spec)] * batch  # type: ignore[arg-type]
    else:
        idx = [one(c) for c in spec]  # type: ignore[union-attr]
    if len(idx) != batch:
        raise ValueError(f"{what} gives {len(idx)} classes for a batch of {batch} image pairs.")
    return torch.tensor(idx)


def normalised_logit_diff_metric(
    classifier: Any, clean_idx: torch.Tensor, corrupt_idx: torch.Tensor, clean_ld: float, corrupt_ld: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TransformerLens patching metric on image embeddings: the normalised zero-shot logit difference."""
    denom = clean_ld - corrupt_ld
    if abs(denom) < 1e-6:
        raise ValueError(
            "The clean and corrupted images have the same logit difference, so there is nothing to patch; "
            "choose a corruption that changes the zero-shot prediction."
        )

    def metric(embeds: torch.Tensor) -> torch.Tensor:
        return (_logit_diff(classifier, embeds, clean_idx, corrupt_idx) - corrupt_ld) / denom

    return metric


def _logit_diff(classifier: Any, embeds: torch.Tensor, clean_idx: torch.Tensor, corrupt_idx: torch.Tensor) -> torch.Tensor:
    logits = classifier.logits_from_embeddings(embeds)
    rows = torch.arange(len(logits))
    return (logits[rows, clean_idx.to(logits.device)] - logits[rows, corrupt_idx.to(logits.device)]).mean()


def token_names(model: Any) -> list[str]:
    """Names of the vision tower's token positions: prefix tokens ("CLS", "prefix 1", ...) then
    "patch (row, col)"."""
    spec = _vision_tower(model).hook_spec("hook_full_embed")  # prefix tokens and patch grid, from the contract
    n_prefix, (gh, gw) = spec.n_prefix_tokens, spec.grid
    prefix = ["CLS" if i == 0 else f"prefix {i}" for i in range(n_prefix)]
    return prefix + [f"patch ({r}, {c})" for r in range(gh) for c in range(gw)]


@dataclass
class VisionPatchingResult:
    """Patching effects (normalised logit difference: 0 = corrupt, 1 = clean) in a vision tower."""

    #: activation name -> [n_layers, n_tokens], one token patched at a time
    by_token: dict[str, torch.Tensor]
    #: activation name -> [n_layers], every token of that layer's activation patched
    full_layer: dict[str, torch.Tensor]
    #: [n_layers, n_heads]: one head's ``hook_z`` (all positions) patched; None if not computed
    heads: Optional[torch.Tensor]
    #: activation name -> [n_layers]: only the tokens in ``region_tokens`` patched
    region: dict[str, torch.Tensor]
    region_tokens: list[int]
    clean_logit_diff: float
    corrupt_logit_diff: float
    n_prefix_tokens: int
    grid: tuple[int, int]
    clean_label: str = ""
    corrupt_label: str = ""
    #: [3, H, W] images in [0, 1] for the figure (first pair)
    clean_image: Optional[torch.Tensor] = field(default=None, repr=False)
    corrupt_image: Optional[torch.Tensor] = field(default=None, repr=False)
    #: [n_layers, n_tokens, n_heads]: one head's ``hook_z`` at one token patched (``heads_by_position=True``)
    heads_by_position: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        first = next(iter(self.by_token.values()), None)
        if first is not None:
            return first.shape[0]
        return self.heads.shape[0] if self.heads is not None else 0

    def patch_grid(self, layer: int, activation: str = "resid_pre") -> torch.Tensor:
        """One layer's per-token effects folded onto the patch grid: [grid_h, grid_w] (prefix tokens dropped)."""
        row = self._by_token(activation)[layer]
        return row[self.n_prefix_tokens:].reshape(self.grid)

    def _by_token(self, activation: str) -> torch.Tensor:
        if activation not in self.by_token:
            raise KeyError(f"No per-token results for {activation!r}; computed: {list(self.by_token)}.")
        return self.by_token[activation]

    def to_records(self) -> list[dict[str, Any]]:
        """One record per patched (activation, layer, token / head / region)."""
        gh, gw = self.grid
        names = ["CLS" if i == 0 else f"prefix {i}" for i in range(self.n_prefix_tokens)]
        names += [f"patch ({r}, {c})" for r in range(gh) for c in range(gw)]
        out: list[dict[str, Any]] = []
        for act, grid in self.by_token.items():
            for (layer, tok), v in np.ndenumerate(to_numpy(grid)):
                out.append({"activation": act, "layer": layer, "target": names[tok], "token": tok, "head": None, "effect": float(v)})
        for act, row in self.full_layer.items():
            for layer, v in enumerate(to_numpy(row)):
                out.append({"activation": act, "layer": layer, "target": "all tokens", "token": None, "head": None, "effect": float(v)})
        for act, row in self.region.items():
            for layer, v in enumerate(to_numpy(row)):
                out.append({"activation": act, "layer": layer, "target": "region", "token": None, "head": None, "effect": float(v)})
        if self.heads is not None:
            for (layer, head), v in np.ndenumerate(to_numpy(self.heads)):
                out.append({"activation": "z", "layer": layer, "target": f"head {head}", "token": None, "head": head, "effect": float(v)})
        return out

    def to_table(self) -> pd.DataFrame:
        """Per layer: CLS effect, best patch token and its effect, all-token and region effects, best head."""
        rows = []
        for layer in range(self.n_layers):
            row: dict[str, Any] = {"layer": layer}
            for act, grid in self.by_token.items():
                r = grid[layer]
                best = int(r[self.n_prefix_tokens:].argmax()) if r.numel() > self.n_prefix_tokens else 0
                row[f"{act} CLS"] = round(float(r[0]), 4)
                row[f"{act} best patch"] = f"({best // self.grid[1]}, {best % self.grid[1]})"
                row[f"{act} best patch effect"] = round(float(r[self.n_prefix_tokens + best]), 4)
            for act, r in self.full_layer.items():
                row[f"{act} all tokens"] = round(float(r[layer]), 4)
            for act, r in self.region.items():
                row[f"{act} region"] = round(float(r[layer]), 4)
            if self.heads is not None:
                h = int(self.heads[layer].abs().argmax())
                row["top head"] = h
                row["top head effect"] = round(float(self.heads[layer, h]), 4)
            rows.append(row)
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        head = (
            f"Vision patching {self.clean_label!r} (clean) vs {self.corrupt_label!r} (corrupt): logit diff "
            f"clean {self.clean_logit_diff:.3f}, corrupt {self.corrupt_logit_diff:.3f}; effect 1 = clean"
        )
        return head + "\n" + self.to_table().to_string(index=False)

    def plot(self, path: PathLike, activation: Optional[str] = None) -> Path:
        """PNG: the two images, the layer x head heatmap, effects of token groups per layer, the
        layer x token heatmap, and each layer folded onto the patch grid (CLS in the cell left of it)."""
        act = activation or next(iter(self.by_token), None)
        n_layers = self.n_layers
        ncols = max(n_layers, 4)
        fig = blank_figure(figsize=(2.9 * ncols, 8.6))
        gs = fig.add_gridspec(3, ncols, height_ratios=(1.0, 0.8, 1.0), hspace=0.45, wspace=0.55)
        for j, (img, label) in enumerate(((self.clean_image, "clean"), (self.corrupt_image, "corrupt"))):
            ax = fig.add_subplot(gs[0, j])
            if img is not None:
                ax.imshow(to_numpy(img).transpose(1, 2, 0).clip(0, 1), interpolation="nearest")
            ax.set_title(f"{label}: {getattr(self, label + '_label')}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        if self.heads is not None:
            heatmap(fig.add_subplot(gs[0, 2]), self.heads, row_labels=[f"L{i}" for i in range(n_layers)],
                    col_labels=[f"H{h}" for h in range(self.heads.shape[1])], title="head z, all positions",
                    annotate=True)
        ax = fig.add_subplot(gs[0, 3:])
        series = {f"{a} all tokens": r for a, r in self.full_layer.items()}
        series.update({f"{a} region ({len(self.region_tokens)} tokens)": r for a, r in self.region.items()})
        if act is not None:
            series[f"{act} CLS only"] = self._by_token(act)[:, 0]
        for label, r in series.items():
            ax.plot(range(n_layers), to_numpy(r), marker="o", label=label)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("effect (1 = clean)", fontsize=8)
        ax.set_xticks(range(n_layers))
        ax.legend(fontsize=6)
        ax.set_title("token groups", fontsize=9)
        if act is not None:
            grid = self._by_token(act)
            names = ["CLS" if i == 0 else str(i) for i in range(grid.shape[1])]
            heatmap(fig.add_subplot(gs[1, :]), grid, row_labels=[f"L{i}" for i in range(n_layers)],
                    col_labels=names, title=f"{act}: layer x token (effect, 1 = clean)", max_ticks=33)
            lim = float(grid.abs().max()) or 1.0
            grid_axes = []
            im = None
            for layer in range(n_layers):
                ax = fig.add_subplot(gs[2, layer % ncols])
                patches = to_numpy(self.patch_grid(layer, act))
                # CLS sits left of the grid, separated by a blank (NaN) column.
                canvas = np.full((patches.shape[0], patches.shape[1] + 2), np.nan)
                canvas[0, 0] = float(grid[layer, 0])
                canvas[:, 2:] = patches
                im = ax.imshow(canvas, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
                ax.set_title(f"layer {layer} (CLS top left)", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                grid_axes.append(ax)
            if im is not None:
                fig.colorbar(im, ax=grid_axes, fraction=0.02, pad=0.02)
        return save_figure(fig, path)


def _display(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float().cpu()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else x * 0


@torch.no_grad()
def clip_activation_patching(
    model: Any,
    clean_images: torch.Tensor,
    corrupt_images: torch.Tensor,
    classifier: Any,
    clean_class: ClassSpec,
    corrupt_class: ClassSpec,
    *,
    activations: Sequence[str] = ("resid_pre",),
    heads: bool = True,
    heads_by_position: bool = False,
    full_layer: Sequence[str] = ("resid_pre", "resid_post"),
    region_tokens: Optional[Sequence[int]] = None,
    display_images: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> VisionPatchingResult:
    """Patch the clean run's activations into the corrupted run, one (layer, token) / head at a time.

    Args:
        model: a HookedCLIP (its vision tower is patched) or a HookedViT whose output is the image embedding.
        clean_images / corrupt_images: preprocessed image batches of equal shape (pairs row by row).
        classifier: a :class:`~sae_lens_multimodal.analysis.zero_shot.ZeroShotClassifier` on the same model.
        clean_class / corrupt_class: class name(s) or index(es) for the logit difference (one, or one per pair).
        activations: per-(layer, token) patching runs: any of ``resid_pre``, ``resid_mid``, ``attn_out``, ``mlp_out``.
        heads: also patch each head's ``hook_z`` over all positions ([n_layers, n_heads]).
        heads_by_position: also patch each head's ``hook_z`` at one token at a time ([n_layers, n_tokens,
            n_heads]; n_layers x n_tokens x n_heads forward passes): which head moves the answer from where.
        full_layer: activations to patch at every token, one layer at a time (``resid_post`` included).
        region_tokens: token positions (e.g. the shapes world's
            :func:`~sae_lens_multimodal.world.causal.shape_patch_mask`) patched together, per layer,
            for each activation in ``activations``.
        display_images: ``(clean, corrupt)`` [3, H, W] images in [0, 1] for the figure; default: the
            inputs' first pair rescaled to [0, 1].
    """
    vision = _vision_tower(model)
    if clean_images.shape != corrupt_images.shape:
        raise ValueError(
            f"Clean and corrupted batches must have the same shape (pairs row by row); got "
            f"{tuple(clean_images.shape)} and {tuple(corrupt_images.shape)}."
        )
    unknown = [a for a in activations if a not in PATCHABLE_ACTIVATIONS]
    unknown += [a for a in full_layer if a not in _FULL_LAYER_ACTIVATIONS]
    if unknown:
        raise ValueError(
            f"Cannot patch {unknown}: per-token activations are {list(PATCHABLE_ACTIVATIONS)}, whole-layer "
            f"activations {list(_FULL_LAYER_ACTIVATIONS)}."
        )
    batch = clean_images.shape[0]
    clean_idx = _class_indices(clean_class, classifier, batch, "clean_class")
    corrupt_idx = _class_indices(corrupt_class, classifier, batch, "corrupt_class")

    clean_out, clean_cache = vision.run_with_cache(clean_images)
    corrupt_out = vision(corrupt_images)
    clean_ld = float(_logit_diff(classifier, clean_out, clean_idx, corrupt_idx))
    corrupt_ld = float(_logit_diff(classifier, corrupt_out, clean_idx, corrupt_idx))
    metric = normalised_logit_diff_metric(classifier, clean_idx, corrupt_idx, clean_ld, corrupt_ld)

    n_tokens = tokens_per_image(vision, corrupt_images)
    index_df = image_patching_index(vision, ("layer", "pos"), images=corrupt_images)
    by_token = {}
    for act in activations:
        flat = PATCHABLE_ACTIVATIONS[act](
            vision, corrupt_images, clean_cache, metric, index_axis_names=None, index_df=index_df
        )
        by_token[act] = flat.reshape(patching_shape(index_df)).cpu()

    def whole(corrupted: torch.Tensor, index: Sequence[int], clean: torch.Tensor) -> torch.Tensor:
        return clean.clone()

    full = {
        act: patching.generic_activation_patch(
            vision, corrupt_images, clean_cache, metric, whole, act, index_axis_names=("layer",)
        ).cpu()
        for act in full_layer
    }

    region: dict[str, torch.Tensor] = {}
    tokens = sorted(int(t) for t in region_tokens) if region_tokens is not None else []
    if region_tokens is not None:
        bad = [t for t in tokens if not 0 <= t < n_tokens]
        if bad or not tokens:
            raise ValueError(f"region_tokens must be non-empty positions in [0, {n_tokens}); got {bad or tokens}.")

        def some(corrupted: torch.Tensor, index: Sequence[int], clean: torch.Tensor) -> torch.Tensor:
            corrupted[:, tokens] = clean[:, tokens]
            return corrupted

        for act in activations:
            region[act] = patching.generic_activation_patch(
                vision, corrupt_images, clean_cache, metric, some, act, index_axis_names=("layer",)
            ).cpu()

    head_effects = None
    if heads:
        head_effects = patching.get_act_patch_attn_head_out_all_pos(vision, corrupt_images, clean_cache, metric).cpu()
    head_pos_effects = None
    if heads_by_position:  # n_layers x n_tokens x n_heads forward passes
        head_index = image_patching_index(vision, ("layer", "pos", "head"), images=corrupt_images)
        flat = patching.get_act_patch_attn_head_out_by_pos(
            vision, corrupt_images, clean_cache, metric, index_axis_names=None, index_df=head_index
        )
        head_pos_effects = flat.reshape(patching_shape(head_index)).cpu()

    cfg = vision.cfg
    h, w = corrupt_images.shape[-2:]
    grid = (h // cfg.patch_size[0], w // cfg.patch_size[1])
    names = list(classifier.class_names)
    if display_images is None:
        display_images = (_display(clean_images[0]), _display(corrupt_images[0]))
    return VisionPatchingResult(
        by_token=by_token,
        full_layer=full,
        heads=head_effects,
        region=region,
        region_tokens=tokens,
        clean_logit_diff=clean_ld,
        corrupt_logit_diff=corrupt_ld,
        n_prefix_tokens=int(cfg.n_prefix_tokens),
        grid=grid,
        clean_label=names[int(clean_idx[0])],
        corrupt_label=names[int(corrupt_idx[0])],
        clean_image=display_images[0],
        corrupt_image=display_images[1],
        heads_by_position=head_pos_effects,
    )
