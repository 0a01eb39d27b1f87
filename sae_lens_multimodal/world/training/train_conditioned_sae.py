"""Train the bundled timestep-CONDITIONED diffusion SAE (release ``shapes-diffusion-saes``, SAE id
``up_blocks.0.attentions.1.hook_out.conditioned``).

    python -m sae_lens_multimodal.world.training.train_conditioned_sae                      # overwrites the shipped one
    python -m sae_lens_multimodal.world.training.train_conditioned_sae --cache-dir /tmp/rows # keep the generated rows
    python -m sae_lens_multimodal.world.training.train_conditioned_sae --quick --out /tmp/saes
    python -m sae_lens_multimodal.world.training.train_conditioned_sae --cfg-branch uncond  # ...conditioned.uncond

Same hook, generations (prompts, noise seeds), buckets, per-bucket input scaling and training schedule as the
bucketed SAE of train_saes.py (``--which diffusion``), but ONE dictionary shared by all timesteps whose encoder
is modulated per bucket (saes/conditioned.py): latent i is the same decoder direction at every timestep, so a
feature can be followed across denoising time (world/timestep_features.py). The shipped bucketed SAE is
evaluated on the same fresh generations and its figures are stored next to ours (``evaluation.bucketed``).
``--cfg-branch uncond`` reads the unconditional half of the same CFG batches instead (what the noisy sample
shows without the prompt; SAE id ``...conditioned.uncond``, docs/diffusion-time.md).
Runs on one thread; the same seed gives the same SAE on the same torch build and CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sae_lens_multimodal.world.training.train_saes import (
    BUNDLED_SAES_DIR,
    DIFFUSION_HOOK,
    DIFFUSION_RELEASE,
    DiffusionSAERecipe,
    _diffusion_rows,
    _environment,
    _load_inference,
    _overall,
    _summary,
    diffusion_prompts,
    parse_release_args,
    release_parser,
    write_sae_folder,
)

__all__ = ["CONDITIONED_SAE_ID", "UNCOND_CONDITIONED_SAE_ID", "ConditionedDiffusionSAERecipe",
           "train_conditioned_diffusion_sae", "main"]

CONDITIONED_SAE_ID = DIFFUSION_HOOK + ".conditioned"
UNCOND_CONDITIONED_SAE_ID = CONDITIONED_SAE_ID + ".uncond"  # the same, on the unconditional CFG branch
REGENERATE = "python -m sae_lens_multimodal.world.training.train_conditioned_sae"


@dataclass
class ConditionedDiffusionSAERecipe(DiffusionSAERecipe):
    """The bucketed SAE's settings with one shared dictionary (the defaults made the shipped one)."""

    d_sae: int = 512  # shared by all timesteps (the bucketed SAE has 4 x 256)
    cfg_branch: str = "cond"  # which half of the CFG batch; "uncond" trains UNCOND_CONDITIONED_SAE_ID

    @property
    def sae_id(self) -> str:
        return CONDITIONED_SAE_ID if self.cfg_branch == "cond" else UNCOND_CONDITIONED_SAE_ID


def _per_bucket(result: dict[str, Any], d_sae: int) -> list[dict[str, Any]]:
    return [{"timestep_range": list(b["timestep_range"]), "explained_variance": round(float(b["explained_variance"]), 4),
             "l0": round(float(b["l0"]), 3), "dead_latents": int(b["dead_latents"]),
             "dead_fraction": round(int(b["dead_latents"]) / d_sae, 4), "n_rows": int(b["n_rows"])}
            for b in result["buckets"] if b["n_rows"]]


def _per_timestep(result: dict[str, Any]) -> dict[str, float]:
    return {str(int(t)): round(float(m["explained_variance"]), 4) for t, m in result.get("timesteps", {}).items()}


def _figures(sae: Any, fresh: Any, d_sae: int) -> dict[str, Any]:
    from sae_lens_multimodal.training.evaluate import evaluate_sae

    result = evaluate_sae(sae, fresh, n_rows=len(fresh))
    return {**_overall(result, d_sae), "buckets": _per_bucket(result, d_sae),
            "explained_variance_per_timestep": _per_timestep(result)}


def train_conditioned_diffusion_sae(out_root: os.PathLike = BUNDLED_SAES_DIR, *, seed: int = 0,
                                    recipe: Optional[ConditionedDiffusionSAERecipe] = None, progress: bool = True,
                                    cache_dir: Optional[os.PathLike] = None) -> dict[str, Any]:
    """Train the conditioned SAE and write ``<out_root>/shapes-diffusion-saes/<CONDITIONED_SAE_ID>/``.

    Returns the figures written into its metadata; ``evaluation.bucketed`` holds the bucketed SAE found in
    ``out_root`` evaluated on the same rows (absent when there is none).
    """
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.saes import TimestepConditionedTrainingSAE, TimestepConditionedTrainingSAEConfig
    from sae_lens_multimodal.training.cache import model_identity
    from sae_lens_multimodal.training.train import train_sae
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    r = recipe or ConditionedDiffusionSAERecipe()
    if r.cfg_branch not in ("cond", "uncond"):
        raise ValueError(f"recipe.cfg_branch must be 'cond' or 'uncond'; got {r.cfg_branch!r}.")
    torch.set_num_threads(1)
    cache = Path(cache_dir) if cache_dir is not None else None
    tag, half = ("", "conditional") if r.cfg_branch == "cond" else ("uncond-", "unconditional")
    start = time.perf_counter()
    pipe = load_shapes_pipeline()
    hooked = HookedDiffusionPipeline(pipe)
    data = _diffusion_rows(hooked, diffusion_prompts(r.n_prompts, seed), seed * 100_000, r, progress,
                           cache and cache / f"{tag}train-{seed}-{r.n_prompts}x{r.num_inference_steps}.pt", r.cfg_branch)
    cache_s = time.perf_counter() - start
    torch.manual_seed(seed)
    sae = TimestepConditionedTrainingSAE(TimestepConditionedTrainingSAEConfig(
        d_in=hooked.hook_width(DIFFUSION_HOOK), d_sae=r.d_sae, inner_architecture="topk", inner_config={"k": r.k},
        timestep_ranges=r.timestep_ranges, num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
        dtype="float32", device="cpu",
        metadata={"hook_name": DIFFUSION_HOOK, "model_name": "shapes-diffusion", "input_kind": "block_output",
                  "cfg_branch": r.cfg_branch},
    ))
    steps = r.total_training_samples // r.batch_size
    train_sae(sae, data, total_training_samples=r.total_training_samples, batch_size=r.batch_size, lr=r.lr,
              lr_end=r.lr_end, lr_warm_up_steps=r.lr_warm_up_steps, lr_decay_steps=max(1, steps // 3),
              dead_feature_window=r.dead_feature_window, feature_sampling_window=500, normalize_per_bucket=True,
              n_batches_for_norm_estimate=50, seed=seed, progress=progress)
    train_s = time.perf_counter() - start
    n_rows = len(data)
    del data
    with tempfile.TemporaryDirectory() as tmp:  # evaluate the inference SAE exactly as it is shipped
        sae.save_inference_model(tmp)
        shipped = _load_inference(Path(tmp))
    fresh = _diffusion_rows(hooked, diffusion_prompts(r.eval_prompts, seed + 1000), seed * 100_000 + 50_000, r,
                            progress, cache and cache / f"{tag}eval-{seed}-{r.eval_prompts}x{r.num_inference_steps}.pt",
                            r.cfg_branch)
    figures = _figures(shipped, fresh, r.d_sae)
    bucketed_dir = Path(out_root) / DIFFUSION_RELEASE / DIFFUSION_HOOK
    if (bucketed_dir / "cfg.json").exists():  # the comparison this SAE exists for, on the very same rows
        b_size = int(json.loads((bucketed_dir / "cfg.json").read_text(encoding="utf-8"))["d_sae"])
        unlabelled = type(fresh)(fresh.acts, fresh.sample, fresh.timestep)  # a cond SAE skips rows labelled uncond
        figures["bucketed"] = {"sae_id": DIFFUSION_HOOK, **_figures(_load_inference(bucketed_dir), unlabelled, b_size)}
    metadata = {
        "release": DIFFUSION_RELEASE, "sae_id": r.sae_id, "model_name": "shapes-diffusion",
        "model_class_name": "HookedUNet", "hook_name": DIFFUSION_HOOK, "token_policy": "all",
        "input_kind": "block_output", "cfg_branch": r.cfg_branch, "guidance_scale": r.guidance_scale,
        "timesteps": f"every step of {r.num_inference_steps} DPM-Solver++ steps; one dictionary, encoder scale and "
                     f"bias per bucket ({len(r.timestep_ranges)} buckets)",
        "normalization": {"kind": "per_bucket_scale", "status": "applied by the SAE (bucket_scaling_factors)"},
        "source_format": "bundled", "model_fingerprint": model_identity(pipe.unet)["trunk_fingerprint"],
        "expected_l0": figures["l0"], "expected_variance_explained": figures["explained_variance"],
        "training": {
            "data": f"the bucketed SAE's data: activations of {r.n_prompts} generations of the shapes-diffusion "
                    f"pipeline (DPM-Solver++, {r.num_inference_steps} steps, guidance {r.guidance_scale}), world "
                    f"captions of ShapesWorld seed {seed}, initial-noise seeds {seed * 100_000}..; {half} half "
                    "of the CFG batch; every 8x8 token of every step",
            "n_prompts": r.n_prompts, "rows": n_rows, "seed": seed, "architecture": "timestep_conditioned",
            "inner_architecture": "topk", "d_sae": r.d_sae, "k": r.k,
            "timestep_ranges": r.timestep_ranges, "bucket_scaling_factors": sae.cfg.bucket_scaling_factors,
            "total_training_samples": r.total_training_samples, "batch_size": r.batch_size, "steps": steps,
            "lr": r.lr, "lr_end": r.lr_end, "lr_warm_up_steps": r.lr_warm_up_steps,
            "dead_feature_window": r.dead_feature_window,
            "caching_seconds": round(cache_s, 1), "wall_seconds": round(train_s, 1), **_environment(),
            "command": REGENERATE + ("" if r.cfg_branch == "cond" else " --cfg-branch uncond"),
        },
        "evaluation": {
            "data": f"{r.eval_prompts} fresh generations (prompts from ShapesWorld seed {seed + 1000}, other noise "
                    f"seeds), {half} branch, every step and token; evaluation.bucketed: the bucketed SAE "
                    "(trained on the conditional branch) on the same rows",
            **figures,
        },
    }
    write_sae_folder(sae, Path(out_root) / DIFFUSION_RELEASE / r.sae_id, metadata)
    return metadata


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = release_parser(__doc__)
    parser.add_argument("--cache-dir", default=None, help="keep the generated activation rows here and reuse them")
    parser.add_argument("--d-sae", type=int, default=None, help="dictionary size (default: the recipe's 512)")
    parser.add_argument("--cfg-branch", choices=("cond", "uncond"), default="cond",
                        help="half of the CFG batch to read (uncond: SAE id ...conditioned.uncond)")
    args = parse_release_args(parser, argv, what="SAEs")
    recipe = ConditionedDiffusionSAERecipe()
    if args.quick:
        recipe = ConditionedDiffusionSAERecipe(n_prompts=2, num_inference_steps=4, d_sae=32, k=4,
                                               total_training_samples=4096, batch_size=128, lr_warm_up_steps=2,
                                               eval_prompts=1, batch_prompts=2)
    if args.d_sae is not None:
        recipe.d_sae = args.d_sae
    recipe.cfg_branch = args.cfg_branch
    meta = train_conditioned_diffusion_sae(args.out, seed=args.seed, recipe=recipe, cache_dir=args.cache_dir)
    print(_summary(f"{DIFFUSION_RELEASE}/{recipe.sae_id}", meta))
    if "bucketed" in meta["evaluation"]:
        b = meta["evaluation"]["bucketed"]
        print(f"  bucketed SAE on the same rows: explained variance {b['explained_variance']:.4f}, L0 {b['l0']:.2f}")


if __name__ == "__main__":
    main()
