"""``sae-lens-mm dashboards``: static HTML feature dashboards for any supported model and SAE.

The model is loaded by name with :func:`~sae_lens_multimodal.models.loading.load_model` (its kind detected
from the name unless ``--model-kind`` says it; registered names such as ``shapes-clip`` included), the SAE by release (``SAE.from_pretrained``) or from
a directory (``SAE.load_from_disk``), and :func:`~sae_lens_multimodal.reports.dashboards.write_feature_dashboards`
writes the pages.

>>> sae-lens-mm dashboards --model shapes-clip --release shapes-clip-saes --sae-id blocks.2.hook_resid_post \\
...     --images photos/ --out dash
>>> sae-lens-mm dashboards --model shapes-diffusion --release shapes-diffusion-saes \\
...     --sae-id up_blocks.0.attentions.1.hook_out --prompts prompts.txt --num-inference-steps 20 --out dash-diffusion
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sae_lens_multimodal.cli_options import (
    add_cfg_branch_option,
    add_model_kind_option,
    add_model_option,
    add_no_progress_option,
    add_num_inference_steps_option,
    add_sae_options,
    add_seed_option,
    check_output_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from sae_lens_multimodal.models.registry import MODEL_REGISTRY, load_model_providers

# This command module imports its work (torch, sae_lens, stores, models, the shapes world) inside the handlers:
# `sae-lens-mm --help` builds every subcommand's parser and should start without them.

__all__ = [
    "IMAGE_SUFFIXES",
    "add_dashboards_arguments",
    "model_kind",
    "load_dashboard_model",
    "load_sae",
    "load_images",
    "load_prompts",
    "run_from_args",
]

#: file name endings read from an ``--images`` folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: default number of shapes-world images / prompts when a shapes model gets no --images / --prompts
DEFAULT_SHAPES_IMAGES = 512
DEFAULT_SHAPES_PROMPTS = 12
#: the command runs on CPU: the dashboard functions keep their per-feature tallies in CPU tensors
DEVICE = "cpu"


# --------------------------------------------------------------------------------------------- arguments
def _feature_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated feature ids like 3,17,42; got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one feature id, e.g. --features 3,17")
    return ids


def add_dashboards_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sae-lens-mm dashboards``."""
    g = parser.add_argument_group("model and SAE")
    add_model_option(g)
    add_model_kind_option(g)
    add_sae_options(g)

    g = parser.add_argument_group("inputs")
    g.add_argument("--images", metavar="DIR|shapes[:N]",
                   help="vision: a folder of image files (each goes through the model's own preprocessing) or "
                        f"shapes[:N] for N shapes-world images (default for shapes models: shapes:{DEFAULT_SHAPES_IMAGES})")
    g.add_argument("--max-images", type=positive_int, help="read at most this many images of the folder (sorted by name)")
    g.add_argument("--prompts", metavar="FILE|shapes[:N]",
                   help="diffusion: a text file with one prompt per line, or shapes[:N] for N shapes-world captions "
                        f"(default for shapes models: shapes:{DEFAULT_SHAPES_PROMPTS})")
    add_num_inference_steps_option(g, default=20, deprecated_steps=True, type=positive_int)
    g.add_argument("--guidance-scale", type=non_negative_float, help="diffusion: classifier-free guidance scale (default: the pipeline's)")
    add_seed_option(g, help="seed of the shapes-world images / prompts and of the initial noise")

    g = parser.add_argument_group("features")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--features", type=_feature_list, metavar="3,17,...", help="these feature ids")
    which.add_argument("--top-features", type=positive_int, metavar="N",
                       help="the N features chosen automatically (vision: the strongest among those active on "
                            "0.5-50%% of the images, default 8; diffusion: those varying most between prompts, default 6)")
    g.add_argument("--top-k", type=positive_int, default=8, help="top-activating images per feature (default 8)")

    g = parser.add_argument_group("labels and steering")
    g.add_argument("--vocabulary", metavar="FILE",
                   help="CLIP only: label words, one per line (default: the package's vocabulary; shapes models: "
                        "the words of the shapes world's captions)")
    g.add_argument("--classes", metavar="FILE",
                   help="zero-shot classes, one per line, whose probability change is shown when a feature is clamped "
                        "(default for shapes models: the 162 caption classes; without it no steering effect is "
                        "measured)")
    g.add_argument("--class-template", action="append", metavar="TEMPLATE",
                   help="prompt template of the classes, e.g. 'a photo of a {}.' (repeat to average; default '{}')")
    g.add_argument("--judge-clip", metavar="NAME",
                   help="diffusion: the CLIP (HookedCLIP.from_pretrained name) that reads generated images with "
                        "--classes (default for shapes-diffusion: shapes-clip)")
    g.add_argument("--clamp-multiplier", type=positive_float,
                   help="steering clamps a feature to this times its largest activation (default: vision 2, diffusion 5)")
    g.add_argument("--steer-images", type=positive_int, default=32,
                   help="vision: images on which the zero-shot change is measured (default 32)")
    g.add_argument("--steer-prompts", type=non_negative_int, default=4,
                   help="diffusion: prompts generated again with each feature clamped (default 4; 0: none)")
    add_cfg_branch_option(g, "diffusion: steer this CFG branch, or both (default: the SAE's own branch, else both)")

    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True,
                   help="output directory (created, or replaced if it holds earlier dashboards; a foreign "
                        "non-empty directory is refused)")
    g.add_argument("--title", help="title of the index page")
    g.add_argument("--batch-size", type=positive_int, default=64, help="vision: images per forward pass (default 64)")
    add_no_progress_option(g)


# --------------------------------------------------------------------------------------------- loading
def _is_shapes(name: str, kind: Optional[str] = None) -> bool:
    """A registered shapes-world model (the defaults for inputs, labels and classes come from the world)."""
    load_model_providers(name)
    entry = MODEL_REGISTRY.get(name)
    return entry is not None and name.startswith("shapes-") and (kind is None or entry.kind == kind)


def model_kind(name: str, kind: Optional[str] = None) -> str:
    """``"clip"``, ``"vision"``, ``"vlm"`` or ``"diffusion"``: what ``name`` loads as (``kind`` when given,
    i.e. ``--model-kind``). Detected by :func:`~sae_lens_multimodal.models.loading.detect_model_kind`; a name
    that gives no clue counts as a vision model here (a CLIP when HookedCLIP can load it, decided by
    :func:`load_dashboard_model`)."""
    if kind is not None:
        return kind
    # Imported when a command runs, not when the parser is built (it loads every model class).
    from sae_lens_multimodal.models.loading import detect_model_kind

    return detect_model_kind(name) or "vision"


def load_dashboard_model(name: str, device: str = "cpu", kind: Optional[str] = None) -> tuple[Any, str]:
    """(model, kind) for ``--model`` through :func:`~sae_lens_multimodal.models.loading.load_model`: a
    HookedDiffusionPipeline (``"diffusion"``), a HookedCLIP (``"clip"``: labels and zero-shot steering) or a
    HookedViT (``"vision"``)."""
    from sae_lens_multimodal.models.conversions import UnsupportedModelError
    from sae_lens_multimodal.models.loading import load_model, model_kind_of

    try:
        model = load_model(name, kind, device=device)
    except (UnsupportedModelError, OSError, RuntimeError) as err:
        what = {"diffusion": "diffusion pipeline", "vlm": "vision-language model", "clip": "CLIP",
                "vision": "vision transformer"}.get(kind or model_kind(name), "CLIP or ViT")
        raise ValueError(f"Could not load model {name!r} as a {what}: {err}") from err
    kind = model_kind_of(model)
    if kind == "vlm":
        raise ValueError(f"{name!r} is a vision-language model; dashboards support CLIP / ViT and diffusion models.")
    return model, kind


def load_sae(release: Optional[str] = None, sae_id: Optional[str] = None, path: Optional[str] = None,
             device: str = "cpu") -> Any:
    """The SAE given by ``--release/--sae-id`` (``SAE.from_pretrained``) or ``--sae-path`` (``SAE.load_from_disk``),
    in eval mode."""
    import sae_lens_multimodal  # noqa: F401  (registers this package's releases and SAE architectures)
    from sae_lens import SAE

    if path is not None and (release is not None or sae_id is not None):
        raise ValueError("Give the SAE either as --release R --sae-id ID or as --sae-path DIR, not both.")
    if path is not None:
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"No SAE directory at {directory} (--sae-path wants a directory saved by "
                                    "sae.save_model, with cfg.json and the weights).")
        from sae_lens_multimodal.pretrained.local import load_sae_dir  # a damaged directory names its file

        sae = load_sae_dir(directory, device=device)
    elif release is not None and sae_id is not None:
        from sae_lens_multimodal.pretrained.registry import check_pretrained_name

        check_pretrained_name(release, sae_id)  # a typo lists close matches instead of SAELens's message
        sae = SAE.from_pretrained(release, sae_id, device=device)
        sae = sae[0] if isinstance(sae, tuple) else sae  # SAELens < 6 returned (sae, cfg, sparsity)
    elif release is not None or sae_id is not None:
        raise ValueError("--release and --sae-id go together: pass both (list releases and ids with "
                         "`sae-lens-mm releases`).")
    else:
        raise ValueError("No SAE given: pass --release R --sae-id ID (list them with `sae-lens-mm releases`) or "
                         "--sae-path DIR (a directory saved by sae.save_model).")
    return sae.eval()


def _shapes_count(spec: str, option: str) -> Optional[int]:
    """N of ``shapes`` / ``shapes:N``, or None when ``spec`` is something else."""
    if spec != "shapes" and not spec.startswith("shapes:"):
        return None
    _, _, n = spec.partition(":")
    if not n:
        return None if spec != "shapes" else -1
    try:
        count = int(n)
    except ValueError:
        raise ValueError(f"{option} {spec!r}: expected shapes or shapes:N with N a whole number.") from None
    if count < 1:
        raise ValueError(f"{option} {spec!r}: N must be at least 1.")
    return count


@dataclass
class Images:
    """Images for vision dashboards: the model input (numpy uint8 or a preprocessed tensor) and captions."""

    inputs: Any
    captions: list[str]
    source: str


def load_images(spec: str, tower: Any, *, seed: int = 0, max_images: Optional[int] = None) -> Images:
    """``--images``: ``shapes[:N]`` (shapes-world images with their captions) or a folder of image files,
    each through ``tower.preprocess`` (the model's own resize, crop and normalisation), captioned with
    its file name."""
    count = _shapes_count(spec, "--images")
    if count is not None:
        from sae_lens_multimodal.world import ShapesWorld, caption

        n = DEFAULT_SHAPES_IMAGES if count == -1 else count
        images, factors = ShapesWorld(image_size=32, seed=seed).sample(n)
        return Images(images, [caption(f) for f in factors], f"{n} shapes-world images (seed {seed})")
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"No images folder at {folder}. --images wants a folder of image files "
                                f"({', '.join(IMAGE_SUFFIXES)}) or shapes[:N].")
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is a file; pass the folder that holds the images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"No image files in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}; subfolders are not read).")
    if max_images is not None:
        files = files[:max_images]
    preprocess = getattr(tower, "preprocess", None)
    if preprocess is None:
        raise ValueError("This model has no preprocessing function (model.preprocess), so image files cannot be "
                         "turned into model inputs; load it with from_pretrained.")
    import torch
    from PIL import Image, UnidentifiedImageError

    tensors = []
    for p in files:
        try:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"Cannot read {p} as an image ({err}); remove it from the folder.") from err
        # The model's own preprocessing (resize, crop, normalise): the dashboards show what the model saw,
        # so the patch heatmaps line up with the pictures.
        tensors.append(preprocess(rgb))
    return Images(torch.stack(tensors), [p.name for p in files], f"{len(files)} images from {folder}")


def load_prompts(spec: str, *, seed: int = 0) -> list[str]:
    """``--prompts``: ``shapes[:N]`` (captions of N shapes-world images) or a text file, one prompt a line
    (blank lines skipped)."""
    count = _shapes_count(spec, "--prompts")
    if count is not None:
        from sae_lens_multimodal.world import ShapesWorld, caption

        n = DEFAULT_SHAPES_PROMPTS if count == -1 else count
        _, factors = ShapesWorld(image_size=32, seed=seed + 1).sample(n)
        return [caption(f) for f in factors]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No prompts file at {path}. --prompts wants a text file with one prompt per line, "
                                "or shapes[:N].")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts (one per line; blank lines are skipped).")
    return prompts


def _lines(path: str, option: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"No {option} file at {p} (one entry per line).")
    out = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError(f"{option} file {p} is empty.")
    return out


# --------------------------------------------------------------------------------------------- running
def _vision_options(args: argparse.Namespace, model: Any, kind: str, images: Images) -> dict[str, Any]:
    opts: dict[str, Any] = dict(captions=images.captions, top_k=args.top_k, batch_size=args.batch_size,
                                steer_images=args.steer_images, progress=not args.no_progress)
    if args.clamp_multiplier is not None:
        opts["clamp_multiplier"] = args.clamp_multiplier
    shapes = _is_shapes(args.model, "clip")
    if kind != "clip":
        for option in ("vocabulary", "classes"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option} needs a CLIP (text tower); {args.model!r} loads as a vision transformer "
                                 "without one.")
        return opts
    if args.vocabulary is not None:
        opts["vocabulary"] = _lines(args.vocabulary, "--vocabulary")
    elif shapes:
        from sae_lens_multimodal.world.demo import LABEL_WORDS, caption_word_embeddings

        # The shapes CLIP only ever saw captions: embed each word in caption context (as the demo does).
        opts["vocabulary"] = list(LABEL_WORDS)
        opts["text_embeds"] = caption_word_embeddings(model, LABEL_WORDS)
    templates = tuple(args.class_template or ("{}",))
    if args.classes is not None:
        opts.update(class_names=_lines(args.classes, "--classes"), class_templates=templates)
    elif shapes:
        from sae_lens_multimodal.world import all_captions

        opts.update(class_names=all_captions(), class_templates=templates)
    return opts


def _diffusion_options(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    from sae_lens_multimodal.reports.dashboard_data import ZeroShotProbe

    opts: dict[str, Any] = dict(top_k=min(args.top_k, len(prompts)), num_inference_steps=args.num_inference_steps, seed=args.seed,
                                steer_prompts=max(0, min(args.steer_prompts, len(prompts))),
                                clamp_multiplier=5.0 if args.clamp_multiplier is None else args.clamp_multiplier,
                                cfg_branch=args.cfg_branch, progress=not args.no_progress)
    if args.guidance_scale is not None:
        opts["pipeline_kwargs"] = {"guidance_scale": args.guidance_scale}
    shapes = _is_shapes(args.model, "diffusion")
    judge = args.judge_clip or ("shapes-clip" if shapes else None)
    if args.vocabulary is not None:
        raise ValueError("--vocabulary labels vision features of a CLIP; diffusion dashboards have no text labels.")
    if judge is None:
        if args.classes is not None:
            raise ValueError("--classes for a diffusion model needs --judge-clip NAME: the CLIP that reads the "
                             "generated images.")
        return opts
    if args.classes is not None:
        classes = _lines(args.classes, "--classes")
    elif judge == "shapes-clip":
        from sae_lens_multimodal.world import all_captions

        classes = all_captions()
    else:
        raise ValueError(f"--judge-clip {judge!r} needs --classes FILE: the classes it reads generated images as.")
    clip, clip_kind = load_dashboard_model(judge, DEVICE)
    if clip_kind != "clip":
        raise ValueError(f"--judge-clip {judge!r} is not a CLIP model (it loads as a {clip_kind} model).")
    opts["probe"] = ZeroShotProbe(clip, classes, tuple(args.class_template or ("{}",)))
    return opts


def run_from_args(args: argparse.Namespace) -> int:
    """Load the model, SAE and inputs named by ``args``, write the dashboards, and print where they are."""
    from sae_lens_multimodal.reports.dashboards import write_feature_dashboards
    from sae_lens_multimodal.reports.html import check_output_dir as check_report_dir

    # refuse a file, a cache or SAE folder, or a foreign directory now, not after minutes of work
    check_output_dir(args.out, "report")
    check_report_dir(args.out)
    sae = load_sae(args.release, args.sae_id, args.sae_path, DEVICE)  # cheap: before the model
    kind = model_kind(args.model, args.model_kind)
    if kind == "diffusion" and args.images is not None:
        raise ValueError(f"{args.model!r} is a diffusion pipeline: give it --prompts, not --images.")
    if kind != "diffusion" and args.prompts is not None:
        raise ValueError(f"{args.model!r} is a vision model: give it --images, not --prompts.")
    if kind == "diffusion":
        spec = args.prompts or ("shapes" if _is_shapes(args.model) else None)
        if spec is None:
            raise ValueError("Pass --prompts FILE (one prompt per line) or --prompts shapes:N.")
        inputs: Any = load_prompts(spec, seed=args.seed)
        source = f"{len(inputs)} prompts"
    else:
        spec = args.images or ("shapes" if _is_shapes(args.model) else None)
        if spec is None:
            raise ValueError("Pass --images DIR (a folder of image files) or --images shapes:N.")
    model, kind = load_dashboard_model(args.model, DEVICE, args.model_kind)
    if kind == "diffusion":
        options = _diffusion_options(args, inputs)
    else:
        tower = model.part("vision")
        images = load_images(spec, tower, seed=args.seed, max_images=args.max_images)
        inputs, source = images.inputs, images.source
        options = _vision_options(args, model, kind, images)
    if args.features is not None:
        options["feature_ids"] = args.features
    elif args.top_features is not None:
        options["n_features"] = args.top_features
    index = Path(write_feature_dashboards(model, sae, inputs, args.out, title=args.title, **options))
    n_pages = len(list(index.parent.glob("*-feature-*.html")))
    print(f"Feature dashboards ({n_pages} features, {kind} model {args.model!r}, {source}): {index}")
    print(f"Open it in a browser: {index.resolve().as_uri()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sae_lens_multimodal.reports.cli ...`` (the same as ``sae-lens-mm dashboards ...``)."""
    from sae_lens_multimodal.cli import main as cli_main

    return cli_main(["dashboards", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
