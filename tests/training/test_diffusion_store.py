"""Diffusion activation store (rows labelled with timestep and CFG branch), its cache, training a
bucketed SAE from it, and diffusion downstream metrics; all on a tiny random-init UNet."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sae_lens_multimodal.saes import TimestepBucketedTrainingSAE, TimestepBucketedTrainingSAEConfig  # noqa: E402
from sae_lens_multimodal.training import cache_activations, train_sae  # noqa: E402
from sae_lens_multimodal.training.diffusion_store import DiffusionActivationStore  # noqa: E402
from sae_lens_multimodal.training.evaluate import diffusion_downstream, evaluate_sae  # noqa: E402

HOOK = "mid_block.attentions.0.hook_out"
STEPS = 4
KW = {"num_inference_steps": STEPS, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    return HookedDiffusionPipeline(denoiser=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))


def prompts(n):
    g = torch.Generator().manual_seed(11)
    return [{"prompt_embeds": torch.randn(1, 3, 16, generator=g)} for _ in range(n)]


def test_rows_are_labelled_with_actual_timestep_and_branch(pipe):
    items = prompts(2)
    store = DiffusionActivationStore(pipe, HOOK, items, seeds=[5, 6], pipeline_kwargs=KW, progress=False)
    (_, _, c0), (_, _, c1) = list(store.iter_chunks())
    schedule = [int(t) for t in pipe.pipe.scheduler.timesteps]
    # ground truth: the pipeline's own per-timestep, per-branch cache of the same run
    _, cache = pipe.run_with_cache(**items[1], **KW, generator=torch.Generator().manual_seed(6), names_filter=HOOK)
    chunk = c1[HOOK]
    assert (chunk.sample == 1).all()
    assert sorted({int(t) for t in chunk.timestep.tolist()}) == sorted(schedule)
    for t in schedule:
        for branch, code in (("uncond", 0), ("cond", 1)):
            ref = cache.get(HOOK, t, branch).reshape(-1, 64)
            rows = (chunk.timestep == t) & (chunk.branch == code)
            torch.testing.assert_close(chunk.acts[rows], ref, rtol=0, atol=1e-6)
    meta = store.describe(HOOK)
    assert meta["diffusion"]["num_train_timesteps"] == 1000 and meta["diffusion"]["scheduler"] == "DDIMScheduler"
    assert meta["d_in"] == 64


def test_timestep_branch_and_token_selection(pipe):
    schedule = [750, 500, 250, 0]  # DDIM, 4 steps, 1000 training timesteps
    store = DiffusionActivationStore(pipe, HOOK, prompts(1), timesteps=[schedule[0], schedule[-1]], cfg_branch="cond",
                                     tokens_per_sample=5, pipeline_kwargs=KW, progress=False)
    chunk = next(store.iter_chunks())[2][HOOK]
    assert sorted(set(chunk.timestep.tolist())) == sorted({float(schedule[0]), float(schedule[-1])})
    assert set(chunk.branch.tolist()) == {1}
    assert len(chunk) == 2 * 5  # two timesteps x one sample x 5 positions


def test_cache_train_and_evaluate_a_bucketed_sae(pipe, tmp_path):
    store = DiffusionActivationStore(pipe, HOOK, prompts(6), pipeline_kwargs=KW, progress=False)
    reader = cache_activations(store, tmp_path, items_per_shard=2)[HOOK]
    assert reader.has_timesteps and reader.timesteps() == [0.0, 250.0, 500.0, 750.0]
    assert reader.metadata["kind"] == "diffusion" and len(reader.shards) == 3
    sae = TimestepBucketedTrainingSAE(TimestepBucketedTrainingSAEConfig(
        d_in=64, d_sae=64, inner_architecture="topk", inner_config={"k": 8},
        timestep_ranges=[[0, 400], [400, 1000]], num_train_timesteps=1000, metadata={"input_kind": "block_output"}))
    before = evaluate_sae(sae, reader)["overall"]["explained_variance"]
    train_sae(sae, reader, total_training_samples=30_000, batch_size=128, lr=3e-3)
    result = evaluate_sae(sae, reader)
    assert result["overall"]["explained_variance"] > max(0.5, before + 0.3)
    assert [b["n_rows"] for b in result["buckets"]] == [2 * 6 * 16 * 2, 2 * 6 * 16 * 2]  # 2 timesteps each
    assert sae.cfg.metadata.hook_name == HOOK

    # downstream: per-timestep denoiser MSE on the clean trajectory, final-image difference
    res = diffusion_downstream(pipe, sae, [{**prompts(1)[0], **KW}], seeds=[3])
    assert list(res["timesteps"]) == [750, 500, 250, 0]
    for t, m in res["timesteps"].items():
        assert m["mse"] > 0 and m["mse_error_term"] < 1e-10, (t, m)
    assert res["images"]["image_mse"] > 0
    assert res["images"]["image_max_abs_diff_error_term"] < 1e-4
