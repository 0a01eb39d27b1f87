"""Head and block ablation in the shapes-world diffusion model, judged by the shapes CLIP.

Zero-ablating a head at ``hook_z`` is checked against zeroing that head's slice of the output
projection's input with a plain torch pre-hook; mean-ablating over a single prompt must change nothing
(the mean is the prompt's own activation, so this also checks the timestep / branch alignment of the
means). The functional claims are the measured ones (36 prompts, 10 steps, change in the judged
probability of the prompt's value):

    skip up_blocks.0.attentions.1             colour -0.006  shape -0.569  position -0.005
    skip mid_block.attentions.0               colour -0.030  shape +0.006  position -0.301
    mean-ablate mid_block ... attn2 head 0    colour -0.001  shape -0.002  position -0.083
    mean-ablate mid_block ... attn2 head 1    colour -0.000  shape +0.000  position +0.000

Single heads matter little in this model (of the 32 heads, only that one moves any factor by more than
0.03, by zero or mean ablation); whole attention blocks have large and factor-specific effects.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_lens_multimodal.analysis.ablation import (
    Component,
    ablate_components,
    attention_modules,
    block_components,
    head_components,
)
from sae_lens_multimodal.world.causal import shapes_prompts

STEPS = 8
ATTN = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    return HookedDiffusionPipeline(load_shapes_pipeline())


@pytest.fixture(scope="module")
def judge():
    from sae_lens_multimodal.world.eval_diffusion import FactorClassifier

    return FactorClassifier()


def test_components(pipe):
    mods = attention_modules(pipe)
    assert len(mods) == 8 and mods[0].startswith("down_blocks.2") and mods[-1] == ATTN
    heads = head_components(pipe)
    assert len(heads) == 32 and heads[0] == Component(mods[0], 0)
    blocks = block_components(pipe)
    assert Component("mid_block.attentions.0") in blocks and all(b.kind == "block" for b in blocks)
    # resnets that change the channel count have no update to skip
    with pytest.raises(KeyError, match="hook_update"):
        block_components(pipe, ["up_blocks.0.resnets.0"])
    with pytest.raises(ValueError, match="4 heads"):
        head_components(pipe, [ATTN], heads=[4])
    prompts = shapes_prompts(12, seed=0)
    assert sorted({p["color"] for p in prompts}) == sorted({"red", "green", "blue", "yellow", "purple", "orange"})
    assert {p["shape"] for p in prompts} == {"circle", "square", "triangle"}


def test_zero_ablation_matches_a_torch_pre_hook(pipe, judge):
    prompts = shapes_prompts(2, seed=1)
    result = ablate_components(pipe, prompts, [Component(ATTN, 2)], method="zero", judge=judge,
                               num_inference_steps=STEPS, progress=False)
    proj = pipe.denoiser.get_submodule(ATTN).to_out[0]
    d_head = proj.in_features // 4

    def zero_head(module, args):
        x = args[0].clone()
        x[..., 2 * d_head:3 * d_head] = 0
        return (x,)

    handle = proj.register_forward_pre_hook(zero_head)
    try:
        from sae_lens_multimodal.world.shapes import caption

        images = pipe.pipe([caption(p) for p in prompts], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                           output_type="pt").images
    finally:
        handle.remove()
    from sae_lens_multimodal.world.diffusion import to_uint8

    expected = to_uint8(images[:1])[0].astype(int)
    assert np.abs(result.images[0].astype(int) - expected).max() <= 1
    assert result.pixel_mse[0] > 0
    assert not any(hp.fwd_hooks for hp in pipe.hook_dict.values())


def test_mean_ablation_over_one_prompt_changes_nothing(pipe, judge):
    comps = head_components(pipe, ["mid_block.attentions.0.transformer_blocks.0.attn2"], heads=[0, 3])
    result = ablate_components(pipe, shapes_prompts(1, seed=2), comps, method="mean", judge=judge,
                               num_inference_steps=STEPS, progress=False)
    assert torch.all(result.pixel_mse < 1e-12)
    assert torch.equal(result.p_true, result.baseline_p_true.expand_as(result.p_true))


def test_components_with_distinct_functions(pipe, judge, tmp_path):
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    comps = [Component("up_blocks.0.attentions.1"), Component("mid_block.attentions.0"), Component(mid, 0), Component(mid, 1)]
    result = ablate_components(pipe, shapes_prompts(36, seed=0), comps, method="mean", judge=judge,
                               num_inference_steps=10, progress=False)
    d = dict(zip([c.name for c in comps], result.p_true_change))
    color, shape, position = range(3)
    shape_block, position_block = d["up_blocks.0.attentions.1 (skip)"], d["mid_block.attentions.0 (skip)"]
    assert shape_block[shape] < -0.3 and abs(shape_block[color]) < 0.05 and abs(shape_block[position]) < 0.05
    assert position_block[position] < -0.15 and abs(position_block[shape]) < 0.05 and abs(position_block[color]) < 0.08
    head0, head1 = d[f"{mid} head 0"], d[f"{mid} head 1"]
    assert head0[position] < -0.04 and abs(head0[color]) < 0.01 and abs(head0[shape]) < 0.02
    assert head1.abs().max() < 0.01
    found = result.selective("shape", "color", min_effect=0.3, max_other=0.05)
    assert [f["component"] for f in found] == ["up_blocks.0.attentions.1 (skip)"]
    table = result.to_table(sort_by="d_p_shape")
    assert table.loc[0, "component"] == "up_blocks.0.attentions.1 (skip)" and set(table["method"]) == {"skip", "mean"}
    assert len(result.to_records()) == 4 and "baseline" in str(result)
    png = result.plot(tmp_path / "ablation.png").read_bytes()
    assert png[:4] == b"\x89PNG"


def test_bad_inputs(pipe, judge):
    with pytest.raises(ValueError, match="method"):
        ablate_components(pipe, shapes_prompts(1), method="resample", judge=judge)
    with pytest.raises(ValueError, match="factor dicts"):
        ablate_components(pipe, ["a red circle on the left"], judge=judge)
    with pytest.raises(KeyError):
        ablate_components(pipe, shapes_prompts(1), [Component("up_blocks.0.attentions.9.transformer_blocks.0.attn2", 0)],
                          judge=judge)
