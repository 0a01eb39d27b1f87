"""Feature dashboards on the shapes models: what they show is checked against ground truth and against
independent computations, and the written pages are opened in headless Chromium."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_lens_multimodal.analysis.labels import label_features
from sae_lens_multimodal.reports import (
    ZeroShotProbe,
    diffusion_feature_dashboards,
    vision_feature_dashboards,
    write_dashboards,
    write_feature_dashboards,
)
from sae_lens_multimodal.reports.dashboard_data import clamp_feature_hook, clamp_hooks
from sae_lens_multimodal.world.demo import caption_word_embeddings
from sae_lens_multimodal.world import ShapesWorld, all_captions, caption, to_tensor
from sae_lens_multimodal.world.shapes import COLORS
from tests.reports._saes import CONCEPTS, DIFFUSION_HOOK, VISION_HOOK, concept_sae, random_timestep_sae

RED = CONCEPTS.index(("color", "red"))
BLUE = CONCEPTS.index(("color", "blue"))
WORDS = list(COLORS) + ["circle", "square", "triangle", "left", "right", "top", "bottom"]
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the center",
           "a yellow circle in the bottom right"]


@pytest.fixture(scope="module")
def world():
    images, factors = ShapesWorld(image_size=32, seed=0).sample(160)
    return images, factors


@pytest.fixture(scope="module")
def vision(shapes_clip, world):
    images, factors = world
    sae = concept_sae(shapes_clip, to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3), factors, images)
    dashboards = vision_feature_dashboards(
        shapes_clip, sae, images, feature_ids=[RED, BLUE], top_k=6,
        captions=[caption(f) for f in factors], vocabulary=WORDS, label_images=32,
        text_embeds=caption_word_embeddings(shapes_clip, WORDS), class_names=all_captions(),
        steer_images=24, progress=False)
    return sae, dashboards


@pytest.fixture(scope="module")
def diffusion(shapes_pipe, shapes_clip):
    sae = random_timestep_sae()
    probe = ZeroShotProbe(shapes_clip, all_captions())
    dashboards = diffusion_feature_dashboards(shapes_pipe, sae, PROMPTS, n_features=2, num_inference_steps=4,
                                              steer_prompts=2, probe=probe, progress=False)
    return sae, dashboards


@pytest.mark.shipped_weights
def test_vision_top_images_heatmaps_labels_and_steering_match_ground_truth(vision, world, shapes_clip):
    images, factors = world
    sae, dashboards = vision
    for d, colour in zip(dashboards, ("red", "blue")):
        assert d.kind == "vision" and len(d.top) == 6
        assert all(factors[t.index].color == colour for t in d.top)  # a colour direction's top images have it
        acts = [t.activation for t in d.top]
        assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(d.max_activation)
        for t in d.top:  # the strongest patch of the heatmap lies on the shape (patch grid aligned, CLS skipped)
            r, c = np.unravel_index(np.argmax(t.heatmap), t.heatmap.shape)
            assert t.heatmap.shape == (8, 8) and t.image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].max() > 100
            assert (t.image == images[t.index]).all()
        assert len(d.activations) > 0 and (d.activations > 0).all()
        assert 0 < d.token_frequency <= d.sample_frequency <= 1
    # the labels shown are the labelers' own (one direct call with the same reference images)
    direct = label_features(shapes_clip, sae, to_tensor(images[:32], mean=(0.5,) * 3, std=(0.5,) * 3), WORDS,
                            feature_ids=[RED, BLUE], text_embeds=caption_word_embeddings(shapes_clip, WORDS))
    for d in dashboards:
        ref = direct[d.feature]
        for got, want in ((d.labels.causal, ref.causal), (d.labels.direct_path, ref.direct_path)):
            assert [w for w, _ in got] == [w for w, _ in want]
            assert np.allclose([v for _, v in got], [v for _, v in want], atol=1e-4)
        assert d.labels.validity == pytest.approx(ref.validity, abs=1e-4)
    blue = dashboards[1]
    assert blue.labels.causal[0][0] == "blue"
    word, before, after = blue.steering[0].toward_label
    assert word == "blue" and after > before + 0.3  # clamping the blue feature moves zero-shot towards blue
    assert 0 < blue.steering[0].changed_fraction <= 1


def test_clamp_fallback_matches_the_steering_api(shapes_clip, vision, world):
    sae, _ = vision
    x = to_tensor(world[0][:8], mean=(0.5,) * 3, std=(0.5,) * 3)
    outs = []
    for hooks in (clamp_hooks(shapes_clip.vision, sae, RED, 5.0, hook_name=VISION_HOOK),
                  [(VISION_HOOK, clamp_feature_hook(sae, RED, 5.0))]):
        outs.append(shapes_clip.vision.run_with_hooks(x, fwd_hooks=hooks))
    clean = shapes_clip.vision(x)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 and (outs[0] - clean).abs().max() > 1e-2
    with torch.no_grad():  # clamping to the value the feature already has changes nothing
        _, cache = shapes_clip.vision.run_with_cache(x[:1], names_filter=VISION_HOOK)
        current = float(sae.encode(cache[VISION_HOOK])[0, 0, RED])
        hook = clamp_feature_hook(sae, RED, current, positions=[0])
        same = shapes_clip.vision.run_with_hooks(x[:1], fwd_hooks=[(VISION_HOOK, hook)])
    assert (same - clean[:1]).abs().max() <= 1e-5


def test_diffusion_curves_equal_the_spliced_sae_and_steering_acts_only_in_its_window(diffusion, shapes_pipe):
    sae, dashboards = diffusion
    d = dashboards[0]
    assert d.kind == "diffusion" and d.curve is not None
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    with shapes_pipe.saes(saes=[sae], use_error_term=True):  # independent path: SAELens splicing, pipeline timesteps
        _, cache = shapes_pipe.run_with_cache(PROMPTS, names_filter=DIFFUSION_HOOK + ".hook_sae_acts_post",
                                              cfg_branch="cond", num_inference_steps=4, generator=gens, output_type="np")
    name = DIFFUSION_HOOK + ".hook_sae_acts_post"
    spliced = cache.stack(name, "cond")[..., d.feature].mean((2, 3))  # [T, prompts]
    assert [float(t) for t in cache.timesteps_of(name, "cond")] == d.curve.timesteps
    assert np.abs(spliced.mean(1).numpy() - d.curve.mean).max() <= 1e-4
    assert (d.curve.low <= d.curve.mean + 1e-6).all() and (d.curve.mean <= d.curve.high + 1e-6).all()
    columns, rows, labels = d.generations
    assert columns[0] == "clean" and len(columns) >= 2 and labels == PROMPTS[:2]
    clean, steered = rows[0][0][0], rows[0][1][0]
    assert np.abs(clean.astype(int) - steered.astype(int)).max() > 0  # clamping changed the image
    assert rows[0][0][1].startswith("CLIP: ") and d.steering and d.steering[0].gained
    # the same clamp in a window that holds none of the schedule's timesteps leaves the image as it was
    hooks = clamp_hooks(shapes_pipe, sae, d.feature, 100.0, hook_name=DIFFUSION_HOOK)
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    untouched = shapes_pipe.run_with_hooks(PROMPTS[:2], fwd_hooks=hooks, at_timesteps=lambda t: False,
                                           num_inference_steps=4, generator=g, output_type="np")
    assert np.abs((untouched[0] * 255).round() - clean).max() <= 1


def test_dashboard_pages_open_in_chromium(vision, diffusion, tmp_path, browser):
    index = write_dashboards(vision[1] + diffusion[1], tmp_path / "dash")
    checks = [browser.check(index, sections=["vision-features", "diffusion-features"],
                            screenshot=tmp_path / "index.png")]
    v, dd = vision[1][0], diffusion[1][0]
    checks.append(browser.check(index.parent / v.file_name,
                                sections=["summary", "labels", "top", "histogram", "steering"]))
    checks.append(browser.check(index.parent / dd.file_name,
                                sections=["summary", "top", "histogram", "timesteps", "generations", "steering"],
                                screenshot=tmp_path / "diffusion.png"))
    for c in checks:
        assert c.ok, (c.path, c.problems)
        assert c.n_images > 0
    assert v.file_name in checks[0].links and dd.file_name in checks[0].links
    assert (tmp_path / "index.png").stat().st_size > 10_000


def test_write_feature_dashboards_dispatches_on_the_model(shapes_clip, vision, world, tmp_path):
    sae, _ = vision
    images = world[0][:48]
    index = write_feature_dashboards(shapes_clip.vision, sae, images, tmp_path / "vit", n_features=2, top_k=4,
                                     progress=False)  # a bare HookedViT: no labels, no zero-shot steering
    html = index.read_text()
    assert html.count('href="vision-feature-') == 2
    page = (index.parent / html.split('href="')[1].split('"')[0]).read_text()
    assert "they need a HookedCLIP" in page and 'id="labels"' not in page
    with pytest.raises(TypeError, match="HookedCLIP, HookedViT or HookedDiffusionPipeline"):
        write_feature_dashboards(object(), sae, images, tmp_path / "x")
    with pytest.raises(ValueError, match="feature_ids"):
        vision_feature_dashboards(shapes_clip, sae, images, feature_ids=[99], progress=False)
