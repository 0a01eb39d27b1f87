"""Roles of attention heads in a diffusion denoiser, and what removing its bottleneck costs.

Any hooked denoiser (UNet or DiT) whose attention modules expose ``hook_pattern`` works; nothing here knows
a particular model. Three measurements:

* :func:`attention_head_statistics`: per head, averaged over a sampling run (conditional CFG branch, every
  step, every query): for **self-attention** the mean attended distance on the token grid (in grid cells)
  and its ratio to the distance under uniform attention (``locality``: < 1 = local); for
  **cross-attention** the attention mass on each caller-given group of text positions (e.g. the token
  positions of each factor word) and its enrichment over uniform attention; for both the normalised
  entropy of the attention distribution (0 = one key, 1 = uniform: spread);
* head ablation per factor: :func:`~sae_lens_multimodal.analysis.ablation.ablate_components` (reused,
  with any judge and factor set);
* :func:`bottleneck_ablation`: whole groups of blocks skipped at once (resnets keep their shortcut path,
  other blocks pass their input on: :func:`~sae_lens_multimodal.analysis.diffusion_lens.skip_block_hooks`),
  the output's degradation as judged accuracy per factor, pixel and feature distance to the unablated
  images, and the relative increase of a Fréchet distance in a feature space (an FID analogue) in percent.

:func:`assign_head_roles` turns statistics and ablation effects into roles by a stated rule
(:data:`ROLE_RULE`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import pandas as pd
import torch

from sae_lens_multimodal.analysis.ablation import AblationResult, Component, attention_modules
from sae_lens_multimodal.analysis.diffusion_lens import judge_factors, skip_block_hooks
from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline
from sae_lens_multimodal.analysis.factor_worlds import FactorWorld, factor_world_for
from sae_lens_multimodal.analysis.plotting import PathLike, blank_figure, heatmap, save_figure
from sae_lens_multimodal.core.arguments import check_guidance_scale, positive_int
from sae_lens_multimodal.core.denoising import cfg_row_split, current_denoising_state
from sae_lens_multimodal.core.images import to_uint8

__all__ = [
    "ROLE_RULE",
    "HeadStatistics",
    "grid_distances",
    "pattern_statistics",
    "attention_head_statistics",
    "assign_head_roles",
    "BottleneckResult",
    "bottleneck_ablation",
    "frechet_distance",
    "plot_head_roles",
    "short_module_name",
]

#: How :func:`assign_head_roles` names a head (thresholds are its keyword arguments).
ROLE_RULE = (
    "cross-attention: 'semantic:<factor>' when the factor words' attention enrichment (mass / share of the "
    "text positions they fill) of the most enriched factor is >= semantic_min, else 'text-global' (attends "
    "to start/end/padding and function words: the pooled prompt). Joint (SD3 / Flux) heads: read as "
    "cross-attention (text block renormalised) when they send >= joint_text_min of their attention to text "
    "tokens, else as self-attention (image block renormalised). Self-attention: 'local (edge/texture)' "
    "when locality (mean attended grid distance / that of uniform attention) <= local_max; 'composition "
    "(global)' when locality >= global_min and normalised entropy >= spread_min; else 'regional'. "
    "Ablation: 'effect' is the factor whose judged probability drops most when the head is ablated, if "
    "that drop is >= min_effect, else 'none (redundant)'."
)


def grid_distances(n_tokens: int, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Euclidean distances [n, n] between positions of a row-major token grid (square unless ``grid``)."""
    if grid is None:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"{n_tokens} query positions are not a square grid; pass grid=(rows, cols).")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != n_tokens:
        raise ValueError(f"grid {grid} has {rows * cols} cells, but the pattern has {n_tokens} positions.")
    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()
    return torch.cdist(pos, pos)


def _entropy(pattern: torch.Tensor) -> torch.Tensor:
    """Normalised entropy per head [h] of a pattern [b, h, q, k], averaged over b and q."""
    p = pattern.float().clamp_min(0)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return (ent / math.log(max(pattern.shape[-1], 2))).mean(dim=(0, 2))


def pattern_statistics(
    pattern: torch.Tensor,
    *,
    kind: str,
    grid: Optional[tuple[int, int]] = None,
    group_masks: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Per-head statistics of one attention pattern [batch, heads, query, key] (rows sum to 1).

    ``kind="self"``: ``mean_distance`` (grid cells), ``uniform_distance`` (the same under uniform
    attention), ``locality`` (their ratio), ``entropy``. ``kind="cross"``: ``entropy`` and ``mass:<group>``
    per entry of ``group_masks`` (bool [batch, key]: which key positions belong to the group in each row)."""
    if pattern.ndim != 4:
        raise ValueError(f"pattern must be [batch, heads, query, key]; got shape {tuple(pattern.shape)}.")
    out = {"entropy": _entropy(pattern)}
    if kind == "self":
        if pattern.shape[-1] != pattern.shape[-2]:
            raise ValueError(f"A self-attention pattern is square; got {tuple(pattern.shape[-2:])}.")
        dist = grid_distances(pattern.shape[-1], grid).to(pattern.device)
        mean_d = (pattern.float() * dist).sum(-1).mean(dim=(0, 2))
        uniform = dist.mean()
        out.update(mean_distance=mean_d, uniform_distance=uniform.expand_as(mean_d), locality=mean_d / uniform)
    elif kind == "cross":
        for g, mask in (group_masks or {}).items():
            if mask.shape != (pattern.shape[0], pattern.shape[-1]):
                raise ValueError(f"group {g!r}: mask shape {tuple(mask.shape)} must be (batch, key) = "
                                 f"{(pattern.shape[0], pattern.shape[-1])}.")
            m = mask.to(pattern.device, pattern.dtype)[:, None, None, :]
            out[f"mass:{g}"] = (pattern * m).sum(-1).float().mean(dim=(0, 2))
            out[f"share:{g}"] = mask.float().sum(-1).mean().div(pattern.shape[-1]).expand(pattern.shape[1])
    else:
        raise ValueError(f"kind must be 'self' or 'cross'; got {kind!r}.")
    return out


@dataclass
class HeadStatistics:
    """Attention statistics per head (rows of :meth:`to_frame`)."""

    heads: list[Component]
    #: "self" / "cross" per head
    kinds: list[str]
    #: statistic name -> [n_heads] (NaN where it does not apply)
    values: dict[str, torch.Tensor]
    groups: tuple[str, ...] = ()
    n_prompts: int = 0
    num_inference_steps: int = 0

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for i, c in enumerate(self.heads):
            row: dict[str, Any] = {"module": c.module, "head": c.head, "kind": self.kinds[i]}
            row.update({k: float(v[i]) for k, v in self.values.items()})
            rows.append(row)
        return pd.DataFrame(rows)


def _attention_kind(module: Any) -> str:
    if getattr(module, "is_cross_attention", False):
        return "cross"
    if getattr(module, "add_q_proj", None) is not None:
        return "joint"  # SD3 / Flux: image and text keys in one softmax
    return "self"


@torch.no_grad()
def attention_head_statistics(
    pipe: Any,
    prompts: Sequence[Union[str, dict[str, str]]],
    token_groups: Optional[Sequence[Mapping[str, Sequence[int]]]] = None,
    *,
    modules: Optional[Sequence[str]] = None,
    world: Optional[FactorWorld] = None,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    grid: Optional[tuple[int, int]] = None,
    **pipe_kwargs: Any,
) -> HeadStatistics:
    """Statistics of every head of ``modules`` (default every attention module with a ``hook_z``) over one
    sampling run of ``prompts``, on the conditional CFG rows.

    ``token_groups``: one mapping per prompt, group name -> the text token positions of that group (e.g.
    ``{"color": [3], "position": [7, 8]}``), for the cross-attention mass; ``grid``: the token grid of
    self-attention (default square)."""
    positive_int(num_inference_steps, "num_inference_steps")
    check_guidance_scale(guidance_scale)
    if not prompts:
        raise ValueError("prompts must be a non-empty list.")
    if token_groups is not None and len(token_groups) != len(prompts):
        raise ValueError(f"token_groups has {len(token_groups)} entries for {len(prompts)} prompts (one mapping per prompt).")
    hooked = as_hooked_pipeline(pipe)
    text = list(prompts) if all(isinstance(p, str) for p in prompts) else (world or factor_world_for(hooked)).captions(prompts)
    mods = attention_modules(hooked) if modules is None else [hooked.canonical_hook_name(m) for m in modules]
    missing = [m for m in mods if f"{m}.hook_pattern" not in hooked.hook_dict]
    if missing:
        raise KeyError(f"{missing} have no hook_pattern; attention modules: {attention_modules(hooked)}.")
    kinds = {m: _attention_kind(hooked.denoiser.get_submodule(m)) for m in mods}
    text_first = "Flux" in type(hooked.denoiser).__name__  # joint order: Flux [text, image], SD3 [image, text]
    n_image: dict[str, int] = {}
    groups = tuple(dict.fromkeys(g for tg in (token_groups or []) for g in tg))
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {m: 0 for m in mods}

    def hook_for(m: str) -> Any:
        def accumulate(pattern: torch.Tensor, hook: Any) -> None:
            state = current_denoising_state()
            branch = None if state is None else state.branch
            if branch == "uncond":
                return
            rows = cfg_row_split(pattern.shape[0])[1] if branch == "both" else slice(None)
            p = pattern[rows]
            text_share = None
            if kinds[m] == "joint":
                # image queries only; the image block and the text block renormalised to distributions
                n_img = n_image[m]
                n_txt = p.shape[-1] - n_img
                img, txt = (slice(n_txt, None), slice(0, n_txt)) if text_first else (slice(0, n_img), slice(n_img, None))
                p_img, p_txt = p[:, :, img, img].float(), p[:, :, img, txt].float()
                text_share = p_txt.sum(-1).mean(dim=(0, 2))
                p = p_img / p_img.sum(-1, keepdim=True).clamp_min(1e-12)
                p_txt = p_txt / p_txt.sum(-1, keepdim=True).clamp_min(1e-12)
            masks = None
            if kinds[m] in ("cross", "joint") and token_groups is not None:
                if p.shape[0] != len(token_groups):
                    raise ValueError(f"{p.shape[0]} conditional rows but {len(token_groups)} token groups.")
                masks = {}
                for g in groups:
                    mask = torch.zeros(p.shape[0], p.shape[-1], dtype=torch.bool)
                    for r, tg in enumerate(token_groups):
                        mask[r, list(tg.get(g, []))] = True
                    if kinds[m] == "joint":
                        mask = mask[:, : p_txt.shape[-1]]
                    masks[g] = mask
            if kinds[m] == "joint":
                stats = pattern_statistics(p, kind="self", grid=grid)
                cross = pattern_statistics(p_txt, kind="cross", group_masks=masks)
                stats.update({k: v for k, v in cross.items() if k != "entropy"},
                             text_entropy=cross["entropy"], text_share=text_share)
            else:
                stats = pattern_statistics(p, kind=kinds[m], grid=grid, group_masks=masks)
            acc = sums.setdefault(m, {k: torch.zeros_like(v) for k, v in stats.items()})
            for k, v in stats.items():
                acc[k] += v.cpu()
            counts[m] += 1

        return accumulate

    def image_length(m: str) -> Any:
        def remember(q: torch.Tensor, hook: Any) -> None:
            n_image[m] = q.shape[1]  # a joint module's hook_q holds its image tokens only

        return remember

    fwd = [(f"{m}.hook_q", image_length(m)) for m in mods if kinds[m] == "joint"]
    fwd += [(f"{m}.hook_pattern", hook_for(m)) for m in mods]
    call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **pipe_kwargs)
    # With precomputed prompt embeddings (DiT pipelines) the prompts only label the rows.
    hooked.run_with_hooks(*(() if "prompt_embeds" in pipe_kwargs else (text,)), fwd_hooks=fwd, **call)
    heads, kind_list = [], []
    names = ["entropy", "mean_distance", "uniform_distance", "locality", "text_share", "text_entropy"]
    names += [f"{p}:{g}" for g in groups for p in ("mass", "share", "enrichment")]
    cols: dict[str, list[float]] = {k: [] for k in names}
    for m in mods:
        if counts[m] == 0:
            raise RuntimeError(f"{m}.hook_pattern never ran on a conditional row.")
        avg = {k: v / counts[m] for k, v in sums[m].items()}
        for g in groups:
            if f"mass:{g}" in avg:
                avg[f"enrichment:{g}"] = avg[f"mass:{g}"] / avg[f"share:{g}"].clamp_min(1e-12)
        for h in range(int(avg["entropy"].shape[0])):
            heads.append(Component(m, h))
            kind_list.append(kinds[m])
            for k in names:
                cols[k].append(float(avg[k][h]) if k in avg else float("nan"))
    return HeadStatistics(heads=heads, kinds=kind_list, values={k: torch.tensor(v) for k, v in cols.items()},
                          groups=groups, n_prompts=len(prompts), num_inference_steps=num_inference_steps)


def assign_head_roles(
    stats: HeadStatistics,
    ablation: Optional[AblationResult] = None,
    *,
    factor_groups: Optional[Sequence[str]] = None,
    semantic_min: float = 1.5,
    local_max: float = 0.6,
    global_min: float = 0.85,
    spread_min: float = 0.7,
    min_effect: float = 0.02,
    joint_text_min: float = 0.25,
) -> pd.DataFrame:
    """One row per head: its statistics, its role by :data:`ROLE_RULE`, and (with ``ablation``, a head
    ablation over the same heads) the change in judged probability per factor and the factor it affects."""
    groups = list(factor_groups) if factor_groups is not None else list(stats.groups)
    df = stats.to_frame()
    roles, tops = [], []
    for i, kind in enumerate(stats.kinds):
        share = float(stats.values["text_share"][i]) if "text_share" in stats.values else float("nan")
        if kind == "cross" or (kind == "joint" and share >= joint_text_min):
            enr = {g: float(stats.values[f"enrichment:{g}"][i]) for g in groups if f"enrichment:{g}" in stats.values}
            top = max(enr, key=enr.get) if enr else None
            tops.append(top)
            roles.append(f"semantic:{top}" if top is not None and enr[top] >= semantic_min else "text-global")
        else:
            if kind == "joint":
                enr = {g: float(stats.values[f"enrichment:{g}"][i]) for g in groups if f"enrichment:{g}" in stats.values}
                tops.append(max(enr, key=enr.get) if enr else None)
            else:
                tops.append(None)
            loc, ent = float(stats.values["locality"][i]), float(stats.values["entropy"][i])
            if loc <= local_max:
                roles.append("local (edge/texture)")
            elif loc >= global_min and ent >= spread_min:
                roles.append("composition (global)")
            else:
                roles.append("regional")
    df["top_word_group"] = tops
    df["role"] = roles
    if ablation is not None:
        index = {c: i for i, c in enumerate(ablation.components)}
        effects = []
        for j, f in enumerate(ablation.factors):
            df[f"d_p_{f}"] = [float(ablation.p_true_change[index[c], j]) if c in index else float("nan") for c in stats.heads]
        for _, row in df.iterrows():
            drops = {f: -row[f"d_p_{f}"] for f in ablation.factors if not math.isnan(row[f"d_p_{f}"])}
            best = max(drops, key=drops.get) if drops else None
            effects.append(best if best is not None and drops[best] >= min_effect else "none (redundant)")
        df["effect"] = effects
        df["pixel_mse"] = [float(ablation.pixel_mse[index[c]]) if c in index else float("nan") for c in stats.heads]
    return df


def short_module_name(module: str) -> str:
    """A compact label for an attention module path (``down_blocks.2.attentions.0.transformer_blocks.0.attn2``
    -> ``down2.a0.attn2``; ``transformer_blocks.3.attn1`` -> ``tb3.attn1``)."""
    parts = module.replace("transformer_blocks.0.", "").split(".") if "attentions" in module else module.split(".")
    out = []
    i = 0
    while i < len(parts):
        p = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else ""
        if p in ("down_blocks", "up_blocks") and nxt.isdigit():
            out.append(p.split("_")[0] + nxt)
            i += 2
        elif p == "mid_block":
            out.append("mid")
            i += 1
        elif p in ("attentions", "resnets", "transformer_blocks", "single_transformer_blocks") and nxt.isdigit():
            out.append({"attentions": "a", "resnets": "r", "transformer_blocks": "tb", "single_transformer_blocks": "stb"}[p] + nxt)
            i += 2
        else:
            out.append(p)
            i += 1
    return ".".join(out)


def plot_head_roles(roles: pd.DataFrame, path: PathLike, factors: Sequence[str] = (),
                    bottleneck: Optional["BottleneckResult"] = None, survey_range: tuple[float, float] = (25.0, 128.0)) -> Path:
    """PNG: (left) self-attention heads by locality and entropy, cross-attention heads by factor-word
    enrichment, coloured by role; (middle, when ``roles`` has ablation columns for ``factors``) the ablation
    effect per head and factor; (right, with ``bottleneck``) the degradation of each bottleneck ablation next
    to the survey's range."""
    import matplotlib

    d_cols = [f"d_p_{f}" for f in factors if f"d_p_{f}" in roles.columns]
    n_cols = 1 + bool(d_cols) + (bottleneck is not None)  # statistics only: no empty ablation panel
    fig = blank_figure(figsize=(5.5 * n_cols, max(5.0, 0.2 * len(roles) + 2.0)), layout="constrained")
    gs = fig.add_gridspec(2, n_cols)
    cmap = matplotlib.colormaps["tab10"]
    role_names = sorted(roles["role"].unique())
    colour = {r: cmap(i % 10) for i, r in enumerate(role_names)}
    ax = fig.add_subplot(gs[0, 0])
    self_rows = roles[roles["kind"].isin(["self", "joint"])]
    for r in role_names:
        sub = self_rows[self_rows["role"] == r]
        if len(sub):
            ax.scatter(sub["locality"], sub["entropy"], color=colour[r], label=r, s=28)
    ax.set_xlabel("locality (mean attended distance / uniform)")
    ax.set_ylabel("normalised entropy")
    ax.set_title("self-attention heads")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[1, 0])
    cross = roles[roles["kind"].isin(["cross", "joint"])]
    enr_cols = [c for c in roles.columns if c.startswith("enrichment:")]
    if len(cross) and enr_cols:
        labels = [f"{short_module_name(m)} h{h}" for m, h in zip(cross["module"], cross["head"])]
        heatmap(ax, cross[enr_cols].to_numpy(), row_labels=labels, col_labels=[c.split(":")[1] for c in enr_cols],
                title="cross-attention: factor-word enrichment", symmetric=False, cmap="viridis", max_ticks=200)
    if d_cols:
        ax = fig.add_subplot(gs[:, 1])
        labels = [f"{short_module_name(m)} h{h} [{r.split(' ')[0]}]"
                  for m, h, r in zip(roles["module"], roles["head"], roles["role"])]
        heatmap(ax, roles[d_cols].to_numpy(), row_labels=labels, col_labels=list(factors),
                title="head ablation: change in P(prompt's value)", max_ticks=200)
    if bottleneck is not None:
        ax = fig.add_subplot(gs[:, n_cols - 1])
        names = bottleneck.groups
        y = np.arange(len(names))
        ax.axvspan(*survey_range, color="0.85", label=f"survey {survey_range[0]:.0f}-{survey_range[1]:.0f}%")
        ax.barh(y - 0.2, bottleneck.fd_increase_pct.numpy(), height=0.4, label="feature FD increase %")
        ax.barh(y + 0.2, bottleneck.accuracy_drop_pct.numpy(), height=0.4, label="accuracy drop %")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("degradation (%)")
        ax.set_title("bottleneck ablation")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` [n, d] and ``b`` [m, d] (FID's formula)."""
    from scipy import linalg  # scipy: only this metric needs a matrix square root

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a64.mean(0), b64.mean(0)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@dataclass
class BottleneckResult:
    """Degradation of the output when each group of blocks is skipped."""

    groups: list[str]
    blocks: dict[str, list[str]]
    factors: tuple[str, ...]
    #: [n_groups, n_factors]
    accuracy: torch.Tensor
    baseline_accuracy: torch.Tensor
    #: [n_groups] mean squared pixel difference to the unablated images (pixels in [0, 1])
    pixel_mse: torch.Tensor
    #: [n_groups] mean cosine distance of image features to the unablated images' (NaN without features)
    feature_distance: torch.Tensor
    #: [n_groups] Fréchet distance of image features to the reference images' (NaN without references)
    fd: torch.Tensor
    baseline_fd: float
    n_prompts: int
    num_inference_steps: int
    images: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def accuracy_drop_pct(self) -> torch.Tensor:
        """Relative drop of the mean judged accuracy over factors, in percent of the baseline's."""
        base = self.baseline_accuracy.mean()
        return (base - self.accuracy.mean(-1)) / base * 100

    @property
    def fd_increase_pct(self) -> torch.Tensor:
        """Relative increase of the feature Fréchet distance to the references (an FID analogue), in percent."""
        return (self.fd / self.baseline_fd - 1) * 100

    def to_table(self) -> pd.DataFrame:
        rows = []
        for i, g in enumerate(self.groups):
            row: dict[str, Any] = {"skipped": g, "blocks": len(self.blocks[g])}
            row.update({f"acc_{f}": round(float(self.accuracy[i, j]), 3) for j, f in enumerate(self.factors)})
            row.update(accuracy_drop_pct=round(float(self.accuracy_drop_pct[i]), 1),
                       fd_increase_pct=round(float(self.fd_increase_pct[i]), 1),
                       pixel_mse=round(float(self.pixel_mse[i]), 4),
                       feature_distance=round(float(self.feature_distance[i]), 4))
            rows.append(row)
        return pd.DataFrame(rows)


@torch.no_grad()
def bottleneck_ablation(
    pipe: Any,
    prompts: Sequence[dict[str, str]],
    groups: Mapping[str, Sequence[str]],
    *,
    judge: Any = None,
    world: Optional[FactorWorld] = None,
    factors: Optional[Sequence[str]] = None,
    features: Optional[Callable[[np.ndarray], torch.Tensor]] = None,
    reference_images: Optional[np.ndarray] = None,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    **pipe_kwargs: Any,
) -> BottleneckResult:
    """Skip each group of blocks (name -> block paths) in one generation run of ``prompts`` (same seed) and
    measure the degradation (see :class:`BottleneckResult`). ``features``: uint8 images -> [n, d] (e.g. a
    CLIP image tower); ``reference_images``: real images of the prompts (for the Fréchet distance)."""
    positive_int(num_inference_steps, "num_inference_steps")
    check_guidance_scale(guidance_scale)
    if not groups:
        raise ValueError("groups must name at least one group of blocks to skip.")
    if not prompts or not all(isinstance(p, dict) for p in prompts):
        raise ValueError("prompts must be a non-empty list of factor dicts.")
    hooked = as_hooked_pipeline(pipe)
    world = world or factor_world_for(hooked)
    judge = judge if judge is not None else world.make_judge()
    facs = tuple(factors) if factors is not None else tuple(judge.factors)
    text = world.captions(prompts)

    def generate(fwd: list) -> torch.Tensor:
        return hooked.run_with_hooks(*(() if "prompt_embeds" in pipe_kwargs else (text,)), fwd_hooks=fwd, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, output_type="pt",
                                     generator=torch.Generator().manual_seed(seed), **pipe_kwargs)

    hook_lists = {g: skip_block_hooks(hooked, blocks) for g, blocks in groups.items()}  # bad names raise first
    base = generate([])
    base_u8 = to_uint8(base)
    base_acc = judge_factors(judge, base_u8, prompts, facs)[0]
    base_feat = features(base_u8) if features is not None else None
    ref_feat = features(reference_images) if features is not None and reference_images is not None else None
    base_fd = frechet_distance(base_feat, ref_feat) if ref_feat is not None else float("nan")
    acc, mse, fdist, fd, examples = [], [], [], [], []
    for g, fwd in hook_lists.items():
        images = generate(fwd)
        u8 = to_uint8(images)
        acc.append(judge_factors(judge, u8, prompts, facs)[0])
        mse.append(((images - base) ** 2).mean())
        if base_feat is not None:
            feat = features(u8)  # type: ignore[misc]
            cos = torch.nn.functional.cosine_similarity(feat.float(), base_feat.float(), dim=-1)
            fdist.append(float((1 - cos).mean()))
            fd.append(frechet_distance(feat, ref_feat) if ref_feat is not None else float("nan"))
        else:
            fdist.append(float("nan"))
            fd.append(float("nan"))
        examples.append(u8[0])
    return BottleneckResult(
        groups=list(groups), blocks={g: list(b) for g, b in groups.items()}, factors=facs,
        accuracy=torch.stack(acc), baseline_accuracy=base_acc, pixel_mse=torch.stack(mse),
        feature_distance=torch.tensor(fdist), fd=torch.tensor(fd), baseline_fd=base_fd, n_prompts=len(prompts),
        num_inference_steps=num_inference_steps, images=np.stack(examples),
    )
