"""A small TopK SAE trained in seconds on shapes-clip's blocks.2.hook_resid_post (used until / unless the
bundled 'shapes-clip-saes' release is available)."""

from __future__ import annotations

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_multimodal.world import ShapesWorld, to_tensor

HOOK = "blocks.2.hook_resid_post"


def world_images(n: int, seed: int) -> tuple[torch.Tensor, list]:
    images, factors = ShapesWorld(image_size=32, seed=seed).sample(n)
    return to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3), factors


def bundled_sae():
    """The bundled SAE when it is shipped, else None."""
    from sae_lens import SAE

    import sae_lens_multimodal  # noqa: F401  (registers the bundled releases with SAELens)

    try:
        return SAE.from_pretrained("shapes-clip-saes", HOOK)
    except Exception:
        return None


def train_quick_sae(model, n_images: int = 800, d_sae: int = 256, k: int = 8, steps: int = 300, seed: int = 0) -> TopKSAE:
    x, _ = world_images(n_images, seed=1000 + seed)
    with torch.no_grad():
        _, cache = model.vision.run_with_cache(x, names_filter=HOOK)
    acts = cache[HOOK].reshape(-1, cache[HOOK].shape[-1])
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=acts.shape[1], d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        w = torch.randn(d_sae, acts.shape[1], generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.mean(0))
        sae.b_enc.zero_()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = acts[torch.randint(0, len(acts), (1024,), generator=g)]
        loss = (sae.decode(sae.encode(batch)) - batch).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae
