"""The shipped shapes-world CLIP: loads by name offline, HookedViT reproduces open_clip's own vision
tower, and open_clip's own model + tokenizer classify fresh world images zero-shot."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from sae_lens_multimodal.models import HookedViT
from sae_lens_multimodal.models.registry import (
    UnknownModelError,
    list_models,
    model_info,
    register_model,
    resolve_model_name,
)
from sae_lens_multimodal.world import ShapesWorld, all_captions, class_factor_combinations
from sae_lens_multimodal.world.clip import SHAPES_CLIP_DIR, load_shapes_clip, zero_shot_accuracy

LOCAL = f"local-dir:{SHAPES_CLIP_DIR}"


@pytest.fixture(scope="module")
def source():
    """open_clip's own model, transforms and tokenizer for the shipped directory."""
    model, _, preprocess = open_clip.create_model_and_transforms(LOCAL)
    return model.eval(), preprocess, open_clip.get_tokenizer(LOCAL)


def test_shipped_files_are_small_and_in_open_clip_layout():
    files = {p.name: p.stat().st_size for p in SHAPES_CLIP_DIR.iterdir() if not p.name.startswith(".")}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) < 4_000_000
    config = json.loads((SHAPES_CLIP_DIR / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= set(config)


def test_registry():
    assert "shapes-clip" in list_models() and "shapes-clip" in list_models(kind="clip")
    assert model_info("shapes-clip").source == f"open-clip:{LOCAL}"
    assert resolve_model_name("open-clip:ViT-B-32") == "open-clip:ViT-B-32"  # other names pass through
    with pytest.raises(UnknownModelError, match="shapes-clip"):
        model_info("shapes-clp")
    with pytest.raises(ValueError, match="already registered"):
        register_model("shapes-clip", "open-clip:ViT-B-32", "another model")
    with pytest.raises(ValueError, match="':'"):
        register_model("open-clip:x", "y", "bad name")


def test_tokenizer_knows_every_caption_word(source):
    _, _, tokenizer = source
    ids = tokenizer(all_captions(("color", "shape", "position", "size", "texture")) + ["a red circle with the word blue"])
    unk = tokenizer.tokenizer.convert_tokens_to_ids("[UNK]")
    assert not (ids == unk).any()
    # open_clip's CLIP pools text at the largest token id: it must be the end-of-text token, once per row.
    eot = ids.max(dim=1).values
    assert (eot == ids.max()).all() and ((ids == ids.max()).sum(1) == 1).all()
    assert (tokenizer(["a pink dog"]) == unk).sum() == 2  # unknown words are marked, not dropped


def test_hooked_vit_by_name_equals_open_clip(source):
    model, _, _ = source
    hooked = HookedViT.from_pretrained("shapes-clip")
    images, _ = ShapesWorld(image_size=32, seed=21, text_prob=0.5).sample(16)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    x = torch.cat([x, torch.randn(4, 3, 32, 32)])
    blocks = {}
    handles = [
        b.register_forward_hook(lambda _m, _i, out, i=i: blocks.__setitem__(i, out.detach().clone()))
        for i, b in enumerate(model.visual.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            ref = model.encode_image(x)
    finally:
        for h in handles:
            h.remove()
    out, cache = hooked.run_with_cache(x)
    assert len(blocks) == hooked.cfg.n_layers
    for i, ref_block in blocks.items():
        assert (cache[f"blocks.{i}.hook_resid_post"] - ref_block).abs().max() <= 1e-4
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4


@pytest.mark.shipped_weights
def test_zero_shot_accuracy_with_open_clip_itself(source):
    """Fresh seeded images (not the training stream), open_clip's own preprocessing, tokenizer and forward."""
    model, preprocess, tokenizer = source
    images, factors = ShapesWorld(image_size=32, seed=2024).sample(1000)
    pixels = torch.stack([preprocess(Image.fromarray(img)) for img in images])
    classes = class_factor_combinations()
    with torch.no_grad():
        image_features, text_features, logit_scale = model(pixels, tokenizer(all_captions()))
    logits = logit_scale * image_features @ text_features.T
    pred = logits.argmax(-1).numpy()
    truth = np.array([classes.index({"color": f.color, "shape": f.shape, "position": f.position}) for f in factors])
    accuracy = float((pred == truth).mean())
    assert accuracy >= 0.95, accuracy
    # The package's evaluation function reports the same kind of figure from the same objects.
    res = zero_shot_accuracy(*load_shapes_clip(), n=1000, seed=2024, verbose=False)
    assert res.accuracy == pytest.approx(accuracy, abs=1e-6) and res.n_classes == 162


def test_training_is_reproducible_and_saves_an_open_clip_directory(tmp_path):
    from sae_lens_multimodal.world.training.train_clip import TrainConfig, train_clip

    cfg = TrainConfig(steps=3, eval_every=0, final_eval_images=20)
    a, _, meta = train_clip(cfg, tmp_path / "clip", progress=False)
    b, _, _ = train_clip(cfg, None, progress=False)
    c, _, _ = train_clip(TrainConfig(steps=3, eval_every=0, final_eval_images=20, seed=1), None, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert meta["train_config"]["steps"] == 3
    # The saved directory is what open_clip itself loads, with the same weights.
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in sa.items())
    assert not list((tmp_path / "clip").glob("*.tmp"))  # atomic writes leave nothing behind
