"""Evaluation metrics against direct computation; downstream effects on HookedViT / HookedCLIP."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

from sae_lens_multimodal.saes import TimestepBucketedSAE, TimestepBucketedSAEConfig
from sae_lens_multimodal.training import ActivationChunk
from sae_lens_multimodal.training.evaluate import clip_zero_shot, evaluate_sae, image_embedding_cosine


def _sae(d_in=8, d_sae=12, seed=0):
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(std=0.5)
        sae.W_dec.normal_(std=0.5)
        sae.b_enc.zero_()
        sae.b_enc[0] = -1e4  # never fires: dead
        sae.b_enc[1] = 1e4  # always fires: dense
    return sae


def test_metrics_match_direct_computation():
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1)) + 2.0
    sae = _sae()
    m = evaluate_sae(sae, x, batch_size=300)["overall"]
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    resid = (x - recon).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    assert m["n_rows"] == 1000
    assert m["explained_variance"] == pytest.approx(float(1 - resid / total), rel=1e-5)
    assert m["fvu"] == pytest.approx(float(resid / total), rel=1e-5)
    assert m["mse"] == pytest.approx(float(resid / 1000), rel=1e-5)
    assert m["l0"] == pytest.approx(float((acts != 0).sum(-1).float().mean()), rel=1e-6)
    freq = (acts != 0).float().mean(0)
    assert m["dead_latents"] == int((freq == 0).sum()) >= 1
    assert m["dense_latents"] == int((freq > 0.1).sum()) >= 1
    assert evaluate_sae(sae, x, n_rows=250)["overall"]["n_rows"] == 250


def test_per_bucket_metrics_are_each_buckets_own():
    torch.manual_seed(0)
    sae = TimestepBucketedSAE(TimestepBucketedSAEConfig(d_in=8, d_sae=12, timestep_ranges=[[0, 500], [500, 1000]],
                                                        num_train_timesteps=1000))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 8, generator=g)
    t = torch.tensor([100.0, 800.0]).repeat(300)
    result = evaluate_sae(sae, ActivationChunk(x, torch.arange(600), t.double(), None))
    for b, rows in ((0, t < 500), (1, t >= 500)):
        plain = evaluate_sae(sae.bucket_sae(b), x[rows])["overall"]
        got = result["buckets"][b]
        for key in ("explained_variance", "mse", "l0", "dead_latents", "dense_latents", "n_rows"):
            assert got[key] == pytest.approx(plain[key], rel=1e-5), key
    assert result["timesteps"][100]["n_rows"] == 300
    assert len(result["weights"]["buckets"]) == 2


def test_image_embedding_cosine(vit, images):
    sae = _sae(d_in=32, d_sae=64)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    exact = image_embedding_cosine(vit, sae, images[:8], use_error_term=True)
    assert exact["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    lossy = image_embedding_cosine(vit, sae, images[:8])
    assert lossy["cosine_mean"] < 0.99 and lossy["n_images"] == 8


def test_clip_zero_shot_applies_the_logit_scale(tiny_clip, images):
    sae = _sae(d_in=32, d_sae=64)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"  # bare tower name: spliced into the vision tower
    labels = torch.arange(12) % 3
    classes = ["cat", "dog", "car"]
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(2.0)
    exact = clip_zero_shot(tiny_clip, sae, images[:12], labels, classes, templates=["a {}"], use_error_term=True)
    assert exact["accuracy_spliced"] == exact["accuracy_clean"] and exact["kl_mean"] < 1e-8
    assert exact["logit_scale"] == pytest.approx(torch.tensor(2.0).exp().item())
    lossy = clip_zero_shot(tiny_clip, sae, images[:12], labels, classes, templates=["a {}"])
    # the KL between class distributions depends on the logit scale (a cosine-only metric would not)
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(4.0)
    sharper = clip_zero_shot(tiny_clip, sae, images[:12], labels, classes, templates=["a {}"])
    assert lossy["kl_mean"] > 0 and sharper["kl_mean"] != pytest.approx(lossy["kl_mean"])
    assert sharper["cosine_mean"] == pytest.approx(lossy["cosine_mean"], abs=1e-6)
