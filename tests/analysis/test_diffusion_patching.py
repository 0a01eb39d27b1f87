"""Cross-prompt activation patching in the shapes-world diffusion model.

Two prompts that differ in one factor run from the same noise. Patching the source's activations at
every block and every timestep must reproduce the source image (the last block's output determines the
noise prediction). Which timesteps carry a factor was measured (8 DPM-Solver steps, 4 prompt pairs,
all blocks patched over the first k steps, the judge's probability of the source's value):

    steps patched   999  ..874  ..749  ..624  ..500  ..375  ..250  ..125
    position       0.25  0.50   0.75   0.995  0.995  0.995  0.995  0.995
    colour         0.00  0.00   0.00   0.001  0.007  0.055  0.976  0.997

so the position is fixed within the first half of the schedule and the colour only in its second half;
patching the first half alone moves the position but not the colour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_lens_multimodal.analysis.diffusion_patching import ALL_BLOCKS, diffusion_patching, unet_blocks

STEPS = 8
SOURCE = [
    {"color": "red", "shape": "circle", "position": "left"},
    {"color": "green", "shape": "square", "position": "top"},
]


@pytest.fixture(scope="module")
def pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    return HookedDiffusionPipeline(load_shapes_pipeline())


@pytest.fixture(scope="module")
def judge():
    from sae_lens_multimodal.world.eval_diffusion import FactorClassifier

    return FactorClassifier()


@pytest.fixture(scope="module")
def schedule(pipe):
    pipe.pipe.scheduler.set_timesteps(STEPS)
    return pipe.pipe.scheduler.timesteps.tolist()


def swapped(factor, mapping):
    return [dict(p, **{factor: mapping[p[factor]]}) for p in SOURCE]


def test_unet_blocks_in_execution_order(pipe):
    blocks = unet_blocks(pipe)
    assert blocks[0] == "down_blocks.0.resnets.0" and blocks[-1] == "up_blocks.2.resnets.1"
    assert blocks.index("mid_block.resnets.0") < blocks.index("mid_block.attentions.0") < blocks.index("mid_block.resnets.1")
    assert blocks.index("up_blocks.0.resnets.1") < blocks.index("up_blocks.0.attentions.1")
    assert not any("transformer_blocks" in b for b in blocks) and len(blocks) == 15


def test_patching_everything_reproduces_the_source(pipe, judge, schedule):
    target = swapped("color", {"red": "blue", "green": "purple"})
    result = diffusion_patching(pipe, SOURCE, target, judge=judge, blocks=["down_blocks.2.attentions.0", "up_blocks.2.resnets.1"],
                                timesteps=[schedule], num_inference_steps=STEPS, progress=False)
    assert result.blocks == [ALL_BLOCKS, "down_blocks.2.attentions.0", "up_blocks.2.resnets.1"]
    assert result.target_baseline["p_target"] > 0.95 and result.source_baseline["p_source"] > 0.95
    for row in (0, 2):  # every block, or the last block alone: the noise prediction is the source's
        assert result["pixel_mse_to_source"][row, 0] < 1e-10
        assert abs(result["pixel_recovery"][row, 0] - 1.0) < 1e-5
        assert abs(result["p_source"][row, 0] - result.source_baseline["p_source"]) < 1e-4
    # One mid-network block is overwritten again by the text conditioning downstream: no colour moves.
    assert result["p_source"][1, 0] < 0.05
    assert np.array_equal(result.images[0, 0], result.source_image)
    assert not any(hp.fwd_hooks for hp in pipe.hook_dict.values())


def test_position_commits_before_colour(pipe, judge, schedule):
    half = STEPS // 2
    windows = [schedule[:half], schedule[half:]]
    pos = diffusion_patching(pipe, SOURCE, swapped("position", {"left": "right", "top": "bottom"}), judge=judge,
                             factor="position", per_block=False, timesteps=windows, num_inference_steps=STEPS,
                             progress=False)
    col = diffusion_patching(pipe, SOURCE, swapped("color", {"red": "blue", "green": "purple"}), judge=judge,
                             factor="color", per_block=False, timesteps=windows, num_inference_steps=STEPS,
                             progress=False)
    early_pos, late_pos = pos["p_source"][0].tolist()
    early_col, late_col = col["p_source"][0].tolist()
    # Early steps decide the position ...
    assert early_pos > 0.9 and late_pos < 0.1
    # ... but not the colour, which neither half decides alone.
    assert early_col < 0.1 and early_pos - early_col > 0.8
    assert pos.timesteps == [f"{schedule[0]}..{schedule[half - 1]}", f"{schedule[half]}..{schedule[-1]}"]


def test_until_mode_table_records_and_figure(pipe, judge, schedule, tmp_path):
    target = swapped("color", {"red": "blue", "green": "purple"})
    result = diffusion_patching(pipe, SOURCE[:1], target[:1], judge=judge, blocks=["up_blocks.2.resnets.1"],
                                include_all_blocks=False, timesteps=[schedule[0], schedule[-1]],
                                timestep_mode="until", num_inference_steps=STEPS, progress=False)
    # "until" the last timestep patches every step: the source image again.
    assert result["pixel_mse_to_source"][0, 1] < 1e-10 and result["pixel_recovery"][0, 0] < 0.5
    table = result.to_table("pixel_recovery")
    assert table.shape == (1, 2) and list(table.columns) == [f"t={schedule[0]}", f"t={schedule[-1]}"]
    records = result.to_records()
    assert len(records) == 2 and {"p_source", "p_target", "pixel_recovery", "pixel_mse_to_source"} <= set(records[0])
    png = result.plot(tmp_path / "patch.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000
    assert "source" in str(result)
    # "from" the first timestep also patches every step.
    every = diffusion_patching(pipe, SOURCE[:1], target[:1], judge=judge, blocks=["up_blocks.2.resnets.1"],
                               include_all_blocks=False, timesteps=[schedule[0]], timestep_mode="from",
                               num_inference_steps=STEPS, progress=False)
    assert every["pixel_mse_to_source"][0, 0] < 1e-10


def test_bad_inputs(pipe, judge, schedule):
    target = swapped("color", {"red": "blue", "green": "purple"})
    with pytest.raises(KeyError, match="up_blocks"):
        diffusion_patching(pipe, SOURCE, target, judge=judge, blocks=["up_blocks.9.resnets.0"])
    with pytest.raises(ValueError, match="timestep_mode"):
        diffusion_patching(pipe, SOURCE, target, judge=judge, timestep_mode="sometimes")
    with pytest.raises(ValueError, match="pair up"):
        diffusion_patching(pipe, SOURCE, target[:1], judge=judge)
    with pytest.raises(ValueError, match="factor dicts"):
        diffusion_patching(pipe, ["a red circle on the left"], ["a blue circle on the left"], judge=judge)
    with pytest.raises(ValueError, match="schedule"):
        diffusion_patching(pipe, SOURCE[:1], target[:1], judge=judge, blocks=["up_blocks.2.resnets.1"],
                           timesteps=[998], num_inference_steps=STEPS, progress=False)


def test_cfg_branch_patching_follows_which_branch_carries_the_prompt(pipe, schedule):
    # Both runs start from the same noise and their unconditional rows see the same empty prompt, so at the first
    # step the two runs' unconditional activations are identical: patching only them there changes nothing, and
    # patching only the conditional rows equals patching every row. Patching the last block's conditional rows at
    # every step makes every noise prediction the source's, so the source image comes back.
    target = swapped("color", {"red": "blue", "green": "purple"})
    kwargs = dict(blocks=["up_blocks.2.resnets.1"], include_all_blocks=False, factor=None,
                  num_inference_steps=STEPS, progress=False)
    first = [[schedule[0]]]
    uncond = diffusion_patching(pipe, SOURCE, target, cfg_branch="uncond", timesteps=first, **kwargs)
    cond = diffusion_patching(pipe, SOURCE, target, cfg_branch="cond", timesteps=first, **kwargs)
    both = diffusion_patching(pipe, SOURCE, target, cfg_branch=None, timesteps=first, **kwargs)
    assert np.array_equal(uncond.images[0, 0], uncond.target_image)
    assert not np.array_equal(cond.images[0, 0], cond.target_image)
    assert np.array_equal(cond.images[0, 0], both.images[0, 0])
    every_step = diffusion_patching(pipe, SOURCE, target, cfg_branch="cond", timesteps=[schedule], **kwargs)
    assert every_step["pixel_mse_to_source"][0, 0] < 1e-10
    assert not any(hp.fwd_hooks for hp in pipe.hook_dict.values())
