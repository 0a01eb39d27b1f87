"""Arguments of diffusion calls (HookedDiffusionPipeline, DenoisingLoop, timestep selectors, diffusion steering
and the diffusion analyses): each bad value raises before anything runs (or, for timesteps only the schedule
can judge, when the schedule is known), naming the problem and the fix, and leaves no hook behind."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from sae_lens_multimodal.diffusion import DenoisingLoop, HookedDiffusionPipeline
from sae_lens_multimodal.diffusion.pipeline import TimestepSelector
from sae_lens_multimodal.steering import DirectionSteer, steering_hooks
from tests.diffusion import _tiny

KW = {"prompt": "a cat", "num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}
HOOK = "up.1.1.hook_out"


@pytest.fixture(scope="module")
def hooked() -> HookedDiffusionPipeline:
    torch.manual_seed(0)
    return HookedDiffusionPipeline(_tiny.sd_pipeline())


def no_hooks(model) -> bool:
    return not any(hp._forward_hooks or hp._forward_pre_hooks for hp in model.hook_dict.values())


def _runs(hooked):
    """The three public ways to run the pipeline."""
    return {
        "forward": lambda **kw: hooked(**kw),
        "run_with_cache": lambda **kw: hooked.run_with_cache(names_filter=[HOOK], **kw),
        "run_with_hooks": lambda **kw: hooked.run_with_hooks(fwd_hooks=[(HOOK, lambda a, hook: a)], **kw),
    }


BAD_CALLS = [
    ({"num_inference_steps": 0}, ValueError, r"num_inference_steps must be at least 1; got 0"),
    ({"num_inference_steps": -3}, ValueError, r"num_inference_steps must be at least 1; got -3"),
    ({"num_inference_steps": 2.5}, TypeError, r"num_inference_steps must be a positive integer; got float 2\.5"),
    ({"num_inference_steps": "10"}, TypeError, r"num_inference_steps must be a positive integer; got str '10'"),
    ({"num_inference_steps": True}, TypeError, r"num_inference_steps must be a positive integer; got bool"),
    ({"guidance_scale": -1.0}, ValueError, r"guidance_scale must be >= 0; got -1\.0.*values <= 1 turn"),
    ({"guidance_scale": float("nan")}, ValueError, r"guidance_scale must be a finite number; got nan"),
    ({"guidance_scale": float("inf")}, ValueError, r"guidance_scale must be a finite number; got inf"),
    ({"guidance_scale": "7.5"}, TypeError, r"guidance_scale must be a number; got str"),
    ({"prompt": []}, ValueError, r"prompt is an empty list: pass at least one prompt"),
    ({"prompt": ["a cat", 3]}, TypeError, r"prompt must be strings.*got int 3"),
    ({"prompt": 42}, TypeError, r"prompt must be a string or a list of strings; got int 42"),
    ({"negative_prompt": []}, ValueError, r"negative_prompt is an empty list"),
    ({"height": 0}, ValueError, r"height must be at least 1; got 0"),
    ({"width": -32}, ValueError, r"width must be at least 1; got -32"),
    ({"num_images_per_prompt": 0}, ValueError, r"num_images_per_prompt must be at least 1"),
]


@pytest.mark.parametrize("change, error, pattern", BAD_CALLS)
@pytest.mark.parametrize("how", ["forward", "run_with_cache", "run_with_hooks"])
def test_bad_generation_arguments_on_every_entry_point(hooked, how, change, error, pattern):
    with pytest.raises(error, match=pattern):
        _runs(hooked)[how](**{**KW, **change})
    assert no_hooks(hooked)
    assert hooked._run is None  # nothing left half-started


def test_positional_prompt_is_checked_too(hooked):
    with pytest.raises(ValueError, match="prompt is an empty list"):
        hooked([], num_inference_steps=2, output_type="pt")


def test_valid_edge_values_still_run(hooked):
    for change in ({"num_inference_steps": 1}, {"guidance_scale": 0.0}, {"prompt": ["a", "b"]}, {"prompt": ""}):
        assert hooked(**{**KW, **change}).shape[1:] == (3, 32, 32)


def test_plain_denoising_loop_steps_and_guidance():
    loop = HookedDiffusionPipeline(denoiser=_tiny.sd_unet(), scheduler=DDIMScheduler())
    embeds = _tiny.embeds()
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1; got 0"):
        loop(embeds, num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        loop(embeds, num_inference_steps=2, guidance_scale=-2.0)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        DenoisingLoop(_tiny.sd_unet(), DDIMScheduler())(embeds, num_inference_steps=-1)


# ----------------------------------------------------------------------------------- cfg_branch
@pytest.mark.parametrize("branch", ["negative", "COND", "", 1, "conditional"])
def test_cfg_branch_outside_the_choices(hooked, branch):
    for how in ("run_with_cache", "run_with_hooks"):
        with pytest.raises(ValueError, match=r"cfg_branch must be one of 'cond', 'uncond', 'both' or None"):
            _runs(hooked)[how](cfg_branch=branch, **{**KW, "guidance_scale": 3.0})
    with pytest.raises(ValueError, match=r"cfg_branch must be one of 'cond', 'uncond' or None"):
        DirectionSteer(HOOK, torch.ones(32), "add", value=1.0, cfg_branch=branch)
    assert no_hooks(hooked)


# ----------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("spec, error, pattern", [
    (range(800, 200), ValueError, r"window range\(800, 200\) is empty \(start >= end\).*write range\(200, 800\)"),
    (range(200, 800, -1), ValueError, r"window range\(200, 800, -1\) is empty \(start <= end\).*range\(800, 200, 1\)"),
    (range(500, 500), ValueError, r"is empty"),
    ([-5], ValueError, r"finite numbers >= 0.*got -5"),
    ([float("nan")], ValueError, r"finite numbers >= 0.*got nan"),
    (-1, ValueError, r"got -1"),
    (range(-10, 5), ValueError, r"got -10"),
    (["500"], TypeError, r"timesteps must be numbers.*got str '500'"),
    ("500", TypeError, r"timesteps must be None, a range, numbers or a predicate; got the string '500'"),
    ([True], TypeError, r"timesteps must be numbers.*got bool"),
    (object(), TypeError, r"timesteps must be None, a range, numbers or a predicate"),
])
def test_timestep_selectors_refuse_bad_windows(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        TimestepSelector(spec)


def test_timesteps_outside_the_schedule_name_the_schedule(hooked):
    with pytest.raises(ValueError, match=r"\[5000\] are not in this run's schedule.*actual timesteps are \[\d+, \d+\]"):
        hooked.run_with_cache(names_filter=[HOOK], timesteps=[5000], **KW)
    with pytest.raises(ValueError, match=r"No timestep of this run's schedule falls in range\(2000, 3000\)"):
        hooked.run_with_hooks(fwd_hooks=[(HOOK, lambda a, hook: a)], at_timesteps=range(2000, 3000), **KW)
    with pytest.raises(ValueError, match=r"is empty"):
        hooked.run_with_hooks(fwd_hooks=[(HOOK, lambda a, hook: a)], at_timesteps=range(900, 100), **KW)
    assert no_hooks(hooked)


def test_steering_timestep_windows(hooked):
    d = torch.ones(hooked.hook_spec(hooked.canonical_hook_name(HOOK)).width)
    with pytest.raises(ValueError, match=r"range\(900, 100\) is empty.*range\(100, 900\)"):
        steering_hooks(hooked, [DirectionSteer(HOOK, d, "add", value=1.0, timesteps=range(900, 100))])
    with pytest.raises(ValueError, match=r"got -3"):
        steering_hooks(hooked, [DirectionSteer(HOOK, d, "add", value=1.0, timesteps=[-3])])
    with pytest.raises(ValueError, match="not in this run's schedule"):
        hooked.run_with_hooks(fwd_hooks=steering_hooks(hooked, [DirectionSteer(HOOK, d, "add", 1.0, timesteps=[4242])]), **KW)
    assert no_hooks(hooked)


# ----------------------------------------------------------------------------------- analyses
def test_feature_timecourse_arguments(hooked):
    from sae_lens import StandardSAE, StandardSAEConfig

    from sae_lens_multimodal.analysis.temporal import feature_timecourse

    width = hooked.hook_spec(hooked.canonical_hook_name(HOOK)).width
    d = torch.ones(width)
    sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=8))
    sae.cfg.metadata.hook_name = HOOK
    for kwargs, error, pattern in [
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be at least 1"),
        ({"guidance_scale": -2.0}, ValueError, "guidance_scale must be >= 0"),
        ({"guidance_scale": float("nan")}, ValueError, "finite number"),
        ({"cfg_branch": "both"}, ValueError, "cfg_branch must be one of 'cond', 'uncond'"),
    ]:
        with pytest.raises(error, match=pattern):
            feature_timecourse(hooked, ["a cat"], HOOK, direction=d, **kwargs)
    with pytest.raises(ValueError, match="prompts is an empty list"):
        feature_timecourse(hooked, [], HOOK, direction=d)
    with pytest.raises(ValueError, match=r"direction must be finite.*NaN/inf"):
        feature_timecourse(hooked, ["a cat"], HOOK, direction=torch.full((width,), float("nan")))
    for features, error, pattern in [([1.5], TypeError, "float 1.5"), ([8], IndexError, "d_sae=8"),
                                     (torch.tensor([[1]]), ValueError, "1-d"), ([], ValueError, "empty")]:
        with pytest.raises(error, match=pattern):
            feature_timecourse(hooked, ["a cat"], sae=sae, features=features)
    assert feature_timecourse(hooked, ["a cat"], sae=sae, features=torch.tensor(3), num_inference_steps=2,
                              height=32, width=32).features == [3]
    pattern_hook = next(n for n, s in hooked.hook_specs().items() if s.layout == "pattern")
    with pytest.raises(ValueError, match=r"layout 'pattern'.*feature_timecourse cannot use"):
        feature_timecourse(hooked, ["a cat"], pattern_hook, direction=d)
    assert no_hooks(hooked)


def test_other_diffusion_analyses_check_steps_guidance_and_windows(hooked):
    from sae_lens_multimodal.analysis.ablation import ablate_components
    from sae_lens_multimodal.analysis.diffusion_patching import diffusion_patching
    from sae_lens_multimodal.analysis.temporal import timestep_probes

    prompts = [{"color": "red", "shape": "circle", "position": "left"}]
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        timestep_probes(hooked, HOOK, num_inference_steps=0)
    with pytest.raises(ValueError, match="n_train must be at least 1"):
        timestep_probes(hooked, HOOK, n_train=0)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        ablate_components(hooked, prompts, num_inference_steps=-1)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        ablate_components(hooked, prompts, guidance_scale=-1)
    with pytest.raises(ValueError, match=r"range\(800, 200\) is empty"):
        ablate_components(hooked, prompts, at_timesteps=range(800, 200))
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        diffusion_patching(hooked, ["a"], ["b"], num_inference_steps=0, factor=None)
    with pytest.raises(ValueError, match=r"window range\(800, 200\) is empty"):
        diffusion_patching(hooked, ["a"], ["b"], timesteps=[range(800, 200)], factor=None)
    with pytest.raises(ValueError, match="cfg_branch must be one of 'cond', 'uncond' or None"):
        diffusion_patching(hooked, ["a"], ["b"], cfg_branch="both", factor=None)
    with pytest.raises(ValueError, match="source is an empty list"):
        diffusion_patching(hooked, [], [], factor=None)
    with pytest.raises(TypeError, match="heads must be integer head indices; got float"):
        from sae_lens_multimodal.analysis.ablation import attention_modules, head_components

        head_components(hooked, modules=attention_modules(hooked)[:1], heads=[0.5])
    assert no_hooks(hooked)
