"""The shapes world's side of the causal and temporal analyses (docs/causal-analysis.md).

* :data:`SHAPES_FACTOR_WORLD`: how the world captions a factor dict, its factor values, balanced prompt
  sets and its judge (:class:`~sae_lens_multimodal.world.eval_diffusion.FactorClassifier`), registered by
  :mod:`sae_lens_multimodal.world` for ``ShapesDiffusionPipeline``, so ``diffusion_patching``,
  ``ablate_components`` and ``timestep_probes`` find it from the pipeline;
* :func:`shapes_prompts`: balanced factor-dict prompts; :func:`shape_patch_mask`: the patches a shape covers
  (ground truth for vision patching);
* run as a script, per-timestep probe tables for the shipped shapes-world diffusion model::

    python -m sae_lens_multimodal.world.causal --hooks up_blocks.0.attentions.1.hook_out
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline
from sae_lens_multimodal.analysis.factor_worlds import FactorWorld
from sae_lens_multimodal.analysis.temporal import POOLINGS, ProbeResult, timestep_probes
from sae_lens_multimodal.world.shapes import COLORS, POSITIONS, SHAPES, ShapeFactors, ShapesWorld, caption

__all__ = ["SHAPES_FACTOR_WORLD", "shapes_prompts", "shape_patch_mask", "main"]


def shapes_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` shapes-world prompts (colour, shape, position factor dicts) that cycle through every colour,
    shape and position as evenly as ``n`` allows, in a seeded order (balanced accuracy per factor)."""
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}.")
    rng = np.random.default_rng(seed)
    cols = [list(COLORS)[i % len(COLORS)] for i in rng.permutation(max(n, len(COLORS)))[:n]]
    shapes = [SHAPES[i % len(SHAPES)] for i in rng.permutation(max(n, len(SHAPES)))[:n]]
    pos = [POSITIONS[i % len(POSITIONS)] for i in rng.permutation(max(n, len(POSITIONS)))[:n]]
    return [{"color": c, "shape": s, "position": p} for c, s, p in zip(cols, shapes, pos)]


def shape_patch_mask(factors: ShapeFactors, image_size: int, patch_size: int, n_prefix_tokens: int = 1) -> list[int]:
    """Token positions (prefix tokens counted) of the patches a shapes-world shape covers: ground truth
    for where the effect of changing the shape's colour should sit. ``factors``: a ShapeFactors."""
    white = replace(factors, rgb=(255, 255, 255), texture="plain", text=None, text_row=None)
    alpha = ShapesWorld(image_size=image_size).render([white])[0, ..., 0]  # uint8 [H, W]
    g = image_size // patch_size
    cover = alpha.reshape(g, patch_size, g, patch_size).max(axis=(1, 3)) > 0
    return [n_prefix_tokens + int(i) for i in np.flatnonzero(cover.reshape(-1))]


#: The shapes world as the diffusion analyses see it; the judge (diffusers, the shapes CLIP) loads on first use.
SHAPES_FACTOR_WORLD = FactorWorld(
    name="shapes",
    factor_values=ShapesWorld.factor_values,
    caption=caption,
    sample_prompts=shapes_prompts,
    judge="sae_lens_multimodal.world.eval_diffusion:FactorClassifier",
)


def main(argv: Optional[list[str]] = None) -> list[ProbeResult]:
    """Print per-timestep probe tables for the shipped shapes-world diffusion model (both CFG branches)."""
    # diffusers: the shapes pipeline needs it; a script, so importing it here costs importers nothing
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline directory (default: the shipped shapes-diffusion)")
    parser.add_argument("--hooks", default="up_blocks.0.attentions.1.hook_out,up_blocks.2.resnets.1.hook_out",
                        help="comma-separated hook names")
    parser.add_argument("--branches", default="uncond,cond")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=162)
    parser.add_argument("--n-test", type=int, default=108)
    parser.add_argument("--pooling", default="auto", choices=("auto",) + POOLINGS)
    parser.add_argument("--plot-dir", default=None, help="also write one PNG per branch here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hooked = as_hooked_pipeline(load_shapes_pipeline(args.model))
    results = []
    for hook in args.hooks.split(","):
        for branch in args.branches.split(","):
            result = timestep_probes(hooked, hook.strip(), cfg_branch=branch.strip(), n_train=args.n_train,
                                     n_test=args.n_test, pooling=args.pooling, num_inference_steps=args.steps)
            print(result, end="\n\n", flush=True)
            if args.plot_dir:
                result.plot(Path(args.plot_dir) / f"probes_{hook.strip()}_{branch.strip()}.png")
            results.append(result)
    return results


if __name__ == "__main__":
    main()
