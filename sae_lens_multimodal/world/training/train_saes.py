"""Train the bundled shapes-world SAEs (releases ``shapes-clip-saes`` and ``shapes-diffusion-saes``).

    python -m sae_lens_multimodal.world.training.train_saes                 # both; overwrites weights/saes/
    python -m sae_lens_multimodal.world.training.train_saes --which clip    # only the vision SAE
    python -m sae_lens_multimodal.world.training.train_saes --which clip-layers  # shapes-clip-layer-saes (blocks 0-3)
    python -m sae_lens_multimodal.world.training.train_saes --which diffusion --out /tmp/saes --seed 1

Both go through the package's own training path: an activation store (``ImageActivationStore`` /
``DiffusionActivationStore``) and ``train_sae`` (SAELens's ``SAETrainer``). The result is saved with
SAELens's ``save_inference_model`` (``cfg.json`` + ``sae_weights.safetensors``: the ``mm_bundled`` layout,
docs/releases.md), after the figures measured on fresh data (explained variance, L0, dead fraction,
training time) have been added to ``cfg.json``'s metadata. A folder is replaced only once it is
complete (written next to the target, then renamed), so an interrupted run never leaves half a SAE.

* vision: ``blocks.2.hook_resid_post`` of ``HookedViT.from_pretrained("shapes-clip")`` (= the vision
  tower of ``HookedCLIP.from_pretrained("shapes-clip")``), every token (CLS + 64 patches), TopK.
* vision, every block (release ``shapes-clip-layer-saes``, for circuits across layers): the same recipe at
  ``blocks.{0,1,2,3}.hook_resid_post`` (``--which clip-layers``).
* diffusion: ``up_blocks.0.attentions.1.hook_out`` of the shapes-diffusion UNet, channel-last 8x8
  tokens, recorded during real generations (DPM-Solver++, 20 steps, guidance 2) on the conditional
  half of the classifier-free-guidance batch, one TopK dictionary per timestep bucket
  (``timestep_bucketed``), with per-bucket input scaling (activation norms grow ~10x towards t = 999).

Runs on one thread (``torch.set_num_threads(1)``); the same seed gives the same SAE on the same torch
build and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sae_lens_multimodal.core.atomic import atomic_directory
from sae_lens_multimodal.world.clip import clip_pixels
from sae_lens_multimodal.world.paths import BUNDLED_SAES_DIR  # <BUNDLED_SAES_DIR>/<release>/<sae_id>/

__all__ = [
    "BUNDLED_SAES_DIR",
    "CLIP_RELEASE",
    "CLIP_HOOK",
    "CLIP_LAYER_RELEASE",
    "CLIP_LAYER_HOOKS",
    "DIFFUSION_RELEASE",
    "DIFFUSION_HOOK",
    "DIFFUSION_TIMESTEP_RANGES",
    "ClipSAERecipe",
    "DiffusionSAERecipe",
    "diffusion_prompts",
    "train_clip_sae",
    "train_diffusion_sae",
    "parse_release_args",
    "release_parser",
    "write_release_folder",
    "write_sae_folder",
    "main",
]

CLIP_RELEASE = "shapes-clip-saes"
CLIP_HOOK = "blocks.2.hook_resid_post"
#: One SAE per block of the shapes CLIP's vision tower (4 blocks), for circuits with edges between layers.
CLIP_LAYER_RELEASE = "shapes-clip-layer-saes"
CLIP_LAYER_HOOKS = tuple(f"blocks.{i}.hook_resid_post" for i in range(4))
DIFFUSION_RELEASE = "shapes-diffusion-saes"
DIFFUSION_HOOK = "up_blocks.0.attentions.1.hook_out"
#: Four buckets of five DPM-Solver steps each (the 20-step schedule is 50, 100, ..., 500, 549, ..., 999).
DIFFUSION_TIMESTEP_RANGES = [[0, 275], [275, 525], [525, 775], [775, 1000]]
REGENERATE = "python -m sae_lens_multimodal.world.training.train_saes"


@dataclass
class ClipSAERecipe:
    """Settings of the vision SAE (the defaults made the shipped one)."""

    n_images: int = 12_000  # training images (x 65 tokens = 780k rows, repeated)
    text_prob: float = 0.25  # share of images with a written word (the world's 'text' factor)
    d_sae: int = 512
    k: int = 8
    total_training_samples: int = 3_000_000
    batch_size: int = 1024
    lr: float = 3e-3
    lr_end: float = 3e-4
    lr_warm_up_steps: int = 100
    dead_feature_window: int = 200  # steps; TopK's auxiliary loss revives latents dead this long
    eval_images: int = 1000  # fresh text-free images (another seed) for the figures
    eval_text_prob: float = 0.0


@dataclass
class DiffusionSAERecipe:
    """Settings of the timestep-bucketed diffusion SAE (the defaults made the shipped one)."""

    n_prompts: int = 320  # generations (x 20 steps x 64 tokens = 410k conditional rows)
    num_inference_steps: int = 20
    guidance_scale: float = 2.0
    timestep_ranges: list[list[float]] = field(default_factory=lambda: [list(r) for r in DIFFUSION_TIMESTEP_RANGES])
    d_sae: int = 256  # per bucket (512 left 40% of the t >= 775 dictionary dead)
    k: int = 8
    total_training_samples: int = 3_000_000
    batch_size: int = 1024
    lr: float = 3e-3
    lr_end: float = 3e-4
    lr_warm_up_steps: int = 100
    dead_feature_window: int = 200
    eval_prompts: int = 48  # fresh generations (other seeds and prompts) for the figures
    batch_prompts: int = 8  # generations per pipeline call


# ----------------------------------------------------------------------------------------- data
def diffusion_prompts(n: int, seed: int) -> list[str]:
    """``n`` world captions as the diffusion model was trained on: colour, shape and position always,
    size and texture each half of the time."""
    from sae_lens_multimodal.world.shapes import ShapesWorld, caption

    world = ShapesWorld(32, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return [caption(f, size=bool(rng.random() < 0.5), texture=bool(rng.random() < 0.5))
            for f in world.sample_factors(n)]


def _diffusion_rows(pipeline: Any, prompts: Sequence[str], seed_offset: int, recipe: DiffusionSAERecipe,
                    progress: bool, cache: Optional[Path] = None, cfg_branch: str = "cond") -> Any:
    """Activation rows of real generations (``cfg_branch`` half of the CFG batch); ``cache`` (a .pt file) is
    reused when it exists and written otherwise, so a second SAE on the same generations
    (train_conditioned_sae.py) skips the generating."""
    from sae_lens_multimodal.training.cache import ActivationChunk

    if cache is not None and cache.exists():
        return ActivationChunk(**torch.load(cache))
    rows = _generate_diffusion_rows(pipeline, prompts, seed_offset, recipe, progress, cfg_branch)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"acts": rows.acts, "sample": rows.sample, "timestep": rows.timestep, "branch": rows.branch}, cache)
    return rows


def _generate_diffusion_rows(pipeline: Any, prompts: Sequence[str], seed_offset: int, recipe: DiffusionSAERecipe,
                             progress: bool, cfg_branch: str = "cond") -> Any:
    from sae_lens_multimodal.training.cache import ActivationChunk
    from sae_lens_multimodal.training.diffusion_store import DiffusionActivationStore

    store = DiffusionActivationStore(
        pipeline, DIFFUSION_HOOK, list(prompts), seed_offset=seed_offset, cfg_branch=cfg_branch,
        batch_size=recipe.batch_prompts, progress=progress, model_name="shapes-diffusion",
        pipeline_kwargs={"num_inference_steps": recipe.num_inference_steps,
                         "guidance_scale": recipe.guidance_scale, "output_type": "pt"},
    )
    return ActivationChunk.cat([chunks[DIFFUSION_HOOK] for _, _, chunks in store.iter_chunks()])


# ----------------------------------------------------------------------------------------- writing
def write_release_folder(save: Callable[[Path], Any], directory: os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write one release folder: ``save(folder)`` writes SAELens's layout (``cfg.json`` + weights), then extra
    ``metadata`` is merged into ``cfg.json``'s metadata and every file is made readable by all.

    The folder is assembled next to the target and renamed into place, so readers see the old folder or
    the new one, never a mix.
    """
    target = Path(directory)
    with atomic_directory(target) as tmp:
        save(tmp)
        cfg_path = tmp / "cfg.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["metadata"] = {**cfg.get("metadata", {}), **metadata}
        cfg_path.write_text(json.dumps(cfg, indent=1, sort_keys=True), encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # the package's files must be readable by all
    return target


def write_sae_folder(sae: Any, directory: os.PathLike, metadata: dict[str, Any]) -> Path:
    """Save ``sae`` (a SAELens TrainingSAE) for inference into ``directory`` with extra ``metadata``
    (:func:`write_release_folder`)."""
    return write_release_folder(sae.save_inference_model, directory, metadata)


def _load_inference(directory: Path) -> Any:
    import sae_lens_multimodal.saes  # noqa: F401  (registers timestep_bucketed with SAELens)
    from sae_lens import SAE

    return SAE.load_from_disk(directory)


def _environment() -> dict[str, Any]:
    import sae_lens

    return {"torch": torch.__version__, "sae_lens": sae_lens.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def _overall(result: dict[str, Any], d_sae: int) -> dict[str, Any]:
    o = result["overall"]
    return {"explained_variance": round(float(o["explained_variance"]), 4), "l0": round(float(o["l0"]), 3),
            "dead_latents": int(o["dead_latents"]), "dead_fraction": round(int(o["dead_latents"]) / d_sae, 4),
            "n_rows": int(o.get("n_rows", 0))}


# ----------------------------------------------------------------------------------------- vision SAE
def train_topk_vision_sae(
    acts: torch.Tensor, *, hook: str, model_name: str, recipe: Any, seed: int
) -> tuple[Any, Any, int]:
    """Train a TopK SAE on activation rows ``acts`` through :func:`train_sae` (SAELens's ``SAETrainer``) with
    ``recipe``'s ``d_sae, k, total_training_samples, batch_size, lr, lr_end, lr_warm_up_steps,
    dead_feature_window``; returns ``(training SAE (for write_sae_folder), the inference SAE exactly as it is
    shipped (saved and loaded back), training steps)``. Every bundled vision SAE is trained by this function."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_lens_multimodal.training.train import train_sae

    r = recipe
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=acts.shape[-1], d_sae=r.d_sae, k=r.k, dtype="float32", device="cpu",
        metadata=SAEMetadata(hook_name=hook, model_name=model_name),
    ))
    steps = r.total_training_samples // r.batch_size
    train_sae(sae, acts, total_training_samples=r.total_training_samples, batch_size=r.batch_size, lr=r.lr,
              lr_end=r.lr_end, lr_warm_up_steps=r.lr_warm_up_steps, lr_decay_steps=max(1, steps // 3),
              dead_feature_window=r.dead_feature_window, feature_sampling_window=500, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:  # evaluate the inference SAE exactly as it is shipped
        sae.save_inference_model(tmp)
        return sae, _load_inference(Path(tmp)), steps


def train_clip_sae(out_root: os.PathLike = BUNDLED_SAES_DIR, *, seed: int = 0,
                   recipe: Optional[ClipSAERecipe] = None, progress: bool = True, hook: str = CLIP_HOOK,
                   release: str = CLIP_RELEASE) -> dict[str, Any]:
    """Train the vision SAE at ``hook`` and write ``<out_root>/<release>/<hook>/`` (default
    ``shapes-clip-saes/blocks.2.hook_resid_post/``).

    Returns the figures written into its metadata (``evaluation``, ``training``).
    """
    from sae_lens_multimodal.models.hooked_vit import HookedViT
    from sae_lens_multimodal.training.cache import model_identity
    from sae_lens_multimodal.training.evaluate import evaluate_sae
    from sae_lens_multimodal.training.image_store import ImageActivationStore
    from sae_lens_multimodal.world.shapes import ShapesWorld

    r = recipe or ClipSAERecipe()
    torch.set_num_threads(1)
    start = time.perf_counter()
    vit = HookedViT.from_pretrained("shapes-clip").eval()
    fingerprint = model_identity(vit)["trunk_fingerprint"]  # the SAE fits these weights only (readout head aside)

    def rows(n: int, world_seed: int, text_prob: float) -> torch.Tensor:
        images, _ = ShapesWorld(32, seed=world_seed, text_prob=text_prob).sample(n)
        store = ImageActivationStore(vit, hook, clip_pixels(images), token_policy="all", batch_size=256,
                                     model_name="shapes-clip", progress=progress)
        return torch.cat(list(store.activation_batches(hook)))

    acts = rows(r.n_images, seed, r.text_prob)
    cache_s = time.perf_counter() - start
    sae, shipped, steps = train_topk_vision_sae(acts, hook=hook, model_name="shapes-clip", recipe=r, seed=seed)
    train_s = time.perf_counter() - start
    del acts
    fresh = rows(r.eval_images, seed + 1000, r.eval_text_prob)
    figures = _overall(evaluate_sae(shipped, fresh, n_rows=len(fresh)), r.d_sae)
    with_text = _overall(evaluate_sae(shipped, rows(r.eval_images, seed + 2000, 0.5), n_rows=10**9), r.d_sae)
    metadata = {
        "release": release, "sae_id": hook, "model_name": "shapes-clip", "model_class_name": "HookedViT",
        "hook_name": hook, "token_policy": "all", "input_kind": "block_output", "cfg_branch": None,
        "normalization": {"kind": "none"}, "source_format": "bundled", "model_fingerprint": fingerprint,
        "expected_l0": figures["l0"], "expected_variance_explained": figures["explained_variance"],
        "training": {
            "data": f"ShapesWorld(32, seed={seed}, text_prob={r.text_prob}): every factor varies (shape, colour, "
                    "position, size, texture, written word); all 65 tokens (CLS + 8x8 patches) of each image",
            "n_images": r.n_images, "rows": r.n_images * vit.cfg.n_ctx, "seed": seed,
            "architecture": "topk", "d_sae": r.d_sae, "k": r.k,
            "total_training_samples": r.total_training_samples, "batch_size": r.batch_size, "steps": steps,
            "lr": r.lr, "lr_end": r.lr_end, "lr_warm_up_steps": r.lr_warm_up_steps,
            "dead_feature_window": r.dead_feature_window,
            "caching_seconds": round(cache_s, 1), "wall_seconds": round(train_s, 1), **_environment(),
            "command": REGENERATE + (" --which clip" if release == CLIP_RELEASE else f" --which clip-layers --hook {hook}"),
        },
        "evaluation": {
            "data": f"{r.eval_images} fresh images, ShapesWorld(32, seed={seed + 1000}, text_prob={r.eval_text_prob}),"
                    " all tokens",
            **figures,
            "with_text": {"data": f"{r.eval_images} fresh images, ShapesWorld(32, seed={seed + 2000}, "
                                  "text_prob=0.5)", **with_text},
        },
    }
    write_sae_folder(sae, Path(out_root) / release / hook, metadata)
    return metadata


# ----------------------------------------------------------------------------------------- diffusion SAE
def train_diffusion_sae(out_root: os.PathLike = BUNDLED_SAES_DIR, *, seed: int = 0,
                        recipe: Optional[DiffusionSAERecipe] = None, progress: bool = True) -> dict[str, Any]:
    """Train the timestep-bucketed SAE and write ``<out_root>/shapes-diffusion-saes/up_blocks.0.attentions.1.hook_out/``.

    Returns the figures written into its metadata.
    """
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.saes import TimestepBucketedTrainingSAE, TimestepBucketedTrainingSAEConfig
    from sae_lens_multimodal.training.evaluate import evaluate_sae
    from sae_lens_multimodal.training.train import train_sae
    from sae_lens_multimodal.training.cache import model_identity
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    r = recipe or DiffusionSAERecipe()
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipe = load_shapes_pipeline()
    hooked = HookedDiffusionPipeline(pipe)
    num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
    data = _diffusion_rows(hooked, diffusion_prompts(r.n_prompts, seed), seed * 100_000, r, progress)
    cache_s = time.perf_counter() - start
    torch.manual_seed(seed)
    sae = TimestepBucketedTrainingSAE(TimestepBucketedTrainingSAEConfig(
        d_in=hooked.hook_width(DIFFUSION_HOOK), d_sae=r.d_sae, inner_architecture="topk",
        inner_config={"k": r.k}, timestep_ranges=r.timestep_ranges, num_train_timesteps=num_train_timesteps,
        dtype="float32", device="cpu",
        metadata={"hook_name": DIFFUSION_HOOK, "model_name": "shapes-diffusion", "input_kind": "block_output",
                  "cfg_branch": "cond"},
    ))
    steps = r.total_training_samples // r.batch_size
    train_sae(sae, data, total_training_samples=r.total_training_samples, batch_size=r.batch_size, lr=r.lr,
              lr_end=r.lr_end, lr_warm_up_steps=r.lr_warm_up_steps, lr_decay_steps=max(1, steps // 3),
              dead_feature_window=r.dead_feature_window, feature_sampling_window=500, normalize_per_bucket=True,
              n_batches_for_norm_estimate=50, seed=seed)
    train_s = time.perf_counter() - start
    n_rows = len(data)
    del data

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        shipped = _load_inference(Path(tmp))
    fresh = _diffusion_rows(hooked, diffusion_prompts(r.eval_prompts, seed + 1000), seed * 100_000 + 50_000, r,
                            progress)
    result = evaluate_sae(shipped, fresh, n_rows=len(fresh))
    figures = _overall(result, r.d_sae)
    per_bucket = [
        {"timestep_range": list(b["timestep_range"]), "explained_variance": round(float(b["explained_variance"]), 4),
         "l0": round(float(b["l0"]), 3), "dead_latents": int(b["dead_latents"]),
         "dead_fraction": round(int(b["dead_latents"]) / r.d_sae, 4), "n_rows": int(b["n_rows"])}
        for b in result["buckets"] if b["n_rows"]
    ]
    # A latent belongs to one bucket's dictionary: dead = never active on its own bucket's rows.
    figures["dead_latents"] = sum(b["dead_latents"] for b in per_bucket)
    figures["dead_fraction"] = round(figures["dead_latents"] / (r.d_sae * max(1, len(per_bucket))), 4)
    metadata = {
        "release": DIFFUSION_RELEASE, "sae_id": DIFFUSION_HOOK, "model_name": "shapes-diffusion",
        "model_class_name": "HookedUNet", "hook_name": DIFFUSION_HOOK, "token_policy": "all",
        "input_kind": "block_output", "cfg_branch": "cond", "guidance_scale": r.guidance_scale,
        "timesteps": f"every step of {r.num_inference_steps} DPM-Solver++ steps, in {len(r.timestep_ranges)} buckets",
        "normalization": {"kind": "per_bucket_scale", "status": "applied by the SAE (bucket_scaling_factors)"},
        "source_format": "bundled", "model_fingerprint": model_identity(pipe.unet)["trunk_fingerprint"],
        "expected_l0": figures["l0"], "expected_variance_explained": figures["explained_variance"],
        "training": {
            "data": f"activations of {r.n_prompts} generations of the shapes-diffusion pipeline (DPM-Solver++, "
                    f"{r.num_inference_steps} steps, guidance {r.guidance_scale}), prompts = world captions "
                    f"(ShapesWorld seed {seed}; size and texture each named half of the time), initial-noise seeds "
                    f"{seed * 100_000}..; conditional half of the CFG batch only (the unconditional half sees the "
                    "empty prompt; a cond-trained SAE is what prompt-feature analyses need); every 8x8 token of "
                    "every step",
            "n_prompts": r.n_prompts, "rows": n_rows, "seed": seed, "architecture": "timestep_bucketed",
            "inner_architecture": "topk", "d_sae_per_bucket": r.d_sae, "k": r.k,
            "timestep_ranges": r.timestep_ranges, "bucket_scaling_factors": sae.cfg.bucket_scaling_factors,
            "total_training_samples": r.total_training_samples, "batch_size": r.batch_size, "steps": steps,
            "lr": r.lr, "lr_end": r.lr_end, "lr_warm_up_steps": r.lr_warm_up_steps,
            "dead_feature_window": r.dead_feature_window,
            "caching_seconds": round(cache_s, 1), "wall_seconds": round(train_s, 1), **_environment(),
            "command": REGENERATE + " --which diffusion",
        },
        "evaluation": {
            "data": f"{r.eval_prompts} fresh generations (prompts from ShapesWorld seed {seed + 1000}, other noise "
                    "seeds), conditional branch, every step and token; dead = never active in its own bucket",
            **figures, "buckets": per_bucket,
        },
    }
    write_sae_folder(sae, Path(out_root) / DIFFUSION_RELEASE / DIFFUSION_HOOK, metadata)
    return metadata


# ----------------------------------------------------------------------------------------- CLI
def release_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a release-training script: the first paragraph of ``doc`` as its description, ``--out``
    (the releases' root, default the package's) and ``--seed``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BUNDLED_SAES_DIR),
                        help="root folder of the releases (default: the package's weights/saes/)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_release_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], *,
                       what: str = "SAEs") -> argparse.Namespace:
    """Add ``--quick`` (last), parse ``argv``, and refuse a quick run into the shipped folder (its tiny
    ``what`` must never replace the shipped ones)."""
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (seconds) to check the pipeline; never ship its output")
    args = parser.parse_args(argv)
    if args.quick and Path(args.out).resolve() == BUNDLED_SAES_DIR.resolve():
        parser.error(f"--quick would overwrite the shipped {what}; give --out DIR")
    return args


def _summary(name: str, meta: dict[str, Any]) -> str:
    ev, tr = meta["evaluation"], meta["training"]
    return (f"{name}: explained variance {ev['explained_variance']:.4f}, L0 {ev['l0']:.2f}, dead "
            f"{ev['dead_fraction']:.1%} ({ev['dead_latents']} latents), trained in {tr['wall_seconds']:.0f} s")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = release_parser(__doc__)
    parser.add_argument("--which", choices=("clip", "clip-layers", "diffusion", "all"), default="all",
                        help="all = clip and diffusion; clip-layers = shapes-clip-layer-saes (not in all)")
    parser.add_argument("--hook", action="append", default=None,
                        help=f"with --which clip-layers: only this hook; repeat for several (default: {list(CLIP_LAYER_HOOKS)})")
    args = parse_release_args(parser, argv, what="SAEs")
    clip_recipe, diff_recipe = ClipSAERecipe(), DiffusionSAERecipe()
    if args.quick:
        clip_recipe = ClipSAERecipe(n_images=64, d_sae=64, k=4, total_training_samples=8192, batch_size=256,
                                    lr_warm_up_steps=2, eval_images=16)
        diff_recipe = DiffusionSAERecipe(n_prompts=2, num_inference_steps=4, d_sae=32, k=4,
                                         total_training_samples=4096, batch_size=128, lr_warm_up_steps=2,
                                         eval_prompts=1, batch_prompts=2)
    if args.which in ("clip", "all"):
        print(_summary(CLIP_RELEASE, train_clip_sae(args.out, seed=args.seed, recipe=clip_recipe)))
    if args.hook and (args.which != "clip-layers" or set(args.hook) - set(CLIP_LAYER_HOOKS)):
        parser.error(f"--hook goes with --which clip-layers and is one of {list(CLIP_LAYER_HOOKS)}; got {args.hook}")
    if args.which == "clip-layers":
        for hook in args.hook or CLIP_LAYER_HOOKS:
            meta = train_clip_sae(args.out, seed=args.seed, recipe=clip_recipe, hook=hook, release=CLIP_LAYER_RELEASE)
            print(_summary(f"{CLIP_LAYER_RELEASE}/{hook}", meta))
    if args.which in ("diffusion", "all"):
        print(_summary(DIFFUSION_RELEASE, train_diffusion_sae(args.out, seed=args.seed, recipe=diff_recipe)))


if __name__ == "__main__":
    main()
