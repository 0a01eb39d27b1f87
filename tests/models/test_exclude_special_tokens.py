"""SAELens's `exclude_special_tokens` for images: the spliced SAE leaves the prefix tokens (or listed positions)
untouched, on HookedViT and through HookedCLIP's vision tower; the masks are cleared after every pass."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_multimodal import HookedCLIP

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def clip() -> HookedCLIP:
    return HookedCLIP.from_pretrained("shapes-clip").eval()


@pytest.fixture(scope="module")
def sae() -> StandardSAE:
    torch.manual_seed(0)
    s = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128))
    with torch.no_grad():
        for p in s.parameters():
            p.normal_(0, 0.2)
    s.cfg.metadata.hook_name = HOOK
    return s


def _spliced_and_clean(model, sae, x, exclude):
    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter=HOOK)
        _, cache = model.run_with_cache_with_saes(x, saes=[sae], use_error_term=False, exclude_special_tokens=exclude)
    return cache[f"{HOOK}.hook_sae_output"], clean[HOOK]


def test_prefix_tokens_bypass_the_sae_on_a_vit(clip, sae) -> None:
    vit = clip.vision
    x = torch.randn(3, 3, 32, 32)
    out, clean = _spliced_and_clean(vit, sae, x, True)
    # CLS passes through (to float rounding: the cached runs may take other attention kernels)
    torch.testing.assert_close(out[:, 0], clean[:, 0], atol=1e-5, rtol=1e-5)
    assert (out[:, 1:] - clean[:, 1:]).abs().amax(-1).min() > 1e-3  # every patch is reconstructed
    out_all, _ = _spliced_and_clean(vit, sae, x, False)
    assert (out_all[:, 0] - clean[:, 0]).abs().max() > 1e-3  # without it the CLS token is reconstructed too
    assert all(getattr(m, "_token_mask", None) is None for m in vit.modules())


def test_listed_positions_bypass_the_sae_through_hooked_clip(clip, sae) -> None:
    x = torch.randn(2, 3, 32, 32)
    text = ["a red circle on the left"]
    with torch.no_grad():
        _, clean = clip.run_with_cache(x, text, names_filter=f"vision.{HOOK}")
        _, cache = clip.run_with_cache_with_saes(x, text, saes=[sae], use_error_term=False, exclude_special_tokens=[0, 5])
    out, ref = cache[f"vision.{HOOK}.hook_sae_output"], clean[f"vision.{HOOK}"]
    torch.testing.assert_close(out[:, [0, 5]], ref[:, [0, 5]], atol=1e-5, rtol=1e-5)
    assert (out[:, 1:5] - ref[:, 1:5]).abs().amax(-1).min() > 1e-3


def test_bad_positions_and_tokenless_hooks_are_refused(clip, sae) -> None:
    vit = clip.vision
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 65\)"):
        vit.run_with_saes(x, saes=[sae], exclude_special_tokens=[70])
    pooled = StandardSAE(StandardSAEConfig(d_in=64, d_sae=8))
    pooled.cfg.metadata.hook_name = "hook_pooled"
    with pytest.raises(ValueError, match="no token axis"):
        vit.run_with_saes(x, saes=[pooled], exclude_special_tokens=True)
    assert not vit.acts_to_saes and all(getattr(m, "_token_mask", None) is None for m in vit.modules())
