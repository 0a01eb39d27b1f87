"""Attribution patching on every model kind: a HookedVLM (rotary, grouped-query attention) and one call of a
hooked diffusion UNet at a timestep and CFG branch, against exact patching.

Nothing downstream is linear here, so the checks are the first-order ones: for a small corruption the
estimate must match exact patching closely (error ~ corruption squared), and the CFG-branch split must add up.
"""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal.analysis.attribution import attribution_patching
from sae_lens_multimodal.analysis.circuits_exact import exact_patching
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.testing import tiny_random_llava
from tests.models.test_hooked_vlm import images, padded_batch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.fixture(scope="module")
def vlm():
    return HookedVLM.from_pretrained(tiny_random_llava("llava", "llama", seed=11, attn_implementation="eager"))


@pytest.mark.parametrize(
    "hook,per",
    [
        ("vision.blocks.0.hook_resid_pre", "position"),
        ("lm.blocks.0.hook_resid_post", "position"),
        ("lm.blocks.1.attn.hook_z", "head_position"),
        ("lm.blocks.1.attn.hook_rot_k", "head_position"),
        ("lm.blocks.1.attn.hook_rot_q", "head_position"),
    ],
)
def test_vlm_small_corruption_matches_exact(vlm, hook, per):
    ids, mask = padded_batch()
    px = images(2)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, 3] - logits[:, -1, 4]).mean()

    clean = {"input_ids": ids, "pixel_values": px, "attention_mask": mask}
    if "rot_" in hook:
        # a text token changes (the tiny model's attention barely reads the image)
        ids2 = ids.clone()
        ids2[:, -3] = 13
        corrupted = {**clean, "input_ids": ids2}
    else:
        corrupted = {**clean, "pixel_values": px + 1e-2 * images(2, seed=5)}  # the image changes slightly
    est = attribution_patching(vlm, clean, corrupted, metric, hooks=[hook], per=per)
    ref = exact_patching(vlm, clean, corrupted, metric, hooks=[hook], per=per)
    assert ref[hook].abs().max() > 1e-5
    if "rot_" in hook:
        # Measured: QK fix 0.9e-3 / 1.4e-3 relative error (rot_q / rot_k), linear 1.2e-3 / 0.125.
        assert est.methods[hook] == "qk-fix"
        assert rel_err(est[hook], ref[hook]) < 0.02
    else:
        # Measured: relative errors 1e-4 .. 1.5e-2 for a 1e-2 image corruption.
        assert rel_err(est[hook], ref[hook]) < 0.05
    assert no_hooks_left(vlm)


@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    from sae_lens_multimodal.diffusion import HookedUNet
    from tests.diffusion import _tiny

    torch.manual_seed(0)
    return HookedUNet.from_pretrained(_tiny.sd_unet())


def denoiser_pair(scale: float):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)  # [uncond, cond]: the same latent
    ctx = torch.randn(2, 7, 32, generator=g)
    ctx2 = ctx.clone()
    ctx2[1] += scale * torch.randn(7, 32, generator=g)  # only the conditional prompt changes
    return {"sample": sample, "encoder_hidden_states": ctx}, {"sample": sample, "encoder_hidden_states": ctx2}


def test_denoiser_call_at_a_timestep_and_branch(unet):
    from tests.diffusion import _tiny

    assert _tiny.TEXT_DIM == 32
    clean, corrupted = denoiser_pair(0.05)
    w = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(2))

    def metric(out) -> torch.Tensor:
        return (out.sample[1] * w).sum()  # the conditional prediction

    hook = "down_blocks.1.attentions.0.hook_out"
    kw = dict(hooks=[hook], per="position", timestep=500)
    cond = attribution_patching(unet, clean, corrupted, metric, cfg_branch="cond", **kw)
    uncond = attribution_patching(unet, clean, corrupted, metric, cfg_branch="uncond", **kw)
    both = attribution_patching(unet, clean, corrupted, metric, **kw)
    assert cond[hook].shape == (8, 8)  # the block's feature map, channel-last
    assert torch.allclose(cond[hook] + uncond[hook], both[hook], atol=1e-6)
    assert uncond[hook].abs().max() == 0  # the unconditional rows see the same prompt in both runs
    ref = exact_patching(unet, clean, corrupted, metric, cfg_branch="cond", **kw)
    assert ref[hook].abs().max() > 1e-4
    # Measured: relative error 0.5% for this corruption.
    assert rel_err(cond[hook], ref[hook]) < 0.05
    assert no_hooks_left(unet)
    with pytest.raises(ValueError, match="timestep"):
        attribution_patching(unet, clean, corrupted, metric, hooks=[hook])
    with pytest.raises(ValueError, match="cfg_branch"):
        attribution_patching(unet, clean, corrupted, metric, hooks=[hook], timestep=500, cfg_branch="positive")
