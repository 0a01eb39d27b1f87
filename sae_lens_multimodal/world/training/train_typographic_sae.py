"""Train the bundled SAE of the typographic shapes CLIP (release ``shapes-clip-typographic-saes``).

    python -m sae_lens_multimodal.world.training.train_typographic_sae             # overwrites weights/saes/shapes-clip-typographic-saes/
    python -m sae_lens_multimodal.world.training.train_typographic_sae --hook blocks.0.hook_resid_post --out /tmp/saes

One TopK SAE per hook in ``TYPOGRAPHIC_HOOKS`` (the residual stream after blocks 0, 1, 2) of
``HookedViT.from_pretrained("shapes-clip-typographic")`` (= the vision tower of
``HookedCLIP.from_pretrained("shapes-clip-typographic")``), every token (CLS + 64 patches), trained through the package's own path (``ImageActivationStore`` -> ``train_sae``, i.e.
SAELens's ``SAETrainer``) on a mix of clean images and images with a colour name written on them, so its
dictionary has features for rendered text (docs/typographic.md uses them to suppress typographic
attacks). Saved in SAELens's own layout (``cfg.json`` + ``sae_weights.safetensors``, the ``bundled``
format of docs/releases.md) with the measured figures in ``cfg.json``'s metadata. One thread; the same
seed gives the same SAE on the same torch build and CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sae_lens_multimodal.world.training.train_saes import (
    BUNDLED_SAES_DIR,
    ClipSAERecipe,
    _environment,
    _overall,
    train_topk_vision_sae,
    write_sae_folder,
)

__all__ = ["TYPOGRAPHIC_RELEASE", "TYPOGRAPHIC_HOOK", "TYPOGRAPHIC_HOOKS", "TYPOGRAPHIC_MODEL", "TypographicSAERecipe",
           "train_typographic_sae", "main"]

TYPOGRAPHIC_RELEASE = "shapes-clip-typographic-saes"
#: The residual stream after blocks 0, 1 and 2 (of 4). Text is still on the word's own patches after
#: block 0; after block 2 the CLS token already carries the colour the model read (docs/typographic.md).
TYPOGRAPHIC_HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
TYPOGRAPHIC_HOOK = "blocks.0.hook_resid_post"  # the one docs/typographic.md suppresses text features with
TYPOGRAPHIC_MODEL = "shapes-clip-typographic"
REGENERATE = "python -m sae_lens_multimodal.world.training.train_typographic_sae"


@dataclass
class TypographicSAERecipe(ClipSAERecipe):
    """Settings of the typographic vision SAE (the defaults made the shipped one): the shapes-clip SAE's
    recipe, with a colour name written on half of the training images (any colour, own included)."""

    text_prob: float = 0.5


def _pixels(images: Any) -> torch.Tensor:
    import json

    from sae_lens_multimodal.world.clip import SHAPES_CLIP_TYPOGRAPHIC_DIR
    from sae_lens_multimodal.world.shapes import to_tensor

    config = json.loads((SHAPES_CLIP_TYPOGRAPHIC_DIR / "open_clip_config.json").read_text(encoding="utf-8"))
    pre = config["preprocess_cfg"]
    return to_tensor(images, mean=pre["mean"], std=pre["std"])


def train_typographic_sae(out_root: Path = BUNDLED_SAES_DIR, *, hook: str = TYPOGRAPHIC_HOOK, seed: int = 0,
                          recipe: Optional[TypographicSAERecipe] = None, progress: bool = True) -> dict[str, Any]:
    """Train the SAE at ``hook`` and write ``<out_root>/shapes-clip-typographic-saes/<hook>/``.
    Returns the metadata written into its ``cfg.json`` (``training``, ``evaluation``)."""

    from sae_lens_multimodal.models.hooked_vit import HookedViT
    from sae_lens_multimodal.training.cache import model_identity
    from sae_lens_multimodal.training.evaluate import evaluate_sae
    from sae_lens_multimodal.training.image_store import ImageActivationStore
    from sae_lens_multimodal.world.shapes import COLORS, ShapesWorld

    r = recipe or TypographicSAERecipe()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        vit = HookedViT.from_pretrained(TYPOGRAPHIC_MODEL).eval()
        fingerprint = model_identity(vit)["trunk_fingerprint"]  # the SAE fits these weights only (readout head aside)

        def rows(n: int, world_seed: int, text_prob: float) -> torch.Tensor:
            images, _ = ShapesWorld(32, seed=world_seed, text_prob=text_prob, text_words=tuple(COLORS)).sample(n)
            store = ImageActivationStore(vit, hook, _pixels(images), token_policy="all", batch_size=256,
                                         model_name=TYPOGRAPHIC_MODEL, progress=progress)
            return torch.cat(list(store.activation_batches(hook)))

        acts = rows(r.n_images, seed, r.text_prob)
        cache_s = time.perf_counter() - start
        sae, shipped, steps = train_topk_vision_sae(acts, hook=hook, model_name=TYPOGRAPHIC_MODEL, recipe=r, seed=seed)
        train_s = time.perf_counter() - start
        del acts

        clean = _overall(evaluate_sae(shipped, rows(r.eval_images, seed + 1000, r.eval_text_prob), n_rows=10**9), r.d_sae)
        with_text = _overall(evaluate_sae(shipped, rows(r.eval_images, seed + 2000, 1.0), n_rows=10**9), r.d_sae)
        metadata = {
            "release": TYPOGRAPHIC_RELEASE, "sae_id": hook, "model_name": TYPOGRAPHIC_MODEL,
            "model_class_name": "HookedViT", "hook_name": hook, "token_policy": "all",
            "input_kind": "block_output", "cfg_branch": None, "normalization": {"kind": "none"},
            "source_format": "bundled", "model_fingerprint": fingerprint,
            "expected_l0": clean["l0"], "expected_variance_explained": clean["explained_variance"],
            "training": {
                "data": f"ShapesWorld(32, seed={seed}, text_prob={r.text_prob}, text_words=colour names): every "
                        "factor varies; half the images carry a written colour name (any colour, the shape's "
                        "own included); all 65 tokens (CLS + 8x8 patches) of each image",
                "recipe": asdict(r), "rows": r.n_images * vit.cfg.n_ctx, "seed": seed, "architecture": "topk",
                "steps": steps, "caching_seconds": round(cache_s, 1), "wall_seconds": round(train_s, 1),
                **_environment(), "command": f"{REGENERATE} --hook {hook}",
            },
            "evaluation": {
                "data": f"{r.eval_images} fresh text-free images, ShapesWorld(32, seed={seed + 1000}), all tokens",
                **clean,
                "with_text": {"data": f"{r.eval_images} fresh images each with a colour name written, "
                                      f"ShapesWorld(32, seed={seed + 2000}, text_prob=1)", **with_text},
            },
        }
        write_sae_folder(sae, Path(out_root) / TYPOGRAPHIC_RELEASE / hook, metadata)
        return metadata
    finally:
        torch.set_num_threads(previous)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLED_SAES_DIR, help="root of the releases (default: the shipped one)")
    parser.add_argument("--hook", action="append", default=None,
                        help=f"vision-tower hook; repeat for several (default: all of {list(TYPOGRAPHIC_HOOKS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for hook in args.hook or TYPOGRAPHIC_HOOKS:
        meta = train_typographic_sae(args.out, hook=hook, seed=args.seed, progress=not args.quiet)
        ev = meta["evaluation"]
        print(f"{hook}: explained variance {ev['explained_variance']:.4f} clean, "
              f"{ev['with_text']['explained_variance']:.4f} with text; L0 {ev['l0']}; dead {ev['dead_fraction']:.1%}; "
              f"{meta['training']['wall_seconds']} s")


if __name__ == "__main__":
    main()
