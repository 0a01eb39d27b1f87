"""Timestep-aware SAEs spliced into a hooked diffusers UNet with SAELens's run_with_saes: the SAE reads
the timestep of the actual denoiser call, and use_error_term=True reproduces the clean output."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sae_lens_multimodal.saes import (  # noqa: E402
    TimestepBucketedSAE,
    TimestepBucketedSAEConfig,
    TimestepConditionedSAE,
    TimestepConditionedSAEConfig,
)

HOOK = "mid_block.attentions.0.hook_out"  # (batch, h, w, 64) channel-last


@pytest.fixture(scope="module")
def unet():
    from sae_lens_multimodal.diffusion.hooked import HookedUNet

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    return HookedUNet.from_pretrained(model)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)


def _sae(cls, cfg_cls, **kw):
    torch.manual_seed(3)
    sae = cls(cfg_cls(d_in=64, d_sae=128, inner_architecture="topk", inner_config={"k": 8},
                      timestep_ranges=[[0, 500], [500, 1000]], num_train_timesteps=1000,
                      metadata={"hook_name": HOOK, "input_kind": "block_output", "model_name": "tiny-unet"}, **kw))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(0.2 * torch.randn_like(p)) if "scale" not in name else p.uniform_(0.5, 1.5)
    return sae


@pytest.mark.parametrize("kind", ["bucketed", "conditioned"])
def test_spliced_sae_reads_the_denoiser_timestep_and_error_term_is_exact(unet, kind):
    sae = (_sae(TimestepBucketedSAE, TimestepBucketedSAEConfig) if kind == "bucketed"
           else _sae(TimestepConditionedSAE, TimestepConditionedSAEConfig))
    x, enc = _inputs()
    with torch.no_grad():
        for t in (100, 900):
            clean = unet(x, t, encoder_hidden_states=enc).sample
            spliced = unet.run_with_saes(x, t, encoder_hidden_states=enc, saes=[sae]).sample
            exact = unet.run_with_saes(x, t, encoder_hidden_states=enc, saes=[sae], use_error_term=True).sample
            assert (spliced - clean).abs().max() > 1e-3  # the SAE really replaced the activation
            torch.testing.assert_close(exact, clean, rtol=0, atol=1e-5)

            # The reconstruction used is the one for THIS call's timestep: cache the SAE input and
            # compare with the SAE applied by hand at that timestep.
            _, cache = unet.run_with_cache_with_saes(x, t, encoder_hidden_states=enc, saes=[sae])
            acts_in = cache[HOOK + ".hook_sae_input"]
            from sae_lens_multimodal.saes import timestep_context

            with timestep_context(t):
                expected = sae.decode(sae.encode(acts_in))
            with timestep_context(1000 - t):
                other = sae.decode(sae.encode(acts_in))
            torch.testing.assert_close(cache[HOOK + ".hook_sae_recons"], expected, rtol=0, atol=1e-6)
            assert (cache[HOOK + ".hook_sae_recons"] - other).abs().max() > 1e-3


def test_spliced_bucket_equals_that_buckets_plain_sae_lens_sae(unet):
    sae = _sae(TimestepBucketedSAE, TimestepBucketedSAEConfig)
    x, enc = _inputs()
    with torch.no_grad():
        for t, b in ((250, 0), (750, 1)):
            ours = unet.run_with_saes(x, t, encoder_hidden_states=enc, saes=[sae]).sample
            plain = sae.bucket_sae(b)  # an ordinary SAELens TopKSAE
            plain.cfg.metadata.hook_name = HOOK
            ref = unet.run_with_saes(x, t, encoder_hidden_states=enc, saes=[plain]).sample
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_out_of_range_timestep_in_the_pipeline(unet):
    sae = _sae(TimestepBucketedSAE, TimestepBucketedSAEConfig)
    sae.cfg.timestep_ranges = [[0, 500]]
    sae.buckets = sae.buckets[:1]
    x, enc = _inputs()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"Timestep\(s\) \[800.0\] lie outside every range"):
            unet.run_with_saes(x, 800, encoder_hidden_states=enc, saes=[sae])
        assert not unet.acts_to_saes  # run_with_saes removed the SAE although the run raised
        sae.cfg.out_of_range = "passthrough"
        clean = unet(x, 800, encoder_hidden_states=enc).sample
        out = unet.run_with_saes(x, 800, encoder_hidden_states=enc, saes=[sae]).sample
        assert torch.equal(out, clean)


def test_cond_only_sae_in_a_guided_pipeline_leaves_the_uncond_half_alone(unet):
    """Batched CFG: the pipeline reports branch 'both' with per-row branches; a cfg_branch='cond' SAE
    passes the unconditional rows through unchanged and reconstructs the conditional ones."""
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    pipe = HookedDiffusionPipeline(denoiser=unet.denoiser, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))
    sae = _sae(TimestepBucketedSAE, TimestepBucketedSAEConfig)
    sae.cfg.metadata.cfg_branch = "cond"
    _, enc = _inputs()
    with torch.no_grad(), pipe.saes(saes=[sae]):
        _, cache = pipe.run_with_cache(prompt_embeds=enc[:1], num_inference_steps=2, guidance_scale=3.0,
                                       names_filter=[HOOK + ".hook_sae_input", HOOK + ".hook_sae_output"])
    timesteps = cache.timesteps_of(HOOK + ".hook_sae_input", branch="cond")
    assert len(timesteps) == 2
    for t in timesteps:
        for branch in ("uncond", "cond"):
            x = cache.get(HOOK + ".hook_sae_input", t, branch)
            y = cache.get(HOOK + ".hook_sae_output", t, branch)
            if branch == "uncond":
                assert torch.equal(x, y)
            else:
                assert (x - y).abs().max() > 1e-3
