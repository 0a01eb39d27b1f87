"""Temporal analysis on the shapes-world diffusion model.

Feature time courses are checked against activations recorded with a plain torch forward hook on the
diffusers module (independent of the hook points and the pipeline cache) and encoded by hand; a
timestep-bucketed SAE with one bucket switched off shows that each timestep's activations reach the
right bucket. Linear probes per timestep read the prompt's factors from the UNet: thresholds are the
measured figures with margins (see the test's comment).
"""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal.analysis.temporal import (
    commit_index,
    feature_timecourse,
    pool_activations,
    timestep_probes,
)

HOOK = "up_blocks.0.attentions.1.hook_out"
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the center"]
STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    return HookedDiffusionPipeline(load_shapes_pipeline())


@pytest.fixture(scope="module")
def bucketed_sae():
    from sae_lens_multimodal.saes import TimestepBucketedSAE, TimestepBucketedSAEConfig

    torch.manual_seed(0)
    sae = TimestepBucketedSAE(TimestepBucketedSAEConfig(
        d_in=64, d_sae=32, inner_architecture="standard", timestep_ranges=[[0, 500], [500, 1000]],
        num_train_timesteps=1000, metadata={"hook_name": HOOK, "input_kind": "block_output"},
    ))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        # Bucket 1 (t >= 500) can never fire: any activation seen there must come from bucket 0 by mistake.
        sae.buckets[1].W_enc.zero_()
        sae.buckets[1].b_enc.fill_(-1.0)
    return sae


@pytest.fixture(scope="module")
def recorded(pipe):
    """Conditional-branch outputs of the diffusers module at every denoiser call, by a torch hook."""
    module = pipe.denoiser.up_blocks[0].attentions[1]
    outs = []
    handle = module.register_forward_hook(lambda m, i, o: outs.append(o[0].detach().clone()))
    try:
        pipe.pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt")
    finally:
        handle.remove()
    timesteps = pipe.pipe.scheduler.timesteps.tolist()
    # [uncond rows; cond rows], NCHW -> channel-last
    return timesteps, [o[len(PROMPTS):].permute(0, 2, 3, 1) for o in outs]


def test_commit_index_definition():
    assert commit_index(torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])) == 2
    assert commit_index(torch.tensor([5.0, 5.0, 5.0])) == 0
    # Overshoot then settle: within 10% of the total excursion from step 2 on, within 1% only at the end.
    curve = torch.tensor([0.0, 2.0, 1.05, 1.0])
    assert commit_index(curve, 0.1) == 2
    assert commit_index(curve, 0.01) == 3
    with pytest.raises(ValueError, match="tolerance"):
        commit_index(curve, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        commit_index(torch.zeros(0))


def test_bucketed_sae_timecourse_matches_hand_encoding(pipe, bucketed_sae, recorded):
    timesteps, acts = recorded
    features = [0, 3, 7]
    tc = feature_timecourse(pipe, PROMPTS, sae=bucketed_sae, features=features, num_inference_steps=STEPS)
    assert tc.timesteps == timesteps and tc.hook_name == HOOK  # hook read from the SAE's metadata
    assert tc.activations.shape == (STEPS, len(PROMPTS), len(features))
    inner = bucketed_sae.buckets[0]
    for i, t in enumerate(timesteps):
        if t >= 500:
            assert torch.equal(tc.activations[i], torch.zeros(len(PROMPTS), len(features)))
        else:
            x = acts[i].reshape(len(PROMPTS), -1, 64)
            z = torch.relu((x - inner.b_dec) @ inner.W_enc + inner.b_enc)[..., features].mean(1)
            assert torch.allclose(tc.activations[i], z, atol=1e-4)
    assert tc.activations[[i for i, t in enumerate(timesteps) if t < 500]].abs().sum() > 0
    # Buckets are separate dictionaries: recorded per timestep, commit computed within the last bucket.
    assert tc.buckets == [1 if t >= 500 else 0 for t in timesteps]
    assert set(tc.commit_timesteps().values()) <= {t for t in timesteps if t < 500}
    assert list(tc.to_table()["bucket"])[:STEPS] == [str(b) for b in tc.buckets]
    assert not any(hp.fwd_hooks for hp in pipe.hook_dict.values())


def test_bundled_bucketed_sae_routes_each_timestep_to_its_bucket(pipe, recorded):
    from sae_lens import SAE

    import sae_lens_multimodal  # noqa: F401  (registers the bundled releases)

    try:
        sae = SAE.from_pretrained("shapes-diffusion-saes", HOOK)
    except Exception as err:  # the bundled SAE ships separately (helper "bundled-saes")
        pytest.skip(f"bundled shapes-diffusion SAE not available: {err}")
    sae = sae[0] if isinstance(sae, tuple) else sae
    timesteps, acts = recorded
    tc = feature_timecourse(pipe, PROMPTS, sae=sae, num_inference_steps=STEPS)
    buckets = sae.cfg.buckets
    assert tc.buckets == [int(buckets.bucket_of(torch.tensor([float(t)]))[0]) for t in timesteps]
    assert len(set(tc.buckets)) > 1
    scale = sae.cfg.bucket_scaling_factors or [1.0] * len(buckets)
    for i, b in enumerate(tc.buckets):
        x = acts[i].reshape(-1, 64) * scale[b]  # each bucket's input scale, then that bucket's SAELens SAE
        hand = sae.bucket_sae(b).encode(x).reshape(len(PROMPTS), -1, sae.cfg.d_sae).mean(1)
        assert torch.allclose(tc.activations[i], hand, atol=1e-4)


def test_direction_timecourse_and_commit(pipe, recorded, tmp_path):
    timesteps, acts = recorded
    direction = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    tc = feature_timecourse(pipe, PROMPTS, HOOK, direction=direction, reduce="max", num_inference_steps=STEPS)
    manual = torch.stack([(a.reshape(len(PROMPTS), -1, 64) @ direction.T).max(1).values for a in acts])
    assert torch.allclose(tc.activations, manual, atol=1e-4)
    assert torch.allclose(tc.mean(), manual.mean(1), atol=1e-5)
    commits = tc.commit_timesteps(0.1)
    for j, f in enumerate(tc.features):
        assert commits[f] == timesteps[commit_index(manual.mean(1)[:, j], 0.1)]
    assert tc.commit_steps_per_prompt().shape == (len(PROMPTS), 2)
    table = tc.to_table()
    assert list(table.index)[:STEPS] == [str(t) for t in timesteps] and table.index[-1].startswith("commit")
    assert len(tc.to_records()) == 2 * STEPS
    png = tc.plot(tmp_path / "timecourse.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000


def test_timecourse_bad_inputs(pipe, bucketed_sae):
    with pytest.raises(ValueError, match="exactly one"):
        feature_timecourse(pipe, PROMPTS, HOOK)
    with pytest.raises(ValueError, match="width"):
        feature_timecourse(pipe, PROMPTS, HOOK, direction=torch.ones(10))
    with pytest.raises(ValueError, match="out of range"):
        feature_timecourse(pipe, PROMPTS, sae=bucketed_sae, features=[99])
    with pytest.raises(KeyError, match="up_blocks"):
        feature_timecourse(pipe, PROMPTS, "up_blocks.0.attentions.7.hook_out", direction=torch.ones(64))


def test_pool_activations():
    x = torch.arange(2 * 6 * 6 * 4, dtype=torch.float32).reshape(2, 6, 6, 4)
    assert pool_activations(x, "mean").shape == (2, 4)
    grid = pool_activations(x, "grid")
    assert grid.shape == (2, 4 * 9)
    # cell (0, 0) of channel 0 averages the top-left 2x2 pixels
    assert grid[0, 0] == x[0, :2, :2, 0].mean()
    assert pool_activations(x, "flatten").shape == (2, 144)
    with pytest.raises(ValueError, match="pooling"):
        pool_activations(x, "sum")


PROBE_HOOK = "up_blocks.2.resnets.1.hook_out"  # the last block: what the sample shows at full resolution
PROBE_N = 54


@pytest.fixture(scope="module")
def probes(pipe):
    return timestep_probes(pipe, PROBE_HOOK, n_train=PROBE_N, n_test=PROBE_N, num_inference_steps=STEPS,
                           cfg_branch="uncond", progress=False)


def test_probes_when_factors_become_decodable(probes, tmp_path):
    acc = dict(zip(probes.factors, probes.accuracy.T))
    chance = dict(zip(probes.factors, probes.chance))
    # Measured (54 + 54 runs, 8 steps, unconditional branch at the last block):
    #   timestep   999   874   749   624   500   375   250   125   chance
    #   colour    0.24  0.37  0.74  0.94  0.94  0.96  0.98  0.98   0.17
    #   shape     0.30  0.48  0.46  0.63  0.70  0.78  0.80  0.74   0.33
    #   position  0.09  0.89  0.98  1.00  1.00  1.00  1.00  1.00   0.11
    assert probes.accuracy.shape == (STEPS, 3)
    assert acc["color"][0] < 0.4 and acc["position"][0] < 0.3 and acc["shape"][0] < 0.5  # pure noise: ~chance
    assert acc["color"][-1] > 0.9 and acc["position"][2:].min() > 0.9 and acc["shape"][-1] > 0.6
    assert acc["shape"][-1] > chance["shape"] + 0.2
    first = probes.decodable_from(0.9)
    assert first["position"] > first["color"]  # larger timestep = earlier in denoising
    assert probes.train_accuracy[-1].min() > 0.9
    png = probes.plot(tmp_path / "probes.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    table = probes.to_table()
    assert list(table.columns) == ["color", "shape", "position"] and table.index[-1] == "chance"
