"""Train the bundled MLP transcoders of the shapes CLIP (release ``shapes-clip-transcoders``).

    python -m sae_lens_multimodal.world.training.train_transcoders            # every block; overwrites weights/saes/
    python -m sae_lens_multimodal.world.training.train_transcoders --out /tmp/tc --seed 1
    python -m sae_lens_multimodal.world.training.train_transcoders --quick --out /tmp/tc   # seconds; never ship it

One transcoder per MLP of ``HookedViT.from_pretrained("shapes-clip")`` (= the vision tower of
``HookedCLIP.from_pretrained("shapes-clip")``; width 64, MLP 256, 4 blocks): it reads the block's
``ln2.hook_normalized`` (the MLP's input) and predicts its ``hook_mlp_out``, every token (CLS + 64 patches).
Architecture: SAELens's ``Transcoder`` (ReLU, 64 -> 512 -> 64), trained with the decoder-norm-weighted L1 penalty
through :func:`~sae_lens_multimodal.training.transcoders.train_transcoder` (SAELens's ``SAETrainer``). Each
folder is SAELens's own layout (``cfg.json`` + ``sae_weights.safetensors``) with the training recipe and the
figures on fresh images (fraction of the MLP output's variance explained, L0, dead fraction) in
``cfg.json``'s metadata; written next to the target and renamed into place.

Runs on one thread; the same seed gives the same transcoders on the same torch build and CPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sae_lens_multimodal.world.paths import BUNDLED_SAES_DIR
from sae_lens_multimodal.world.training.train_saes import (
    _environment,
    parse_release_args,
    release_parser,
    write_release_folder,
)

__all__ = ["RELEASE", "LAYERS", "TranscoderRecipe", "sae_id", "train_shapes_clip_transcoders", "write_transcoder_folder",
           "main"]

RELEASE = "shapes-clip-transcoders"
LAYERS = (0, 1, 2, 3)
REGENERATE = "python -m sae_lens_multimodal.world.training.train_transcoders"


def sae_id(layer: int) -> str:
    """The release's SAE id of block ``layer``'s transcoder (its folder name)."""
    return f"blocks.{layer}.mlp"


@dataclass
class TranscoderRecipe:
    """Settings of the shipped transcoders (the defaults made them)."""

    n_images: int = 6000  # training images (x 65 tokens = 390k rows per MLP, repeated)
    text_prob: float = 0.25  # share of images with a written word, as for shapes-clip-saes
    d_sae: int = 512
    # swept 0.3 / 1 / 3 (all four MLPs, fresh images): explained variance 0.95-0.96 / 0.79-0.85 / 0.33-0.46,
    # L0 7-33 / 4-18 / 1-9, dead 0-0.2% / 0-1.6% / 7-25%
    l1_coefficient: float = 0.3
    total_training_samples: int = 1_500_000
    batch_size: int = 1024
    lr: float = 2e-3
    lr_end: float = 2e-4
    lr_warm_up_steps: int = 50
    eval_images: int = 1000  # fresh text-free images (another seed) for the figures


def write_transcoder_folder(tc: Any, directory: Any, metadata: dict[str, Any]) -> Path:
    """Save inference transcoder ``tc`` in SAELens's layout (``tc.save_model``) into ``directory`` with extra
    ``metadata``, assembled next to the target and renamed into place (train_saes.write_release_folder)."""
    return write_release_folder(tc.save_model, directory, metadata)


def _rows(vit: Any, n: int, world_seed: int, text_prob: float, layers: Sequence[int]) -> dict[int, Any]:
    from sae_lens_multimodal.training.transcoders import mlp_pairs
    from sae_lens_multimodal.world.shapes import ShapesWorld
    from sae_lens_multimodal.world.clip import clip_pixels

    images, _ = ShapesWorld(32, seed=world_seed, text_prob=text_prob).sample(n)
    return mlp_pairs(vit, clip_pixels(images), layers, batch_size=256, model_name="shapes-clip")


def train_shapes_clip_transcoders(out_root: Any = BUNDLED_SAES_DIR, *, seed: int = 0,
                                  recipe: Optional[TranscoderRecipe] = None, layers: Sequence[int] = LAYERS,
                                  ) -> dict[int, dict[str, Any]]:
    """Train and write ``<out_root>/shapes-clip-transcoders/blocks.<layer>.mlp/`` for each of ``layers``;
    returns layer -> the metadata written (``training``, ``evaluation``)."""
    from sae_lens_multimodal.models.hooked_vit import HookedViT
    from sae_lens_multimodal.training.cache import model_identity
    from sae_lens_multimodal.training.transcoders import evaluate_transcoder, train_transcoder

    r = recipe or TranscoderRecipe()
    torch.set_num_threads(1)
    start = time.perf_counter()
    vit = HookedViT.from_pretrained("shapes-clip").eval()
    fingerprint = model_identity(vit)["trunk_fingerprint"]
    train = _rows(vit, r.n_images, seed, r.text_prob, layers)
    fresh = _rows(vit, r.eval_images, seed + 1000, 0.0, layers)
    cache_s = time.perf_counter() - start
    out: dict[int, dict[str, Any]] = {}
    for layer in layers:
        t0 = time.perf_counter()
        tc = train_transcoder(vit, pairs=train[layer], layer=layer, d_sae=r.d_sae, l1_coefficient=r.l1_coefficient,
                              total_training_samples=r.total_training_samples, batch_size=r.batch_size, lr=r.lr,
                              lr_end=r.lr_end, lr_warm_up_steps=r.lr_warm_up_steps, model_name="shapes-clip",
                              seed=seed + layer)
        wall = time.perf_counter() - t0
        figures = {k: (round(v, 4) if isinstance(v, float) else v)
                   for k, v in evaluate_transcoder(tc, *fresh[layer]).items()}
        on_train = evaluate_transcoder(tc, train[layer][0][:65_000], train[layer][1][:65_000])
        metadata = {
            "release": RELEASE, "sae_id": sae_id(layer), "model_name": "shapes-clip",
            "model_class_name": "HookedViT", "hook_name": tc.cfg.metadata.hook_name,
            "hook_name_out": tc.cfg.metadata.hook_name_out, "token_policy": "all", "cfg_branch": None,
            "normalization": {"kind": "none"}, "source_format": "bundled", "model_fingerprint": fingerprint,
            "expected_l0": figures["l0"], "expected_variance_explained": figures["explained_variance"],
            "training": {
                "data": f"ShapesWorld(32, seed={seed}, text_prob={r.text_prob}): every factor varies; all 65 tokens "
                        "of each image; pairs (blocks.L.ln2.hook_normalized, blocks.L.hook_mlp_out)",
                "rows": int(train[layer][0].shape[0]), "seed": seed + layer, "architecture": "transcoder",
                **{k: v for k, v in asdict(r).items() if k not in ("eval_images",)},
                "steps": r.total_training_samples // r.batch_size,
                "explained_variance_on_training_rows": round(on_train["explained_variance"], 4),
                "caching_seconds": round(cache_s, 1), "wall_seconds": round(wall, 1), **_environment(),
                "command": REGENERATE + (f" --seed {seed}" if seed else ""),
            },
            "evaluation": {
                "data": f"{r.eval_images} fresh images, ShapesWorld(32, seed={seed + 1000}, text_prob=0.0), all "
                        "tokens; explained_variance = 1 - |mlp_out - prediction|^2 / |mlp_out - mean|^2 over rows",
                **figures,
            },
        }
        write_transcoder_folder(tc, Path(out_root) / RELEASE / sae_id(layer), metadata)
        out[layer] = metadata
        print(f"{RELEASE} {sae_id(layer)}: explained variance {figures['explained_variance']:.4f}, "
              f"L0 {figures['l0']:.1f}, dead {figures['dead_fraction']:.1%}, {wall:.0f} s", flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = release_parser(__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    parser.add_argument("--l1", type=float, default=None, help="override the recipe's l1_coefficient")
    args = parse_release_args(parser, argv, what="transcoders")
    recipe = TranscoderRecipe()
    if args.quick:
        recipe = TranscoderRecipe(n_images=64, d_sae=64, total_training_samples=8192, batch_size=256,
                                  lr_warm_up_steps=2, eval_images=16)
    if args.l1 is not None:
        recipe.l1_coefficient = args.l1
    train_shapes_clip_transcoders(args.out, seed=args.seed, recipe=recipe, layers=args.layers)


if __name__ == "__main__":
    main()
