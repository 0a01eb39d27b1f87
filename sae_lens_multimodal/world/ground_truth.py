"""Ground-truth checks on the shapes world: do the package's claims hold where the answer is known?

    python -m sae_lens_multimodal.world.ground_truth            # or: sae-lens-mm ground-truth
    python -m sae_lens_multimodal.world.ground_truth --quick    # smaller samples, about a minute

Four checks, each printed as a table (the functions doing the work live with their analyses):

0. Labelers side by side (``world.labeler_checks.compare_labelers``): every labeler of
   ``analysis.labelers`` (DN-CBM-style decoder projection, TextSpan-style, SpLiCE-style, image-side,
   direct-path, causal, enrichment) on the features of every bundled shapes-CLIP SAE whose top images share
   a factor value: accuracy / coverage / precision overall and per factor.
1. Free-label accuracy (``world.feature_checks.label_accuracy``): for vision-SAE features whose top activating
   images share a colour / shape / position, does each labeler's top label name that value?
2. Steerability (``world.feature_checks.shapes_steerability``): the fraction of features whose clamping moves
   zero-shot predictions toward their label beyond random-feature and random-direction baselines.
3. Temporal probes (``analysis.temporal.timestep_probes``): at which denoising timestep colour, position and
   shape become linearly decodable from the shapes UNet's activations.

The same checks run in ``tests/world/test_ground_truth.py`` with thresholds.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sae_lens_multimodal.cli_options import positive_int

__all__ = ["GroundTruthChecks", "run_ground_truth_checks", "main"]


@dataclass
class GroundTruthChecks:
    """Figures of all three checks."""

    vision: Any  # world.feature_checks.GroundTruthReport (labels + steerability)
    probes: list[Any]  # analysis.temporal.ProbeResult, one per (hook, branch)
    labelers: list[Any] = field(default_factory=list)  # world.labeler_checks.LabelerComparison, one per SAE

    def first_decodable(self, factor: str, threshold: float = 0.9) -> dict[str, Optional[int]]:
        """Per probe run (``"<hook> [<branch>]"``), the timestep from which ``factor`` is decodable with test
        accuracy >= ``threshold`` (``ProbeResult.decodable_from``; None if never)."""
        return {f"{p.hook_name} [{p.cfg_branch}]": p.decodable_from(threshold)[factor] for p in self.probes}

    def to_table(self) -> str:
        lines = []
        if self.labelers:
            lines.append("== 0. Labelers side by side (shapes-clip-saes, shapes-clip-typographic-saes) ==")
            lines += [c.to_table() + "\n" for c in self.labelers]
        lines += ["== 1-2. Vision SAE: free-label accuracy and steerability ==", self.vision.to_table(), ""]
        lines.append("== 3. Diffusion: per-timestep linear probes (test accuracy) ==")
        for probe in self.probes:
            lines += [str(probe), ""]
        factors = self.probes[0].factors if self.probes else ()
        if factors:
            lines.append("first timestep from which each factor is decodable (accuracy >= 0.9):")
            for factor in factors:
                cells = ", ".join(f"{k}: {v if v is not None else 'never'}" for k, v in self.first_decodable(factor).items())
                lines.append(f"  {factor:<9} {cells}")
        return "\n".join(lines)

    __str__ = to_table


#: The bundled shapes-CLIP SAEs the labelers are compared on: (model, release, hook).
LABELER_SAES: tuple[tuple[str, str, str], ...] = (
    ("shapes-clip", "shapes-clip-saes", "blocks.2.hook_resid_post"),
    ("shapes-clip-typographic", "shapes-clip-typographic-saes", "blocks.0.hook_resid_post"),
    ("shapes-clip-typographic", "shapes-clip-typographic-saes", "blocks.1.hook_resid_post"),
    ("shapes-clip-typographic", "shapes-clip-typographic-saes", "blocks.2.hook_resid_post"),
)


def run_labeler_checks(
    saes: tuple[tuple[str, str, str], ...] = LABELER_SAES, *, quick: bool = False, verbose: bool = True
) -> list[Any]:
    """Every labeler on every SAE of ``saes``: features judged on 1000 images (seed 7, as the free-label
    check), labels made from 1000 other images (seed 8); causal effects on 64 of them (16 with ``quick``)."""
    from sae_lens import SAE

    from sae_lens_multimodal.models.hooked_clip import HookedCLIP
    from sae_lens_multimodal.world.feature_checks import factor_text_embeddings
    from sae_lens_multimodal.world.labeler_checks import compare_labelers
    from sae_lens_multimodal.world.shapes import ShapesWorld, to_tensor

    images, factors = ShapesWorld(image_size=32, seed=7).sample(1000)
    x = to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3)
    ref = to_tensor(ShapesWorld(image_size=32, seed=8).sample(1000)[0], mean=(0.5,) * 3, std=(0.5,) * 3)
    out, models = [], {}
    for model_name, release, hook in saes:
        if model_name not in models:  # the model and its vocabulary embeddings, once per model
            model = HookedCLIP.from_pretrained(model_name)
            models[model_name] = (model, factor_text_embeddings(model))
        model, text = models[model_name]
        comparison = compare_labelers(model, SAE.from_pretrained(release, hook), x, factors, ref, text,
                                      n_effect_images=16 if quick else 64)
        comparison.hook_name = f"{release} {hook}"
        if verbose:
            print(comparison.to_table(), "", sep="\n", flush=True)
        out.append(comparison)
    return out


def run_ground_truth_checks(
    *,
    quick: bool = False,
    labelers: bool = True,
    hooks: tuple[str, ...] = ("up_blocks.2.resnets.1.hook_out",),
    branches: tuple[str, ...] = ("uncond",),
    progress: bool = True,
    verbose: bool = True,
) -> GroundTruthChecks:
    """Run the three checks on the shipped models and bundled SAEs; ``quick`` uses smaller samples."""
    # deferred: `sae-lens-mm --help` builds this command's parser from this module; the checks' imports
    # (transformer_lens, sae_lens, diffusers for the shapes pipeline) load only when they run
    from sae_lens_multimodal.analysis.temporal import timestep_probes
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline
    from sae_lens_multimodal.world.feature_checks import shapes_ground_truth

    if verbose and labelers:
        print("== 0. Labelers side by side (shapes-clip-saes, shapes-clip-typographic-saes) ==", flush=True)
    comparisons = run_labeler_checks(quick=quick, verbose=verbose) if labelers else []
    vision = shapes_ground_truth(
        n_images=400 if quick else 1000,
        n_steer_images=12 if quick else 24,
        max_features=24 if quick else 64,
        progress=progress,
        verbose=False,
    )
    if verbose:
        print("== 1-2. Vision SAE: free-label accuracy and steerability ==", vision.to_table(), "", sep="\n", flush=True)
    pipe = load_shapes_pipeline()
    probes = []
    for hook in hooks:
        for branch in branches:
            probe = timestep_probes(
                pipe, hook, cfg_branch=branch,
                n_train=90 if quick else 162, n_test=54 if quick else 108,
                num_inference_steps=10, progress=progress,
            )
            if verbose:
                print(probe, "", sep="\n", flush=True)
            probes.append(probe)
    checks = GroundTruthChecks(vision=vision, probes=probes, labelers=comparisons)
    if verbose:
        summary = checks.to_table().split("first timestep from which", 1)  # the vision and probe tables are printed above
        if len(summary) == 2:
            print("first timestep from which" + summary[1])
    return checks


def main(argv: Optional[list[str]] = None) -> GroundTruthChecks:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller samples (about a minute)")
    parser.add_argument("--no-labelers", action="store_true", help="skip the side-by-side labeler table (check 0)")
    parser.add_argument("--hooks", default="up_blocks.2.resnets.1.hook_out",
                        help="comma-separated UNet hooks to probe (default: the last up block's output resnet)")
    parser.add_argument("--branches", default="uncond", help="CFG branches to probe: uncond (what the sample "
                        "shows), cond (the prompt is an input there, so factors are decodable from the start)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def run_from_args(args: argparse.Namespace) -> GroundTruthChecks:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return run_ground_truth_checks(
        quick=args.quick,
        labelers=not args.no_labelers,
        hooks=tuple(h.strip() for h in args.hooks.split(",") if h.strip()),
        branches=tuple(b.strip() for b in args.branches.split(",") if b.strip()),
    )


if __name__ == "__main__":
    main()
