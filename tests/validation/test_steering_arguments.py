"""Arguments of steering and analysis calls: feature indices, strengths, hooks; every refusal names the problem
and the fix, and no hook is left on the model after one (also when a steer fails while the model runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_multimodal.core.arguments import (
    FeatureIndexError,
    as_feature_index,
    as_feature_indices,
    as_layer_indices,
    finite_float,
    finite_values,
    non_negative_latents,
)
from sae_lens_multimodal.steering import DirectionSteer, FeatureSteer, steer, steering_hooks, steerability

HOOK = "blocks.2.hook_resid_post"
D_SAE = 64


@pytest.fixture(scope="module")
def clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    model = HookedCLIP.from_pretrained("shapes-clip").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sae(cls, cfg_cls, d_in: int, **kw):
    sae = cls(cfg_cls(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK), **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return sae.eval()


@pytest.fixture(scope="module")
def sae(clip):
    return _sae(TopKSAE, TopKSAEConfig, clip.vision.cfg.d_model, k=4)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def no_hooks(model) -> bool:
    return not any(hp._forward_hooks or hp._forward_pre_hooks for hp in model.hook_dict.values())


# ----------------------------------------------------------------------------------- feature indices
@pytest.mark.parametrize("given, expected", [
    (3, [3]), ([3, 7], [3, 7]), ((3, 7), [3, 7]), (range(2, 5), [2, 3, 4]), (torch.tensor(3), [3]),
    (torch.tensor([3, 7]), [3, 7]), (np.int64(3), [3]), (np.array([3, 7]), [3, 7]), (np.array(5), [5]),
    ([np.int32(1), torch.tensor(2)], [1, 2]), ({4, 1}, [1, 4]), (63, [63]),
])
def test_feature_indices_accepted_forms(given, expected):
    assert as_feature_indices(given, D_SAE) == expected


@pytest.mark.parametrize("given, error, pattern", [
    (3.0, TypeError, r"integer feature indices; got the float 3\.0\. Pass int\(3\.0\)"),
    ([1, 2.5], TypeError, r"got the float 2\.5"),
    (np.float32(2), TypeError, r"got the float 2\.0"),
    (torch.tensor([1.0, 2.0]), TypeError, r"torch\.float32 tensor.*x\.long\(\)"),
    (np.array([1.0]), TypeError, r"float64 numpy array.*x\.long\(\)"),
    (True, TypeError, r"got the bool True"),
    ([1, False], TypeError, r"got the bool False"),
    (torch.tensor([True, False]), TypeError, r"torch\.bool tensor.*nonzero\(\)"),
    ("3", TypeError, r"got the string '3'"),
    ({1: 2}, TypeError, r"got a dict"),
    (None, TypeError, r"got NoneType None"),
    ([[1, 2]], TypeError, r"got list \[1, 2\]"),
    (torch.tensor([[1, 2]]), ValueError, r"1-d list of indices.*shape \(1, 2\).*Flatten"),
    ([], ValueError, r"features is empty: pass at least one feature index \(0 \.\. 63\)"),
    (torch.tensor([], dtype=torch.long), ValueError, r"features is empty"),
    (-1, FeatureIndexError, r"Feature index -1 in features is out of range: this SAE has d_sae=64 latents.*not counted from the end"),
    (64, FeatureIndexError, r"Feature index 64 .*d_sae=64.*indices 0\.\.63"),
    ([1, 10**9], FeatureIndexError, r"Feature index 1000000000"),
    ([3, 5, 3], ValueError, r"Feature index 3 is given twice in features; pass each feature once"),
])
def test_feature_indices_refused(given, error, pattern):
    with pytest.raises(error, match=pattern):
        as_feature_indices(given, D_SAE)


def test_out_of_range_is_both_an_index_error_and_a_value_error():
    with pytest.raises(IndexError):
        as_feature_indices(99, D_SAE)
    with pytest.raises(ValueError):
        as_feature_indices(99, D_SAE)


def test_one_feature_index():
    assert as_feature_index(torch.tensor(4), D_SAE) == 4
    with pytest.raises(TypeError, match=r"one feature index; got list.*once per feature"):
        as_feature_index([1, 2], D_SAE)
    with pytest.raises(TypeError, match=r"one feature index; got a torch\.int64 tensor of shape \(2,\)"):
        as_feature_index(torch.tensor([1, 2]), D_SAE)


def test_layer_indices():
    assert as_layer_indices(np.array([0, 2]), 3) == [0, 2]
    with pytest.raises(FeatureIndexError, match=r"Layer index 3 in layers is out of range: this model has n_layers=3"):
        as_layer_indices([3], 3)


@pytest.mark.parametrize("given, error, pattern", [
    (float("nan"), ValueError, r"strength must be a finite number; got nan"),
    (float("inf"), ValueError, r"got inf"),
    (np.float64("-inf"), ValueError, r"got -inf"),
    (torch.tensor(float("nan")), ValueError, r"got nan"),
    ("2", TypeError, r"strength must be a number; got str '2'"),
    (True, TypeError, r"must be a number; got bool"),
    (None, TypeError, r"must be a number; got NoneType"),
    (torch.tensor([1.0, 2.0]), TypeError, r"must be one number; got a torch\.float32 tensor of shape \(2,\)"),
])
def test_finite_float(given, error, pattern):
    with pytest.raises(error, match=pattern):
        finite_float(given, "strength")


def test_finite_values():
    assert finite_values([1, 2.5], "value").tolist() == [1.0, 2.5]
    with pytest.raises(ValueError, match=r"value must be finite; entry 1 is nan \(1 non-finite of 3\)"):
        finite_values([1.0, float("nan"), 2.0], "value")
    with pytest.raises(TypeError, match=r"value must be a number or a list of numbers; got str"):
        finite_values("big", "value")
    with pytest.raises(ValueError, match="value is empty"):
        finite_values([], "value")


# ----------------------------------------------------------------------------------- FeatureSteer / DirectionSteer
@pytest.mark.parametrize("features", [torch.tensor(3), np.int64(3), np.array([3, 4]), torch.tensor([3, 4]), (3, 4)])
def test_feature_steer_accepts_tensor_and_numpy_indices(sae, features):
    s = FeatureSteer(sae, features, "clamp", value=1.0)
    assert s.feature_ids == ([3] if np.ndim(features) == 0 else [3, 4])


@pytest.mark.parametrize("features, error", [(3.0, TypeError), ([3.5], TypeError), (True, TypeError),
                                             (-1, IndexError), (D_SAE, IndexError), ([], ValueError),
                                             ([2, 2], ValueError), ("3", TypeError)])
def test_feature_steer_refuses_bad_indices(sae, features, error):
    with pytest.raises(error, match=r"feature|features"):
        FeatureSteer(sae, features, "clamp", value=1.0)


@pytest.mark.parametrize("mode, value", [("clamp", float("nan")), ("add", float("inf")), ("scale", float("-inf")),
                                         ("clamp", [1.0, float("nan")]), ("add", torch.tensor([float("inf")]))])
def test_feature_steer_refuses_non_finite_strengths(sae, mode, value):
    feats = [1, 2] if isinstance(value, list) else 1
    with pytest.raises(ValueError, match=r"value must be finite.*Pass finite values"):
        FeatureSteer(sae, feats, mode, value=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), np.float32("nan")])
def test_direction_steer_refuses_non_finite_strengths(clip, value):
    with pytest.raises(ValueError, match=r"value must be a finite number"):
        DirectionSteer("vision." + HOOK, torch.ones(clip.vision.cfg.d_model), "add", value=value)


def test_direction_steer_value_is_one_number(clip):
    with pytest.raises(ValueError, match="one number"):
        DirectionSteer("vision." + HOOK, torch.ones(clip.vision.cfg.d_model), "add", value=[1.0, 2.0])
    with pytest.raises(TypeError, match="value must be a number; got str"):
        DirectionSteer("vision." + HOOK, torch.ones(clip.vision.cfg.d_model), "add", value="2")


@pytest.mark.parametrize("cls, cfg_cls, kw", [(TopKSAE, TopKSAEConfig, {"k": 4}), (StandardSAE, StandardSAEConfig, {}),
                                              (JumpReLUSAE, JumpReLUSAEConfig, {})])
def test_negative_clamp_of_non_negative_latents_is_refused(clip, cls, cfg_cls, kw):
    sae = _sae(cls, cfg_cls, clip.vision.cfg.d_model, **kw)
    assert non_negative_latents(sae)
    arch = cfg_cls.architecture()
    with pytest.raises(ValueError, match=rf"value=-2\.0 would make latents negative \(clamping\).*'{arch}'.*value >= 0"):
        FeatureSteer(sae, 3, "clamp", value=-2.0)
    with pytest.raises(ValueError, match=r"value=-1\.0 would make latents negative \(scaling\)"):
        FeatureSteer(sae, [3, 4], "scale", value=[2.0, -1.0])
    FeatureSteer(sae, 3, "clamp", value=0.0)  # zero and positive values are fine
    FeatureSteer(sae, 3, "add", value=-2.0)  # adding a negative amount lowers the feature: allowed


def test_ablate_takes_no_value(sae):
    with pytest.raises(ValueError, match=r"mode='ablate' sets the feature to 0 and takes no value="):
        FeatureSteer(sae, 3, "ablate", value=5.0)


# ----------------------------------------------------------------------------------- hooks of steers
@pytest.mark.parametrize("hook", ["vision.blocks.99.hook_resid_post", "blocks.9.hook_resid_post",
                                  "vision.blocks.2.hook_resid_pots", "vision.blocks.-1.hook_resid_post"])
def test_steering_at_a_hook_the_model_lacks_is_the_unknown_hook_error(clip, sae, x, hook):
    d = torch.ones(clip.vision.cfg.d_model)
    for make in (lambda: DirectionSteer(hook, d, "add", value=1.0),
                 lambda: FeatureSteer(sae, 1, "clamp", value=1.0, hook_name=hook)):
        with pytest.raises(KeyError, match=r"Unknown hook.*Did you mean: 'vision\.blocks\.\d\.hook_resid_post'"):
            with steer(clip, make()):
                clip.encode_image(x)
        with pytest.raises(KeyError, match="Did you mean"):
            steering_hooks(clip, [make()])
        assert no_hooks(clip)
    with pytest.raises(KeyError, match="Did you mean"):  # the same error run_with_hooks gives for the name
        clip.run_with_hooks(x, ["a"], fwd_hooks=[(hook if hook.startswith("vision.") else "vision." + hook, lambda a, hook: a)])


@pytest.mark.parametrize("hook, layout", [("vision.blocks.1.attn.hook_pattern", "pattern"),
                                          ("vision.blocks.1.attn.hook_attn_scores", "pattern"),
                                          ("vision.blocks.1.ln1.hook_scale", "scale")])
def test_steering_at_a_hook_without_a_feature_axis_is_refused(clip, hook, layout):
    with pytest.raises(ValueError, match=rf"layout '{layout}'.*steering cannot use.*tokens \[batch, pos, width\].*"
                                         r"Hooks that fit near it: 'vision\.blocks\.1\.hook_resid_pre'"):
        steering_hooks(clip, [DirectionSteer(hook, torch.ones(4), "add", value=1.0)])
    assert no_hooks(clip)


def test_a_bad_steer_among_good_ones_leaves_no_hook(clip, sae, x):
    good = FeatureSteer(sae, 1, "clamp", value=1.0)
    bad = DirectionSteer("vision.blocks.7.hook_resid_post", torch.ones(clip.vision.cfg.d_model), "add", value=1.0)
    with pytest.raises(KeyError):
        with steer(clip, good, bad):
            clip.encode_image(x)
    assert no_hooks(clip)


def test_hooks_removed_when_a_steer_fails_while_the_model_runs(clip, sae, x):
    # Position 500 is only found out of range when the hook sees the activation.
    s = FeatureSteer(sae, 1, "clamp", value=1.0, positions=[500])
    with pytest.raises(IndexError, match="out of range"):
        with steer(clip, s):
            clip.encode_image(x)
    assert no_hooks(clip)
    with pytest.raises(IndexError, match="out of range"):
        clip.vision.run_with_hooks(x, fwd_hooks=steering_hooks(clip.vision, [s]))
    assert no_hooks(clip)


# ----------------------------------------------------------------------------------- steerability
@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"strengths": [1.0, float("nan")]}, ValueError, r"strengths must be finite; entry 1 is nan"),
    ({"strengths": [float("inf")]}, ValueError, r"strengths must be finite"),
    ({"strengths": []}, ValueError, r"strengths is empty"),
    ({"strengths": [-1.0, 2.0]}, ValueError, r"strengths=-1\.0 would make latents negative"),
    ({"feature_ids": [2.0]}, TypeError, r"feature_ids must be integer feature indices; got the float 2\.0"),
    ({"feature_ids": [999]}, IndexError, r"Feature index 999 in feature_ids is out of range.*d_sae=64"),
    ({"feature_ids": [1, 1]}, ValueError, r"given twice"),
    ({"max_features": 0}, ValueError, r"max_features must be at least 1"),
    ({"quantile": float("nan")}, ValueError, r"quantile must be a finite number"),
])
def test_steerability_arguments(clip, sae, x, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        steerability(clip, sae, x, ["red", "blue"], progress=False, **kwargs)
    assert no_hooks(clip)


def test_steerability_accepts_tensor_feature_ids(clip, sae, x):
    _, cache = clip.vision.run_with_cache(x, names_filter=HOOK)
    alive = int((sae.encode(cache[HOOK]).amax(dim=(0, 1)) > 0).nonzero()[0])  # TopK: some latent is always active
    res = steerability(clip, sae, x, ["red", "blue"], feature_ids=torch.tensor([alive]), strengths=np.array([1.0]),
                       n_baseline=2, progress=False)
    assert res.feature_ids == [alive] and res.strengths == [1.0]


# ----------------------------------------------------------------------------------- VLM analyses
@pytest.fixture(scope="module")
def vlm():
    from sae_lens_multimodal.models.vlm import HookedVLM
    from sae_lens_multimodal.testing import tiny_random_llava
    from tests.models.test_hooked_vlm import images, make_sae, prompt

    return HookedVLM.from_pretrained(tiny_random_llava("llava", "llama", seed=12)), prompt(), images(), make_sae


def test_vlm_steering_and_layer_arguments(vlm):
    from sae_lens_multimodal.analysis.vlm import image_logit_lens, patch_image_tokens, steer_vision_feature

    model, ids, px, make_sae = vlm
    sae = make_sae(32, "blocks.1.hook_resid_post", seed=13, d_sae=16)
    common = dict(answer_tokens=3, n_random=1)
    for feature, error, pattern in [(2.0, TypeError, "got the float 2.0"), (16, IndexError, "d_sae=16"),
                                    (torch.tensor(1.5), TypeError, r"torch\.float32 tensor.*x\.long\(\)"), ([1, 2], TypeError, "one feature index")]:
        with pytest.raises(error, match=pattern):
            steer_vision_feature(model, sae, feature, ids, px, value=1.0, **common)
    with pytest.raises(ValueError, match="value must be a finite number; got nan"):
        steer_vision_feature(model, sae, 1, ids, px, value=float("nan"), **common)
    with pytest.raises(ValueError, match=r"value=-3\.0 would make latents negative.*'standard'"):
        steer_vision_feature(model, sae, 1, ids, px, value=-3.0, **common)
    with pytest.raises(ValueError, match="n_random"):
        steer_vision_feature(model, sae, 1, ids, px, value=1.0, answer_tokens=3, n_random=-2)
    n = model.lm.cfg.n_layers
    with pytest.raises(IndexError, match=rf"Layer index {n + 1} in layers is out of range: residual-stream indices run 0\.\.{n}"):
        image_logit_lens(model, ids, px, layers=[n + 1])
    with pytest.raises(IndexError, match=rf"Layer index {n} in layers is out of range.*n_layers={n}"):
        patch_image_tokens(model, ids, px, px, answer_tokens=3, layers=[n])
    with pytest.raises(TypeError, match="integer layer indices; got the float 0.5"):
        patch_image_tokens(model, ids, px, px, answer_tokens=3, layers=[0.5])
    assert no_hooks(model)
