"""Ground-truth checks on the shapes world: do the package's claims hold where the answer is known?

    sae-lens-mm ground-truth                              # or: python -m sae_lens_multimodal.world.ground_truth
    sae-lens-mm ground-truth --checks zero-shot,typographic
    sae-lens-mm ground-truth --quick                      # tiny samples: every check runs, figures not comparable

Prints one line per row of README.md's table "What the shapes world lets us check" (``README_ROWS``), in
its order and wording, each computed by the function that owns the analysis. The checks (rows, the function
behind each, what it computes, and how to add one) are registered in ``world/readme_checks.py``; this module
runs them (:func:`run_readme_checks`, the command's arguments).

``run_ground_truth_checks`` / ``GroundTruthChecks`` keep the detailed tables of free labels, steerability and
probes. ``tests/world/test_ground_truth.py`` checks that every README row has a printed line.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sae_lens_multimodal.cli_options import positive_int
from sae_lens_multimodal.world.readme_checks import (  # re-exported: the registry of checks lived here before
    CHECK_FUNCTIONS,
    CHECKS,
    LABELER_NAMES,
    LABELER_SAES,
    PATCHING_SOURCES,
    PATCHING_SWAPS,
    README_ROWS,
    CheckContext,
    run_labeler_checks,
)

__all__ = ["CHECKS", "LABELER_NAMES", "LABELER_SAES", "PATCHING_SOURCES", "PATCHING_SWAPS", "README_ROWS",
           "GroundTruthChecks", "ReadmeFigures", "parse_checks", "run_ground_truth_checks", "run_labeler_checks",
           "run_readme_checks", "main"]


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


@dataclass
class ReadmeFigures:
    """The figures of each check run: ``lines[check]`` is the printed line, ``results[check]`` what the
    analysis returned, ``seconds[check]`` its wall time."""

    lines: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_table(self) -> str:
        return "\n".join(f"| {README_ROWS[c]} | {line} |" for c, line in self.lines.items())

    __str__ = to_table


def parse_checks(text: str) -> tuple[str, ...]:
    """``"all"`` or comma-separated check names -> the checks in README order; unknown names raise."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or names == ["all"]:
        return CHECKS
    unknown = [n for n in names if n not in README_ROWS]
    if unknown:
        raise ValueError(f"Unknown check(s) {unknown}; choose from {', '.join(CHECKS)} (or 'all').")
    return tuple(c for c in CHECKS if c in names)


def run_readme_checks(
    checks: tuple[str, ...] = CHECKS,
    *,
    quick: bool = False,
    hooks: tuple[str, ...] = ("up_blocks.2.resnets.1.hook_out",),
    branches: tuple[str, ...] = ("uncond",),
    progress: bool = False,
    verbose: bool = True,
) -> ReadmeFigures:
    """Compute the figures of each check of README.md's shapes-world table (``checks``: names of
    :data:`README_ROWS`) and print one line per check, ``<README row>: <figures>``, as each finishes."""
    unknown = [c for c in checks if c not in README_ROWS]
    if unknown:
        raise ValueError(f"Unknown check(s) {unknown}; choose from {', '.join(CHECKS)}.")
    ctx = CheckContext(quick, progress, hooks, branches)
    out = ReadmeFigures()
    for check in checks:
        start = time.perf_counter()
        line, result = CHECK_FUNCTIONS[check](ctx)
        out.lines[check], out.results[check] = line, result
        out.seconds[check] = round(time.perf_counter() - start, 1)
        if verbose:
            print(f"{README_ROWS[check]}: {line}  [{check}, {out.seconds[check]:.0f} s]", flush=True)
    return out


def _checks_argument(text: str) -> tuple[str, ...]:
    try:
        return parse_checks(text)
    except ValueError as err:  # argparse turns this into its one-line usage error, exit status 2
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Optional[list[str]] = None) -> ReadmeFigures:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checks", type=_checks_argument, default=CHECKS,
                        help="comma-separated checks to run, in README order: " + ", ".join(CHECKS) + " (default: all). "
                        "At the README's sizes the whole command takes about 7-8 minutes on 2 CPU threads, 3 of them in the "
                        "diffusion check (648 images, 20 steps; kept at the README's size), about 1 in vlm-typographic; "
                        "every other check < 30 s")
    parser.add_argument("--quick", action="store_true",
                        help="small samples and few steps, to see that every check runs (figures not comparable)")
    parser.add_argument("--no-labelers", action="store_true", help="skip the labelers check (check 0)")
    parser.add_argument("--hooks", default="up_blocks.2.resnets.1.hook_out",
                        help="comma-separated UNet hooks for the probes check (default: the last up block's output "
                        "resnet; the printed line reports the first)")
    parser.add_argument("--branches", default="uncond", help="CFG branches to probe: uncond (what the sample "
                        "shows), cond (the prompt is an input there, so factors are decodable from the start)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def run_from_args(args: argparse.Namespace) -> ReadmeFigures:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    checks = getattr(args, "checks", CHECKS)
    if getattr(args, "no_labelers", False):
        checks = tuple(c for c in checks if c != "labelers")
    return run_readme_checks(
        checks,
        quick=args.quick,
        hooks=tuple(h.strip() for h in args.hooks.split(",") if h.strip()),
        branches=tuple(b.strip() for b in args.branches.split(",") if b.strip()),
        progress=getattr(args, "progress", False),
    )


if __name__ == "__main__":
    main()
