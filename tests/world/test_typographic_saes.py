"""The bundled SAEs of the typographic shapes CLIP (release ``shapes-clip-typographic-saes``): load by name
offline, fit the shipped model's weights, reconstruct fresh clean and text-bearing activations, and the
training script writes a folder SAELens itself loads (through the package's training path)."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

import sae_lens_multimodal  # noqa: F401  (registers the releases)
from sae_lens_multimodal.models import HookedViT
from sae_lens_multimodal.training.cache import model_identity
from sae_lens_multimodal.world.shapes import COLORS, ShapesWorld, to_tensor
from sae_lens_multimodal.world.training.train_typographic_sae import (
    TYPOGRAPHIC_HOOKS,
    TYPOGRAPHIC_RELEASE,
    TypographicSAERecipe,
    train_typographic_sae,
)


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    return HookedViT.from_pretrained("shapes-clip-typographic")


def _resid(vit: HookedViT, hook: str, seed: int, text_prob: float) -> torch.Tensor:
    images, _ = ShapesWorld(32, seed=seed, text_prob=text_prob, text_words=tuple(COLORS)).sample(200)
    _, cache = vit.run_with_cache(to_tensor(images, (0.5,) * 3, (0.5,) * 3), names_filter=[hook])
    return cache[hook].reshape(-1, vit.cfg.d_model)


@pytest.mark.shipped_weights
@pytest.mark.parametrize("hook", TYPOGRAPHIC_HOOKS)
def test_bundled_sae_fits_the_shipped_model(vit, hook):
    sae = SAE.from_pretrained(TYPOGRAPHIC_RELEASE, hook)
    meta = sae.cfg.metadata
    assert meta.hook_name == hook and meta.model_name == "shapes-clip-typographic"
    assert meta.model_fingerprint == model_identity(vit)["trunk_fingerprint"]  # trained on these very weights
    for text_prob in (0.0, 1.0):
        x = _resid(vit, hook, seed=31, text_prob=text_prob)
        with torch.no_grad():
            feats = sae.encode(x)
            err = (sae.decode(feats) - x).pow(2).sum()
        ev = 1 - err / (x - x.mean(0)).pow(2).sum()
        assert ev >= 0.93, (hook, text_prob, float(ev))  # recorded: 0.957-0.981 on 1000 images
        assert (feats > 0).sum(-1).float().mean() <= 8.0 + 1e-6  # TopK, k = 8


def test_training_script_writes_a_folder_sae_lens_loads(tmp_path):
    recipe = TypographicSAERecipe(n_images=64, d_sae=32, k=4, total_training_samples=8192, batch_size=512,
                                  lr_warm_up_steps=2, eval_images=16)
    meta = train_typographic_sae(tmp_path, hook="blocks.0.hook_resid_post", recipe=recipe, progress=False)
    folder = tmp_path / TYPOGRAPHIC_RELEASE / "blocks.0.hook_resid_post"
    sae = SAE.load_from_disk(folder)
    assert sae.cfg.d_in == 64 and sae.cfg.d_sae == 32 and sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["evaluation"] == meta["evaluation"]
    assert meta["training"]["steps"] == 16 and meta["evaluation"]["explained_variance"] <= 1  # 16 steps: no quality claim
    assert torch.get_num_threads() == 1  # the caller's thread count is restored (conftest sets 1)
