"""Does the shapes-world diffusion model draw what the prompt says? Measured with the shapes CLIP.

    python -m sae_lens_multimodal.world.eval_diffusion                       # the shipped model
    python -m sae_lens_multimodal.world.eval_diffusion --images-per-prompt 4 --steps 20 --guidance-scale 2

For every colour x shape x position combination (6 x 3 x 9 = 162 prompts, "a red circle on the left") the
pipeline generates ``images_per_prompt`` images; the shapes CLIP classifies each image zero-shot **per
factor**: the softmax over the 162 caption classes (logit scale applied, as open_clip computes logits) is
summed over the classes sharing a factor value, and the most probable value is the prediction. Printed:
accuracy per factor (targets: colour >= 90%, position >= 80%, shape >= 70%), the fraction of images with
all three right, per-value accuracies, and the same classifier's accuracy on real world images (its
ceiling).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_lens_multimodal.world.clip import encode_world_images, load_shapes_clip
from sae_lens_multimodal.world.diffusion import ShapesDiffusionPipeline, load_shapes_pipeline, to_uint8
from sae_lens_multimodal.world.shapes import (
    CLASS_FACTORS,
    ShapesWorld,
    all_captions,
    caption,
    class_factor_combinations,
)

__all__ = ["TARGETS", "FactorClassifier", "DiffusionEval", "evaluate_pipeline", "main"]

#: The issue's targets: fraction of generated images whose factor matches the prompt.
TARGETS: dict[str, float] = {"color": 0.90, "position": 0.80, "shape": 0.70}


class FactorClassifier:
    """Zero-shot classification of world-format images (uint8 [n, H, W, 3]) per factor with the shapes
    CLIP: class probabilities over every combination of ``factors`` marginalised onto each factor."""

    def __init__(self, clip_dir: Any = None, factors: Sequence[str] = CLASS_FACTORS) -> None:
        self.model, tokenizer = load_shapes_clip(clip_dir)
        self.factors = tuple(factors)
        self.classes = class_factor_combinations(self.factors)
        with torch.no_grad():
            text = self.model.encode_text(tokenizer(all_captions(self.factors)))
            self.text = torch.nn.functional.normalize(text, dim=-1)
            self.scale = self.model.logit_scale.exp()
        self.values = {f: sorted({c[f] for c in self.classes}, key=[c[f] for c in self.classes].index) for f in self.factors}
        # [n_classes, n_values] one-hot membership per factor, to sum class probabilities per value.
        self.membership = {
            f: torch.tensor([[float(c[f] == v) for v in self.values[f]] for c in self.classes]) for f in self.factors
        }

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """Softmax over the caption classes, [n, n_classes]."""
        img = encode_world_images(self.model, images)
        return (self.scale * img @ self.text.T).softmax(dim=-1)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        """Predicted value per factor (marginal argmax), plus ``"joint"``: the argmax class's index."""
        probs = self.probabilities(images)
        out: dict[str, list[Any]] = {
            f: [self.values[f][i] for i in (probs @ self.membership[f]).argmax(dim=-1).tolist()] for f in self.factors
        }
        out["joint"] = probs.argmax(dim=-1).tolist()
        return out


@dataclass
class DiffusionEval:
    """How often generated images show the prompt's factors, by the shapes CLIP's zero-shot judgement."""

    factor_accuracy: dict[str, float]
    #: all of the prompt's factors right (marginal predictions)
    all_factors_accuracy: float
    #: accuracy per factor value, e.g. {"shape": {"circle": 0.9, ...}}
    value_accuracy: dict[str, dict[str, float]]
    #: the same classifier on real world images (same factor combinations): the ceiling
    reference_accuracy: dict[str, float]
    n_images: int
    n_prompts: int
    images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    seconds: float
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))

    def meets_targets(self) -> dict[str, bool]:
        return {k: self.factor_accuracy.get(k, 0.0) >= v for k, v in self.targets.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.n_images} images ({self.n_prompts} prompts x {self.images_per_prompt}), {self.scheduler}, "
            f"{self.num_inference_steps} steps, guidance {self.guidance_scale}, seed {self.seed}, "
            f"{self.seconds:.0f} s",
            f"{'factor':<10}{'generated':>10}{'target':>8}{'  met':>6}{'real images':>13}",
        ]
        met = self.meets_targets()
        for k, acc in self.factor_accuracy.items():
            target = self.targets.get(k)
            lines.append(
                f"{k:<10}{acc:>10.1%}{(f'{target:.0%}' if target is not None else '-'):>8}"
                f"{('yes' if met.get(k) else 'NO') if target is not None else '':>6}"
                f"{self.reference_accuracy.get(k, float('nan')):>13.1%}"
            )
        lines.append(f"{'all three':<10}{self.all_factors_accuracy:>10.1%}")
        for k, per in self.value_accuracy.items():
            lines.append(f"  {k}: " + ", ".join(f"{v} {a:.0%}" for v, a in per.items()))
        return "\n".join(lines)


@torch.no_grad()
def evaluate_pipeline(
    pipe: ShapesDiffusionPipeline,
    *,
    prompts: Optional[Sequence[dict[str, str]]] = None,
    images_per_prompt: int = 2,
    num_inference_steps: int = 20,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_prompts: int = 54,
    classifier: Optional[FactorClassifier] = None,
    progress: bool = True,
) -> DiffusionEval:
    """Generate ``images_per_prompt`` images for each prompt (factor dicts with colour, shape, position;
    default: all 162 combinations) and score them per factor with :class:`FactorClassifier`.

    Noise comes from one ``torch.Generator`` seeded with ``seed`` and drawn batch by batch, so the figures
    are reproducible for the same arguments."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1; got {images_per_prompt}.")
    start = time.perf_counter()
    classifier = classifier or FactorClassifier()
    combos = list(prompts) if prompts is not None else class_factor_combinations(CLASS_FACTORS)
    missing = [c for c in combos if not set(CLASS_FACTORS) <= set(c)]
    if missing:
        raise ValueError(f"Each prompt needs the factors {list(CLASS_FACTORS)}; got {missing[0]}.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images: list[np.ndarray] = []
    truth: list[dict[str, str]] = []
    for i in tqdm(range(0, len(combos), batch_prompts), desc="generate", disable=not progress):
        chunk = combos[i:i + batch_prompts]
        out = pipe(
            [caption(c) for c in chunk],
            num_images_per_prompt=images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
        )
        images.append(to_uint8(out.images))
        truth += [c for c in chunk for _ in range(images_per_prompt)]
    generated = np.concatenate(images)
    pred = classifier.predict(generated)
    factors = classifier.factors
    correct = {f: np.array([p == t[f] for p, t in zip(pred[f], truth)]) for f in factors}
    value_acc = {
        f: {v: float(correct[f][[t[f] == v for t in truth]].mean()) for v in classifier.values[f] if any(t[f] == v for t in truth)}
        for f in factors
    }

    # The ceiling: the same classifier on real world images of the same combinations.
    denoiser = getattr(pipe, "unet", None) or pipe.transformer  # shapes-diffusion's UNet or shapes-dit's DiT
    world = ShapesWorld(image_size=int(denoiser.config.sample_size), seed=seed + 12345)
    real_factors = [world.sample_factors(1, **{k: t[k] for k in factors})[0] for t in truth]
    real_pred = classifier.predict(world.render(real_factors))
    reference = {f: float(np.mean([p == getattr(r, f) for p, r in zip(real_pred[f], real_factors)])) for f in factors}

    return DiffusionEval(
        factor_accuracy={f: float(correct[f].mean()) for f in factors},
        all_factors_accuracy=float(np.logical_and.reduce([correct[f] for f in factors]).mean()),
        value_accuracy=value_acc,
        reference_accuracy=reference,
        n_images=len(truth),
        n_prompts=len(combos),
        images_per_prompt=images_per_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        scheduler=type(pipe.scheduler).__name__,
        seed=seed,
        seconds=round(time.perf_counter() - start, 1),
    )


def main(argv: Optional[list[str]] = None) -> DiffusionEval:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline directory (default: the shipped shapes-diffusion)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--scheduler", default=None, help="diffusers scheduler class to sample with (default: the saved one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_shapes_pipeline(args.model, scheduler=args.scheduler)
    result = evaluate_pipeline(
        pipe,
        images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(result)
    return result


if __name__ == "__main__":
    main()
