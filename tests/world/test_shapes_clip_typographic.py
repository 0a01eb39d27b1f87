"""The typographic shapes CLIP ("shapes-clip-typographic"): the training option that writes each image's own
colour on it, the shipped model loading by name offline, its clean zero-shot accuracy, and that a written
wrong colour word fools it (unlike the shipped "shapes-clip").

Thresholds come from the figures measured when the model was trained (weights/shapes_clip_typographic/
training.json: 99.65%-level clean accuracy, ~75% of colour predictions follow the written word), less a
margin for the smaller, differently seeded samples used here.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.models.registry import list_models, model_info
from sae_lens_multimodal.world import ShapesWorld, all_captions, class_factor_combinations
from sae_lens_multimodal.world.clip import (
    SHAPES_CLIP_DIR,
    SHAPES_CLIP_TYPOGRAPHIC_DIR,
    load_shapes_clip,
    typographic_attack,
)
from sae_lens_multimodal.world.shapes import COLORS, POSITIONS
from sae_lens_multimodal.world.training.train_clip import TYPOGRAPHIC_SETTINGS, VARIANTS, TrainConfig, training_batch

LOCAL = f"local-dir:{SHAPES_CLIP_TYPOGRAPHIC_DIR}"


@pytest.fixture(scope="module")
def source():
    model, _, preprocess = open_clip.create_model_and_transforms(LOCAL)
    return model.eval(), preprocess, open_clip.get_tokenizer(LOCAL)


def test_default_training_batches_are_untouched_by_the_option():
    """With the default settings a batch's images are exactly the world's own draw (no extra text, no
    extra random draws from the world), so the shipped shapes-clip stays reproducible."""
    cfg = TrainConfig(batch_size=32)
    assert cfg.typographic_prob == 0.0 and VARIANTS["default"] == ({}, SHAPES_CLIP_DIR)
    images, captions, _ = training_batch(ShapesWorld(32, seed=5, text_prob=cfg.text_prob), cfg, np.random.default_rng(0))
    expected, factors = ShapesWorld(32, seed=5, text_prob=cfg.text_prob).sample(32)
    assert np.array_equal(images, expected)
    assert all(c.split(" with the word")[0].endswith(f.position.split()[-1]) for c, f in zip(captions, factors))


def test_typographic_batches_write_the_own_colour_without_saying_it():
    cfg = TrainConfig(batch_size=64, **TYPOGRAPHIC_SETTINGS)
    world = ShapesWorld(32, seed=5, text_prob=cfg.text_prob)
    images, captions, positives = training_batch(world, cfg, np.random.default_rng(0))
    clean, factors = ShapesWorld(32, seed=5, text_prob=cfg.text_prob).sample(64)  # same factor draws, no word
    written = ~np.all(images == clean, axis=(1, 2, 3))
    assert 0.6 <= written.mean() <= 0.95  # typographic_prob = 0.8 of the word-free images
    for i in np.nonzero(written)[0]:
        f = factors[i]
        assert captions[i].startswith(("a ", "an ")) and f.color in captions[i] and "with the word" not in captions[i]
        # The word is white and outside the shape's row; the shape's own row keeps the (faded) shape only.
        row = POSITIONS.index(f.position) // 3
        band = slice(row * 32 // 3 + 1, (row + 1) * 32 // 3 - 1)
        others = [r for r in range(3) if r != row]
        assert (images[i] == 255).all(-1).sum() > 10
        assert not (images[i][band] == 255).all(-1).any()
        assert any((images[i][r * 32 // 3:(r + 1) * 32 // 3] == 255).all(-1).any() for r in others)
    assert positives[:64, :64].diagonal().all()


def test_registered_and_in_open_clip_layout():
    assert "shapes-clip-typographic" in list_models(kind="clip")
    assert model_info("shapes-clip-typographic").source == f"open-clip:{LOCAL}"
    files = {p.name for p in SHAPES_CLIP_TYPOGRAPHIC_DIR.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training.json"} <= files
    meta = json.loads((SHAPES_CLIP_TYPOGRAPHIC_DIR / "training.json").read_text())
    config = json.loads((SHAPES_CLIP_TYPOGRAPHIC_DIR / "open_clip_config.json").read_text())
    assert config["shapes_world_training"] == meta
    assert {k: meta["train_config"][k] for k in TYPOGRAPHIC_SETTINGS} == TYPOGRAPHIC_SETTINGS
    assert meta["zero_shot_accuracy"] >= 0.95 and meta["typographic_attack"]["predicted_written_word"] >= 0.3


@pytest.mark.shipped_weights
def test_clean_zero_shot_with_open_clip_itself(source):
    """Fresh text-free images, open_clip's own preprocessing, tokenizer and forward: >= 95% over 162 classes."""
    model, preprocess, tokenizer = source
    images, factors = ShapesWorld(image_size=32, seed=777).sample(600)
    pixels = torch.stack([preprocess(Image.fromarray(img)) for img in images])
    classes = class_factor_combinations()
    with torch.no_grad():
        image_features, text_features, logit_scale = model(pixels, tokenizer(all_captions()))
    pred = (logit_scale * image_features @ text_features.T).argmax(-1).numpy()
    truth = np.array([classes.index({"color": f.color, "shape": f.shape, "position": f.position}) for f in factors])
    assert (pred == truth).mean() >= 0.95


def test_hooked_clip_by_name_offline_equals_open_clip(source):
    model, _, tokenizer = source
    hooked = HookedCLIP.from_pretrained("shapes-clip-typographic")
    images, _ = ShapesWorld(32, seed=3, text_prob=1.0, text_words=tuple(COLORS)).sample(8)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    captions = all_captions()[:20]
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(x), model.encode_text(tokenizer(captions))
        img, txt = hooked.encode_image(x), hooked.encode_text(captions)
    assert (img - ref_img).abs().max() <= 1e-4 and (txt - ref_txt).abs().max() <= 1e-4


@pytest.mark.shipped_weights
def test_written_colour_words_fool_it_and_not_the_plain_clip():
    typo = typographic_attack(*load_shapes_clip(SHAPES_CLIP_TYPOGRAPHIC_DIR), n=600, seed=99, verbose=False)
    plain = typographic_attack(*load_shapes_clip(SHAPES_CLIP_DIR), n=600, seed=99, verbose=False)
    assert typo["clean_color_accuracy"] >= 0.98
    assert typo["predicted_written_word"] >= 0.5  # measured ~0.75 on 2000 images
    assert typo["attacked_color_accuracy"] <= 0.5
    assert plain["predicted_written_word"] <= 0.05  # the plain model was never taught that text means colour


def test_variant_training_is_reproducible_and_writes_its_figures(tmp_path):
    from sae_lens_multimodal.world.training.train_clip import train_clip

    cfg = TrainConfig(steps=3, eval_every=0, final_eval_images=20, **TYPOGRAPHIC_SETTINGS)
    a, _, meta = train_clip(cfg, tmp_path / "clip", progress=False)
    b, _, _ = train_clip(cfg, None, progress=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    saved = json.loads((tmp_path / "clip" / "training.json").read_text())
    assert saved["train_config"]["typographic_prob"] == 0.8
    assert saved["retrain"] == ("python -m sae_lens_multimodal.world.training.train_clip --variant typographic --steps 3 "
                                "--eval-every 0 --final-eval-images 20")
    assert set(saved) == set(meta)
