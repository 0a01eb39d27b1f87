"""The diffusion lens: readouts checked against the schedulers' own clean-image estimates and against
independently built networks.

* after the last block the readout is the model's own x0: DDIM's ``pred_original_sample`` at every step
  (tiny SD UNet, latent space, epsilon prediction, CFG);
* after block 0 of a tiny PixArt DiT it equals the x0 of a copy truncated to that block (DPM-Solver's
  converted model output at the first step: same noise, same timestep), so "skip the later blocks" is
  "final norm + proj_out after block l" (learned-variance split and CFG included);
* after a UNet's middle block it equals the x0 of a copy whose later resnets are replaced by their
  shortcut path and later attention blocks by the identity (monkeypatched forwards, not hooks).

Shipped weights (slow): the readout grid of shapes-diffusion.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sae_lens_multimodal.analysis.diffusion_lens import (
    LensResult,
    denoiser_blocks,
    diffusion_lens,
    prediction_to_x0,
    skip_block_hooks,
)
from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline
from tests.diffusion import _tiny

PROMPTS = ["a cat", "two dogs"]


def _record_step_outputs(pipe, pick):
    """Wrap ``pipe.scheduler.step``; ``pick(scheduler, output)`` is stored per call."""
    seen = []
    step = pipe.scheduler.step

    def wrapped(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(pick(pipe.scheduler, out).clone())
        return out

    pipe.scheduler.step = wrapped
    return seen


def _sd_with_ddim():
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    return _tiny.sd_pipeline(scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False,
                                                     set_alpha_to_one=False))


def test_last_block_readout_is_ddim_pred_original_sample():
    pipe = _sd_with_ddim()
    lens = diffusion_lens(pipe, PROMPTS, num_inference_steps=3, guidance_scale=3.0, keep_x0=True,
                          blocks=None)
    ref = _sd_with_ddim()  # the same weights (same seed), sampled plainly
    x0s = _record_step_outputs(ref, lambda s, out: out[1] if isinstance(out, tuple) else out.pred_original_sample)
    ref(PROMPTS, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert len(x0s) == 3 and lens.x0.shape[:3] == (len(lens.blocks), 3, 2)
    for s in range(3):
        torch.testing.assert_close(lens.x0[-1, s], x0s[s], atol=1e-4, rtol=1e-4)
    # earlier blocks read out something else (the later blocks do change the prediction)
    assert (lens.x0[0, 0] - lens.x0[-1, 0]).abs().max() > 1e-3
    assert lens.images.shape == (len(lens.blocks), 3, 2, 32, 32, 3) and lens.images.dtype == np.uint8


def _pixart_kwargs():
    kw = _tiny.dit_call_kwargs("pixart")
    for k in ("num_inference_steps", "output_type", "guidance_scale"):
        kw.pop(k)
    return kw


def test_dit_readout_after_block_equals_truncated_model():
    torch.manual_seed(0)
    pipe = _tiny.pixart_pipeline()
    truncated = copy.deepcopy(pipe)
    lens = diffusion_lens(pipe, ["unused"], num_inference_steps=2, guidance_scale=4.5, keep_x0=True, **_pixart_kwargs())
    assert lens.blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    truncated.transformer.transformer_blocks = torch.nn.ModuleList(list(truncated.transformer.transformer_blocks)[:1])
    x0s = _record_step_outputs(truncated, lambda s, out: s.model_outputs[-1])
    truncated(num_inference_steps=2, guidance_scale=4.5, output_type="pt", generator=torch.Generator().manual_seed(0),
              **_pixart_kwargs())
    torch.testing.assert_close(lens.x0[0, 0], x0s[0], atol=1e-4, rtol=1e-4)
    assert (lens.x0[0, 0] - lens.x0[1, 0]).abs().max() > 1e-3


def _skip_forward(module):
    if hasattr(module, "conv_shortcut") and hasattr(module, "output_scale_factor"):
        def resnet_skip(input_tensor, temb=None, *args, **kwargs):
            x = module.conv_shortcut(input_tensor) if module.conv_shortcut is not None else input_tensor
            return x / module.output_scale_factor
        return resnet_skip
    return lambda hidden_states, *args, **kwargs: (hidden_states,)


def test_unet_readout_equals_copy_with_later_blocks_replaced():
    pipe = _sd_with_ddim()
    patched = _sd_with_ddim()
    hooked = as_hooked_pipeline(pipe)
    blocks = denoiser_blocks(hooked)
    middle = blocks.index("mid_block.attentions.0")
    later = blocks[middle + 1:]
    assert any(".resnets." in b for b in later) and any(".attentions." in b for b in later)
    lens = diffusion_lens(hooked, PROMPTS, blocks=[blocks[middle]], num_inference_steps=2, guidance_scale=3.0,
                          keep_x0=True)
    for b in later:
        module = patched.unet.get_submodule(b)
        module.forward = _skip_forward(module)
    x0s = _record_step_outputs(patched, lambda s, out: out[1] if isinstance(out, tuple) else out.pred_original_sample)
    patched(PROMPTS, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(lens.x0[0, 0], x0s[0], atol=1e-4, rtol=1e-4)


def test_prediction_to_x0_parameterisations():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for kind in ("epsilon", "v_prediction", "sample"):
        sched = DDPMScheduler(prediction_type=kind)
        a = sched.alphas_cumprod[600]
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]
        torch.testing.assert_close(prediction_to_x0(pred, x, torch.tensor([600, 600]), sched), x0, atol=1e-5, rtol=1e-4)
    # learned variance: the second half of the channels is ignored
    sched = DDPMScheduler()
    a = sched.alphas_cumprod[10]
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(prediction_to_x0(torch.cat([eps, 100 + eps], 1), x, 10, sched), x0, atol=1e-4, rtol=1e-4)
    flow = FlowMatchEulerDiscreteScheduler()
    sigma = 0.3
    x = (1 - sigma) * x0 + sigma * eps
    torch.testing.assert_close(prediction_to_x0(eps - x0, x, 300.0, flow), x0, atol=1e-5, rtol=1e-4)


def test_readable_steps_rule_and_errors():
    acc = torch.tensor([[0.9, 0.5, 0.85, 0.9], [0.9, 0.9, 0.9, 0.7]])[:, :, None]
    lens = LensResult(blocks=["a", "b"], timesteps=[999, 750, 500, 250], prompts=["p"],
                      images=np.zeros((2, 4, 1, 2, 2, 3), np.uint8), final_images=np.zeros((1, 2, 2, 3), np.uint8),
                      factors=("color",), accuracy=acc, p_true=acc)
    # "readable from step s" means readable at s and at every later step
    assert lens.readable_steps(0.8) == {"color": {"a": 2, "b": None}}
    assert lens.readable_table(0.8)["color"].tolist() == ["step 2 (t=500)", "never"]
    pipe = _sd_with_ddim()
    with pytest.raises(KeyError, match="not blocks"):
        diffusion_lens(pipe, PROMPTS, blocks=["up_blocks.9.resnets.0"], num_inference_steps=1)
    with pytest.raises(KeyError, match="not a block"):
        skip_block_hooks(as_hooked_pipeline(pipe), ["no_such.block"])
    with pytest.raises(ValueError, match="readable|judge"):
        LensResult(blocks=["a"], timesteps=[1], prompts=[], images=np.zeros((1, 1, 1, 2, 2, 3), np.uint8),
                   final_images=np.zeros((1, 2, 2, 3), np.uint8)).readable_steps()


# --------------------------------------------------------------------------- shipped weights
@pytest.mark.slow
@pytest.mark.shipped_weights
def test_shapes_diffusion_lens_grid(tmp_path):
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline
    from sae_lens_multimodal.world.diffusion_heads import lens_study

    lens = lens_study(load_shapes_pipeline(), n_prompts=12, num_inference_steps=6, seed=0)
    f = {k: i for i, k in enumerate(lens.factors)}
    # The last readout at the last step is the sampler's final image.
    assert np.array_equal(lens.images[-1, -1], lens.final_images)
    # Measured (12 prompts, 6 steps, seed 0): at the first step (t=999) the readout after the last block
    # already shows the position (1.00, chance 0.11) and colour (0.67, chance 0.17); after the mid block
    # neither (position 0.08, colour 0.17). Margins 0.2 / 0.22 / 0.27 / 0.23.
    assert lens.accuracy[-1, 0, f["position"]] >= 0.8 and lens.accuracy[-1, 0, f["color"]] >= 0.45
    mid = lens.blocks.index("mid_block.attentions.0")
    assert lens.accuracy[mid, 0, f["position"]] <= 0.35 and lens.accuracy[mid, 0, f["color"]] <= 0.4
    # Layout early in depth and time: position stays readable from t=999 after the last block, but only
    # from the last steps (measured step 5 of 6) after the mid block.
    readable = lens.readable_steps(0.8)["position"]
    assert readable["up_blocks.2.resnets.1"] == 0 and (readable["mid_block.attentions.0"] or 99) >= 3
    assert lens.plot_grid(tmp_path / "g.png").stat().st_size > 1000
    assert "Diffusion lens" in lens.to_html(tmp_path / "l.html").read_text()
