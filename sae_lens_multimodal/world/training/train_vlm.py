"""Train the shapes-world VLM (``"shapes-vlm"``, ``weights/shapes_vlm/``).

    python -m sae_lens_multimodal.world.training.train_vlm                   # overwrites weights/shapes_vlm/
    python -m sae_lens_multimodal.world.training.train_vlm --out /tmp/vlm --seed 1 --steps 600
    python -m sae_lens_multimodal.world.training.train_vlm --tower shapes-clip-typographic  # weights/shapes_vlm_typographic/

The model is :func:`sae_lens_multimodal.world.vlm.build_shapes_vlm`: the shipped shapes CLIP's vision tower
(frozen), a GELU projector and a small Llama, a transformers ``LlavaForConditionalGeneration``. Every step
draws fresh world images (a quarter carry a written word, as for the CLIP), asks each image about one factor
(colour, shape, position, size or texture, uniformly, with a phrasing drawn from ``QUESTIONS``) and trains the
projector and language model with cross-entropy on the answer tokens and end-of-text only. AdamW, linear
warm-up then cosine decay, gradient clipping at 1. Held-out accuracy is measured at the end by greedy
generation through ``HookedVLM`` on fresh images of another seed, per factor, without and with written words;
the figures, settings and timings go to ``training.json`` beside the weights. The folder is replaced only
once complete. One thread (``torch.set_num_threads(1)``): the same seed gives the same model on the same
torch build and CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.core.atomic import atomic_directory
from sae_lens_multimodal.world.paths import (
    SHAPES_CLIP_DIR,
    SHAPES_CLIP_TYPOGRAPHIC_DIR,
    SHAPES_VLM_DIR,
    SHAPES_VLM_TYPOGRAPHIC_DIR,
)
from sae_lens_multimodal.world.training.train_clip import _write_own_colour  # the typographic CLIP's data recipe

__all__ = ["TOWERS", "VLMRecipe", "training_batch", "train_vlm", "main"]

REGENERATE = "python -m sae_lens_multimodal.world.training.train_vlm"
#: Vision towers a shapes VLM can be built on: name -> (the CLIP's folder, where that VLM is shipped).
TOWERS: dict[str, tuple[Path, Path]] = {
    "shapes-clip": (SHAPES_CLIP_DIR, SHAPES_VLM_DIR),
    "shapes-clip-typographic": (SHAPES_CLIP_TYPOGRAPHIC_DIR, SHAPES_VLM_TYPOGRAPHIC_DIR),
}


@dataclass
class VLMRecipe:
    """Settings of the shapes VLM (the defaults made the shipped one)."""

    seed: int = 0
    tower: str = "shapes-clip"  # the shipped CLIP whose vision tower is used (a key of TOWERS)
    steps: int = 1800
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_mlp: int = 384
    vision_feature_layer: int = -1  # the tower's last residual stream (LLaVA-1.5 uses -2: shape stayed at 94%)
    vision_feature_select_strategy: str = "full"  # keep the CLS token
    text_prob: float = 0.25  # share of training images with a written word
    # The typographic CLIP's data recipe (train_clip --variant typographic), off by default: write each image's own
    # colour name on this share of the word-free images and fade its colour towards grey by up to typographic_fade.
    typographic_prob: float = 0.0
    typographic_fade: float = 0.0
    log_every: int = 50
    eval_images: int = 1000  # held-out images per evaluation (each factor asked about 1/5 of them)
    eval_seed: int = 10_000  # the held-out images' seed; training draws from seed .. (never this one)
    init: str = ""  # a previous run's folder to continue training from (its weights; the seed draws new images)


def training_batch(processor: Any, world: Any, rng: np.random.Generator, batch_size: int,
                   recipe: Optional["VLMRecipe"] = None) -> dict[str, torch.Tensor]:
    """One batch: fresh images, one question each, the answer and end-of-text appended; ``labels`` is -100
    everywhere but the answer and end-of-text tokens (right padding). With ``recipe.typographic_prob`` > 0,
    some images carry their own colour name (the typographic CLIP's training data; answers stay the truth)."""
    from sae_lens_multimodal.world.vlm import ASKED_FACTORS, EOS, QUESTIONS, answer_of, prompt

    if recipe is not None and recipe.typographic_prob > 0:  # (draws nothing otherwise: default runs stay identical)
        truth, _ = _write_own_colour(world.sample_factors(batch_size), recipe, rng)  # type: ignore[arg-type]
        images = world.render(truth)
    else:
        images, truth = world.sample(batch_size)
    asked = [ASKED_FACTORS[i] for i in rng.integers(len(ASKED_FACTORS), size=batch_size)]
    questions = [QUESTIONS[f][rng.integers(len(QUESTIONS[f]))] for f in asked]
    prompts = [prompt(q) for q in questions]
    full = [f"{p} {answer_of(t, f)}{EOS}" for p, t, f in zip(prompts, truth, asked)]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        batch = processor(images=list(images), text=full, return_tensors="pt", padding=True)
        prompt_lengths = [len(ids) for ids in processor(images=list(images), text=prompts)["input_ids"]]
    finally:
        tokenizer.padding_side = side
    labels = batch["input_ids"].clone()
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for row, n in enumerate(prompt_lengths):
        keep[row, n:] = True
    labels[~keep | (batch["attention_mask"] == 0)] = -100
    batch["labels"] = labels
    return dict(batch)


def _lr_factor(step: int, recipe: VLMRecipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model: Any, processor: Any, recipe: VLMRecipe) -> dict[str, Any]:
    """Held-out accuracy by greedy generation through HookedVLM, without and with written words."""
    from sae_lens_multimodal.models.vlm import HookedVLM
    from sae_lens_multimodal.world.vlm import vlm_accuracy

    hooked = HookedVLM.from_pretrained(model, processor=processor)
    out = {}
    for name, text_prob in (("clean", 0.0), ("with_words", 1.0)):
        acc = vlm_accuracy(hooked, recipe.eval_images, seed=recipe.eval_seed, text_prob=text_prob)
        print(f"held-out accuracy, {name}: {acc}", flush=True)
        out[name] = {"overall": acc.overall, "per_factor": acc.per_factor, "n": acc.n}
    return out


def train_vlm(recipe: VLMRecipe, out: Optional[Path] = SHAPES_VLM_DIR) -> dict[str, Any]:
    """Build, train, evaluate and (unless ``out`` is None) save the VLM; returns the figures."""
    if recipe.tower not in TOWERS:
        raise ValueError(f"Unknown vision tower {recipe.tower!r}; choose one of {sorted(TOWERS)}.")
    from sae_lens_multimodal.world.shapes import ShapesWorld
    from sae_lens_multimodal.world.vlm import build_shapes_vlm

    from sae_lens_multimodal.models.vlm import HookedVLM

    torch.set_num_threads(1)
    model, processor = build_shapes_vlm(TOWERS[recipe.tower][0], d_model=recipe.d_model, n_layers=recipe.n_layers,
                                        n_heads=recipe.n_heads, d_mlp=recipe.d_mlp, vision_feature_layer=recipe.vision_feature_layer,
                                        vision_feature_select_strategy=recipe.vision_feature_select_strategy,
                                        seed=recipe.seed)
    HookedVLM.from_pretrained(model)  # the evaluation's conversions fail (if they do) now, not after training
    previous = None
    if recipe.init:
        from transformers import LlavaForConditionalGeneration  # its own reader: saved keys use its layout

        model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(recipe.init).state_dict(), strict=True)
        previous = json.loads((Path(recipe.init) / "training.json").read_text(encoding="utf-8"))
        print(f"continuing from {recipe.init}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in params):,} (vision tower frozen)", flush=True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, recipe))
    world = ShapesWorld(image_size=32, seed=recipe.seed, text_prob=recipe.text_prob)
    rng = np.random.default_rng(recipe.seed + 1)
    history = []
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    model.model.vision_tower.eval()
    running = None
    for step in range(recipe.steps):
        batch = training_batch(processor, world, rng, recipe.batch_size, recipe)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % recipe.log_every == 0 or step == recipe.steps - 1:
            seconds = time.perf_counter() - start
            history.append({"step": step + 1, "loss": round(running, 5), "seconds": round(seconds, 1)})
            print(f"step {step + 1}/{recipe.steps} loss {running:.4f} ({seconds:.0f} s)", flush=True)
    train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    eval_start = time.perf_counter()
    accuracy = evaluate(model, processor, recipe)
    figures = {
        "recipe": dataclasses.asdict(recipe),
        "held_out_accuracy": accuracy,
        "train_seconds_wall": round(train_seconds, 1),
        "train_seconds_cpu": round(cpu_seconds, 1),
        "eval_seconds_wall": round(time.perf_counter() - eval_start, 1),
        "history": history,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "regenerate": REGENERATE + ("" if recipe.tower == "shapes-clip" else f" --tower {recipe.tower}"),
        "continued_from": previous,
    }
    if out is not None:
        with atomic_directory(Path(out).resolve()) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            (tmp / "training.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
            for path in tmp.iterdir():  # transformers writes the weights private (0600); shipped files are shared
                path.chmod(0o644)
        print(f"saved to {out}", flush=True)
    return figures


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(VLMRecipe):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the shipped model of --tower, see TOWERS)")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    args = parser.parse_args(argv)
    recipe = VLMRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VLMRecipe)})
    if recipe.tower not in TOWERS:
        parser.error(f"--tower must be one of {sorted(TOWERS)}; got {recipe.tower!r}.")
    out = args.out if args.out is not None else TOWERS[recipe.tower][1]
    train_vlm(recipe, None if args.no_save else out)


if __name__ == "__main__":
    main()
