"""Activation patching in the shapes-world CLIP, where the answer is known.

Clean image: a red circle on the left; corrupted: the very same circle (same centre, radius and pixels
covered) in blue. Only the patches the circle covers differ between the two inputs, so at the first
layer patching any other token must change nothing and patching the circle's tokens together must give
back the clean prediction exactly; deeper layers move the colour into the CLS token, which the image
embedding is read from.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sae_lens_multimodal.analysis.vision_patching import clip_activation_patching, token_names
from sae_lens_multimodal.analysis.zero_shot import ZeroShotClassifier
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.world import ShapesWorld, all_captions, caption, to_tensor
from sae_lens_multimodal.world.causal import shape_patch_mask
from sae_lens_multimodal.world.shapes import COLORS


@pytest.fixture(scope="module")
def setup():
    model = HookedCLIP.from_pretrained("shapes-clip")
    classifier = ZeroShotClassifier(model, all_captions(), templates=("{}",))
    world = ShapesWorld(image_size=32, seed=3)
    red = world.sample_factors(1, shape="circle", color="red", position="left", size="large", texture="plain")[0]
    blue = replace(red, color="blue", rgb=COLORS["blue"])
    images = world.render([red, blue])
    x = to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3)
    region = shape_patch_mask(red, image_size=32, patch_size=4)
    with torch.no_grad():
        result = clip_activation_patching(
            model, x[:1], x[1:], classifier, caption(red), caption(blue), region_tokens=region
        )
    return model, classifier, x, red, blue, region, result


def test_corruption_flips_the_prediction(setup):
    model, classifier, x, red, blue, _, result = setup
    pred = classifier.predict(x).tolist()
    names = classifier.class_names
    assert [names[i] for i in pred] == [caption(red), caption(blue)]
    assert result.clean_logit_diff > 5 and result.corrupt_logit_diff < -5


def test_ground_truth_region(setup):
    _, _, x, _, _, region, result = setup
    # The region is where the pixels differ (black background elsewhere).
    differs = (x[0] != x[1]).any(0).reshape(8, 4, 8, 4).any(-1).any(1).flatten().nonzero().flatten() + 1
    assert set(differs.tolist()) <= set(region)
    grid = result.by_token["resid_pre"]
    outside = [t for t in range(grid.shape[1]) if t not in region]
    # Layer 0: tokens outside the shape carry identical activations in both runs.
    assert grid[0, outside].abs().max() < 1e-4
    assert abs(result.region["resid_pre"][0] - 1.0) < 1e-4
    # The strongest single tokens at layers 0 and 1 are the circle's patches.
    for layer in (0, 1):
        assert int(grid[layer].argmax()) in region
    assert grid[0, region].max() > 0.2


def test_effect_moves_to_cls_by_the_last_layer(setup):
    _, _, _, _, _, region, result = setup
    grid = result.by_token["resid_pre"]
    last = grid.shape[0] - 1
    # Measured: CLS alone 0.00, 0.03, 0.22, 0.79 at layers 0-3; the circle's patches 1.00, 0.60, 0.47, 0.04.
    assert grid[0, 0].abs() < 1e-4
    assert grid[last, 0] > 0.6
    assert torch.all(grid[1:, 0].diff() > 0)
    assert result.region["resid_pre"][last] < 0.2
    assert result.region["resid_pre"][1] > 0.4
    # The full residual stream at any layer carries everything: patching all of it gives the clean run.
    assert torch.allclose(result.full_layer["resid_post"], torch.ones(last + 1), atol=1e-4)
    assert torch.allclose(result.full_layer["resid_pre"], torch.ones(last + 1), atol=1e-4)


def test_entries_match_hand_patching(setup):
    model, classifier, x, red, blue, _, result = setup
    vision = model.vision
    names = classifier.class_names
    i, j = names.index(caption(red)), names.index(caption(blue))
    with torch.no_grad():
        _, cache = vision.run_with_cache(x[:1])

        def ld(embeds):
            logits = classifier.logits_from_embeddings(embeds)[0]
            return float(logits[i] - logits[j])

        def norm(v):
            return (v - result.corrupt_logit_diff) / (result.clean_logit_diff - result.corrupt_logit_diff)

        def put_token(act, hook):
            act[:, 34] = cache["blocks.1.hook_resid_pre"][:, 34]
            return act

        got = norm(ld(vision.run_with_hooks(x[1:], fwd_hooks=[("blocks.1.hook_resid_pre", put_token)])))
        assert abs(got - float(result.by_token["resid_pre"][1, 34])) < 1e-4

        def put_head(z, hook):
            z[:, :, 2] = cache["blocks.2.attn.hook_z"][:, :, 2]
            return z

        got = norm(ld(vision.run_with_hooks(x[1:], fwd_hooks=[("blocks.2.attn.hook_z", put_head)])))
        assert abs(got - float(result.heads[2, 2])) < 1e-4
    assert result.heads.shape == (4, 4)
    assert not vision.hook_dict["blocks.1.hook_resid_pre"].fwd_hooks


def test_tables_records_and_figure(setup, tmp_path):
    model, _, _, _, _, region, result = setup
    table = result.to_table()
    assert list(table["layer"]) == [0, 1, 2, 3]
    assert {"resid_pre CLS", "resid_pre region", "resid_post all tokens", "top head"} <= set(table.columns)
    records = result.to_records()
    assert len(records) == 4 * 65 + 2 * 4 + 4 + 16
    names = token_names(model)
    assert names[0] == "CLS" and names[1] == "patch (0, 0)" and len(names) == 65
    assert result.patch_grid(0).shape == (8, 8)
    assert "clean" in str(result)
    path = result.plot(tmp_path / "patching.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_bad_inputs(setup):
    model, classifier, x, red, blue, _, _ = setup
    with pytest.raises(ValueError, match="Cannot patch"):
        clip_activation_patching(model, x[:1], x[1:], classifier, caption(red), caption(blue), activations=("resid_post",))
    with pytest.raises(ValueError, match="not one of the classifier's classes"):
        clip_activation_patching(model, x[:1], x[1:], classifier, "a red blob", caption(blue))
    with pytest.raises(ValueError, match="same shape"):
        clip_activation_patching(model, x, x[1:], classifier, caption(red), caption(blue))
    with pytest.raises(ValueError, match="nothing to patch"):
        clip_activation_patching(model, x[:1], x[:1], classifier, caption(red), caption(blue), heads=False)



def test_heads_by_position_match_hand_patching(setup):
    # One head at one token, through transformer_lens.patching with our index, against a hand-written hook.
    model, classifier, x, red, blue, region, _ = setup
    with torch.no_grad():
        result = clip_activation_patching(model, x[:1], x[1:], classifier, caption(red), caption(blue),
                                          activations=(), heads=False, full_layer=(), heads_by_position=True)
    vision = model.vision
    n_tokens = vision.cfg.n_prefix_tokens + 64
    assert result.heads_by_position.shape == (4, n_tokens, 4)
    names = classifier.class_names
    i, j = names.index(caption(red)), names.index(caption(blue))
    outside = next(t for t in range(1, n_tokens) if t not in region)
    with torch.no_grad():
        _, cache = vision.run_with_cache(x[:1])
        for layer, token, head in ((2, region[0], 2), (0, outside, 1), (3, 0, 1)):

            def put(z, hook, token=token, head=head, layer=layer):
                z[:, token, head] = cache[f"blocks.{layer}.attn.hook_z"][:, token, head]
                return z

            embeds = vision.run_with_hooks(x[1:], fwd_hooks=[(f"blocks.{layer}.attn.hook_z", put)])
            logits = classifier.logits_from_embeddings(embeds)[0]
            got = (float(logits[i] - logits[j]) - result.corrupt_logit_diff) / (
                result.clean_logit_diff - result.corrupt_logit_diff
            )
            assert abs(got - float(result.heads_by_position[layer, token, head])) < 1e-4
    assert not vision.hook_dict["blocks.0.attn.hook_z"].fwd_hooks
