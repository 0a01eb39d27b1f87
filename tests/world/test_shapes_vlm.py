"""The shipped shapes-world VLM ("shapes-vlm"): loads by name offline with its processor, its vision tower is the
shapes CLIP's (so the bundled vision SAE splices in unchanged), HookedVLM reproduces transformers' own
LlavaForConditionalGeneration, and it answers held-out questions about every factor it was trained on.

Ground truth: the expected answers come from the world's factors (``ShapeFactors``), never from the model.
"""

import json

import numpy as np
import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.models import HookedViT
from sae_lens_multimodal.models.loading import load_model
from sae_lens_multimodal.models.registry import list_models, model_info
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.world.shapes import ShapesWorld, to_tensor
from sae_lens_multimodal.world.vlm import (
    ASKED_FACTORS,
    QUESTIONS,
    SHAPES_VLM_DIR,
    answer_questions,
    load_shapes_vlm,
    prompt,
    sample_questions,
    vlm_accuracy,
)

#: Held-out accuracy per factor, greedy generation, 500 fresh images of seed 20000 (100 per factor). Measured on
#: the shipped model: colour 100%, shape 99%, position 100%, size 100%, texture 100% (text-free); 100% for every
#: factor with a word written on every image. The issue's target, 95%, leaves a margin of 4+ errors per factor.
ACCURACY_THRESHOLD = 0.95
TOL = 1e-4


@pytest.fixture(scope="module")
def hf():
    """transformers' own model and processor, loaded from the shipped directory."""
    return load_shapes_vlm()


@pytest.fixture(scope="module")
def vlm():
    return HookedVLM.from_pretrained("shapes-vlm")


@pytest.fixture(scope="module")
def questions():
    return sample_questions(40, seed=123, text_prob=0.5)


def _inputs(processor, qs):
    return processor(images=list(qs.images), text=[prompt(q) for q in qs.questions], return_tensors="pt", padding=True)


def test_shipped_files_are_small_and_in_transformers_layout():
    files = {p.name: p.stat().st_size for p in SHAPES_VLM_DIR.iterdir() if not p.name.startswith(".")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "training.json"} <= set(files)
    assert sum(files.values()) < 6_000_000
    config = json.loads((SHAPES_VLM_DIR / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "llama"


def test_registered_and_loads_by_name_offline(vlm):
    assert "shapes-vlm" in list_models(kind="vlm")
    assert model_info("shapes-vlm").source == str(SHAPES_VLM_DIR)
    assert type(vlm.processor).__name__ == "LlavaProcessor" and vlm.tokenizer is not None
    assert vlm.cfg.vision_feature_layer == -1 and vlm.cfg.vision_feature_select_strategy == "full"
    assert vlm.vision.cfg.n_layers == 4 and vlm.cfg.vision_layers_run == 4
    assert isinstance(load_model("shapes-vlm"), HookedVLM)


def test_processor_reproduces_the_clip_preprocessing_and_knows_every_word(vlm, questions):
    batch = _inputs(vlm.processor, questions)
    expected = to_tensor(questions.images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert (batch["pixel_values"] - expected).abs().max() < 1e-6
    assert ((batch["input_ids"] == vlm.cfg.image_token_id).sum(1) == 65).all()  # CLS + 8x8 patches
    tok = vlm.tokenizer
    words = " ".join(q for qs in QUESTIONS.values() for q in qs) + " " + " ".join(questions.answers)
    assert tok.unk_token_id not in tok(prompt(words))["input_ids"]
    assert tok.decode(tok("top left", add_special_tokens=False)["input_ids"]) == "top left"


def test_vision_tower_is_the_shapes_clip(vlm, hf, questions):
    pixels = to_tensor(questions.images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    vit = HookedViT.from_pretrained("shapes-clip")
    _, cache = vit.run_with_cache(pixels, names_filter="blocks.3.hook_resid_post")
    with torch.no_grad():
        tower = hf[0].model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]  # LLaVA's layer
    assert (tower - cache["blocks.3.hook_resid_post"]).abs().max() < 1e-5
    assert (vlm.vision_features(pixels) - cache["blocks.3.hook_resid_post"]).abs().max() < 1e-5


def test_hooked_vlm_equals_transformers_logits(vlm, hf, questions):
    model, processor = hf
    batch = _inputs(processor, questions)  # left-padded prompts of different lengths
    with torch.no_grad():
        ref = model(**batch).logits
        ours = vlm(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert (ours - ref)[real].abs().max() < TOL


def test_bundled_vision_sae_splices_unchanged(vlm, questions):
    sae = SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post")
    batch = _inputs(vlm.processor, questions)
    ids, px, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    _, cache = vlm.run_with_cache_with_saes(ids, px, saes=[sae], attention_mask=mask,
                                            names_filter=lambda n: n.endswith("hook_sae_acts_post"))
    ours = cache["vision.blocks.2.hook_resid_post.hook_sae_acts_post"]
    vit = HookedViT.from_pretrained("shapes-clip")
    _, standalone = vit.run_with_cache_with_saes(px, saes=[sae])
    ref = standalone["blocks.2.hook_resid_post.hook_sae_acts_post"]
    assert ours.shape == ref.shape == (len(ids), 65, sae.cfg.d_sae)
    assert (ours - ref).abs().max() < 1e-5 and (ref > 0).sum(-1).float().mean() > 1  # real, non-empty codes
    # With the error term the splice is exact: the answer logits do not move.
    sae.use_error_term = True
    with torch.no_grad():
        clean = vlm(ids, px, attention_mask=mask)
        spliced = vlm.run_with_saes(ids, px, saes=[sae], attention_mask=mask)
    assert (spliced - clean)[mask.bool()].abs().max() < TOL


@pytest.mark.shipped_weights
@pytest.mark.parametrize("text_prob", [0.0, 1.0])
def test_held_out_accuracy_per_factor(vlm, text_prob):
    acc = vlm_accuracy(vlm, 500, seed=20_000, text_prob=text_prob)
    assert set(acc.per_factor) == set(ASKED_FACTORS)
    low = {f: a for f, a in acc.per_factor.items() if a < ACCURACY_THRESHOLD}
    assert not low, f"held-out accuracy below {ACCURACY_THRESHOLD}: {acc}"


@pytest.mark.shipped_weights
def test_answers_follow_the_image_and_transformers_generate_agrees(vlm, hf):
    # The same question about images that differ in one factor gets that factor's values as answers.
    world = ShapesWorld(image_size=32, seed=5)
    for factor, values in (("color", ("red", "blue", "green")), ("position", ("top left", "bottom right", "center"))):
        images = np.concatenate([world.sample(4, **{factor: v})[0] for v in values])
        got = answer_questions(vlm, images, [QUESTIONS[factor][0]] * len(images))
        assert got == [v for v in values for _ in range(4)], got
    qs = sample_questions(60, seed=321, text_prob=0.5)
    ours = answer_questions(vlm, qs.images, qs.questions)
    theirs = answer_questions(hf[0], qs.images, qs.questions, processor=hf[1])
    assert ours == theirs


#: The block in which the answer position reads each factor from the image (docs/vlm.md, measured on seed 30000).
READING_BLOCK = {"color": 1, "shape": 0, "position": 0, "size": 1, "texture": 1}


@pytest.mark.shipped_weights
@pytest.mark.parametrize("seed", [1, 2])
def test_attention_knockout_ground_truth_and_stable_windows(vlm, seed):
    from sae_lens_multimodal.analysis.vlm_flow import attention_knockout
    from sae_lens_multimodal.world.vlm_flow import factor_batch

    for factor, block in READING_BLOCK.items():
        b = factor_batch(vlm.processor, factor, 40, seed=seed)
        ids, px, mask = b.inputs["input_ids"], b.inputs["pixel_values"], b.inputs["attention_mask"]
        single = attention_knockout(vlm, ids, px, b.answer_tokens, attention_mask=mask, queries="answer")
        assert single.changed[0] == 0  # knocking out nothing changes nothing
        per_block = single.accuracy[1:-1]  # windows L0, L1, L2
        assert int(per_block.argmin()) == block, (factor, per_block)  # the same reading block on fresh images
        assert per_block[block] < 0.8 and all(a >= 0.9 for i, a in enumerate(per_block.tolist()) if i != block)
        # no text position may read the image in any block: chance level (1 / number of values, + sampling slack)
        cut = attention_knockout(vlm, ids, px, b.answer_tokens, windows=[(0, 3)], attention_mask=mask, queries="text")
        assert float(cut.accuracy[0]) <= 1 / len(b.value_tokens) + 0.2, (factor, cut.accuracy)
