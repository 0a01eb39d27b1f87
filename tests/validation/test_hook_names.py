"""Hook names at every public boundary (run_with_cache / run_with_hooks / hooks(), add_sae, locate, steering,
patching, ablation, temporal analysis, logit lens): unknown names raise the KeyError with close matches,
names of the wrong layout or type a ValueError / TypeError naming what is expected, and no hook is left."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_multimodal.core.arguments import hook_with_layout
from sae_lens_multimodal.models import HookedViT, HookedViTConfig
from sae_lens_multimodal.steering import DirectionSteer, steering_hooks


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    cfg = HookedViTConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, image_size=32, patch_size=8)
    model = HookedViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained("shapes-clip").eval()


@pytest.fixture(scope="module")
def pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from tests.diffusion import _tiny

    torch.manual_seed(0)
    return HookedDiffusionPipeline(_tiny.sd_pipeline())


X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
KW = {"prompt": "a cat", "num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}


def no_hooks(model) -> bool:
    return not any(hp._forward_hooks or hp._forward_pre_hooks for hp in model.hook_dict.values())


def sae_at(hook, d_in: int = 16) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=8))
    sae.cfg.metadata.hook_name = hook
    return sae


# ----------------------------------------------------------------------------------- caching and hooks
@pytest.mark.parametrize("typo, close", [
    ("blocks.0.hook_resid_pst", "blocks.0.hook_resid_post"),
    ("blocks.7.hook_resid_post", "blocks.1.hook_resid_post"),
    ("blocks.0.attn.hook_patern", "blocks.0.attn.hook_pattern"),
    ("block.1.mlp.hook_post", "blocks.1.mlp.hook_post"),
    ("hook_embeds", "hook_embed"),
    ("blocks.0.hook_resid_post ", "blocks.0.hook_resid_post"),
])
def test_names_filter_typos_list_close_matches(vit, typo, close):
    for nf in (typo, [typo], ["hook_embed", typo], {typo}, (typo,)):
        with pytest.raises(KeyError, match=rf"Unknown hook {typo!r}\. Did you mean: .*{close!r}.*hook_dict\.keys\(\)"):
            vit.run_with_cache(X, names_filter=nf)
    assert no_hooks(vit)


def test_names_filter_forms(vit):
    _, cache = vit.run_with_cache(X, names_filter=("blocks.0.hook_resid_post", "hook_embed"))  # a tuple works
    assert set(cache.keys()) == {"blocks.0.hook_resid_post", "hook_embed"}
    _, cache = vit.run_with_cache(X, names_filter=lambda n: n.endswith("resid_post"))
    assert set(cache.keys()) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    for bad in ([3], [None], ["hook_embed", b"hook_pos_embed"]):
        with pytest.raises(TypeError, match=r"names_filter lists hook names \(strings\); got"):
            vit.run_with_cache(X, names_filter=bad)
    assert no_hooks(vit)


@pytest.mark.parametrize("hooks, error, pattern", [
    ([("blocks.5.hook_resid_post", lambda a, hook: a)], KeyError, r"Unknown hook 'blocks\.5\.hook_resid_post'\. Did you mean"),
    ([(5, lambda a, hook: a)], TypeError, r"named by a string.*or a predicate on names; got 5 \(int\)"),
    ([("blocks.0.hook_resid_post", "not a function")], TypeError, r"hook function for 'blocks\.0\.hook_resid_post' is not callable"),
    (("blocks.0.hook_resid_post", lambda a, hook: a), TypeError, r"fwd_hooks is a list of \(hook name, function\) pairs"),
    ([("blocks.0.hook_resid_post",)], TypeError, r"Each entry of fwd_hooks is a \(hook name, function\) pair"),
    ("blocks.0.hook_resid_post", TypeError, r"fwd_hooks is a list of \(hook name, function\) pairs"),
])
def test_run_with_hooks_names(vit, hooks, error, pattern):
    with pytest.raises(error, match=pattern):
        vit.run_with_hooks(X, fwd_hooks=hooks)
    with pytest.raises(error, match=pattern):
        with vit.hooks(fwd_hooks=hooks):
            vit(X)
    assert no_hooks(vit)


# ----------------------------------------------------------------------------------- SAEs
@pytest.mark.parametrize("hook, error, pattern", [
    ("blocks.9.hook_resid_post", KeyError, r"Unknown hook for this SAE 'blocks\.9\.hook_resid_post'\. Did you mean"),
    ("blocks.0.attn.hook_pattern", ValueError, r"layout 'pattern'.*not a feature dimension.*residual-stream"),
    ("blocks.0.attn.hook_attn_scores", ValueError, r"layout 'pattern'"),
    ("blocks.0.ln1.hook_scale", ValueError, r"layout 'scale'"),
    ("blocks.0.mlp.hook_post", ValueError, r"SAE d_in=16 does not match hook 'blocks\.0\.mlp\.hook_post'.*width 32"),
])
def test_add_sae_by_hook_name(vit, hook, error, pattern):
    with pytest.raises(error, match=pattern):
        vit.add_sae(sae_at(hook, 16 if "pattern" not in hook and "scores" not in hook else 5))
    assert not vit._acts_to_saes


def test_locate_and_parts(clip):
    with pytest.raises(KeyError, match=r"Unknown hook 'vision\.blocks\.9\.hook_resid_post'\. Did you mean: 'vision\.blocks\.3"):
        clip.hook_spec("vision.blocks.9.hook_resid_post")
    with pytest.raises(KeyError, match=r"Did you mean: .*'vision\.blocks\.0\.hook_resid_post'"):
        clip.run_with_cache(X, ["a"], names_filter="vision.blocks.0.hook_resid_pots")
    with pytest.raises(TypeError, match=r"locate\(\) takes a hook name .* or an SAELens SAE; got int 3"):
        clip.locate(3)
    with pytest.raises(KeyError, match=r"has no part 'audio'; its parts are \('vision', 'text'\)"):
        clip.locate("blocks.0.hook_resid_post", part="audio")
    assert no_hooks(clip)


def test_hook_with_layout(clip):
    assert hook_with_layout(clip, "vision.blocks.0.hook_resid_post").layout == "tokens"
    with pytest.raises(ValueError, match=r"'vision\.blocks\.1\.attn\.hook_pattern' has layout 'pattern'.*probing cannot use.*"
                                         r"Hooks that fit near it: 'vision\.blocks\.1\.hook_resid_pre'"):
        hook_with_layout(clip, "vision.blocks.1.attn.hook_pattern", purpose="probing")
    with pytest.raises(TypeError, match=r"A hook name is a string.*got int 7"):
        hook_with_layout(clip, 7)


# ----------------------------------------------------------------------------------- steering targets
def test_steering_targets(vit):
    d = torch.ones(16)
    with pytest.raises(KeyError, match=r"Unknown hook 'blocks\.2\.hook_resid_post'\. Did you mean"):
        steering_hooks(vit, [DirectionSteer("blocks.2.hook_resid_post", d, "add", 1.0)])
    with pytest.raises(ValueError, match=r"layout 'pattern'.*steering cannot use"):
        steering_hooks(vit, [DirectionSteer("blocks.0.attn.hook_pattern", torch.ones(5), "add", 1.0)])
    assert no_hooks(vit)


# ----------------------------------------------------------------------------------- diffusion
def test_diffusion_hook_names(pipe):
    with pytest.raises(KeyError, match=r"'up\.9\.1\.hook_out' is an alias of 'up_blocks\.9\.attentions\.1\.hook_out'.*Did you mean"):
        pipe.run_with_cache(names_filter=["up.9.1.hook_out"], **KW)
    with pytest.raises(KeyError, match=r"Unknown hook 'up_blocks\.1\.attentions\.1\.hook_outt'\. Did you mean"):
        pipe.run_with_hooks(fwd_hooks=[("up_blocks.1.attentions.1.hook_outt", lambda a, hook: a)], **KW)
    with pytest.raises(KeyError, match=r"alias of .*Did you mean"):
        pipe.add_sae(sae_at("up.7.0.hook_out", 32))
    pattern = next(n for n, s in pipe.hook_specs().items() if s.layout == "pattern")
    with pytest.raises(ValueError, match=r"layout 'pattern'.*SAE cannot read it"):
        pipe.add_sae(sae_at(pattern, 4))
    with pytest.raises(ValueError, match=r"layout 'pattern'.*steering cannot use"):
        steering_hooks(pipe, [DirectionSteer(pattern, torch.ones(4), "add", 1.0)])
    assert no_hooks(pipe) and not pipe._acts_to_saes


def test_diffusion_analyses_hook_names(pipe):
    from sae_lens_multimodal.analysis.ablation import Component, ablate_components, block_components, head_components
    from sae_lens_multimodal.analysis.temporal import feature_timecourse, timestep_probes

    with pytest.raises(KeyError, match=r"Did you mean"):
        feature_timecourse(pipe, ["a"], "up_blocks.0.attentions.7.hook_out", direction=torch.ones(64))
    pattern = next(n for n, s in pipe.hook_specs().items() if s.layout == "pattern")
    with pytest.raises(ValueError, match=r"layout 'pattern'.*feature_timecourse cannot use"):
        feature_timecourse(pipe, ["a"], pattern, direction=torch.ones(4))
    with pytest.raises(ValueError, match=r"layout 'pattern'.*timestep_probes cannot use"):
        timestep_probes(pipe, pattern, factors=("color",), world=_NoWorld())
    with pytest.raises(KeyError, match=r"have no hook_update"):
        block_components(pipe, ["up_blocks.9.resnets.0"])
    with pytest.raises(KeyError, match=r"has no hook_z"):
        head_components(pipe, modules=["up_blocks.1.attentions.0.transformer_blocks.0.attn9"])
    with pytest.raises(KeyError, match=r"Did you mean"):
        ablate_components(pipe, [{"color": "red"}], components=[Component("up_blocks.1.attentions.0.nothing", 0)])
    assert no_hooks(pipe)


class _NoWorld:
    """A factor world stub: timestep_probes checks the hook after the factors."""

    factor_values = {"color": ["red", "blue"]}

    def sample_prompts(self, n, seed):
        return [{"color": "red"}] * n


# ----------------------------------------------------------------------------------- patching and logit lens
def test_patching_and_logit_lens_names(clip):
    from sae_lens_multimodal.analysis.logit_lens import clip_logit_lens
    from sae_lens_multimodal.analysis.vision_patching import clip_activation_patching
    from sae_lens_multimodal.analysis.zero_shot import zero_shot_classifier

    clf = zero_shot_classifier(clip, ["red", "blue"])
    with pytest.raises(ValueError, match=r"Cannot patch \['resid_post'\]: per-token activations are \['resid_pre'"):
        clip_activation_patching(clip, X, X, clf, 0, 1, activations=["resid_post"])
    with pytest.raises(ValueError, match=r"Cannot patch \['hook_resid_pre'\]"):
        clip_activation_patching(clip, X, X, clf, 0, 1, full_layer=["hook_resid_pre"])
    with pytest.raises(ValueError, match=r"position must be 'pooled', 'cls' or a token index, got 'middle'"):
        clip_logit_lens(clip, X, clf, position="middle")
    assert no_hooks(clip)
