"""Train the shapes-world diffusion transformer (``shapes-dit``) and save it as a diffusers pipeline.

    python -m sae_lens_multimodal.world.training.train_dit                  # retrain the shipped model in place (~1 h, one core)
    python -m sae_lens_multimodal.world.training.train_dit --out /tmp/dit --steps 200 --seed 1

The same recipe as the UNet's (world.training.train_diffusion, whose loop :func:`fit_denoiser` this
reuses): fresh world batches, captions naming colour, shape and position (size and "striped" half of the
time each), classifier-free-guidance dropout to ``""``, DDPM v-prediction on the cosine schedule, AdamW
with warm-up and cosine decay, gradient clipping and an EMA of the weights (saved). Only the denoiser
differs: an SD3-style ``SD3Transformer2DModel`` (``--kind sd3``, the default: joint attention over image and
text tokens, the pooled prompt added to the timestep embedding) or a PixArt-style ``PixArtTransformer2DModel``
(``--kind pixart``: cross-attention to the text tokens under their padding mask), world.dit.shapes_dit_config,
conditioned on the frozen shapes CLIP text tower and called as ``world.dit.ShapesDiTPipeline`` calls it.
Reproducible by seed (same seed, thread count, torch build and CPU give the same weights). Measured
figures (time per step, loss curve, the shapes CLIP's judgement of generated images) go to
``training.json`` next to the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from sae_lens_multimodal.world.dit import SHAPES_DIT_DIR, ShapesDiTPipeline, build_shapes_dit_pipeline, shapes_dit_config
from sae_lens_multimodal.world.training.train_diffusion import (
    DenoiserTrainConfig,
    _CaptionEncoder,
    evaluate_and_save,
    fit_denoiser,
    parse_train_args,
)

__all__ = ["DiTTrainConfig", "DiTTrainResult", "train_dit", "main"]

RETRAIN = "python -m sae_lens_multimodal.world.training.train_dit"
#: issue 19's bar for shapes-dit (the UNet's, eval_diffusion.TARGETS, asks less of shape and position)
DIT_TARGETS: dict[str, float] = {"color": 0.90, "shape": 0.80, "position": 0.90}


@dataclass
class DiTTrainConfig(DenoiserTrainConfig):
    """The shared denoiser settings (train_diffusion.DenoiserTrainConfig) with the DiT's kind and size.

    Measured on one core (figures in weights/shapes_dit/training.json): patch 2 (256 tokens) cost 4 s/step
    against 1 s/step for patch 4, too slow to train in about 35 minutes, so patches are 4x4. A PixArt-style
    model (cross-attention only, width 128, 2200 steps, 23 min) drew colour (91%) but no coherent shape:
    scattered 4x4 patches, position at chance (9.6%), shape 46%. The SD3-style model (joint attention and
    the pooled prompt in every block's adaLN, as the UNet gets it through its time embedding) learns
    position and colour in 2400 steps (10 min) but draws shape only with long training (judged by the shapes
    CLIP, 20 steps, chance 33%): 41% after 2400 steps, 61% after 5000 (19 min), 99.1% after 15000 (61 min,
    0.25 s/step; colour and position 100%): the shipped one. Patch 2 (0.85 s/step) reached only 36% in
    1200 steps (17 min)."""

    steps: int = 15000
    warmup_steps: int = 100
    #: "sd3" (SD3Transformer2DModel: joint attention, the pooled prompt in every block's adaLN) or "pixart"
    #: (PixArtTransformer2DModel: cross-attention to the text tokens)
    kind: str = "sd3"
    width: int = 96
    depth: int = 6
    heads: int = 4
    patch_size: int = 4


@dataclass
class DiTTrainResult:
    config: dict[str, Any]
    train_seconds: float
    seconds_per_step: float
    transformer_parameters: int
    #: (step, mean loss over the preceding log_every steps)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


def train_dit(cfg: DiTTrainConfig, *, progress: bool = True) -> tuple[ShapesDiTPipeline, DiTTrainResult]:
    """Train a fresh pipeline's transformer on the world; returns the pipeline (EMA weights) and the figures."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got {cfg.steps} and {cfg.batch_size}.")
    torch.set_num_threads(cfg.threads)
    pipe = build_shapes_dit_pipeline(
        transformer_config=shapes_dit_config(kind=cfg.kind, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                                             patch_size=cfg.patch_size),
        seed=cfg.seed,
    )
    transformer = pipe.transformer
    encoder = _CaptionEncoder(pipe)

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        states, mask, pooled = encoder(captions)
        return {"embeds": states, "mask": mask, "pooled": pooled}

    def predict(noisy: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return pipe.denoise(noisy, t, **cond)  # the transformer called as the pipeline calls it

    curve, seconds = fit_denoiser(transformer, encode, predict, cfg, desc="train shapes DiT", progress=progress)
    result = DiTTrainResult(
        config=asdict(cfg),
        train_seconds=round(seconds, 1),
        seconds_per_step=round(seconds / cfg.steps, 3),
        transformer_parameters=sum(p.numel() for p in transformer.parameters()),
        loss_curve=curve,
    )
    return pipe, result


def main(argv: Optional[list[str]] = None) -> None:
    cfg, out, per_prompt, progress = parse_train_args(DiTTrainConfig, SHAPES_DIT_DIR, __doc__, argv)
    pipe, result = train_dit(cfg, progress=progress)
    print(f"trained {cfg.steps} steps in {result.train_seconds:.0f} s ({result.seconds_per_step:.2f} s/step, "
          f"{cfg.threads} threads, {result.transformer_parameters} parameters); final loss {result.loss_curve[-1][1]:.4f}")
    evaluate_and_save(pipe, asdict(result), out, images_per_prompt=per_prompt, retrain=RETRAIN, progress=progress,
                      targets=DIT_TARGETS)


if __name__ == "__main__":
    main()
