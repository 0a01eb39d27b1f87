"""Ablation of attention heads and blocks in a diffusion denoiser, with a measured effect per component.

Each component is knocked out in one full generation run of a fixed prompt set (same seed, so the only
difference from the baseline run is the ablation), and the generated images are judged per factor by a
CLIP, the judge of the prompts' factor world (:mod:`sae_lens_multimodal.analysis.factor_worlds`; shapes
world: :class:`~sae_lens_multimodal.world.eval_diffusion.FactorClassifier`):

* **heads**: one head of one attention module (``...attn1`` self-attention, ``...attn2`` cross-attention)
  at ``hook_z`` (its output before the output projection), set to zero (``method="zero"``) or to its mean
  over the prompt set at the same timestep, CFG branch and position (``method="mean"``);
* **blocks**: a block's update skipped (``hook_update`` set to zero, so the block passes its input on).

Measured per component: accuracy per factor (the judge's marginal argmax equals the prompt's value), the
mean probability of the prompt's value (finer than accuracy), their changes from the unablated baseline,
and the pixel MSE against the baseline images. :meth:`AblationResult.selective` turns these into
statements such as "head 2 of up_blocks.0.attentions.1...attn2 affects colour but not position".

>>> from sae_lens_multimodal.world.causal import shapes_prompts
>>> result = ablate_components(pipe, shapes_prompts(24, seed=0), method="mean")
>>> print(result.to_table()); result.plot("ablation.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline, unet_blocks
from sae_lens_multimodal.analysis.factor_worlds import FactorWorld, factor_world_for
from sae_lens_multimodal.analysis.plotting import PathLike, blank_figure, heatmap, save_figure
from sae_lens_multimodal.core.arguments import check_guidance_scale, positive_int
from sae_lens_multimodal.core.denoising import CFG_BATCH_ORDER, cfg_row_split, current_denoising_state
from sae_lens_multimodal.core.images import to_uint8

__all__ = [
    "ABLATION_METHODS",
    "AblationResult",
    "Component",
    "ablate_components",
    "attention_modules",
    "head_components",
    "block_components",
]

ABLATION_METHODS = ("zero", "mean")
FACTORS = ("color", "shape", "position")


@dataclass(frozen=True)
class Component:
    """One thing to ablate: a head (``module`` is an attention module path, ``head`` its index) or a
    block (``module`` is a block path, ``head`` is None: its update is skipped)."""

    module: str
    head: Optional[int] = None

    @property
    def kind(self) -> str:
        return "block" if self.head is None else "head"

    @property
    def name(self) -> str:
        return f"{self.module} (skip)" if self.head is None else f"{self.module} head {self.head}"

    @property
    def hook_name(self) -> str:
        return f"{self.module}.hook_update" if self.head is None else f"{self.module}.hook_z"


def attention_modules(hooked: Any) -> list[str]:
    """Attention modules with a ``hook_z`` (``...attn1``, ``...attn2``), in execution order of their blocks."""
    blocks = unet_blocks(hooked)
    mods = [n[: -len(".hook_z")] for n in hooked.hook_dict if n.endswith(".hook_z")]
    return sorted(mods, key=lambda m: (next((i for i, b in enumerate(blocks) if m.startswith(b + ".")), len(blocks)), m))


def head_components(hooked: Any, modules: Optional[Sequence[str]] = None, heads: Optional[Sequence[int]] = None) -> list[Component]:
    """Every (attention module, head) pair (or those of ``modules`` / ``heads``)."""
    hooked = as_hooked_pipeline(hooked) if not hasattr(hooked, "hook_dict") else hooked
    mods = attention_modules(hooked) if modules is None else [hooked.canonical_hook_name(m) for m in modules]
    out = []
    for m in mods:
        if f"{m}.hook_z" not in hooked.hook_dict:
            raise KeyError(f"{m!r} has no hook_z; attention modules here: {attention_modules(hooked)[:8]}...")
        attn = hooked.denoiser.get_submodule(m)
        n_heads = int(attn.heads)
        for h in heads if heads is not None else range(n_heads):
            if isinstance(h, bool) or not isinstance(h, (int, np.integer)):
                raise TypeError(f"heads must be integer head indices; got {type(h).__name__} {h!r}.")
            if not 0 <= h < n_heads:
                raise ValueError(f"{m} has {n_heads} heads; got head {h}.")
            out.append(Component(m, int(h)))
    return out


def block_components(hooked: Any, blocks: Optional[Sequence[str]] = None) -> list[Component]:
    """Blocks whose update can be skipped (those with a ``hook_update``), in execution order."""
    hooked = as_hooked_pipeline(hooked) if not hasattr(hooked, "hook_dict") else hooked
    names = unet_blocks(hooked) if blocks is None else [hooked.canonical_hook_name(b) for b in blocks]
    if blocks is None:
        names = [b for b in names if f"{b}.hook_update" in hooked.hook_dict]
    bad = [b for b in names if f"{b}.hook_update" not in hooked.hook_dict]
    if bad:
        raise KeyError(
            f"{bad} have no hook_update (resnets that change the channel count or resample cannot be skipped)."
        )
    return [Component(b) for b in names]


@dataclass
class AblationResult:
    """Effects of ablating each component on the generated images."""

    components: list[Component]
    method: str
    factors: tuple[str, ...]
    #: [n_components, n_factors]
    accuracy: torch.Tensor
    #: [n_components, n_factors]: mean judged probability of the prompt's value
    p_true: torch.Tensor
    #: [n_components]: mean squared pixel difference (pixels in [0, 1]) from the baseline images
    pixel_mse: torch.Tensor
    baseline_accuracy: torch.Tensor
    baseline_p_true: torch.Tensor
    n_prompts: int
    num_inference_steps: int
    seed: int
    #: one example image per component (the first prompt), uint8 [n_components, H, W, 3]
    images: Optional[np.ndarray] = field(default=None, repr=False)
    baseline_image: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def accuracy_change(self) -> torch.Tensor:
        return self.accuracy - self.baseline_accuracy

    @property
    def p_true_change(self) -> torch.Tensor:
        return self.p_true - self.baseline_p_true

    def to_records(self) -> list[dict[str, Any]]:
        out = []
        for i, c in enumerate(self.components):
            rec: dict[str, Any] = {"component": c.name, "kind": c.kind, "module": c.module, "head": c.head,
                                   "method": self.method if c.kind == "head" else "skip"}
            for j, f in enumerate(self.factors):
                rec[f"acc_{f}"] = float(self.accuracy[i, j])
                rec[f"d_acc_{f}"] = float(self.accuracy_change[i, j])
                rec[f"p_{f}"] = float(self.p_true[i, j])
                rec[f"d_p_{f}"] = float(self.p_true_change[i, j])
            rec["pixel_mse"] = float(self.pixel_mse[i])
            out.append(rec)
        return out

    def to_table(self, sort_by: Optional[str] = None) -> pd.DataFrame:
        """One row per component: accuracy change and probability change per factor, pixel MSE."""
        df = pd.DataFrame(self.to_records()).drop(columns=["module", "head"])
        keep = ["component", "method"] + [f"d_acc_{f}" for f in self.factors] + [f"d_p_{f}" for f in self.factors] + ["pixel_mse"]
        df = df[keep].round(4)
        if sort_by is not None:
            df = df.sort_values(sort_by, key=lambda s: -s.abs() if s.dtype.kind == "f" else s)
        return df.reset_index(drop=True)

    def __str__(self) -> str:
        base = ", ".join(
            f"{f} acc {float(a):.3f} p {float(p):.3f}"
            for f, a, p in zip(self.factors, self.baseline_accuracy, self.baseline_p_true)
        )
        return (f"Ablation ({self.method} for heads, skip for blocks) over {self.n_prompts} prompts, "
                f"{self.num_inference_steps} steps, seed {self.seed}; baseline: {base}\n"
                + self.to_table().to_string(index=False))

    def selective(self, affects: str, spares: str, min_effect: float = 0.1, max_other: float = 0.03) -> list[dict[str, Any]]:
        """Components that lower the judged probability of factor ``affects`` by at least ``min_effect``
        while changing that of ``spares`` by at most ``max_other`` (absolute): evidence for "affects
        colour but not position", with the numbers."""
        for f in (affects, spares):
            if f not in self.factors:
                raise ValueError(f"Unknown factor {f!r}; measured factors: {list(self.factors)}.")
        a, s = self.factors.index(affects), self.factors.index(spares)
        out = []
        for i, c in enumerate(self.components):
            da, ds = float(self.p_true_change[i, a]), float(self.p_true_change[i, s])
            if da <= -min_effect and abs(ds) <= max_other:
                out.append({"component": c.name, f"d_p_{affects}": round(da, 4), f"d_p_{spares}": round(ds, 4)})
        return out

    def plot(self, path: PathLike) -> Path:
        """PNG: components x factors heatmap of the change in the probability of the prompt's value,
        and the pixel MSE per component."""
        n = len(self.components)
        fig = blank_figure(figsize=(9.0, 0.28 * n + 2.0))
        gs = fig.add_gridspec(1, 2, width_ratios=(3.0, 1.0), wspace=0.25)
        names = [c.name for c in self.components]
        heatmap(fig.add_subplot(gs[0, 0]), self.p_true_change, row_labels=names, col_labels=list(self.factors),
                title="change in P(prompt's value)", annotate=n * len(self.factors) <= 300, max_ticks=200)
        # Same row layout (aspect "auto", one colour bar each) so rows line up with the heatmap's.
        heatmap(fig.add_subplot(gs[0, 1]), self.pixel_mse[:, None], row_labels=[""] * n, col_labels=["pixel MSE"],
                title="image change", symmetric=False, cmap="Greys", annotate=n <= 300, max_ticks=200, fmt="{:.4f}")
        return save_figure(fig, path)


@torch.no_grad()
def ablate_components(
    pipe: Any,
    prompts: Sequence[Union[str, dict[str, str]]],
    components: Optional[Sequence[Component]] = None,
    *,
    method: str = "mean",
    at_timesteps: Any = None,
    judge: Any = None,
    world: Optional[FactorWorld] = None,
    factors: Sequence[str] = FACTORS,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> AblationResult:
    """Ablate each component in turn and measure the judged factors of the generated images.

    Args:
        pipe: a diffusers pipeline (e.g. the shapes-world one) or a HookedDiffusionPipeline.
        prompts: factor dicts (e.g. the shapes world's
            :func:`~sae_lens_multimodal.world.causal.shapes_prompts`): the ground truth the judge checks.
        components: default every head of every attention module (:func:`head_components`) and every
            skippable block (:func:`block_components`).
        method: head ablation, ``"zero"`` or ``"mean"`` (over the prompts, per timestep, branch, position).
        at_timesteps: ablate only at these timesteps (any selector ``run_with_hooks`` takes); None = all.
        judge: scores the images per factor (default: the factor world's judge, built when None).
        world: the :class:`~sae_lens_multimodal.analysis.factor_worlds.FactorWorld` of the prompts
            (default: the one registered for ``pipe``'s class).
    """
    if method not in ABLATION_METHODS:
        raise ValueError(f"method must be one of {ABLATION_METHODS}; got {method!r}.")
    positive_int(num_inference_steps, "num_inference_steps")
    check_guidance_scale(guidance_scale)
    if at_timesteps is not None:
        from sae_lens_multimodal.diffusion.pipeline import TimestepSelector  # diffusers: diffusion models only

        TimestepSelector(at_timesteps)  # an empty window, negative or non-numeric timesteps raise here
    if not prompts or not all(isinstance(p, dict) for p in prompts):
        raise ValueError("prompts must be a non-empty list of factor dicts ({'color': ..., 'shape': ..., 'position': ...}).")
    hooked = as_hooked_pipeline(pipe)
    comps = list(components) if components is not None else head_components(hooked) + block_components(hooked)
    if not comps:
        raise ValueError("No components to ablate.")
    for c in comps:
        hooked._filter_names([c.hook_name])  # unknown -> KeyError with close matches
    world = world or factor_world_for(hooked)
    if judge is None:
        judge = world.make_judge()
    factors = tuple(factors)
    missing = [f for f in factors if f not in judge.factors]
    if missing:
        raise ValueError(f"The judge classifies {list(judge.factors)}; cannot score {missing}.")
    text = world.captions(prompts)
    truth = {f: torch.tensor([judge.values[f].index(p[f]) for p in prompts]) for f in factors}

    def generate(runner: Callable, **extra: Any) -> Any:
        return runner(text, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pt",
                      generator=torch.Generator().manual_seed(seed), **pipe_kwargs, **extra)

    def judged(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = judge.probabilities(to_uint8(images))
        acc, p = [], []
        for f in factors:
            marginal = probs @ judge.membership[f]
            rows = torch.arange(len(marginal))
            acc.append((marginal.argmax(-1) == truth[f]).float().mean())
            p.append(marginal[rows, truth[f]].mean())
        return torch.stack(acc), torch.stack(p)

    z_hooks = sorted({c.hook_name for c in comps if c.kind == "head"})
    means = None
    if method == "mean" and z_hooks:
        base_images, cache = generate(hooked.run_with_cache, names_filter=z_hooks)
        means = cache
    else:
        base_images = generate(hooked.run_with_hooks, fwd_hooks=[])
    base_acc, base_p = judged(base_images)

    def head_hook(c: Component) -> Callable:
        def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            if method == "zero":
                z[:, :, c.head] = 0.0
                return z
            state = current_denoising_state()
            t, branch = state.timestep, state.branch  # type: ignore[union-attr]
            if branch == "both":
                for half, rows in zip(CFG_BATCH_ORDER, cfg_row_split(z.shape[0])):
                    z[rows, :, c.head] = means[c.hook_name, t, half][:, :, c.head].mean(0)  # type: ignore[index]
            else:
                z[:, :, c.head] = means[c.hook_name, t, branch][:, :, c.head].mean(0)  # type: ignore[index]
            return z

        return ablate

    def skip(update: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(update)

    acc_rows, p_rows, mse, examples = [], [], [], []
    for c in tqdm(comps, desc=f"ablating ({method})", disable=not progress):
        fn = head_hook(c) if c.kind == "head" else skip
        images = generate(hooked.run_with_hooks, fwd_hooks=[(c.hook_name, fn)], at_timesteps=at_timesteps)
        a, p = judged(images)
        acc_rows.append(a)
        p_rows.append(p)
        mse.append(((images - base_images) ** 2).mean())
        examples.append(to_uint8(images[:1])[0])
    return AblationResult(
        components=comps,
        method=method,
        factors=factors,
        accuracy=torch.stack(acc_rows),
        p_true=torch.stack(p_rows),
        pixel_mse=torch.stack(mse),
        baseline_accuracy=base_acc,
        baseline_p_true=base_p,
        n_prompts=len(prompts),
        num_inference_steps=num_inference_steps,
        seed=seed,
        images=np.stack(examples),
        baseline_image=to_uint8(base_images[:1])[0],
    )
