"""Typographic attacks on the typographic shapes CLIP and their suppression through its bundled SAE.

Ground truth is known (shapes world), so the attack set is checked pixel by pixel, the suppression against
an independent implementation of "remove these features' decoder contributions", and the study's
figures against thresholds taken from a full run (docs/typographic.md: 1000 test images) less a margin
for the smaller samples used here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.world.typographic import (
    ATTACK_CONDITIONS,
    TypographicResult,
    build_attack_set,
    class_text_weights,
    find_text_features,
    suppression_predictions,
    typographic_analysis,
    zero_shot_predictions,
)
from sae_lens_multimodal.models import HookedViT
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.world.shapes import COLORS, POSITIONS, ShapesWorld, class_factor_combinations

RELEASE, HOOK = "shapes-clip-typographic-saes", "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model() -> HookedCLIP:
    return HookedCLIP.from_pretrained("shapes-clip-typographic")


@pytest.fixture(scope="module")
def sae() -> SAE:
    return SAE.from_pretrained(RELEASE, HOOK)


@pytest.fixture(scope="module")
def result(model, sae) -> TypographicResult:
    return typographic_analysis(model, sae, n_discover=300, n_select=300, n_test=600, seed=100,
                                candidate_counts=(0, 8, 24, 40, 56, 72), progress=False)


def test_attack_set_pairs_each_image_with_a_misleading_word_in_another_row():
    s = build_attack_set(60, seed=1)
    # The clean images are the world's own renderings of the recorded factors, without text.
    assert all(f.text is None for f in s.factors)
    assert np.array_equal(s.clean, ShapesWorld(32, seed=0).render(s.factors))
    classes = class_factor_combinations()
    for i, f in enumerate(s.factors):
        assert s.words[i] in COLORS and s.words[i] != f.color
        assert classes[int(s.labels[i])] == {"color": f.color, "shape": f.shape, "position": f.position}
        rows = np.nonzero(s.text_masks[i].any(1))[0]
        assert len(rows) > 0
        shape_row = POSITIONS.index(f.position) // 3
        # The word sits in one of the two other thirds of the image, and nothing else changed.
        assert all(r // (32 / 3) != shape_row for r in (rows.min(), rows.max()))
        assert np.array_equal(s.attacked[i][~s.text_masks[i]], s.clean[i][~s.text_masks[i]])
        assert (s.attacked[i][s.text_masks[i]] > s.clean[i][s.text_masks[i]]).all(-1).any()  # white ink
    cover = s.patch_coverage(4)
    assert cover.shape == (60, 64) and torch.allclose(cover.sum(1) * 16, torch.from_numpy(s.text_masks.sum((1, 2))).float())
    with pytest.raises(ValueError, match="colour names"):
        build_attack_set(4, words=["red", "circle"])
    with pytest.raises(ValueError, match="positive"):
        build_attack_set(0)


def test_attack_set_is_reproducible_by_seed():
    a, b, c = build_attack_set(20, seed=4), build_attack_set(20, seed=4), build_attack_set(20, seed=5)
    assert np.array_equal(a.attacked, b.attacked) and a.words == b.words
    assert not np.array_equal(a.clean, c.clean)


def test_suppression_removes_exactly_the_features_decoder_contributions(model, sae):
    """Ablating through the steering API equals subtracting sum_f a_f(x) W_dec[f] at the hook by hand."""
    s = build_attack_set(96, seed=7)
    _, attacked = s.tensors()
    weights = class_text_weights(model)
    feats = [f.index for f in find_text_features(model, sae, s, top_k=6, progress=False)]
    assert len(feats) == 6

    def by_hand(x, hook):
        return x - sae.encode(x)[..., feats] @ sae.W_dec[feats]

    with torch.no_grad():
        with model.hooks(fwd_hooks=[(f"vision.{HOOK}", by_hand)]):
            ref = model.logits_from_embeddings(model.encode_image(attacked), weights).argmax(-1)
    got = suppression_predictions(model, sae, attacked, weights, feats)
    assert torch.equal(got, ref)
    plain = zero_shot_predictions(model, attacked, weights)
    assert not torch.equal(got, plain)  # the features matter on attacked images
    assert torch.equal(suppression_predictions(model, sae, attacked, weights, []), plain)
    # Nothing stays attached, also when the forward pass fails.
    with pytest.raises(Exception):
        suppression_predictions(model, sae, attacked[:, :2], weights, feats)
    assert not any(h.fwd_hooks for h in model.hook_dict.values())
    assert torch.equal(zero_shot_predictions(model, attacked, weights), plain)


@pytest.mark.shipped_weights
def test_text_features_fire_on_the_words_patches(model, sae):
    s = build_attack_set(200, seed=11)
    feats = find_text_features(model, sae, s, top_k=8, progress=False)
    assert [f.score for f in feats] == sorted((f.score for f in feats), reverse=True)
    top = feats[:4]
    for f in top:
        assert f.attacked_activation > 3 * max(f.clean_activation, 1e-3)
        assert f.text_patch_share >= 0.8  # the rise lands where the word is
        assert f.patch_map.shape == (8, 8)


@pytest.mark.shipped_weights
def test_study_figures(result):
    acc = result.accuracy
    assert set(acc) == set(ATTACK_CONDITIONS)
    assert acc["clean"] >= 0.95
    # Full run (docs/typographic.md, 1000 test images): drop 81.8 points, 70% of it recovered, clean cost 3.5.
    assert result.attack_drop >= 0.60
    assert result.recovered_fraction >= 0.45
    assert result.clean_cost <= 0.07  # 4.8 points on this smaller sample
    assert result.written_word_rate["attacked"] >= 0.6
    assert result.written_word_rate["attacked_suppressed"] <= result.written_word_rate["attacked"] / 2
    assert 0 < result.n_suppressed == len(result.suppressed_features) <= 72
    # The count was chosen on the selection split within the clean-cost budget.
    chosen = next(s for s in result.selection if s["n_features"] == result.n_suppressed)
    assert result.selection[0]["clean_accuracy"] - chosen["clean_accuracy"] <= result.max_clean_cost + 1e-9


def test_table_and_plot(result, tmp_path):
    table = result.to_table()
    labels = ("clean", "under attack", "under attack + suppression", "clean + suppression")
    for label, condition in zip(labels, ATTACK_CONDITIONS):
        assert f"| {label} | {result.accuracy[condition]:.1%} | {result.color_accuracy[condition]:.1%} |" in table
    assert f"{result.accuracy['attacked']:.1%}" in table and f"{result.n_suppressed} SAE features" in table
    path = result.plot(tmp_path / "typo.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left


def test_needs_a_clip_model(sae):
    vit = HookedViT.from_pretrained("shapes-clip-typographic")
    with pytest.raises(TypeError, match="HookedCLIP"):
        typographic_analysis(vit, sae)
