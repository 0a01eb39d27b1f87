"""Command line: ``sae-lens-mm <subcommand> ...``.

Each subcommand is one ``add_<name>_command(subparsers)`` function that registers its parser and sets
``handler`` to the function that runs it; add new subcommands to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Callable, Optional

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# Command modules import their work (torch, sae_lens, stores, models, the shapes world) inside the handlers:
# `sae-lens-mm --help` builds every subcommand's parser and should start without them.


# ----------------------------------------------------------------------------------------- releases
def run_releases(args: argparse.Namespace) -> int:
    from sae_lens_multimodal.pretrained import expand_manifest_release, get_release, list_releases

    if args.runs:
        release = get_release(args.runs)
        if not release.manifest:
            print(f"Release {args.runs!r} has a fixed list of SAEs (no manifest); showing it.", file=sys.stderr)
        else:
            expand_manifest_release(args.runs, download=True)
        table = list_releases(release=args.runs, model=args.model, hook=args.hook)
        table = type(table)(row for row in table if row.release == args.runs)
    else:
        table = list_releases(model=args.model, hook=args.hook, release=args.release)
    if args.json:
        print(json.dumps([{**asdict(row), "unverified": list(row.unverified)} for row in table], indent=1, default=str))
    else:
        print(table.to_text())
        if not table:
            print("No release matches. Try a shorter --model / --hook (substring or glob).", file=sys.stderr)
    return 0


def add_releases_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "releases",
        help="list the pretrained vision/diffusion SAE releases (load with sae_lens.SAE.from_pretrained)",
        description="List the SAE releases registered with SAELens by sae-lens-multimodal. Load one with "
                    "sae_lens.SAE.from_pretrained(release, sae_id).",
    )
    parser.add_argument("--model", help="only models whose name contains this (case-insensitive)")
    parser.add_argument("--hook", help="only SAEs at hooks containing this, or matching this glob")
    parser.add_argument("--release", help="only releases whose name contains this")
    parser.add_argument("--runs", metavar="RELEASE",
                        help="read RELEASE's manifest (downloading it unless offline) and list every run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run_releases)


from sae_lens_multimodal.training.cli import (  # noqa: E402  (cache / train / evaluate)
    add_cache_command,
    add_evaluate_command,
    add_train_command,
)

from sae_lens_multimodal.steering.cli import add_steerability_command  # noqa: E402

# ----------------------------------------------------------------------------------------- demo
def add_demo_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    # deferred (as every command's own module): `sae-lens-mm --help` loads no torch; the demo is the shapes world's
    from sae_lens_multimodal.world.demo import add_demo_arguments

    parser = subparsers.add_parser(
        "demo",
        help="run the offline shapes-world demo and write an HTML report with feature dashboards",
        description="Load the shipped shapes CLIP and diffusion model and the bundled SAEs by name, label, "
                    "steer and trace features, and write DIR/report.html (opens from disk, no network).",
    )
    add_demo_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from sae_lens_multimodal.world.demo import run_from_args

        return run_from_args(args)

    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------------------- ground truth
def add_ground_truth_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from sae_lens_multimodal.world.ground_truth import add_arguments

    parser = subparsers.add_parser(
        "ground-truth",
        help="check label accuracy, steerability and per-timestep probes against the shapes world's ground truth",
        description="Run the shapes-world ground-truth checks on the shipped models and bundled SAEs and print "
                    "the figures (free-label accuracy, steerable fraction vs baselines, per-timestep linear probes).",
    )
    add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from sae_lens_multimodal.world.ground_truth import run_from_args

        run_from_args(args)
        return 0

    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------------------- dashboards
def add_dashboards_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from sae_lens_multimodal.reports.cli import add_dashboards_arguments

    parser = subparsers.add_parser(
        "dashboards",
        help="write static HTML feature dashboards for any supported model and SAE",
        description="Load a vision (CLIP / ViT) or diffusion model and an SAE by name, run the SAE on images or "
                    "prompts, and write DIR/index.html with one page per feature (top images with patch heatmaps, "
                    "histogram, text labels, steering effect; per-timestep curves for diffusion).",
    )
    add_dashboards_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from sae_lens_multimodal.reports.cli import run_from_args

        return run_from_args(args)

    parser.set_defaults(handler=run)


#: subcommand registrars, in the order they appear in --help
SUBCOMMANDS: list[Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]] = [
    add_releases_command,
    add_cache_command,
    add_train_command,
    add_evaluate_command,
    add_steerability_command,
    add_demo_command,
    add_dashboards_command,
    add_ground_truth_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-mm",
        description="sae-lens-multimodal: TransformerLens hooks and SAELens SAEs for vision and diffusion models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sae-lens-mm`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"sae-lens-mm {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
