"""HookedDiffusionPipeline on tiny SD / SDXL / PixArt / SD3 / Flux pipelines and a plain loop."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_multimodal.diffusion import (
    DenoisingLoop,
    DiffusionCache,
    HookedDiffusionPipeline,
    current_branch,
    current_denoising_state,
    current_timestep,
)
from tests.diffusion import _tiny

SD_KW = {"prompt": "a cat", "num_inference_steps": 3, "height": 32, "width": 32, "output_type": "pt"}

FAMILIES = {
    # family: (builder, call kwargs, hook to cache, where the diffusers block keeps that stream)
    "sd": (_tiny.sd_pipeline, SD_KW, "up.1.1.hook_out", ("up_blocks.1.attentions.1", 0)),
    "sdxl": (_tiny.sdxl_pipeline, {**SD_KW, "num_inference_steps": 2, "guidance_scale": 5.0}, "up.0.1.hook_out",
             ("up_blocks.0.attentions.1", 0)),
    "pixart": (_tiny.pixart_pipeline, _tiny.dit_call_kwargs("pixart"), "transformer_blocks.1.hook_out",
               ("transformer_blocks.1", None)),
    "sd3": (_tiny.sd3_pipeline, _tiny.dit_call_kwargs("sd3"), "transformer_blocks.1.hook_out_text",
            ("transformer_blocks.1", 0)),
    "flux": (_tiny.flux_pipeline, _tiny.dit_call_kwargs("flux"), "single_transformer_blocks.1.hook_out",
             ("single_transformer_blocks.1", 1)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    builder, kwargs, hook, where = FAMILIES[request.param]
    torch.manual_seed(0)
    pipe = builder()
    reference = pipe(generator=_tiny.generator(), **kwargs).images  # the plain diffusers pipeline
    return request.param, pipe, HookedDiffusionPipeline(pipe), kwargs, hook, where, reference


def _capture_calls(pipe, path: str, index: int | None):
    """Record the diffusers block's output at every denoiser call (a plain torch hook: the ground truth)."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls: list[torch.Tensor] = []

    def grab(mod, args, out):
        y = out if index is None else out[index]
        calls.append((y.permute(0, 2, 3, 1) if y.ndim == 4 else y).clone())

    return calls, denoiser.get_submodule(path).register_forward_hook(grab)


def test_same_images_as_plain_pipeline_and_identity_hooks(family):
    name, pipe, hooked, kwargs, _, _, reference = family
    assert torch.equal(hooked(generator=_tiny.generator(), **kwargs), reference)
    identity = [(n, lambda a, hook: a) for n in hooked.hook_dict if "pattern" not in n and "scores" not in n]
    images = hooked.run_with_hooks(generator=_tiny.generator(), fwd_hooks=identity, **kwargs)
    assert torch.equal(images, reference)
    assert not any(hp._forward_hooks for hp in hooked.hook_dict.values())


def test_cache_is_keyed_by_actual_timesteps_and_branches(family):
    name, pipe, hooked, kwargs, hook, (path, index), reference = family
    calls, handle = _capture_calls(pipe, path, index)
    try:
        images, cache = hooked.run_with_cache(generator=_tiny.generator(), names_filter=[hook], **kwargs)
    finally:
        handle.remove()
    assert torch.equal(images, reference)
    schedule = [t.item() for t in pipe.scheduler.timesteps]
    assert cache.timesteps == schedule
    assert cache.hook_names == [hooked.canonical_hook_name(hook)]
    assert sorted(cache.branches) == ["cond", "uncond"]
    assert len(calls) == len(schedule) * (2 if name == "flux" else 1)
    for step, t in enumerate(schedule):
        if name == "flux":  # true CFG: a conditional call, then a negative-prompt call, per step
            cond, uncond = calls[2 * step], calls[2 * step + 1]
        else:  # batched CFG: [unconditional rows, conditional rows]
            half = calls[step].shape[0] // 2
            uncond, cond = calls[step][:half], calls[step][half:]
        assert torch.equal(cache[hook, t, "cond"], cond)
        assert torch.equal(cache[hook, t, "uncond"], uncond)
    assert cache.stack(hook, branch="cond").shape == (len(schedule), *cache[hook, schedule[0], "cond"].shape)
    assert cache.timesteps_of(hook, branch="uncond") == schedule
    with pytest.raises(KeyError, match="branches"):
        cache[hook, schedule[0]]
    # Only requested timesteps x branches are kept.
    _, cache = hooked.run_with_cache(generator=_tiny.generator(), names_filter=[hook], timesteps=[schedule[-1]],
                                     cfg_branch="cond", **kwargs)
    assert cache.keys() == [(hooked.canonical_hook_name(hook), schedule[-1], "cond")]


@torch.no_grad()
def test_scheduled_intervention_on_one_branch_equals_manual_edit():
    torch.manual_seed(0)
    pipe = _tiny.sd_pipeline()
    hooked = HookedDiffusionPipeline(pipe)
    module = pipe.unet.up_blocks[1].attentions[1]
    _, cache = hooked.run_with_cache(generator=_tiny.generator(), names_filter=["up.1.1.hook_out"], **SD_KW)
    schedule = cache.timesteps
    target = schedule[1]
    # Manual version with a raw torch hook that knows the call order: zero the conditional half at call 1.
    counter = {"n": 0}

    def manual(mod, args, out):
        n = counter["n"]
        counter["n"] += 1
        if n != 1:
            return None
        y = out[0].clone()
        y[y.shape[0] // 2:] = 0
        return (y,)

    handle = module.register_forward_hook(manual)
    try:
        expected = pipe(generator=_tiny.generator(), **SD_KW).images
    finally:
        handle.remove()
    seen = []

    def zero(act, hook):
        seen.append((current_timestep(), current_branch(), act.shape[0], current_denoising_state().step_index))
        return torch.zeros_like(act)

    for selector in ([target], range(int(target), int(target) + 1), lambda t: t == target):
        seen.clear()
        images = hooked.run_with_hooks(generator=_tiny.generator(), fwd_hooks=[("up.1.1.hook_out", zero)],
                                       at_timesteps=selector, cfg_branch="cond", **SD_KW)
        assert seen == [(target, "cond", 1, 1)]
        torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
    # cfg_branch=None/'both' hits every row of the batched CFG call.
    seen.clear()
    hooked.run_with_hooks(generator=_tiny.generator(), fwd_hooks=[("up.1.1.hook_out", zero)], at_timesteps=[target],
                          **SD_KW)
    assert seen == [(target, "both", 2, 1)]


def test_flux_sequential_cfg_branches():
    torch.manual_seed(0)
    pipe = _tiny.flux_pipeline()
    hooked = HookedDiffusionPipeline(pipe)
    kwargs = _tiny.dit_call_kwargs("flux")
    seen = []
    hooked.run_with_hooks(generator=_tiny.generator(), cfg_branch="uncond",
                          fwd_hooks=[("transformer_blocks.0.hook_out", lambda a, hook: seen.append(current_branch()))],
                          **kwargs)
    assert seen == ["uncond"] * kwargs["num_inference_steps"]
    # Flux is called with timestep / 1000; the state reports the scheduler's own value.
    stamps = []
    hooked.run_with_hooks(generator=_tiny.generator(), cfg_branch="cond",
                          fwd_hooks=[("transformer_blocks.0.attn.hook_cross_pattern",
                                      lambda a, hook: stamps.append(current_timestep()))], **kwargs)
    assert stamps == [t.item() for t in pipe.scheduler.timesteps]
    no_cfg = _tiny.dit_call_kwargs("flux", guidance=False)
    assert hooked.cfg_mode(**no_cfg) == "none"
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):
        hooked.run_with_cache(generator=_tiny.generator(), names_filter=["transformer_blocks.0.hook_out"],
                              cfg_branch="both", **no_cfg)
    _, cache = hooked.run_with_cache(generator=_tiny.generator(), names_filter=["transformer_blocks.0.hook_out"],
                                     **no_cfg)
    assert cache.branches == ["cond"]


def test_errors_name_the_problem():
    torch.manual_seed(0)
    pipe = _tiny.sd_pipeline()
    hooked = HookedDiffusionPipeline(pipe)
    with pytest.raises(KeyError, match="up_blocks.1.attentions.1.hook_out"):
        hooked.run_with_cache(names_filter=["up_blocks.1.attentions.1.hook_outt"], **SD_KW)
    with pytest.raises(ValueError, match=r"actual timesteps are \[667, 334, 1\]"):
        hooked.run_with_cache(names_filter=["up.1.1.hook_out"], timesteps=[500], **SD_KW)
    with pytest.raises(ValueError, match=r"actual timesteps are \[667, 334, 1\]"):
        hooked.run_with_hooks(fwd_hooks=[("up.1.1.hook_out", lambda a, hook: a)], at_timesteps=[999], **SD_KW)
    with pytest.raises(ValueError, match="No timestep of this run's schedule"):
        hooked.run_with_hooks(fwd_hooks=[("up.1.1.hook_out", lambda a, hook: a)], at_timesteps=range(2, 300), **SD_KW)
    with pytest.raises(ValueError, match="guidance is off"):
        hooked.run_with_cache(names_filter=["up.1.1.hook_out"], cfg_branch="uncond", **{**SD_KW, "guidance_scale": 1.0})
    with pytest.raises(ValueError, match="cfg_branch must be one of"):
        hooked.run_with_cache(names_filter=["up.1.1.hook_out"], cfg_branch="negative", **SD_KW)
    assert not any(hp._forward_hooks for hp in hooked.hook_dict.values())
    assert hooked._installation.state_provider is None

    class NoDenoiser:
        pass

    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        HookedDiffusionPipeline(NoDenoiser())

    class OddPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="UNet2DConditionModel.*FluxTransformer2DModel|FluxTransformer2DModel"):
        HookedDiffusionPipeline(OddPipeline())


def test_offload_to_disk_and_cpu(tmp_path):
    torch.manual_seed(0)
    hooked = HookedDiffusionPipeline(_tiny.sd_pipeline())
    names = ["up.1.1.hook_out", "mid.0.transformer_blocks.0.attn2.hook_pattern"]
    _, memory = hooked.run_with_cache(generator=_tiny.generator(), names_filter=names, **SD_KW)
    _, on_cpu = hooked.run_with_cache(generator=_tiny.generator(), names_filter=names, offload="cpu", **SD_KW)
    _, on_disk = hooked.run_with_cache(generator=_tiny.generator(), names_filter=names, offload=tmp_path / "acts",
                                       **SD_KW)
    reopened = DiffusionCache.load(tmp_path / "acts", resolve=hooked.canonical_hook_name)
    index = json.loads((tmp_path / "acts" / "index.json").read_text())
    assert len(index["entries"]) == len(memory) == 12
    assert not [p for p in (tmp_path / "acts").iterdir() if p.name.startswith(".")]  # no temp files left
    for cache in (on_cpu, on_disk, reopened):
        assert cache.keys() == memory.keys()
        for key in memory.keys():
            assert torch.equal(cache[key], memory[key])
            assert cache[key].device.type == "cpu"
        assert torch.equal(cache.stack("up.1.1.hook_out", branch="uncond"), memory.stack("up.1.1.hook_out", "uncond"))
    assert memory.nbytes == sum(t.numel() * t.element_size() for t in memory.to_dict().values())


@torch.no_grad()
def test_plain_denoising_loop_and_second_order_scheduler():
    torch.manual_seed(0)
    unet = _tiny.sd_unet()
    prompt, negative = _tiny.embeds(), _tiny.embeds(seed=3)
    latents = torch.randn(1, 4, 16, 16, generator=_tiny.generator())
    loop_kw = {"negative_prompt_embeds": negative, "latents": latents, "num_inference_steps": 3,
               "guidance_scale": 3.0}
    reference = DenoisingLoop(unet, DDIMScheduler())(prompt, **loop_kw).images
    hooked = HookedDiffusionPipeline(denoiser=unet, scheduler=DDIMScheduler())
    images, cache = hooked.run_with_cache(prompt, names_filter=["mid.0.hook_out"], **loop_kw)
    assert torch.equal(images, reference)
    assert cache.timesteps == [t.item() for t in hooked.pipe.scheduler.timesteps]
    # Heun visits each inner timestep twice: both visits are kept, in call order.
    heun = HookedDiffusionPipeline(denoiser=unet, scheduler=HeunDiscreteScheduler())
    _, cache = heun.run_with_cache(prompt, names_filter=["mid.0.hook_out"], cfg_branch="cond", **loop_kw)
    schedule = [t.item() for t in heun.pipe.scheduler.timesteps]
    assert len(schedule) > len(set(schedule))
    assert cache.timesteps_of("mid.0.hook_out") == schedule
    repeated = next(t for t in schedule if schedule.count(t) == 2)
    with pytest.raises(KeyError, match="visited 2 times"):
        cache["mid.0.hook_out", repeated]
    assert not torch.equal(cache.get("mid.0.hook_out", repeated, visit=0), cache.get("mid.0.hook_out", repeated, visit=1))
    assert cache.to_dict().keys() >= {("mid_block.attentions.0.hook_out", repeated, "cond", 1)}


class TimestepRecordingSAE(StandardSAE):
    """An SAE that reads the denoising state while SAELens calls encode(x) with the activation only."""

    def encode(self, x):
        self.seen.append((current_timestep(), current_branch(), current_denoising_state().batch_branches))
        return super().encode(x)


@torch.no_grad()
def test_saes_see_the_timestep_and_branch():
    torch.manual_seed(0)
    pipe = _tiny.sd_pipeline()
    hooked = HookedDiffusionPipeline(pipe)
    reference = hooked(generator=_tiny.generator(), **SD_KW)
    sae = TimestepRecordingSAE(StandardSAEConfig(d_in=64, d_sae=64, metadata=SAEMetadata(hook_name="up.1.1.hook_out")))
    sae.seen = []
    images = hooked.run_with_saes(generator=_tiny.generator(), saes=[sae], use_error_term=True, **SD_KW)
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)
    schedule = [t.item() for t in pipe.scheduler.timesteps]
    # (SAELens encodes twice per call with use_error_term: once spliced, once clean for the error term.)
    assert list(dict.fromkeys(sae.seen)) == [(t, "both", ("uncond", "cond")) for t in schedule]
    assert len(sae.seen) == 2 * len(schedule)


def test_timestep_selector_semantics():
    from sae_lens_multimodal.diffusion.pipeline import TimestepSelector

    schedule = [999, 749, 499, 249]
    up = TimestepSelector(range(249, 750))
    assert [t for t in schedule if up(t)] == [749, 499, 249]
    down = TimestepSelector(range(999, 499, -1))  # 499 < t <= 999
    assert [t for t in schedule if down(t)] == [999, 749]
    stepped = TimestepSelector(range(249, 1000, 250))  # other steps: exact values
    stepped.validate(schedule)
    assert [t for t in schedule if stepped(t)] == [999, 749, 499, 249]
    exact = TimestepSelector([499.0000001])
    exact.validate(schedule)  # snapped to the schedule's value
    assert exact.values == [499] and exact(499) and not exact(500)
    assert TimestepSelector(lambda t: t > 600)(749) and not TimestepSelector(lambda t: t > 600)(499)
    assert TimestepSelector(None)(0)
    with pytest.raises(ValueError, match=r"\[999, 749, 499, 249\]"):
        TimestepSelector([500]).validate(schedule)
    with pytest.raises(TypeError, match="timesteps must be"):
        TimestepSelector(object())
