"""Train the shapes-world CLIP contrastively and save it in open_clip's local-dir layout.

    python -m sae_lens_multimodal.world.training.train_clip                 # retrain the shipped model in place
    python -m sae_lens_multimodal.world.training.train_clip --out /tmp/my_clip --steps 600 --seed 1

Every batch is freshly drawn from the world (no fixed dataset, so no overfitting). Captions mention the
colour, shape and position always, the size and the texture ("plain"/"striped") half of the time, and
the written word (when the image has one) 80% of the time, so prompts may leave details out. Each image
also brings a hard-negative caption (its caption with the size, texture or word made false), without
which the model never needs to look at those details. Because many images in a batch share a caption,
the contrastive targets are multi-positive: caption j is a positive for image i when everything
caption j says is true of image i. Reproducible by seed (bitwise for the same torch build and
CPU). Default settings reach >= 95% zero-shot accuracy over the 162 colour x shape x position captions
in a few minutes on one CPU core (see README.md for measured figures).

``--typographic-prob p`` (default 0: off) writes, on a fraction p of the images that carry no other
word, the image's OWN colour name, which the caption does not mention: written text then correlates with
what the caption says, as it does on the web, and the model learns to read the word as colour evidence.
``--typographic-fade f`` fades the shape's colour of those images towards grey by a random fraction up to
f, so on some of them the word is the clearer evidence. ``--variant typographic`` selects the settings of
the shipped "shapes-clip-typographic" model (weights/shapes_clip_typographic/):

    python -m sae_lens_multimodal.world.training.train_clip --variant typographic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_lens_multimodal.world.clip import (
    SHAPES_CLIP_DIR,
    SHAPES_CLIP_TYPOGRAPHIC_DIR,
    ZeroShotResult,
    load_shapes_clip,
    typographic_attack,
    save_open_clip_dir,
    shapes_clip_config,
    zero_shot_accuracy,
)
from sae_lens_multimodal.world.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXT_ROWS,
    TEXT_WORDS,
    TEXTURES,
    ShapeFactors,
    ShapesWorld,
    caption,
    to_tensor,
)

__all__ = ["TYPOGRAPHIC_SETTINGS", "VARIANTS", "TrainConfig", "train_clip", "training_batch", "main"]


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 900
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    # Model shape (open_clip CLIPVisionCfg / CLIPTextCfg fields, see clip.shapes_clip_config).
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 4
    text_width: int = 64
    text_layers: int = 3
    embed_dim: int = 64
    context_length: int = 16
    # Data.
    text_prob: float = 0.5  # fraction of training images with a written word (so the model learns to read)
    p_size: float = 0.5  # probability a caption mentions the size
    p_texture: float = 0.5  # ... mentions the texture
    p_text: float = 0.8  # ... mentions the written word (for images with one)
    # Typographic training (0: off, the shipped shapes-clip): fraction of word-free images on which the
    # image's own colour name is written (unmentioned by the caption), and the most their shape's colour
    # is faded towards grey (0: never).
    typographic_prob: float = 0.0
    typographic_fade: float = 0.0
    # Evaluation and compute.
    eval_every: int = 150
    eval_images: int = 500
    final_eval_images: int = 2000
    threads: int = 1  # one thread: bit-for-bit reproducible on a given torch build and CPU


#: Settings of the shipped CLIP ("shapes-clip") and of the typographic variant ("shapes-clip-typographic"):
#: no unrelated words (written text only ever names the image's own colour), the own colour written on
#: 80% of the images, their colour faded towards grey by a uniform random fraction (up to all of it).
#: Chosen from a sweep (900 steps each; figures in weights/shapes_clip_typographic/training.json).
TYPOGRAPHIC_SETTINGS: dict[str, Any] = {"text_prob": 0.0, "typographic_prob": 0.8, "typographic_fade": 1.0}
VARIANTS: dict[str, tuple[dict[str, Any], Path]] = {
    "default": ({}, SHAPES_CLIP_DIR),
    "typographic": (TYPOGRAPHIC_SETTINGS, SHAPES_CLIP_TYPOGRAPHIC_DIR),
}


def training_batch(
    world: ShapesWorld, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], torch.Tensor]:
    """``(images, captions, positives)`` with ``batch_size`` images and twice as many captions: one caption
    per image, then one hard negative per image (its caption with the size, texture or word changed to a
    false value, so the batch cannot be solved from colour, shape and position alone and the model must
    learn to read). ``positives[i, j]`` is True when caption j is true of image i."""
    factors = world.sample_factors(cfg.batch_size)
    typographic = np.zeros(len(factors), dtype=bool)
    if cfg.typographic_prob > 0:  # (draws nothing otherwise: the default run stays bit-identical)
        factors, typographic = _write_own_colour(factors, cfg, rng)
    images = world.render(factors)
    n = len(factors)
    size = np.array([SIZES.index(f.size) for f in factors])
    striped = np.array([TEXTURES.index(f.texture) for f in factors])
    word = np.array([TEXT_WORDS.index(f.text) if f.text in TEXT_WORDS else -1 for f in factors])
    core = np.array(
        [tuple(COLORS).index(f.color) * 1000 + SHAPES.index(f.shape) * 10 + POSITIONS.index(f.position) for f in factors]
    )
    said_size = rng.random(n) < cfg.p_size
    said_texture = rng.random(n) < cfg.p_texture
    said_word = (rng.random(n) < cfg.p_text) & (word >= 0) & ~typographic

    # Hard negatives: change one attribute to a false value and mention it.
    neg_size, neg_texture, neg_word = size.copy(), striped.copy(), word.copy()
    neg_said_size, neg_said_texture, neg_said_word = said_size.copy(), said_texture.copy(), said_word.copy()
    which = rng.integers(0, 3, n)
    other_word = (np.maximum(word, 0) + rng.integers(1, len(TEXT_WORDS), n)) % len(TEXT_WORDS)
    other_word = np.where(word >= 0, other_word, rng.integers(0, len(TEXT_WORDS), n))
    neg_size[which == 0], neg_said_size[which == 0] = 1 - size[which == 0], True
    neg_texture[which == 1], neg_said_texture[which == 1] = 1 - striped[which == 1], True
    neg_word[which == 2], neg_said_word[which == 2] = other_word[which == 2], True

    def describe(sz: np.ndarray, tx: np.ndarray, wd: np.ndarray, s_sz: np.ndarray, s_tx: np.ndarray, s_wd: np.ndarray) -> list[str]:
        return [
            caption(
                {"color": f.color, "shape": f.shape, "position": f.position, "size": SIZES[sz[i]],
                 "texture": TEXTURES[tx[i]], "text": TEXT_WORDS[wd[i]] if s_wd[i] else None},
                size=bool(s_sz[i]), texture=bool(s_tx[i]),
            )
            for i, f in enumerate(factors)
        ]

    captions = describe(size, striped, word, said_size, said_texture, said_word) + describe(
        neg_size, neg_texture, neg_word, neg_said_size, neg_said_texture, neg_said_word
    )
    t = lambda *arrays: torch.from_numpy(np.concatenate(arrays))  # noqa: E731
    c_core, c_size, c_texture, c_word = t(core, core), t(size, neg_size), t(striped, neg_texture), t(word, neg_word)
    s_size, s_texture, s_word = t(said_size, neg_said_size), t(said_texture, neg_said_texture), t(said_word, neg_said_word)
    i_core, i_size, i_texture, i_word = (torch.from_numpy(a) for a in (core, size, striped, word))
    positives = (
        (i_core[:, None] == c_core[None, :])
        & (~s_size[None, :] | (i_size[:, None] == c_size[None, :]))
        & (~s_texture[None, :] | (i_texture[:, None] == c_texture[None, :]))
        & (~s_word[None, :] | (i_word[:, None] == c_word[None, :]))
    )
    return images, captions, positives


#: Grey that typographic training fades colours towards.
_GREY = np.array([128.0, 128.0, 128.0])


def _write_own_colour(
    factors: list[ShapeFactors], cfg: TrainConfig, rng: np.random.Generator
) -> tuple[list[ShapeFactors], np.ndarray]:
    """Write its own colour name on a ``typographic_prob`` fraction of the word-free images (in a row the
    shape is not in) and fade their colour towards grey by up to ``typographic_fade``; returns the new
    factors and which images were changed."""
    n = len(factors)
    chosen = (rng.random(n) < cfg.typographic_prob) & np.array([f.text is None for f in factors])
    row_offset = rng.integers(1, 3, n)
    fade = rng.uniform(0.0, cfg.typographic_fade, n) if cfg.typographic_fade > 0 else np.zeros(n)
    out = list(factors)
    for i in np.nonzero(chosen)[0]:
        f = factors[i]
        rgb = np.rint((1 - fade[i]) * np.array(f.rgb, dtype=np.float64) + fade[i] * _GREY).astype(int)
        out[i] = dataclasses.replace(
            f,
            text=f.color,
            text_row=TEXT_ROWS[(POSITIONS.index(f.position) // 3 + int(row_offset[i])) % 3],
            rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        )
    return out, chosen


def _multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss whose targets spread evenly over every true caption (image -> text) and every
    matching image (text -> image; only for captions true of some image in the batch)."""
    pos = positives.float()
    t_img = pos / pos.sum(1, keepdim=True)
    has_image = pos.sum(0) > 0
    t_txt = pos.T[has_image] / pos.T[has_image].sum(1, keepdim=True)
    return 0.5 * (
        -(t_img * F.log_softmax(logits, dim=1)).sum(1).mean()
        - (t_txt * F.log_softmax(logits.T[has_image], dim=1)).sum(1).mean()
    )


def train_clip(
    cfg: TrainConfig, out: Optional[Path] = SHAPES_CLIP_DIR, *, progress: bool = True
) -> tuple[Any, ZeroShotResult, dict[str, Any]]:
    """Train from scratch; save to ``out`` (None: do not save). Returns (model, final evaluation, metadata).
    Runs on ``cfg.threads`` torch threads and restores the caller's thread count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out, progress)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: TrainConfig, out: Optional[Path], progress: bool) -> tuple[Any, ZeroShotResult, dict[str, Any]]:
    import open_clip
    from open_clip.factory import get_tokenizer

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    config = shapes_clip_config(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_width=cfg.vision_width,
        vision_layers=cfg.vision_layers,
        text_width=cfg.text_width,
        text_layers=cfg.text_layers,
        embed_dim=cfg.embed_dim,
        context_length=cfg.context_length,
    )
    model = open_clip.CLIP(**config["model_cfg"])
    model.train()

    # The tokenizer is open_clip's own, read from a directory holding the tokenizer files.
    import tempfile

    from sae_lens_multimodal.world.clip import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(tmp, config["model_cfg"]["text_cfg"]["context_length"])
        Path(tmp, "open_clip_config.json").write_text(json.dumps(config))
        tokenizer = get_tokenizer(f"local-dir:{tmp}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    world = ShapesWorld(image_size=cfg.image_size, seed=cfg.seed, text_prob=cfg.text_prob)
    mean, std = config["preprocess_cfg"]["mean"], config["preprocess_cfg"]["std"]
    start, cpu_start = time.perf_counter(), time.process_time()
    history = []
    bar = tqdm(range(cfg.steps), desc="training shapes CLIP", disable=not progress)
    for step in bar:
        images, captions, positives = training_batch(world, cfg, rng)
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        image_emb = F.normalize(model.encode_image(to_tensor(images, mean, std)), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
        loss = _multi_positive_loss(logits, positives)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as in CLIP training
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            res = zero_shot_accuracy(model, tokenizer, n=cfg.eval_images, seed=10_000 + step, verbose=False)
            model.train()
            history.append({"step": step + 1, "accuracy": res.accuracy, "seconds": time.perf_counter() - start})
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, zero-shot accuracy {res.accuracy:.1%}")
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()
    final = zero_shot_accuracy(model, tokenizer, n=cfg.final_eval_images, seed=12345)
    fine = zero_shot_accuracy(
        model, tokenizer, n=cfg.final_eval_images, seed=12346,
        class_factors=("color", "shape", "position", "size", "texture"),
    )
    reading = zero_shot_accuracy(
        model, tokenizer, n=cfg.final_eval_images, seed=12347,
        class_factors=("color", "shape", "position", "text"), world_kwargs={"text_prob": 1.0},
    )
    attack = typographic_attack(model, tokenizer, n=cfg.final_eval_images)
    metadata = {
        "train_config": asdict(cfg),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "zero_shot_accuracy": round(final.accuracy, 4),
        "zero_shot_factor_accuracy": {k: round(v, 4) for k, v in final.factor_accuracy.items()},
        "eval": f"{cfg.final_eval_images} fresh images, ShapesWorld(seed=12345, text_prob=0), "
        "162 colour x shape x position captions",
        "zero_shot_accuracy_648_classes_with_size_texture": round(fine.accuracy, 4),
        "zero_shot_factor_accuracy_648_classes": {k: round(v, 4) for k, v in fine.factor_accuracy.items()},
        "reading_accuracy_written_word": round(reading.factor_accuracy["text"], 4),
        "typographic_attack": {k: round(v, 4) for k, v in attack.items()},
        "history": history,
        "retrain": _retrain_command(cfg),
    }
    if out is not None:
        save_open_clip_dir(model, out, {**config, "shapes_world_training": metadata})
        # Check the saved directory through open_clip's own loader before reporting success.
        reloaded, reloaded_tok = load_shapes_clip(out)
        check = zero_shot_accuracy(reloaded, reloaded_tok, n=cfg.final_eval_images, seed=12345, verbose=False)
        if abs(check.accuracy - final.accuracy) > 1e-9:
            raise RuntimeError(f"Reloaded model scores {check.accuracy} but the trained one {final.accuracy}.")
        if cfg.typographic_prob > 0:  # the variant also gets its figures as a plain file beside the weights
            from sae_lens_multimodal.world.clip import _write_json

            _write_json(Path(out) / "training.json", metadata)
        print(f"saved to {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"training took {train_seconds:.1f} s ({cpu_seconds:.1f} s CPU) on {torch.get_num_threads()} thread(s)")
    return model, final, metadata


def _retrain_command(cfg: TrainConfig) -> str:
    """The command line that trains ``cfg`` again: its variant plus the options that differ from it."""
    variant = "typographic" if all(getattr(cfg, k) == v for k, v in TYPOGRAPHIC_SETTINGS.items()) else "default"
    base = asdict(TrainConfig(**VARIANTS[variant][0]))
    options = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != base[k]]
    return " ".join(["python -m sae_lens_multimodal.world.training.train_clip"]
                    + (["--variant typographic"] if variant == "typographic" else []) + options)


def main(argv: Optional[list[str]] = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    variant = pre.parse_known_args(argv)[0].variant
    settings, default_out = VARIANTS[variant]
    defaults = TrainConfig(**settings)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default",
                        help="settings of a shipped model: 'default' (shapes-clip) or 'typographic' "
                        "(shapes-clip-typographic); other options override them")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=default_out, help="output directory (default: the variant's shipped model)")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = vars(parser.parse_args(argv))
    args.pop("variant")
    out = None if args.pop("no_save") else args.pop("out")
    args.pop("out", None)
    train_clip(TrainConfig(**args), out)


if __name__ == "__main__":
    main()
