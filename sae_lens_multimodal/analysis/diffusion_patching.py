"""Activation patching across prompts in a text-to-image diffusion model, per block x timestep.

Two prompts run with the same seed (the same initial noise): the **source** prompt, whose activations
are cached per (hook, actual timestep, CFG branch) by :class:`HookedDiffusionPipeline.run_with_cache`, and
the **target** prompt, rerun once per cell with the source's activation written into one block's output at
the cell's timesteps (``run_with_hooks(..., at_timesteps=...)``). Each final image is scored:

* ``p_source`` / ``p_target``: the judge's (a CLIP's) zero-shot probability of the source's / target's
  value of ``factor`` (e.g. the colour), averaged over the prompt pairs;
* ``pixel_recovery``: ``1 - |patched - source| / |target - source|`` (mean absolute pixel differences):
  1 = the source image reproduced, 0 = no closer to it than the target image;
* ``pixel_mse_to_source``: mean squared pixel difference to the source image (pixels in [0, 1]).

Rows are blocks (plus an "all blocks" row: every listed block patched at once), columns timesteps in
denoising order (``timestep_mode``: ``"single"`` patches that timestep only, ``"from"`` that timestep
and every later (less noisy) one, ``"until"`` every earlier one up to it).

>>> result = diffusion_patching(pipe, [{"color": "red", ...}], [{"color": "blue", ...}], factor="color")
>>> result.plot("diffusion_patching.png"); print(result.to_table())
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

from sae_lens_multimodal.analysis.factor_worlds import FactorWorld, captions, factor_world_for
from sae_lens_multimodal.analysis.plotting import PathLike, blank_figure, heatmap, save_figure, to_numpy
from sae_lens_multimodal.core.arguments import check_guidance_scale, check_prompts, check_timesteps, positive_int
from sae_lens_multimodal.core.denoising import CFG_BATCH_ORDER, check_cfg_branch, current_denoising_state
from sae_lens_multimodal.core.images import to_uint8

__all__ = [
    "DEFAULT_UNET_BLOCKS",
    "ALL_BLOCKS",
    "DiffusionPatchingResult",
    "diffusion_patching",
    "as_hooked_pipeline",
    "unet_blocks",
]

#: The row that patches every listed block at once.
ALL_BLOCKS = "all blocks"
#: Block-level modules of an SD-style UNet in execution order (those a UNet2DConditionModel has are used).
DEFAULT_UNET_BLOCKS = "auto"
TIMESTEP_MODES = ("single", "from", "until")

Prompt = Union[str, dict[str, str]]


def as_hooked_pipeline(pipe: Any) -> Any:
    """A :class:`HookedDiffusionPipeline` for ``pipe`` (returned as is when it already is one)."""
    # diffusers: the diffusion package imports it; analysis loads it only for a diffusion model
    from sae_lens_multimodal.diffusion.pipeline import HookedDiffusionPipeline

    return pipe if isinstance(pipe, HookedDiffusionPipeline) else HookedDiffusionPipeline(pipe)


def unet_blocks(hooked: Any) -> list[str]:
    """Block-level modules (resnets and attention blocks, not their inner transformer blocks) of a hooked
    UNet in execution order: down blocks, mid block, up blocks; each has ``.hook_out``. For a DiT (PixArt,
    SD3, Flux: no UNet blocks), its transformer blocks in order (Flux: then its single-stream blocks)."""
    names = [n[: -len(".hook_out")] for n in hooked.hook_dict if n.endswith(".hook_out")]
    dit = [n for n in names if n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
           and len(n.split(".")) == 2 and n.split(".")[1].isdigit()]
    if dit and not any(n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for n in names):
        return sorted(dit, key=lambda n: (n.startswith("single_"), int(n.split(".")[1])))
    blocks = [n for n in names if n.split(".")[-2] in ("resnets", "attentions") and "transformer_blocks" not in n]

    def order(name: str) -> tuple:
        parts = name.split(".")
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
        if parts[0] == "mid_block":
            idx, kind, j = 0, parts[1], int(parts[2])
        else:
            idx, kind, j = int(parts[1]), parts[2], int(parts[3])
        # Within a down / up block diffusers runs resnet j, then attention j; the mid block runs
        # resnet 0, attention 0, resnet 1.
        return (stage, idx, j, 0 if kind == "resnets" else 1)

    blocks = [b for b in blocks if b.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
    return sorted(blocks, key=order)


@dataclass
class DiffusionPatchingResult:
    """Scores of the target run's final images with the source's activations patched in."""

    blocks: list[str]
    #: column labels: the first timestep each column patches (scheduler units), in denoising order
    timesteps: list[Any]
    timestep_mode: str
    #: metric name -> [n_blocks, n_timesteps]
    metrics: dict[str, torch.Tensor]
    #: metric name -> value for the unpatched source and target runs
    source_baseline: dict[str, float]
    target_baseline: dict[str, float]
    factor: Optional[str]
    source_prompts: list[str]
    target_prompts: list[str]
    hook: str = "hook_out"
    #: first pair's images, uint8 [n_blocks, n_timesteps, H, W, 3]
    images: Optional[np.ndarray] = field(default=None, repr=False)
    source_image: Optional[np.ndarray] = field(default=None, repr=False)
    target_image: Optional[np.ndarray] = field(default=None, repr=False)

    def __getitem__(self, metric: str) -> torch.Tensor:
        if metric not in self.metrics:
            raise KeyError(f"No metric {metric!r}; computed: {list(self.metrics)}.")
        return self.metrics[metric]

    def to_records(self) -> list[dict[str, Any]]:
        out = []
        for i, block in enumerate(self.blocks):
            for j, t in enumerate(self.timesteps):
                rec: dict[str, Any] = {"block": block, "timestep": t, "step": j, "mode": self.timestep_mode}
                rec.update({k: float(v[i, j]) for k, v in self.metrics.items()})
                out.append(rec)
        return out

    def to_table(self, metric: Optional[str] = None) -> pd.DataFrame:
        """Blocks x timesteps of one metric (default ``p_source`` if computed, else the first)."""
        metric = metric or ("p_source" if "p_source" in self.metrics else next(iter(self.metrics)))
        data = to_numpy(self[metric]).round(3)
        return pd.DataFrame(data, index=pd.Index(self.blocks, name=metric), columns=[f"t={t}" for t in self.timesteps])

    def __str__(self) -> str:
        lines = [
            f"Diffusion patching ({self.timestep_mode}) of {self.hook}: source {self.source_prompts[0]!r} -> "
            f"target {self.target_prompts[0]!r} ({len(self.source_prompts)} pair(s))",
            "baselines: " + ", ".join(
                f"{k} source {self.source_baseline[k]:.3f} / target {self.target_baseline[k]:.3f}"
                for k in self.metrics if k in self.source_baseline
            ),
        ]
        for metric in self.metrics:
            lines.append(self.to_table(metric).to_string())
        return "\n".join(lines)

    def plot(self, path: PathLike, metrics: Optional[Sequence[str]] = None, image_row: Optional[str] = None) -> Path:
        """PNG: a blocks x timesteps heatmap per metric, the source and target images, and the patched
        images of one row (default: the "all blocks" row, or the first) across timesteps."""
        metrics = list(metrics or [m for m in ("p_source", "pixel_recovery") if m in self.metrics] or list(self.metrics)[:2])
        n_t = len(self.timesteps)
        fig = blank_figure(figsize=(max(6.5 * len(metrics), 0.9 * n_t + 2.5), 0.34 * len(self.blocks) + 5.2))
        gs = fig.add_gridspec(2, 1, height_ratios=(0.34 * len(self.blocks) + 1.5, 1.6), hspace=0.35)
        top = gs[0].subgridspec(1, len(metrics), wspace=0.6)
        cols = [f"{t}" for t in self.timesteps]
        for k, metric in enumerate(metrics):
            ax = fig.add_subplot(top[0, k])
            symmetric = metric not in ("p_source", "p_target", "pixel_mse_to_source")
            heatmap(ax, self[metric], row_labels=self.blocks if k == 0 else [""] * len(self.blocks), col_labels=cols,
                    title=f"{metric} (source {self.source_baseline.get(metric, float('nan')):.2f}, "
                          f"target {self.target_baseline.get(metric, float('nan')):.2f})",
                    symmetric=symmetric, annotate=len(self.blocks) * n_t <= 200)
            ax.set_xlabel(f"timestep patched ({self.timestep_mode})", fontsize=8)
        if self.images is not None:
            row = self.blocks.index(image_row) if image_row else (
                self.blocks.index(ALL_BLOCKS) if ALL_BLOCKS in self.blocks else 0)
            bottom = gs[1].subgridspec(1, n_t + 2, wspace=0.1)
            strip = [(self.source_image, "source"), (self.target_image, "target")]
            strip += [(self.images[row, j], f"t={t}") for j, t in enumerate(self.timesteps)]
            for j, (img, title) in enumerate(strip):
                ax = fig.add_subplot(bottom[0, j])
                if img is not None:
                    ax.imshow(img, interpolation="nearest")
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            fig.text(0.5, 0.08, f"patched images, row {self.blocks[row]!r}", ha="center", fontsize=8)
        return save_figure(fig, path)


def _judge_metrics(judge: Any, factor: Optional[str], source_values: list[str], target_values: list[str]) -> Callable:
    if judge is None or factor is None:
        return lambda images: {}
    if factor not in judge.factors:
        raise ValueError(f"The judge classifies {list(judge.factors)}; got factor={factor!r}.")
    values = judge.values[factor]
    src = torch.tensor([values.index(v) for v in source_values])
    tgt = torch.tensor([values.index(v) for v in target_values])

    def score(images: np.ndarray) -> dict[str, float]:
        probs = judge.probabilities(images) @ judge.membership[factor]  # [n, n_values]
        rows = torch.arange(len(probs))
        return {"p_source": float(probs[rows, src].mean()), "p_target": float(probs[rows, tgt].mean())}

    return score


@torch.no_grad()
def diffusion_patching(
    pipe: Any,
    source: Sequence[Prompt],
    target: Sequence[Prompt],
    *,
    blocks: Union[str, Sequence[str]] = DEFAULT_UNET_BLOCKS,
    include_all_blocks: bool = True,
    per_block: bool = True,
    timesteps: Optional[Sequence[Any]] = None,
    timestep_mode: str = "single",
    factor: Optional[str] = "color",
    judge: Any = None,
    world: Optional[FactorWorld] = None,
    hook: str = "hook_out",
    cfg_branch: Optional[str] = None,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> DiffusionPatchingResult:
    """Patch the source prompts' activations into the target prompts' runs per block x timestep.

    Args:
        pipe: a diffusers text-to-image pipeline (e.g. the shapes-world pipeline) or a HookedDiffusionPipeline.
        source / target: prompts, pairs row by row: strings, or factor dicts (``{"color": "red",
            "shape": "circle", "position": "left"}``, captioned by the factor world), which also give the
            factor values the judge scores.
        blocks: block module paths (``"up_blocks.0.attentions.1"``; aliases allowed) or ``"auto"`` (every
            resnet and attention block of the UNet, or every transformer block of a DiT, in execution order).
        include_all_blocks: add a row patching every block at once; ``per_block``: a row per block.
        timesteps: the columns: scheduler timesteps of this run (default every one), or windows (lists
            of timesteps patched together, e.g. the first and the second half of the schedule).
        timestep_mode: ``"single"`` (the column's timestep or window), ``"from"`` (it and every later,
            less noisy step) or ``"until"`` (every step up to and including it).
        factor / judge: the factor whose probability is scored and the judge that scores it (default the
            factor world's, e.g. the shapes world's
            :class:`~sae_lens_multimodal.world.eval_diffusion.FactorClassifier`, built when ``None`` and the
            prompts are factor dicts); ``factor=None`` scores pixels only.
        world: the :class:`~sae_lens_multimodal.analysis.factor_worlds.FactorWorld` of factor-dict prompts
            (default: the one registered for ``pipe``'s class).
        hook: the block hook patched (``"hook_out"``, or ``"hook_update"`` where a block has one).
        cfg_branch: patch only this CFG branch (``"cond"`` / ``"uncond"``); None patches every row.
        num_inference_steps / guidance_scale / seed / pipe_kwargs: the pipeline's arguments; both runs
            use a generator seeded with ``seed``, hence the same initial noise.
    """
    positive_int(num_inference_steps, "num_inference_steps")
    check_guidance_scale(guidance_scale)
    check_cfg_branch(cfg_branch, allow_both=False)
    check_prompts(list(source), "source")
    check_prompts(list(target), "target")
    for window in [] if timesteps is None else list(timesteps):
        if isinstance(window, range) and len(window) == 0:
            raise ValueError(f"The timestep window {window!r} is empty (start >= end); write range(end, start) for "
                             "the steps between them, or a list of the schedule's timesteps.")
        check_timesteps(list(window) if isinstance(window, (list, tuple, range)) else [window], "timesteps")
    hooked = as_hooked_pipeline(pipe)
    if len(source) != len(target) or not len(source):
        raise ValueError(f"source and target must be non-empty and pair up; got {len(source)} and {len(target)} prompts.")
    if timestep_mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES}; got {timestep_mode!r}.")
    block_list = unet_blocks(hooked) if isinstance(blocks, str) and blocks == "auto" else list(
        [blocks] if isinstance(blocks, str) else blocks)
    # locate resolves block aliases; unknown hooks raise a KeyError with close matches
    hook_names = [hooked.locate(f"{b}.{hook}").name for b in block_list]
    src_text, tgt_text = captions(source, hooked, world), captions(target, hooked, world)

    judge_fn: Callable[[np.ndarray], dict[str, float]] = lambda images: {}  # noqa: E731
    if factor is not None:
        dicts = all(isinstance(p, dict) for p in list(source) + list(target))
        if not dicts:
            raise ValueError(
                "Scoring a factor needs the prompts as factor dicts ({'color': ..., 'shape': ..., 'position': ...}); "
                "pass factor=None to score pixels only."
            )
        if judge is None:
            judge = (world or factor_world_for(hooked)).make_judge()
        judge_fn = _judge_metrics(judge, factor, [p[factor] for p in source], [p[factor] for p in target])  # type: ignore[index]

    def generate(prompts: list[str], **extra: Any) -> torch.Tensor:
        kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pt",
                      generator=torch.Generator().manual_seed(seed), **pipe_kwargs)
        return extra.pop("runner")(prompts, **kwargs, **extra)

    src_images, cache = generate(src_text, runner=hooked.run_with_cache, names_filter=hook_names, cfg_branch=cfg_branch)
    tgt_images = generate(tgt_text, runner=hooked.run_with_hooks, fwd_hooks=[])
    schedule = list(cache.timesteps)
    columns = list(schedule) if timesteps is None else list(timesteps)
    windows = [list(c) if isinstance(c, (list, tuple, range)) else [c] for c in columns]
    missing = [t for w in windows for t in w if t not in schedule]
    if missing or not all(windows):
        raise ValueError(f"Timesteps {missing or columns} are not (non-empty windows of) this run's schedule {schedule}.")
    if timestep_mode != "single" and any(len(w) > 1 for w in windows):
        raise ValueError("Timestep windows need timestep_mode='single' (a window already says which steps to patch).")
    labels = [w[0] if len(w) == 1 else f"{w[0]}..{w[-1]}" for w in windows]

    def scores(images: torch.Tensor) -> dict[str, float]:
        out = dict(judge_fn(to_uint8(images)))
        d_target = (tgt_images - src_images).abs().mean()
        d = (images - src_images).abs().mean()
        out["pixel_recovery"] = float(1 - d / d_target) if d_target > 0 else float("nan")
        out["pixel_mse_to_source"] = float(((images - src_images) ** 2).mean())
        return out

    def patch_hook(name: str) -> Callable:
        def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
            state = current_denoising_state()
            branch = state.branch if state is not None else None
            t = state.timestep if state is not None else None
            if branch == "both":
                return torch.cat([cache[name, t, half] for half in CFG_BATCH_ORDER]).to(act.dtype)
            return cache[name, t, branch].to(act.dtype)

        return put

    def selection(j: int) -> list[Any]:
        if timestep_mode == "single":
            return windows[j]
        k = schedule.index(windows[j][0])
        return schedule[k:] if timestep_mode == "from" else schedule[: k + 1]

    rows = ([ALL_BLOCKS] if include_all_blocks else []) + (block_list if per_block else [])
    row_hooks = ([hook_names] if include_all_blocks else []) + ([[n] for n in hook_names] if per_block else [])
    if not rows:
        raise ValueError("Nothing to patch: set include_all_blocks and/or per_block.")
    results: dict[str, np.ndarray] = {}
    first_images = np.zeros((len(rows), len(columns)) + tuple(to_uint8(src_images[:1]).shape[1:]), dtype=np.uint8)
    bar = tqdm(total=len(rows) * len(columns), desc="diffusion patching", disable=not progress)
    try:
        for i, names in enumerate(row_hooks):
            for j in range(len(columns)):
                images = generate(
                    tgt_text, runner=hooked.run_with_hooks, fwd_hooks=[(n, patch_hook(n)) for n in names],
                    at_timesteps=selection(j), cfg_branch=cfg_branch,
                )
                for k, v in scores(images).items():
                    results.setdefault(k, np.zeros((len(rows), len(columns))))[i, j] = v
                first_images[i, j] = to_uint8(images[:1])[0]
                bar.update()
    finally:
        bar.close()
    src_scores, tgt_scores = scores(src_images), scores(tgt_images)
    return DiffusionPatchingResult(
        blocks=rows,
        timesteps=labels,
        timestep_mode=timestep_mode,
        metrics={k: torch.from_numpy(v) for k, v in results.items()},
        source_baseline=src_scores,
        target_baseline=tgt_scores,
        factor=factor,
        source_prompts=src_text,
        target_prompts=tgt_text,
        hook=hook,
        images=first_images,
        source_image=to_uint8(src_images[:1])[0],
        target_image=to_uint8(tgt_images[:1])[0],
    )
