"""Timestep-aware SAEs: registration, round trips through SAELens loading, equivalence with SAELens's
own SAE classes, routing by timestep / CFG branch, and out-of-range policies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

import sae_lens_multimodal.saes as saes_mod
from sae_lens_multimodal.saes import (
    TimestepBucketedSAE,
    TimestepBucketedTrainingSAE,
    TimestepBucketedTrainingSAEConfig,
    TimestepBuckets,
    TimestepConditionedSAE,
    TimestepConditionedTrainingSAE,
    TimestepConditionedTrainingSAEConfig,
    register_sae_classes,
    timestep_context,
)

D_IN, D_SAE = 8, 16
RANGES = [[0, 400], [400, 1000]]
META = {"hook_name": "mid_block.attentions.0.hook_out", "input_kind": "block_output", "model_name": "tiny-unet",
        "cfg_branch": "both"}
INNER = [("standard", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {"jumprelu_init_threshold": 0.05})]
KINDS = [
    (TimestepBucketedTrainingSAEConfig, TimestepBucketedTrainingSAE),
    (TimestepConditionedTrainingSAEConfig, TimestepConditionedTrainingSAE),
]


def make(kind: int, arch: str, inner: dict, **kw):
    cfg_cls, sae_cls = KINDS[kind]
    args = dict(d_in=D_IN, d_sae=D_SAE, inner_architecture=arch, inner_config=dict(inner), timestep_ranges=RANGES,
                num_train_timesteps=1000, metadata=dict(META))
    args.update(kw)
    sae = sae_cls(cfg_cls(**args))
    with torch.no_grad():  # make every parameter non-trivial so that nothing passes by accident
        for name, p in sae.named_parameters():
            if "timestep_scale" in name:
                p.uniform_(0.5, 1.5)
            elif "threshold" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return sae


def train_step(sae, x, t, coeffs=None):
    sae.set_row_timesteps(t)
    return sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients=coeffs or {"l1": 1.0, "l0": 1.0}, dead_neuron_mask=torch.zeros(D_SAE, dtype=torch.bool),
        n_training_steps=0, is_logging_step=False))


X = torch.randn(6, D_IN)
T = torch.tensor([0.0, 120.0, 399.0, 400.0, 999.0, 1000.0])  # 1000 = num_train_timesteps is in the top range


# ---------------------------------------------------------------------- registration
def test_registered_and_registration_is_idempotent(monkeypatch):
    for name in ("timestep_bucketed", "timestep_conditioned"):
        assert name in SAE_CLASS_REGISTRY and name in SAE_TRAINING_CLASS_REGISTRY
    register_sae_classes()
    register_sae_classes()  # SAELens's own register_* would raise here
    assert SAE_CLASS_REGISTRY["timestep_bucketed"][0] is TimestepBucketedSAE

    # After importlib.reload our classes are new objects: the registry must follow them.
    class Reloaded(TimestepBucketedSAE):
        pass

    Reloaded.__module__ = TimestepBucketedSAE.__module__
    arch = dict(saes_mod._ARCHITECTURES)
    arch["timestep_bucketed"] = ((Reloaded, arch["timestep_bucketed"][0][1]), arch["timestep_bucketed"][1])
    monkeypatch.setattr(saes_mod, "_ARCHITECTURES", arch)
    try:
        register_sae_classes()
        assert SAE_CLASS_REGISTRY["timestep_bucketed"][0] is Reloaded
    finally:
        monkeypatch.undo()
        register_sae_classes()
    assert SAE_CLASS_REGISTRY["timestep_bucketed"][0] is TimestepBucketedSAE


def test_foreign_class_under_our_name_is_refused(monkeypatch):
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    monkeypatch.setitem(SAE_CLASS_REGISTRY, "timestep_bucketed", (StandardSAE, StandardSAEConfig))
    with pytest.raises(ValueError, match="already registered by sae_lens"):
        register_sae_classes()


def test_reload_of_package_is_harmless():
    import importlib

    import sae_lens_multimodal.integration as integration

    importlib.reload(saes_mod)
    integration.register_with_ecosystem()
    assert SAE_CLASS_REGISTRY["timestep_conditioned"][0].__name__ == "TimestepConditionedSAE"


# ---------------------------------------------------------------------- config validation
def test_config_errors_name_the_problem():
    base = dict(d_in=D_IN, d_sae=D_SAE, num_train_timesteps=1000)
    with pytest.raises(ValueError, match="needs timestep_ranges"):
        TimestepBucketedTrainingSAEConfig(**base)
    with pytest.raises(ValueError, match="must not overlap"):
        TimestepBucketedTrainingSAEConfig(**base, timestep_ranges=[[0, 500], [400, 1000]])
    with pytest.raises(ValueError, match="0 <= start < end <= num_train_timesteps"):
        TimestepBucketedTrainingSAEConfig(**base, timestep_ranges=[[0, 1200]])
    with pytest.raises(ValueError, match="valid keys"):
        TimestepBucketedTrainingSAEConfig(**base, timestep_ranges=RANGES, inner_architecture="topk",
                                          inner_config={"kk": 3})
    with pytest.raises(ValueError, match="Unknown inner_architecture"):
        TimestepBucketedTrainingSAEConfig(**base, timestep_ranges=RANGES, inner_architecture="nope")
    with pytest.raises(ValueError, match="support inner_architecture"):
        TimestepConditionedTrainingSAEConfig(**base, timestep_ranges=RANGES, inner_architecture="gated")
    with pytest.raises(ValueError, match="contradicts hook"):
        TimestepBucketedTrainingSAEConfig(**base, timestep_ranges=RANGES,
                                          metadata={"hook_name": "up.0.hook_update", "input_kind": "block_output"})
    with pytest.raises(ValueError, match="2 timestep ranges"):
        TimestepBucketedTrainingSAEConfig(**base, timestep_ranges=RANGES, bucket_scaling_factors=[1.0])


def test_bucket_constructors():
    assert TimestepBuckets.pooled(1000).to_list() == [[0, 1000]]
    assert TimestepBuckets.uniform(4, 1000).to_list() == [[0, 250], [250, 500], [500, 750], [750, 1000]]
    sched = [999, 759, 499, 259, 19]
    per = TimestepBuckets.per_timestep(sched, 1000)
    assert len(per) == 5
    idx = per.bucket_of(torch.tensor(sched, dtype=torch.float64))
    assert sorted(idx.tolist()) == [0, 1, 2, 3, 4]  # each scheduler timestep in its own bucket
    b = TimestepBuckets([[0, 400], [600, 1000]], 1000)
    assert b.bucket_of(torch.tensor([0.0, 399.9, 400.0, 500.0, 600.0, 1000.0])).tolist() == [0, 0, -1, -1, 1, 1]


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", [0, 1], ids=["bucketed", "conditioned"])
@pytest.mark.parametrize("arch,inner", INNER, ids=[a for a, _ in INNER])
def test_round_trip_through_sae_lens_loading(tmp_path, kind, arch, inner):
    sae = make(kind, arch, inner, bucket_scaling_factors=[0.5, 2.0])
    train_step(sae, X, T)  # batchtopk learns its threshold here
    # training checkpoint (SAETrainer saves with save_model) -> TrainingSAE.load_from_disk
    sae.save_model(tmp_path / "ckpt")
    back = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert type(back) is type(sae)
    for (k, v), (k2, v2) in zip(sae.state_dict().items(), back.state_dict().items()):
        # (SAELens's load casts every floating tensor to cfg.dtype, batchtopk's float64 threshold included)
        assert k == k2 and torch.equal(v.to(v2.dtype), v2)
    # inference model -> SAE.load_from_disk
    sae.save_inference_model(tmp_path / "inf")
    cfg = json.loads((tmp_path / "inf" / "cfg.json").read_text())
    assert cfg["architecture"] == ("timestep_bucketed", "timestep_conditioned")[kind]
    md = cfg["metadata"]
    assert md["sae_lens_version"]  # 6.x format: nested metadata is kept on load
    for key, value in META.items():
        assert md[key] == value
    assert md["timestep_ranges"] == RANGES and md["num_train_timesteps"] == 1000
    loaded = SAE.load_from_disk(tmp_path / "inf")
    assert isinstance(loaded, (TimestepBucketedSAE, TimestepConditionedSAE)[kind])
    assert not isinstance(loaded, TrainingSAE)
    assert loaded.cfg.timestep_ranges == RANGES and loaded.cfg.bucket_scaling_factors == [0.5, 2.0]
    assert loaded.cfg.metadata.cfg_branch == "both" and loaded.cfg.metadata.model_name == "tiny-unet"
    expected_inner = "jumprelu" if arch == "batchtopk" else arch
    assert loaded.cfg.inner_architecture == expected_inner
    if arch != "batchtopk":  # batchtopk becomes a jumprelu (per-row threshold) at inference, as in SAELens
        with timestep_context(T):
            torch.testing.assert_close(loaded(X), sae(X), rtol=0, atol=1e-6)


def test_from_pretrained_from_hub_cache_layout(tmp_path, monkeypatch):
    """SAE.from_pretrained('org/repo', folder) offline, from a standard Hugging Face cache layout."""
    sae = make(0, "topk", {"k": 4})
    snap = tmp_path / "hub" / "models--org--tiny-saes" / "snapshots" / ("a" * 40)
    sae.save_inference_model(snap / "mid_block")
    (tmp_path / "hub" / "models--org--tiny-saes" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--tiny-saes" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = SAE.from_pretrained("org/tiny-saes", "mid_block")
    assert isinstance(loaded, TimestepBucketedSAE)
    assert loaded.cfg.timestep_ranges == RANGES and loaded.cfg.metadata.hook_name == META["hook_name"]
    with timestep_context(T):
        torch.testing.assert_close(loaded(X), sae(X), rtol=0, atol=1e-6)


def test_timestep_fields_restored_from_metadata(tmp_path):
    """A loader that drops unknown top-level keys (SAELens config overrides) loses nothing."""
    sae = make(1, "standard", {})
    sae.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("timestep_ranges", "num_train_timesteps", "bucket_scaling_factors"):
        cfg.pop(key)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.timestep_ranges == RANGES and loaded.cfg.num_train_timesteps == 1000


# ---------------------------------------------------------------------- equivalence with SAELens classes
def _plain_sae(arch: str, cfg_extra: dict, state: dict) -> SAE:
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, **cfg_extra, "metadata": {"sae_lens_version": "6.54.12"}}
    sae = SAE.from_dict(cfg)
    sae.load_state_dict(state)
    return sae


@pytest.mark.parametrize("arch,inner", [INNER[0], INNER[1], INNER[3]], ids=["standard", "topk", "jumprelu"])
def test_bucketed_equals_sae_lens_sae_of_each_bucket(tmp_path, arch, inner):
    sae = make(0, arch, inner)
    sae.save_inference_model(tmp_path)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    inner_cfg = json.loads((tmp_path / "cfg.json").read_text())["inner_config"]
    loaded = SAE.load_from_disk(tmp_path)
    with timestep_context(T):
        acts, recon = loaded.encode(X), loaded(X)
    buckets = TimestepBuckets(RANGES, 1000).bucket_of(T)
    for b in range(2):
        plain = _plain_sae(arch, inner_cfg, {k.split(".", 2)[2]: v for k, v in weights.items()
                                             if k.startswith(f"buckets.{b}.")})
        rows = buckets == b
        torch.testing.assert_close(acts[rows], plain.encode(X[rows]), rtol=0, atol=1e-6)
        torch.testing.assert_close(recon[rows], plain(X[rows]), rtol=0, atol=1e-6)
        assert not torch.allclose(recon[~rows], plain(X[~rows]))  # the other bucket really differs


@pytest.mark.parametrize("arch,inner", [INNER[0], INNER[1], INNER[3]], ids=["standard", "topk", "jumprelu"])
def test_conditioned_equals_sae_lens_sae_with_modulated_encoder(tmp_path, arch, inner):
    """(x W + b) * s + beta == x (W s) + (b s + beta): per bucket, a SAELens SAE with that encoder."""
    sae = make(1, arch, inner)
    sae.save_inference_model(tmp_path)
    w = load_file(tmp_path / "sae_weights.safetensors")
    inner_cfg = json.loads((tmp_path / "cfg.json").read_text())["inner_config"]
    loaded = SAE.load_from_disk(tmp_path)
    with timestep_context(T):
        acts, recon = loaded.encode(X), loaded(X)
    buckets = TimestepBuckets(RANGES, 1000).bucket_of(T)
    for b in range(2):
        s, beta = w["timestep_scale"][b], w["timestep_bias"][b]
        state = {k: v for k, v in w.items() if not k.startswith("timestep_")}
        state["W_enc"] = w["W_enc"] * s
        state["b_enc"] = w["b_enc"] * s + beta
        plain = _plain_sae(arch, inner_cfg, state)
        rows = buckets == b
        torch.testing.assert_close(acts[rows], plain.encode(X[rows]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recon[rows], plain(X[rows]), rtol=1e-5, atol=1e-5)


def test_conditioned_at_init_is_its_inner_architecture():
    sae = TimestepConditionedTrainingSAE(TimestepConditionedTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, inner_architecture="topk", inner_config={"k": 3}, timestep_ranges=RANGES,
        num_train_timesteps=1000))
    from sae_lens.saes.topk_sae import TopKTrainingSAE

    assert isinstance(sae, TopKTrainingSAE) and sae.cfg.k == 3
    plain = TopKTrainingSAE(_topk_cfg())
    plain.load_state_dict({k: v for k, v in sae.state_dict().items() if not k.startswith("timestep_")})
    with timestep_context(500):
        torch.testing.assert_close(sae.encode(X), plain.encode(X), rtol=0, atol=0)


def _topk_cfg():
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    return TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3)


def test_folding_keeps_outputs():
    for kind in (0, 1):
        sae = make(kind, "jumprelu", {"jumprelu_init_threshold": 0.05})
        with timestep_context(T):
            before = sae(X)
            sae.fold_W_dec_norm()
            after = sae(X)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- routing policies
def test_no_timestep_is_a_clear_error_unless_pooled():
    sae = make(0, "standard", {})
    with pytest.raises(RuntimeError, match="timestep_context"):
        sae(X)
    pooled = make(0, "standard", {}, timestep_ranges=[[0, 1000]])
    pooled(X)  # one dictionary for all timesteps: no timestep needed


@pytest.mark.parametrize("kind", [0, 1], ids=["bucketed", "conditioned"])
def test_out_of_range_error_or_passthrough(kind):
    sae = make(kind, "standard", {}, timestep_ranges=[[0, 400]])
    t = torch.tensor([10.0, 500.0, 20.0, 900.0, 30.0, 0.0])
    with timestep_context(t), pytest.raises(ValueError, match=r"outside every range.*out_of_range='passthrough'"):
        sae(X)
    sae.cfg.out_of_range = "passthrough"
    with timestep_context(t):
        acts, out = sae.encode(X), sae(X)
    outside = t >= 400
    assert torch.equal(out[outside], X[outside])  # exactly unchanged
    assert (acts[outside] == 0).all()
    assert not torch.allclose(out[~outside], X[~outside])


@pytest.mark.parametrize("kind", [0, 1], ids=["bucketed", "conditioned"])
def test_cfg_branch_rows_of_the_other_branch_pass_through(kind):
    sae = make(kind, "standard", {}, metadata={**META, "cfg_branch": "cond"})
    with timestep_context(300, branch="uncond"):
        assert torch.equal(sae(X), X)
    with timestep_context(300, branch="cond"):
        assert not torch.allclose(sae(X), X)
    with timestep_context(300, branch="both"):  # batched CFG: unconditional half first
        out = sae(X)
    assert torch.equal(out[:3], X[:3]) and not torch.allclose(out[3:], X[3:])


def test_per_sample_timesteps_broadcast_over_tokens():
    sae = make(0, "standard", {})
    x = torch.randn(2, 5, D_IN)  # (batch, tokens, d)
    with timestep_context(torch.tensor([100.0, 700.0])):
        out = sae(x)
    with timestep_context(100):
        a = sae(x[:1])
    with timestep_context(700):
        b = sae(x[1:])
    torch.testing.assert_close(out, torch.cat([a, b]), rtol=0, atol=1e-6)
    with timestep_context(torch.tensor([1.0, 2.0, 3.0])), pytest.raises(ValueError, match="one value per sample"):
        sae(x)


# ---------------------------------------------------------------------- training steps
@pytest.mark.parametrize("arch,inner", INNER, ids=[a for a, _ in INNER])
def test_bucketed_training_step_only_touches_buckets_with_rows(arch, inner):
    sae = make(0, arch, inner)
    t = torch.full((6,), 100.0)  # every row in bucket 0
    out = train_step(sae, X, t)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sae.buckets[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in sae.buckets[1].parameters())
    # the loss of an all-bucket-0 batch is exactly bucket 0's own SAELens training loss
    sae2 = make(0, arch, inner)
    sae2.load_state_dict(sae.state_dict())
    ref = sae2.buckets[0].training_forward_pass(TrainStepInput(
        sae_in=X, coefficients={"l1": 1.0, "l0": 1.0}, dead_neuron_mask=torch.zeros(D_SAE, dtype=torch.bool),
        n_training_steps=0, is_logging_step=False))
    if arch != "batchtopk":  # batchtopk updates its threshold buffer on every pass
        torch.testing.assert_close(out.loss, ref.loss)


def test_labels_out_of_step_with_batch_are_refused():
    sae = make(0, "standard", {})
    with pytest.raises(ValueError, match="out of step"):
        train_step(sae, X, torch.zeros(5))


@pytest.mark.parametrize("arch,inner", INNER, ids=[a for a, _ in INNER])
def test_conditioned_training_step_trains_modulation(arch, inner):
    sae = make(1, arch, inner)
    out = train_step(sae, X, T)
    out.loss.backward()
    assert sae.timestep_scale.grad is not None and sae.timestep_scale.grad.abs().sum() > 0
    assert sae.W_enc.grad.abs().sum() > 0
