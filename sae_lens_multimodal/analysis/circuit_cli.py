"""``sae-lens-mm circuit``: a sparse feature circuit for a model, SAEs and a clean / corrupted input pair,
written as ``circuit.json`` and ``circuit.html`` (see docs/circuits.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sae_lens_multimodal.cli_options import add_model_kind_option, add_model_option, non_negative_float, positive_int

__all__ = ["add_circuit_command", "run_circuit", "CONTRASTS"]

# This command module imports its work (torch, sae_lens, models, the shapes world) inside the handlers:
# `sae-lens-mm --help` builds every subcommand's parser and should start without them.

#: --shapes-contrast value -> the shapes-world factor the corrupted image changes
CONTRASTS = {"colour": "color", "color": "color", "shape": "shape", "position": "position"}
HELP = "find a sparse feature circuit (SAE features, error nodes, edges) and write it as JSON and an HTML graph"


def _load_saes(args: argparse.Namespace) -> list[Any]:
    from sae_lens import SAE

    saes = []
    if args.release:
        if not args.sae_id:
            raise ValueError("--release needs at least one --sae-id (repeat --sae-id for SAEs at several hooks).")
        from sae_lens_multimodal.pretrained.registry import check_pretrained_name

        for sae_id in args.sae_id:
            check_pretrained_name(args.release, sae_id)
            sae = SAE.from_pretrained(args.release, sae_id, device="cpu")
            saes.append(sae[0] if isinstance(sae, tuple) else sae)  # older SAELens returned (sae, cfg, sparsity)
    elif args.sae_id:
        raise ValueError("--sae-id needs --release (or give SAE directories with --sae-path).")
    if args.sae_path:
        from sae_lens_multimodal.pretrained.local import load_sae_dir

        saes += [load_sae_dir(path) for path in args.sae_path]
    if not saes:
        raise ValueError("Give SAEs: --release R --sae-id ID [--sae-id ID ...] and/or --sae-path DIR [--sae-path DIR ...].")
    return [sae.eval() for sae in saes]


def _mirror(f: Any, image_size: int) -> Any:
    """The same image factors with the shape moved to the mirrored grid cell (left-right, else top-bottom)."""
    from dataclasses import replace

    from sae_lens_multimodal.world.shapes import POSITIONS

    i = POSITIONS.index(f.position)
    row, col = divmod(i, 3)
    cx, cy = f.center
    if col != 1:
        return replace(f, position=POSITIONS[3 * row + 2 - col], center=(image_size - cx, cy))
    return replace(f, position=POSITIONS[3 * (2 - row) + col], center=(cx, image_size - cy))


def shapes_contrast(model: Any, factor: str, n_pairs: int, seed: int) -> tuple[Any, Any, Any]:
    """(clean, corrupted, metric) for a HookedCLIP on shapes-world pairs that differ in one factor; the metric
    is the mean over pairs of logit(true caption) - logit(foil caption, the corrupted image's)."""
    from dataclasses import replace

    import torch

    from sae_lens_multimodal.world import ShapesWorld, caption
    from sae_lens_multimodal.world.shapes import COLORS, POSITIONS

    world = ShapesWorld(image_size=32, seed=seed)
    positions = [p for i, p in enumerate(POSITIONS) if i != 4]  # the centre has no mirror image
    bases = world.sample_factors(n_pairs, size="large", texture="plain", position=positions, text_prob=0)
    if factor == "color":
        bad = [replace(f, color=c, rgb=COLORS[c]) for f in bases for c in ["blue" if f.color != "blue" else "red"]]
    elif factor == "shape":
        bad = [replace(f, shape="square" if f.shape != "square" else "circle") for f in bases]
    else:
        bad = [_mirror(f, world.image_size) for f in bases]
    from PIL import Image

    pixels = world.render(list(bases) + bad)
    x = torch.stack([model.preprocess(Image.fromarray(p)) for p in pixels])
    texts = [caption(f) for f in bases] + [caption(f) for f in bad]
    rows = torch.arange(n_pairs)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[rows, rows] - logits[rows, rows + n_pairs]).mean()

    return {"images": x[:n_pairs], "texts": texts}, {"images": x[n_pairs:], "texts": texts}, metric


def image_contrast(model: Any, kind: str, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(clean, corrupted, metric) from two image files: a CLIP's true-minus-foil caption logit, or a vision
    model's true-minus-foil class logit."""
    import torch
    from PIL import Image

    from sae_lens_multimodal.analysis.attribution import logit_difference

    images = []
    for option, path in (("--clean", args.clean), ("--corrupted", args.corrupted)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{option}: no image file at {path}.")
        images.append(model.preprocess(Image.open(path).convert("RGB")).unsqueeze(0))
    if kind == "clip":
        if not (args.true_caption and args.foil_caption):
            raise ValueError("A CLIP's metric is the logit of --true-caption minus --foil-caption: give both.")
        texts = [args.true_caption, args.foil_caption]
        metric = logit_difference(0, 1)
        return {"images": images[0], "texts": texts}, {"images": images[1], "texts": texts}, metric
    if kind == "vision":
        if args.true_class is None or args.foil_class is None:
            raise ValueError("A vision model's metric is the logit of --true-class minus --foil-class: give both.")
        return images[0], images[1], logit_difference(args.true_class, args.foil_class)
    raise ValueError(f"sae-lens-mm circuit handles CLIP and vision models; {args.model!r} loads as a {kind} model "
                     "(use analysis.circuits.find_circuit from Python for VLMs and diffusion denoisers).")


def _top_images(model: Any, saes: list[Any], circuit: Any, k: int) -> dict[str, list[Any]]:
    """node id -> its feature's ``k`` top images (activation at the node's position) among fresh shapes-world
    images."""
    from sae_lens_multimodal.analysis.circuits import _ordered_saes
    from sae_lens_multimodal.world.circuits import node_activations, probe_set, top_images

    import torch
    from PIL import Image

    images, _ = probe_set(1000)
    pixels = torch.stack([model.preprocess(Image.fromarray(p)) for p in images])  # the model's own preprocessing
    feats = [n for n in circuit.nodes if n.feature != "error"]
    tops = top_images(node_activations(model, _ordered_saes(model, saes), feats, images, pixels=pixels), k)
    return {n.id: [images[i] for i in top] for n, top in zip(feats, tops)}


def run_circuit(args: argparse.Namespace) -> int:
    import torch

    from sae_lens_multimodal.analysis.circuits import faithfulness_curve, find_circuit, mean_activations
    from sae_lens_multimodal.models.loading import load_model, model_kind_of

    if args.shapes_contrast is None and not (args.clean and args.corrupted):
        raise ValueError("Give an input pair: --clean IMG --corrupted IMG, or --shapes-contrast colour|shape|position.")
    if args.shapes_contrast is not None and (args.clean or args.corrupted):
        raise ValueError("--shapes-contrast renders its own image pair: leave out --clean / --corrupted.")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a folder.")
    saes = _load_saes(args)
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.model_kind)
    kind = model_kind_of(model)
    if args.shapes_contrast is not None:
        if kind != "clip":
            raise ValueError(f"--shapes-contrast needs a CLIP (the metric reads captions); {args.model!r} loads as a "
                             f"{kind} model.")
        clean, corrupted, metric = shapes_contrast(model, CONTRASTS[args.shapes_contrast], args.pairs, args.seed)
    else:
        clean, corrupted, metric = image_contrast(model, kind, args)
    circuit = find_circuit(model, clean, corrupted, metric, saes=saes, node_threshold=args.node_threshold,
                           edge_threshold=args.edge_threshold, max_nodes=args.max_nodes, edges=not args.no_edges,
                           measure=True)
    means = mean_activations(model, saes, [clean, corrupted])
    faithfulness_curve(model, circuit, clean, metric, saes=saes, means=means)
    out.mkdir(parents=True, exist_ok=True)
    circuit.to_json(out / "circuit.json")
    links = None
    if args.dashboards:
        template = args.dashboards

        def links(hook: str, feature: int) -> str:
            return template.format(hook=hook, feature=feature)

    images = _top_images(model, saes, circuit, args.top_images) if args.top_images and args.shapes_contrast else None
    circuit.to_html(out / "circuit.html", dashboards=links, images=images, title=f"Circuit: {args.model}")
    print(f"{len(circuit.nodes)} nodes, {len(circuit.edges)} edges; faithfulness {circuit.faithfulness:.3f}, "
          f"completeness {circuit.completeness:.3f}; metric clean {circuit.clean_metric:.3f}, corrupted "
          f"{circuit.corrupted_metric:.3f}")
    print(f"wrote {out / 'circuit.json'} and {out / 'circuit.html'}")
    return 0


def add_circuit_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "circuit", help=HELP,
        description="Rank every SAE feature and error node (per position) by attribution patching for the clean -> "
                    "corrupted contrast, keep those above --node-threshold and the edges between consecutive SAE "
                    "hooks above --edge-threshold, measure faithfulness (mean ablation) and write circuit.json and "
                    "circuit.html to --out. Repeat --sae-id (with --release) or --sae-path for SAEs at several hooks. Example: sae-lens-mm circuit --model shapes-clip --release "
                    "shapes-clip-saes --sae-id blocks.2.hook_resid_post --shapes-contrast colour --out circ/",
    )
    add_model_option(parser)
    add_model_kind_option(parser)
    parser.add_argument("--release", help="SAE release for SAE.from_pretrained (list them: sae-lens-mm releases)")
    parser.add_argument("--sae-id", action="append", metavar="ID", help="SAE id within --release")
    parser.add_argument("--sae-path", action="append", metavar="DIR",
                        help="directory of an SAE saved with SAELens (save_model / save_inference_model; "
                             "SAE.load_from_disk), instead of --release")
    parser.add_argument("--clean", metavar="IMG", help="the clean image file")
    parser.add_argument("--corrupted", metavar="IMG", help="the corrupted image file")
    parser.add_argument("--metric", choices=["logit-diff"], default="logit-diff",
                        help="logit of the true caption / class minus the foil's (default)")
    parser.add_argument("--true-caption", help="CLIP: the caption the clean image matches")
    parser.add_argument("--foil-caption", help="CLIP: the caption the corrupted image matches")
    parser.add_argument("--true-class", type=int, help="vision model: the clean image's class index")
    parser.add_argument("--foil-class", type=int, help="vision model: the corrupted image's class index")
    parser.add_argument("--shapes-contrast", choices=sorted(CONTRASTS),
                        help="render shapes-world pairs that differ in this factor (a CLIP; the metric: true minus "
                             "foil caption)")
    parser.add_argument("--pairs", type=positive_int, default=3, help="image pairs for --shapes-contrast (default: 3)")
    parser.add_argument("--node-threshold", type=non_negative_float, default=0.5,
                        help="keep nodes with |attribution| >= this (default: 0.5)")
    parser.add_argument("--edge-threshold", type=non_negative_float, default=0.01,
                        help="keep edges with |attribution| >= this (default: 0.01)")
    parser.add_argument("--max-nodes", type=positive_int, help="at most this many nodes (largest |attribution| first)")
    parser.add_argument("--no-edges", action="store_true", help="skip edges (one backward pass per downstream node)")
    parser.add_argument("--dashboards", metavar="TEMPLATE",
                        help="link each feature node to its dashboard: a URL / path with {hook} and {feature}")
    parser.add_argument("--top-images", type=int, default=4, metavar="N",
                        help="with --shapes-contrast: show each feature node's N top images (activation at its "
                             "position, over 1000 fresh shapes-world images) in the HTML; 0: none (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, also of the shapes pairs (default: 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for circuit.json and circuit.html")
    parser.set_defaults(handler=run_circuit)
