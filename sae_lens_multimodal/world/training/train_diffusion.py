"""Train the shapes-world text-to-image diffusion model and save it as a diffusers pipeline.

    python -m sae_lens_multimodal.world.training.train_diffusion                  # retrain the shipped model in place
    python -m sae_lens_multimodal.world.training.train_diffusion --out /tmp/sd --steps 200 --seed 1

Every batch is freshly drawn from the world (no fixed dataset). Captions always name colour, shape and
position and, half of the time each, the size and "striped" (training images carry no written words).
Classifier-free guidance dropout: a caption is replaced by ``""`` with probability ``p_uncond``, the
unconditional prompt the pipeline uses. The text encoder (the shapes CLIP's text tower) is frozen; each
distinct caption is encoded once. Objective: DDPM v-prediction (``DDPMScheduler.add_noise`` /
``get_velocity``, uniform timesteps, plain MSE), AdamW with warm-up and cosine decay, gradient clipping,
and an exponential moving average of the weights (saved). Reproducible by seed: the same seed, thread count,
torch build and CPU give the same weights. Default settings take about 15 minutes on one core of a busy
2-core machine; measured figures (time per step, loss curve, evaluation) are written to
``training.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from sae_lens_multimodal.world.diffusion import (
    SHAPES_DIFFUSION_DIR,
    ShapesDiffusionPipeline,
    build_shapes_pipeline,
    save_pipeline_atomically,
    shapes_scheduler_config,
    shapes_unet_config,
)
from sae_lens_multimodal.world.shapes import ShapesWorld, caption, to_tensor

__all__ = ["DenoiserTrainConfig", "TrainConfig", "TrainResult", "fit_denoiser", "train_diffusion", "parse_train_args",
           "evaluate_and_save", "main"]


@dataclass
class DenoiserTrainConfig:
    """Settings of :func:`fit_denoiser` shared by every shapes-world denoiser (UNet here, DiT in train_dit.py)."""

    seed: int = 0
    steps: int = 1800
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    #: Probability of replacing a caption by "" (classifier-free guidance dropout).
    p_uncond: float = 0.1
    p_size: float = 0.5  # probability a caption mentions the size
    p_texture: float = 0.5  # ... mentions "striped" (for striped shapes)
    #: min-SNR-gamma loss weighting (0: off, the default). A trial run with gamma 5 on noise prediction
    #: starved the low-noise timesteps: its samples kept visible noise.
    snr_gamma: float = 0.0
    #: EMA decay of the saved weights (warmed up as min(decay, (1 + step) / (10 + step))); 0 disables.
    ema_decay: float = 0.995
    log_every: int = 25
    #: One thread: on a 2-core machine shared with other jobs, 2 threads measured 8x slower per step
    #: (OpenMP threads waiting on each other); one thread is also bit-for-bit reproducible.
    threads: int = 1


@dataclass
class TrainConfig(DenoiserTrainConfig):
    """The UNet's settings: the shared ones plus its size (see diffusion.shapes_unet_config)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1


@dataclass
class TrainResult:
    config: dict[str, Any]
    train_seconds: float
    seconds_per_step: float
    unet_parameters: int
    #: (step, mean loss over the preceding log_every steps)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


class _CaptionEncoder:
    """Frozen text-tower outputs per caption, computed once per distinct caption: the pipeline's
    ``encode_prompt`` (token states, and for the DiT also their attention mask), always as a tuple."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            out = self.pipe.encode_prompt(new, torch.device("cpu"))
            parts = out if isinstance(out, tuple) else (out,)
            self.cache.update({c: tuple(p[i] for p in parts) for i, c in enumerate(new)})
        rows = [self.cache[c] for c in captions]
        return tuple(torch.stack([r[k] for r in rows]) for k in range(len(rows[0])))


def _captions(factors: list, rng: np.random.Generator, cfg: DenoiserTrainConfig) -> list[str]:
    out = []
    for f in factors:
        size, texture, drop = rng.random(3)
        if drop < cfg.p_uncond:
            out.append("")
        else:
            out.append(caption(f, size=bool(size < cfg.p_size), texture=bool(texture < cfg.p_texture), text=False))
    return out


def _lr_factor(step: int, cfg: DenoiserTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit_denoiser(
    denoiser: torch.nn.Module,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    predict: Callable[..., torch.Tensor],
    cfg: DenoiserTrainConfig,
    *,
    desc: str = "train",
    progress: bool = True,
) -> tuple[list[tuple[int, float]], float]:
    """The shapes-world denoiser training loop, shared by the UNet (here) and the DiT (train_dit.py).

    ``encode(captions)``: the
    denoiser's text conditioning as keyword arguments (``{"encoder_hidden_states": ...}``);
    ``predict(noisy, t, **conditioning)``: the denoiser's output. Fresh world batches, v-prediction (or
    epsilon, as the scheduler config says), AdamW with warm-up and cosine decay, gradient clipping; the EMA
    weights (if any) are loaded into ``denoiser`` at the end. Returns the loss curve and the seconds taken."""
    denoiser.train()
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    noise_scheduler = DDPMScheduler(**shapes_scheduler_config())
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    world = ShapesWorld(image_size=int(denoiser.config.sample_size), seed=cfg.seed, text_prob=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))

    curve: list[tuple[int, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for step in bar:
        images, factors = world.sample(cfg.batch_size)
        x0 = to_tensor(images) * 2 - 1
        cond = encode(_captions(factors, rng, cfg))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = predict(noisy, t, **cond)
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:
            # min(SNR, gamma) / SNR for noise prediction; / (SNR + 1) for v-prediction (same x0 weighting).
            denom = snr[t] + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr[t]
            weight = torch.clamp(snr[t], max=cfg.snr_gamma) / denom
            loss = (weight * per_image).mean()
        else:
            loss = per_image.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), denoiser.parameters()):
                    e.lerp_(p, 1 - decay)
        window.append(float(per_image.detach().mean()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, float(np.mean(window))))
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            window = []
    seconds = time.perf_counter() - start
    if ema is not None:
        denoiser.load_state_dict(ema.state_dict())
    denoiser.eval()
    return curve, seconds


def train_diffusion(cfg: TrainConfig, *, progress: bool = True) -> tuple[ShapesDiffusionPipeline, TrainResult]:
    """Train a fresh pipeline's UNet on the world; returns the pipeline (EMA weights) and the figures."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got {cfg.steps} and {cfg.batch_size}.")
    torch.set_num_threads(cfg.threads)
    pipe = build_shapes_pipeline(
        unet_config=shapes_unet_config(
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block
        ),
        seed=cfg.seed,
    )
    unet = pipe.unet
    encoder = _CaptionEncoder(pipe)
    curve, seconds = fit_denoiser(
        unet,
        lambda captions: {"encoder_hidden_states": encoder(captions)[0]},
        lambda noisy, t, **cond: unet(noisy, t, **cond, return_dict=False)[0],
        cfg,
        desc="train shapes diffusion",
        progress=progress,
    )
    result = TrainResult(
        config=asdict(cfg),
        train_seconds=round(seconds, 1),
        seconds_per_step=round(seconds / cfg.steps, 3),
        unet_parameters=sum(p.numel() for p in unet.parameters()),
        loss_curve=curve,
    )
    return pipe, result


def parse_train_args(config_class: type, default_out: Path, description: Optional[str],
                     argv: Optional[list[str]]) -> tuple[Any, Path, int, bool]:
    """Command-line options for every field of ``config_class`` (a dataclass; tuple fields take several
    values) plus ``--out``, ``--eval-images-per-prompt`` and ``--no-progress``; returns (config, out,
    images per prompt, progress)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_out, help="output directory (default: the shipped model)")
    tuples = set()
    for name, value in asdict(config_class()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, tuple):
            tuples.add(name)
            parser.add_argument(flag, type=type(value[0]), nargs="+", default=list(value))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--eval-images-per-prompt", type=int, default=2,
                        help="after training, generate this many images per colour x shape x position prompt and "
                             "classify them with the shapes CLIP (0: skip)")
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    per_prompt = args.pop("eval_images_per_prompt")
    progress = not args.pop("no_progress")
    for name in tuples:
        args[name] = tuple(args[name])
    return config_class(**args), out, per_prompt, progress


def evaluate_and_save(pipe: Any, record: dict[str, Any], out: Path, *, images_per_prompt: int, retrain: str,
                      progress: bool = True, targets: Optional[dict[str, float]] = None) -> None:
    """Judge ``pipe`` with the shapes CLIP (``images_per_prompt`` per prompt; 0 skips) against ``targets``
    (default: eval_diffusion.TARGETS, the UNet's), add the evaluation and the ``retrain`` command to ``record``
    and save both atomically (``training.json`` beside the weights)."""
    if images_per_prompt > 0:
        from sae_lens_multimodal.world.eval_diffusion import evaluate_pipeline

        pipe.set_progress_bar_config(disable=True)
        evaluation = evaluate_pipeline(pipe, images_per_prompt=images_per_prompt, progress=progress)
        if targets is not None:
            evaluation.targets = dict(targets)
        print(evaluation)
        record["evaluation"] = evaluation.to_dict()
    record["retrain"] = retrain
    save_pipeline_atomically(pipe, out, {"training.json": json.dumps(record, indent=2) + "\n"})
    print(f"saved to {out}")


def main(argv: Optional[list[str]] = None) -> None:
    cfg, out, per_prompt, progress = parse_train_args(TrainConfig, SHAPES_DIFFUSION_DIR, __doc__, argv)
    pipe, result = train_diffusion(cfg, progress=progress)
    print(f"trained {cfg.steps} steps in {result.train_seconds:.0f} s ({result.seconds_per_step:.2f} s/step, "
          f"{cfg.threads} threads); final loss {result.loss_curve[-1][1]:.4f}")
    evaluate_and_save(pipe, asdict(result), out, images_per_prompt=per_prompt,
                      retrain="python -m sae_lens_multimodal.world.training.train_diffusion", progress=progress)


if __name__ == "__main__":
    main()
