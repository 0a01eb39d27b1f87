"""``sae-lens-mm steerability``: steerability of a vision SAE's features on a CLIP (a HookedCLIP, loaded by
:func:`~sae_lens_multimodal.models.loading.load_model`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae_lens_multimodal.cli_options import (
    add_model_kind_option,
    add_model_option,
    add_no_progress_option,
    add_sae_options,
    add_seed_option,
    positive_int,
)

__all__ = ["add_steerability_command", "run_steerability"]

# This command module imports its work (torch, sae_lens, models, the shapes world) inside the handlers:
# `sae-lens-mm --help` builds every subcommand's parser and should start without them.


def _quantile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a quantile: give a number between 0 and 1, e.g. 0.95")
    return value


def run_steerability(args: argparse.Namespace) -> int:
    import torch
    from sae_lens import SAE

    from sae_lens_multimodal.models.loading import load_model, model_kind_of
    from sae_lens_multimodal.steering.steerability import steerability

    if args.release:  # a typo of the release or SAE id lists close matches, before the model loads
        from sae_lens_multimodal.pretrained.registry import check_pretrained_name

        check_pretrained_name(args.release, args.sae_id)
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.model_kind)
    if model_kind_of(model) != "clip":  # steerability reads the change of text-space probabilities
        raise ValueError(f"Steerability needs a CLIP (a text tower to read); {args.model!r} loads as a "
                         f"{model_kind_of(model)} model.")
    if args.release:
        sae = SAE.from_pretrained(args.release, args.sae_id, device="cpu")
    else:
        from sae_lens_multimodal.pretrained.local import load_sae_dir  # a damaged directory names its file

        sae = load_sae_dir(args.sae_path)
    if isinstance(sae, tuple):  # older SAELens returned (sae, cfg, sparsity)
        sae = sae[0]
    text_embeds = None
    vocabulary = args.vocabulary
    if args.images == "shapes" or (args.images is None and args.model == "shapes-clip"):
        # --images shapes: the shapes world is a plug-in, imported only when asked for
        from sae_lens_multimodal.world.feature_checks import factor_text_embeddings
        from sae_lens_multimodal.world.shapes import ShapesWorld, to_tensor

        raw, _ = ShapesWorld(image_size=32, seed=args.seed).sample(args.n_images)
        images = to_tensor(raw, mean=(0.5,) * 3, std=(0.5,) * 3)
        if vocabulary is None:  # the world's factor values, embedded in caption context
            vocabulary, text_embeds = factor_text_embeddings(model)
    elif args.images is not None:
        from PIL import Image

        paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not paths:
            raise FileNotFoundError(f"No .png/.jpg/.jpeg/.webp images in {args.images}.")
        images = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths[: args.n_images]])
    else:
        raise ValueError("Pass --images DIR (a folder of images) or --images shapes (shapes-world images).")
    strengths = [float(s) for s in args.strengths.split(",")]
    result = steerability(
        model, sae, images, vocabulary, text_embeds=text_embeds, max_features=args.max_features,
        feature_ids=[int(f) for f in args.features.split(",")] if args.features else None,
        strengths=strengths, positions=args.positions, quantile=args.quantile, seed=args.seed,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps({"summary": result.summary(), "strengths": result.strengths,
                          "threshold": result.threshold.tolist(),
                          "baseline_thresholds": {k: v.tolist() for k, v in result.baseline_thresholds.items()},
                          "fraction_steerable": result.fraction_steerable, "features": result.to_records()}, indent=1))
    else:
        print(result.to_table(max_rows=args.rows))
    if args.plot:
        print(f"plot written to {result.plot(args.plot)}", file=sys.stderr)
    return 0


def add_steerability_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "steerability",
        help="measure how far clamping each vision SAE feature moves a CLIP's text-space probabilities",
        description="Clamp each feature at a sweep of strengths, read the change of the CLIP's probabilities over a "
                    "vocabulary, compare with random-feature and random-direction baselines, and report the "
                    "fraction of steerable features (docs/steering.md).",
    )
    add_model_option(parser, help="a CLIP: registered name (shapes-clip), open-clip:ViT-B-32/<tag>, a Hugging Face "
                                  "repo id or local directory of a CLIP / SigLIP")
    add_model_kind_option(parser)
    add_sae_options(parser)
    parser.add_argument("--images", help="folder of reference images, or 'shapes' (default for shapes-clip)")
    parser.add_argument("--n-images", type=positive_int, default=24, help="reference images (default 24)")
    parser.add_argument("--vocabulary", help="vocabulary file (one word per line); default: the package's")
    parser.add_argument("--features", help="comma-separated feature ids (default: the most active ones)")
    parser.add_argument("--max-features", type=positive_int, default=64, help="at most this many features (default 64)")
    parser.add_argument("--strengths", default="1,2,4,8", help="clamp strengths as multiples of max activation")
    parser.add_argument("--positions", default="all", choices=["all", "patches", "cls"], help="tokens the feature is clamped at (default all)")
    parser.add_argument("--quantile", type=_quantile, default=0.95, help="baseline quantile for the threshold")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="images per forward pass (default 512)")
    add_seed_option(parser, help="seed of the shapes images and the baselines")
    parser.add_argument("--rows", type=positive_int, default=30, help="table rows to print")
    parser.add_argument("--plot", help="write the PNG figure here")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    add_no_progress_option(parser)

    def handler(args: argparse.Namespace) -> int:
        if bool(args.release) == bool(args.sae_path) or (args.release and not args.sae_id):
            raise ValueError("Pass either --release with --sae-id, or --sae-path.")
        return run_steerability(args)

    parser.set_defaults(handler=handler)
