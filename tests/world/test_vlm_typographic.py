"""Typographic attacks on the shapes VLMs (issue 18, part 4; sae_lens_multimodal.world.vlm_typographic).

shapes-vlm-typographic is the shapes-vlm recipe on the shapes-clip-typographic vision tower: it loads by name,
its tower is that CLIP's (so the bundled typographic SAE splices in with the same latents), a wrong colour word
written on the image changes its colour answer, and ablating the SAE's text features in the tower (error term
kept) wins much of it back. The plain shapes-vlm is not fooled by the same images. Ground truth: the attack sets'
true colours and written words (world.typographic.build_attack_set), never the model's own output.
"""

import json

import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.models import HookedViT
from sae_lens_multimodal.models.registry import list_models, model_info
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.world.paths import SHAPES_VLM_TYPOGRAPHIC_DIR
from sae_lens_multimodal.world.typographic import build_attack_set
from sae_lens_multimodal.world.vlm import prompt
from sae_lens_multimodal.world.vlm_typographic import (
    TYPOGRAPHIC_SAE,
    TYPOGRAPHIC_VLM,
    VLMTypographicResult,
    attack_rates,
    colour_answers,
)

# Attack images of the study's test seed (world.vlm_typographic, seed 2), N_TEST of them.
N_TEST = 200
#: Thresholds from the shipped weights. Measured on the study's 1000 test images (docs/vlm.md): typographic CLIP
#: colour 17.9% under attack, 79.0% the written word; shapes-vlm-typographic 99.6% clean, 96.2% under attack,
#: 1.2% the written word. Margins: >= 10 points (>= 20 for the CLIP), wider than 200-image noise (~3 points).
MEASURED = {"clip_attacked_max": 0.4, "clip_written_word_min": 0.6, "vlm_clean_min": 0.95, "vlm_attacked_min": 0.85,
            "vlm_written_word_max": 0.08}


@pytest.fixture(scope="module")
def vlm():
    return HookedVLM.from_pretrained(TYPOGRAPHIC_VLM)


@pytest.fixture(scope="module")
def sae():
    return SAE.from_pretrained(*TYPOGRAPHIC_SAE)


@pytest.fixture(scope="module")
def test_set():
    return build_attack_set(N_TEST, seed=2)


def test_shipped_small_registered_and_trained_on_the_typographic_tower(vlm):
    files = {p.name: p.stat().st_size for p in SHAPES_VLM_TYPOGRAPHIC_DIR.iterdir() if not p.name.startswith(".")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "training.json"} <= set(files)
    assert sum(files.values()) < 6_000_000
    assert TYPOGRAPHIC_VLM in list_models(kind="vlm")
    assert model_info(TYPOGRAPHIC_VLM).source == str(SHAPES_VLM_TYPOGRAPHIC_DIR)
    recipe = json.loads((SHAPES_VLM_TYPOGRAPHIC_DIR / "training.json").read_text())["recipe"]
    assert recipe["tower"] == "shapes-clip-typographic"


def test_the_tower_is_the_typographic_clip_and_its_sae_splices_unchanged(vlm, sae, test_set):
    px = vlm.processor(images=list(test_set.attacked[:16]), text=[prompt("x")] * 16, return_tensors="pt")["pixel_values"]
    vit = HookedViT.from_pretrained("shapes-clip-typographic")
    hook = TYPOGRAPHIC_SAE[1]
    _, ref = vit.run_with_cache(px, names_filter=["blocks.3.hook_resid_post", hook])
    _, ours = vlm.vision.run_with_cache(px, names_filter=[hook])
    assert (vlm.vision_features(px) - ref["blocks.3.hook_resid_post"]).abs().max() < 1e-5
    with torch.no_grad():
        latents, expected = sae.encode(ours[hook]), sae.encode(ref[hook])
    assert (latents - expected).abs().max() < 1e-5 and (expected > 0).sum(-1).float().mean() > 1


def test_colour_answers_need_a_hooked_vlm_and_rates_count_against_the_truth(test_set):
    with pytest.raises(TypeError, match="HookedVLM"):
        colour_answers(object(), test_set.clean[:2])
    small = build_attack_set(4, seed=2)
    truth, words = small.colors, small.words
    answers = [truth[0], words[1], truth[2], "large"]  # right, the written word, right, neither
    rates = attack_rates(answers, small, "attacked")
    assert rates == {"color_accuracy": 0.5, "written_word": 0.25}
    assert attack_rates(answers, small, "clean") == {"color_accuracy": 0.5}


@pytest.mark.shipped_weights
def test_the_clip_is_fooled_but_the_vlm_on_its_tower_barely(vlm, sae, test_set):
    # The same attacked images through the same tower: the typographic CLIP's zero-shot colour follows the written
    # word, the VLM trained on that tower (shapes-vlm recipe: a random word on a quarter of the images) keeps the
    # shape's colour. Measured on the shipped weights, 200 test images: MEASURED below.
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP
    from sae_lens_multimodal.world.shapes import class_factor_combinations
    from sae_lens_multimodal.world.typographic import class_text_weights, zero_shot_predictions

    clip = HookedCLIP.from_pretrained("shapes-clip-typographic")
    _, attacked_px = test_set.tensors()
    preds = zero_shot_predictions(clip, attacked_px, class_text_weights(clip))
    clip_colours = [class_factor_combinations()[p]["color"] for p in preds.tolist()]
    clip_rates = attack_rates(clip_colours, test_set, "attacked")
    clean = attack_rates(colour_answers(vlm, test_set.clean), test_set, "clean")
    attacked = attack_rates(colour_answers(vlm, test_set.attacked), test_set, "attacked")
    assert clip_rates["color_accuracy"] <= MEASURED["clip_attacked_max"]
    assert clip_rates["written_word"] >= MEASURED["clip_written_word_min"]
    assert clean["color_accuracy"] >= MEASURED["vlm_clean_min"]
    assert attacked["color_accuracy"] >= MEASURED["vlm_attacked_min"]
    assert attacked["written_word"] <= MEASURED["vlm_written_word_max"]


def test_result_table_and_plot(tmp_path):
    r = VLMTypographicResult(
        n_test=10, seed=0, max_clean_cost=0.05, sae=TYPOGRAPHIC_SAE, selection=[], clip_accuracy_162={},
        rows={"a": {"color_accuracy": {"clean": 1.0, "attacked": 0.2, "attacked_suppressed": 0.7,
                                       "clean_suppressed": 0.98},
                    "written_word": {"attacked": 0.8, "attacked_suppressed": 0.2}, "n_suppressed": 3, "features": [1, 2, 3]},
              "b": {"color_accuracy": {"clean": 1.0, "attacked": 1.0}, "written_word": {"attacked": 0.0},
                    "n_suppressed": 0, "features": []}})
    table = r.to_table()
    assert "| a | 100.0% | 20.0% | 70.0% | 98.0% | 80.0% / 20.0% | 3 |" in table
    assert "| b | 100.0% | 100.0% | - | - | 0.0% | - |" in table
    assert r.plot(tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
