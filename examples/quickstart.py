"""Quickstart: hook a vision transformer, cache activations, splice an SAELens SAE. Runs offline.

    python examples/quickstart.py

Uses open_clip's ViT-B/32 architecture with random weights (no download). With network access, use
real weights instead: HookedViT.from_pretrained("open-clip:ViT-B-32/laion2b_s34b_b79k").
"""

from __future__ import annotations

import open_clip
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_multimodal import HookedViT

torch.manual_seed(0)

# 1. Convert the original open_clip model (exact: same outputs as open_clip).
source = open_clip.create_model("ViT-B-32", pretrained=None).eval()
model = HookedViT.from_pretrained(source)
images = torch.randn(4, 3, 224, 224)
with torch.no_grad():
    print(f"max |HookedViT - open_clip| = {(model(images) - source.encode_image(images)).abs().max():.2e}")

    # 2. TransformerLens workflows, unchanged: run_with_cache with a names filter and an early stop.
    _, cache = model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_resid_post"), stop_at_layer=10)
print(f"cached {len(cache)} activations; blocks.9.hook_resid_post: {tuple(cache['blocks.9.hook_resid_post'].shape)}")

# 3. SAELens SAEs splice in by hook name (here a random one; pretrained releases load with SAE.from_pretrained).
sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=4096))
sae.cfg.metadata.hook_name = "blocks.9.hook_resid_post"
with torch.no_grad():
    clean = model(images)
    spliced_exact = model.run_with_saes(images, saes=[sae], use_error_term=True)
    _, sae_cache = model.run_with_cache_with_saes(images, saes=[sae])
acts = sae_cache["blocks.9.hook_resid_post.hook_sae_acts_post"]
print(f"SAE latents: {tuple(acts.shape)}, mean L0 = {(acts > 0).float().sum(-1).mean():.1f}")
print(f"with the error term the output is unchanged: {torch.allclose(clean, spliced_exact, atol=1e-6)}")
