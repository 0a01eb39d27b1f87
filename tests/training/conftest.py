"""Tiny models for the training tests (random init, built offline in well under a second)."""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal import HookedViT, HookedViTConfig


def make_vit(seed: int = 0, **overrides) -> HookedViT:
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, image_size=32, patch_size=8, head_type="linear",
               d_out=16, has_ln_pre=True)
    cfg.update(overrides)
    vit = HookedViT(HookedViTConfig(**cfg))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith(".w"):  # LayerNorm weights near 1
                p.fill_(1.0).add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(std=0.2)
    return vit.eval()


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    return make_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tiny_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)).eval()
    return HookedCLIP.from_pretrained(model)
