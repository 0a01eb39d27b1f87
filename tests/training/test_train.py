"""Training through SAELens's SAETrainer from our stores/caches; timestep-bucketed training routes rows."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_multimodal.saes import (
    TimestepBucketedTrainingSAE,
    TimestepBucketedTrainingSAEConfig,
    TimestepConditionedTrainingSAE,
    TimestepConditionedTrainingSAEConfig,
)
from sae_lens_multimodal.training import (
    ActivationChunk,
    ImageActivationStore,
    activation_provider,
    cache_activations,
    estimate_bucket_scaling_factors,
    train_sae,
)
from sae_lens_multimodal.training.evaluate import evaluate_sae

HOOK = "blocks.1.hook_resid_post"


def test_provider_serves_each_row_at_most_once_per_epoch_shuffled():
    n, d = 1000, 4
    data = torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()
    rows = torch.cat(list(activation_provider(data, 32, buffer_rows=256, epochs=1, prefetch=2)))[:, 0].long()
    assert len(rows) == len(set(rows.tolist())) >= n - 31  # no duplicates, at most one partial batch left
    assert not torch.equal(rows, torch.sort(rows).values)  # shuffled


def _labelled(n=4096, d=16, seed=0):
    """Rows whose subspace depends on the timestep: t < 500 -> dims 0..3, t >= 500 -> dims 8..11."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([100.0, 300.0, 700.0, 900.0])[torch.randint(0, 4, (n,), generator=g)]
    acts = torch.zeros(n, d)
    coef = torch.randn(n, 4, generator=g) * 3
    low = t < 500
    acts[low, 0:4] = coef[low]
    acts[~low, 8:12] = coef[~low]
    acts += 0.01 * torch.randn(n, d, generator=g)
    return ActivationChunk(acts, torch.arange(n), t.double(), torch.ones(n, dtype=torch.int8))


def _bucketed(arch="topk", inner=None, **kw):
    args = dict(d_in=16, d_sae=16, inner_architecture=arch, inner_config=inner if inner is not None else {"k": 4},
                timestep_ranges=[[0, 500], [500, 1000]], num_train_timesteps=1000)
    return TimestepBucketedTrainingSAE(TimestepBucketedTrainingSAEConfig(**{**args, **kw}))


def test_timestep_labels_travel_with_their_rows_and_uncovered_rows_are_skipped():
    data = _labelled(n=2000)
    data.acts[:, 15] = data.timestep.float()  # the row says its own timestep
    sae = _bucketed(timestep_ranges=[[0, 500]])  # covers t = 100, 300 only
    provider = activation_provider(data, 64, sae=sae, buffer_rows=512, epochs=1)
    n = 0
    for batch in provider:
        labels, _ = sae._take_pending()
        assert torch.equal(labels.float(), batch[:, 15])
        assert (labels < 500).all()
        n += len(batch)
    assert n >= int((data.timestep < 500).sum()) - 63


def test_plain_sae_trains_through_sae_trainer_from_an_image_cache(vit, images, tmp_path, monkeypatch):
    readers = cache_activations(ImageActivationStore(vit, HOOK, images, progress=False), tmp_path)
    fits = []
    original_fit = SAETrainer.fit
    monkeypatch.setattr(SAETrainer, "fit", lambda self: (fits.append(self), original_fit(self))[1])
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=8))
    before = evaluate_sae(sae, readers[HOOK])["overall"]["explained_variance"]
    train_sae(sae, readers[HOOK], total_training_samples=40_000, batch_size=128, lr=3e-3)
    after = evaluate_sae(sae, readers[HOOK])["overall"]["explained_variance"]
    assert len(fits) == 1 and fits[0].sae is sae
    assert after > 0.6 and after > before + 0.3, (before, after)
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.metadata.model_name == "custom"
    assert sae.cfg.metadata.l0 is not None  # end-of-training stats written by SAETrainer
    # the trained SAE loads with SAELens and splices into the model it was trained on
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    out = vit.run_with_saes(images[:2], saes=[loaded], use_error_term=True)
    torch.testing.assert_close(out, vit(images[:2]), rtol=1e-5, atol=1e-5)


def test_train_from_store_directly_and_refuse_wrong_width(vit, images):
    store = ImageActivationStore(vit, [HOOK, "hook_pooled"], images, progress=False)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=32, k=4))
    with pytest.raises(ValueError, match="say which one"):
        train_sae(sae, store, total_training_samples=512, batch_size=64)
    train_sae(sae, store, hook=HOOK, total_training_samples=512, batch_size=64, buffer_rows=256)
    wrong = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    with pytest.raises(ValueError, match="width 32"):
        train_sae(wrong, store, hook=HOOK, total_training_samples=512, batch_size=64)


@pytest.mark.parametrize("arch,inner", [("topk", {"k": 4}), ("standard", {"l1_coefficient": 0.05})])
def test_bucketed_sae_trains_each_bucket_on_its_own_timesteps(arch, inner):
    data = _labelled()
    sae = _bucketed(arch, inner)
    train_sae(sae, data, total_training_samples=60_000, batch_size=128, lr=3e-3, buffer_rows=2048)
    result = evaluate_sae(sae, data)
    assert [b["timestep_range"] for b in result["buckets"]] == [[0, 500], [500, 1000]]
    for b in result["buckets"]:
        assert b["explained_variance"] > 0.8, result["buckets"]
    assert set(result["timesteps"]) == {100, 300, 700, 900}
    # each bucket learnt ITS timesteps' subspace: applied to the other bucket's rows it fails
    low = data.timestep < 500
    for b, rows in ((0, low), (1, ~low)):
        plain = sae.bucket_sae(b)
        with torch.no_grad():
            own = plain(data.acts[rows])
            other = plain(data.acts[~rows])
        ev = lambda x, y: 1 - (x - y).pow(2).sum() / (x - x.mean(0)).pow(2).sum()  # noqa: E731
        assert ev(data.acts[rows], own) > 0.8 and ev(data.acts[~rows], other) < 0.3


def test_conditioned_sae_trains_end_to_end():
    data = _labelled()
    sae = TimestepConditionedTrainingSAE(TimestepConditionedTrainingSAEConfig(
        d_in=16, d_sae=32, inner_architecture="topk", inner_config={"k": 4}, timestep_ranges=[[0, 500], [500, 1000]],
        num_train_timesteps=1000))
    train_sae(sae, data, total_training_samples=60_000, batch_size=128, lr=3e-3, buffer_rows=2048)
    assert (sae.timestep_scale - 1).abs().max() > 1e-3 and sae.timestep_bias.abs().max() > 1e-3
    assert evaluate_sae(sae, data)["overall"]["explained_variance"] > 0.8


def test_per_bucket_scaling_factors():
    data = _labelled(n=3000)
    data.acts[data.timestep >= 500] *= 10  # late timesteps have 10x larger activations
    sae = _bucketed()
    factors = estimate_bucket_scaling_factors(sae, data)
    for b, rows in enumerate((data.timestep < 500, data.timestep >= 500)):
        expected = math.sqrt(16) / data.acts[rows].double().norm(dim=-1).mean()
        assert factors[b] == pytest.approx(float(expected), rel=1e-6)
    assert sae.cfg.metadata.bucket_scaling_factors == factors
    train_sae(sae, data, total_training_samples=20_000, batch_size=128, lr=3e-3, normalize_per_bucket=True)
    assert evaluate_sae(sae, data)["overall"]["explained_variance"] > 0.7


def test_timestep_aware_sae_needs_labelled_rows():
    sae = _bucketed()
    with pytest.raises(ValueError, match="carry no timestep labels"):
        train_sae(sae, torch.randn(512, 16), total_training_samples=256, batch_size=64, prefetch=0)
