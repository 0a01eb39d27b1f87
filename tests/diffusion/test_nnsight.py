"""nnsight runs on the same objects the hooked wrappers use."""

from __future__ import annotations

import nnsight
import torch
from nnsight import DiffusionModel

from sae_lens_multimodal.diffusion import HookedDiffusionPipeline, HookedUNet
from tests.diffusion import _tiny


@torch.no_grad()
def test_nnsight_traces_a_hooked_unet():
    torch.manual_seed(0)
    hooked = HookedUNet.from_pretrained(_tiny.sd_unet())
    g = _tiny.generator(1)
    args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500]), torch.randn(2, 7, _tiny.TEXT_DIM, generator=g))
    plain = hooked(*args).sample
    _, cache = hooked.run_with_cache(*args, names_filter=["up.1.1.hook_out"])
    model = nnsight.NNsight(hooked)
    with model.trace(*args):
        block = model.up_blocks[1].attentions[1].output[0].save()
        out = model.output.save()
    assert torch.equal(out.sample, plain)
    assert torch.equal(block.permute(0, 2, 3, 1), cache["up_blocks.1.attentions.1.hook_out"])
    # Hook points only run when watched; nnsight does not register torch hooks, so switch them on.
    hooked.set_always_observed(True, ["up.1.1.transformer_blocks.0.attn2.hook_pattern", "up.1.1.hook_out"])
    try:
        with model.trace(*args):
            pattern = model.up_blocks[1].attentions[1].transformer_blocks[0].attn2.hook_pattern.output.save()
            model.up_blocks[1].attentions[1].hook_out.output[..., 3] = 0
            edited = model.output.save()
    finally:
        hooked.set_always_observed(False)
    assert pattern.shape == (2, 4, 16, 7)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 16))

    def zero(act, hook):
        act[..., 3] = 0

    # Same edit with TransformerLens hooks (the pattern hook is watched too, as it was in the trace).
    expected = hooked.run_with_hooks(*args, fwd_hooks=[("up.1.1.hook_out", zero),
                                                       ("up.1.1.transformer_blocks.0.attn2.hook_pattern",
                                                        lambda a, hook: a)]).sample
    assert torch.equal(edited.sample, expected)
    assert torch.equal(hooked(*args).sample, plain)  # switched off again: original path


def test_nnsight_diffusion_model_and_hooked_pipeline_share_a_pipeline(tmp_path):
    torch.manual_seed(0)
    _tiny.sd_pipeline().save_pretrained(tmp_path / "pipe")
    model = DiffusionModel(str(tmp_path / "pipe"), dispatch=True)
    model.pipeline.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}
    with torch.no_grad():
        with model.generate("a cat", generator=_tiny.generator(), **kwargs) as tracer:
            outs = list().save()
            for _ in tracer.iter[0:2]:
                outs.append(model.unet.up_blocks[1].attentions[1].output[0].clone())
            result = model.output.save()
    hooked = HookedDiffusionPipeline(model.pipeline)  # the very pipeline object nnsight loaded
    assert hooked.denoiser is model.pipeline.unet
    images, cache = hooked.run_with_cache("a cat", generator=_tiny.generator(), names_filter=["up.1.1.hook_out"],
                                          **kwargs)
    assert torch.equal(images, result.images)
    assert len(outs) == len(cache.timesteps) == 2
    for out, t in zip(outs, cache.timesteps):
        half = out.shape[0] // 2
        assert torch.equal(out.permute(0, 2, 3, 1)[half:], cache["up.1.1.hook_out", t, "cond"])
        assert torch.equal(out.permute(0, 2, 3, 1)[:half], cache["up.1.1.hook_out", t, "uncond"])
    with torch.no_grad():  # nnsight still works after the hooked wrapper was installed
        with model.generate("a cat", generator=_tiny.generator(), **kwargs):
            again = model.output.save()
    assert torch.equal(again.images, result.images)
