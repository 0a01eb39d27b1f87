"""Steerability (result object, an independent cross-check through the steering API, CLI) and the
shapes-world ground-truth checks with thresholds measured on it (issue 7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_lens_multimodal.steering import FeatureSteer, steer
from sae_lens_multimodal.steering.steerability import steerability
from sae_lens_multimodal.world.feature_checks import (
    factor_text_embeddings,
    label_accuracy,
    shapes_steerability,
)
from tests.steering._sae import bundled_sae, world_images

VOCAB = ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "left", "right", "top"]


@pytest.fixture(scope="module")
def world_text(clip):
    return factor_text_embeddings(clip)


def test_result_object_and_cross_check_with_the_steering_api(clip, vision_sae, images, tmp_path):
    x = images[:4]
    res = steerability(clip, vision_sae, x, VOCAB, max_features=5, strengths=(1.0, 4.0), n_baseline=12, progress=False)
    assert res.power.shape == res.specificity.shape == (5, 2)
    assert set(res.baseline_power) == {"random-feature", "random-direction"}
    assert all(p.shape == (12, 2) for p in res.baseline_power.values())
    assert ((res.specificity >= 0) & (res.specificity <= 1 + 1e-6)).all()
    # Independent recomputation of one entry: clamp through steer() (decode difference, error term kept)
    # and the model's own logits over the vocabulary.
    f, j = res.feature_ids[0], 1
    value = res.strengths[j] * float(res.max_activation[0])
    text = clip.encode_text([f"a photo of {w}." for w in VOCAB])
    with torch.no_grad():
        p0 = clip.logits_to_probs(clip(x, [f"a photo of {w}." for w in VOCAB]))
        with steer(clip, FeatureSteer(vision_sae, f, "clamp", value)):
            p1 = clip.logits_to_probs(clip.logits_from_embeddings(clip.encode_image(x), text))
    delta = (p1 - p0).mean(0)
    assert abs(float(delta[res.target[0]]) - float(res.power[0, j])) < 1e-4
    assert abs(float(delta[res.target[0]] / delta.clamp_min(0).sum()) - float(res.specificity[0, j])) < 1e-4
    # outputs
    table = res.to_table()
    assert "steerable" in table and str(f) in table
    recs = res.to_records()
    assert len(recs) == 5 and {"feature", "target", "power", "specificity", "margin", "steerable"} <= set(recs[0])
    png = res.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for kind in res.baseline_power:  # the rule calls at most about 1 - quantile of each baseline steerable
        assert res.baseline_fraction_above(kind) <= 0.05 + 1 / 12


def test_steerability_errors(clip, vision_sae, images):
    with pytest.raises(IndexError, match=f"d_sae={vision_sae.cfg.d_sae}"):
        steerability(clip, vision_sae, images[:2], VOCAB, feature_ids=[vision_sae.cfg.d_sae], progress=False)
    with pytest.raises(ValueError, match="quantile"):
        steerability(clip, vision_sae, images[:2], VOCAB, quantile=1.5, progress=False)
    with pytest.raises(ValueError, match="positions"):
        steerability(clip, vision_sae, images[:2], VOCAB, positions="edges", progress=False)


def test_cli_steerability(clip, vision_sae, tmp_path, capsys):
    from sae_lens_multimodal.cli import main

    sae_dir = tmp_path / "sae"
    vision_sae.save_model(sae_dir)
    args = ["steerability", "--model", "shapes-clip", "--images", "shapes", "--n-images", "4", "--max-features", "4",
            "--strengths", "1,4", "--no-progress", "--plot", str(tmp_path / "p.png")]
    if bundled_sae() is not None:
        args += ["--release", "shapes-clip-saes", "--sae-id", "blocks.2.hook_resid_post"]
    else:
        args += ["--sae-path", str(sae_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "features steerable" in out and "thresholds per strength" in out
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert main(["steerability", "--model", "shapes-clip"]) == 2  # no SAE given: clear error, exit 2
    assert "--release with --sae-id" in capsys.readouterr().err


def test_factor_text_embeddings_rank_captions(clip, world_text):
    """Sanity of the anchors: each caption's embedding is nearest its own colour, shape and position."""
    from sae_lens_multimodal.world import caption

    words, emb = world_text
    assert len(words) == 18 and emb.shape == (18, 64)
    cap = F.normalize(clip.encode_text([caption({"color": "red", "shape": "square", "position": "top left"})]), dim=-1)
    sims = (cap @ emb.T)[0]
    for group, want in ((words[:6], "red"), (words[6:9], "square"), (words[9:], "top left")):
        idx = [words.index(w) for w in group]
        assert group[int(sims[idx].argmax())] == want


def test_ground_truth_label_accuracy(clip, quick_sae, world_text):
    """Measured (quick SAE, 600 images, seed 7): 53 of 232 features share a value in their top 20 images;
    direct-path names it for 54.7%, causal for 56.6% (chance 5.6%)."""
    x, factors = world_images(600, seed=7)
    acc = label_accuracy(clip, quick_sae, x, factors, text=world_text, n_label_images=32)
    assert acc.n_pure >= 30
    assert acc.direct_accuracy >= 0.4 and acc.causal_accuracy >= 0.4
    assert min(acc.direct_accuracy, acc.causal_accuracy) > 5 * acc.chance()
    assert "direct-path" in acc.to_table() and len(acc.to_records()) == acc.n_pure


def test_ground_truth_steerability_beats_baselines(clip, quick_sae, world_text):
    """Measured (quick SAE, 8 images, 24 most active features, power toward the causal label):
    13/24 = 54% steerable; the rule calls 6.2% / 3.1% of the random-feature / random-direction draws
    steerable."""
    x, _ = world_images(600, seed=7)
    res = shapes_steerability(clip, quick_sae, x[:8], text=world_text, max_features=24, n_label_images=32,
                              strengths=(0.5, 1, 2, 4, 8), progress=False)
    rates = [res.baseline_fraction_above(k) for k in res.baseline_power]
    assert res.fraction_steerable >= 0.3
    assert res.fraction_steerable > 3 * max(max(rates), 1 / 32)


@pytest.mark.shipped_weights
def test_bundled_sae_ground_truth(clip, world_text):
    """The shipped SAE: labels and steerability beat chance and baselines (figures in the report)."""
    sae = bundled_sae()
    if sae is None:
        pytest.skip("shapes-clip-saes is not shipped in this checkout")
    x, factors = world_images(600, seed=7)
    acc = label_accuracy(clip, sae, x, factors, text=world_text, n_label_images=32)
    assert min(acc.direct_accuracy, acc.causal_accuracy) > 4 * acc.chance()  # measured 39% / 36% vs 5.6%
    res = shapes_steerability(clip, sae, x[:8], text=world_text, max_features=24, n_label_images=32, progress=False)
    rates = [res.baseline_fraction_above(k) for k in res.baseline_power]
    assert res.fraction_steerable > 3 * max(max(rates), 1 / 32)  # measured 50% vs 6.2% / 3.1%


def test_cli_help_documents_every_option(capsys):
    import argparse

    from sae_lens_multimodal.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["steerability"]
    assert all(a.help and a.help.strip() for a in sub._actions)
    with pytest.raises(SystemExit):
        main(["steerability", "--help"])
    text = capsys.readouterr().out
    assert all(opt in text for a in sub._actions for opt in a.option_strings)
