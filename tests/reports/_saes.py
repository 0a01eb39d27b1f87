"""Small SAEs for report tests (the bundled shapes releases may not be installed)."""

from __future__ import annotations

import numpy as np
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_multimodal.saes import TimestepBucketedSAE, TimestepBucketedSAEConfig
from sae_lens_multimodal.world.shapes import COLORS, SHAPES

VISION_HOOK = "blocks.2.hook_resid_post"
DIFFUSION_HOOK = "up_blocks.0.attentions.1.hook_out"
#: the concept of each feature of concept_sae, in order
CONCEPTS = [("color", c) for c in COLORS] + [("shape", s) for s in SHAPES]


def object_patches(images: np.ndarray, patch: int = 4) -> torch.Tensor:
    """[N, n_patches] mask of the patches (row-major, as the ViT's tokens after CLS) that the shape
    covers: any pixel brighter than the black background."""
    n, h, w, _ = images.shape
    blocks = images.max(-1).reshape(n, h // patch, patch, w // patch, patch).max(axis=(2, 4))
    return torch.from_numpy(blocks.reshape(n, -1) > 60)


@torch.no_grad()
def concept_sae(model, x, factors, images: np.ndarray, hook: str = VISION_HOOK) -> StandardSAE:
    """A StandardSAE whose features are ground-truth concept directions at the shape's own patches (mean
    activation of object patches of images with that colour / shape minus the mean over all object
    patches), thresholded at the 90th percentile of their projections, so the right top images and the
    right patches of every feature are known."""
    _, cache = model.vision.run_with_cache(x, names_filter=hook)
    acts = cache[hook][:, 1:]  # patch tokens, row-major after CLS
    on = object_patches(images)
    mean = acts[on].mean(0)
    dirs = []
    for key, value in CONCEPTS:
        m = torch.tensor([getattr(f, key) == value for f in factors])[:, None] & on
        dirs.append(acts[m].mean(0) - mean)
    d = torch.nn.functional.normalize(torch.stack(dirs), dim=-1)
    sae = StandardSAE(StandardSAEConfig(d_in=acts.shape[-1], d_sae=len(CONCEPTS),
                                        metadata=SAEMetadata(hook_name=hook, model_name="shapes-clip")))
    proj = (acts - mean) @ d.T
    sae.W_enc.copy_(d.T)
    sae.W_dec.copy_(d)
    sae.b_dec.copy_(mean)
    sae.b_enc.copy_(-proj.flatten(0, 1).quantile(0.97, dim=0))
    return sae


def random_timestep_sae(d_in: int = 64, d_sae: int = 32, seed: int = 0) -> TimestepBucketedSAE:
    """A timestep-bucketed SAE (two buckets) with random weights at the shapes UNet's up_blocks.0 output."""
    torch.manual_seed(seed)
    sae = TimestepBucketedSAE(TimestepBucketedSAEConfig(
        d_in=d_in, d_sae=d_sae, timestep_ranges=[[0, 500], [500, 1000]], num_train_timesteps=1000,
        metadata={"hook_name": DIFFUSION_HOOK, "input_kind": "block_output", "model_name": "shapes-diffusion"}))
    with torch.no_grad():
        for b in range(sae.n_buckets):
            inner = sae.bucket_sae(b)
            inner.W_enc.normal_(std=d_in ** -0.5)
            inner.W_dec.copy_(torch.nn.functional.normalize(inner.W_enc.T.clone(), dim=-1))
            inner.b_enc.fill_(-0.5)
    return sae
