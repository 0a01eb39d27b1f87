"""Head roles: attention statistics on constructed patterns and on tiny random UNet / PixArt models (checked
against patterns cached independently with ``run_with_cache``), the stated role rule, bottleneck ablation.

Shipped weights (slow): head ablation and bottleneck degradation of shapes-diffusion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_lens_multimodal.analysis.ablation import AblationResult, Component
from sae_lens_multimodal.analysis.factor_worlds import FactorWorld
from sae_lens_multimodal.analysis.head_roles import (
    HeadStatistics,
    assign_head_roles,
    attention_head_statistics,
    bottleneck_ablation,
    frechet_distance,
    grid_distances,
    pattern_statistics,
)
from tests.diffusion import _tiny


def test_pattern_statistics_on_constructed_patterns():
    n = 16  # a 4x4 grid
    eye = torch.eye(n)[None, None]
    uniform = torch.full((1, 1, n, n), 1.0 / n)
    # every query attends to its right-hand neighbour (the last column to its left-hand one): distance 1
    shift = torch.zeros(1, 1, n, n)
    for q in range(n):
        shift[0, 0, q, q + 1 if q % 4 != 3 else q - 1] = 1.0
    s_eye = pattern_statistics(eye, kind="self")
    s_uni = pattern_statistics(uniform, kind="self")
    s_shift = pattern_statistics(shift, kind="self")
    assert float(s_eye["mean_distance"]) == 0 and float(s_eye["entropy"]) == 0
    assert math.isclose(float(s_uni["locality"]), 1.0, rel_tol=1e-6) and math.isclose(float(s_uni["entropy"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(s_shift["mean_distance"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(grid_distances(16)[0, 15]), math.sqrt(18), rel_tol=1e-6)
    # cross-attention: all mass on key 3 in row 0, on key 5 in row 1
    cross = torch.zeros(2, 2, 4, 8)
    cross[0, :, :, 3] = 1
    cross[1, :, :, 5] = 1
    masks = {"a": torch.zeros(2, 8, dtype=torch.bool), "b": torch.zeros(2, 8, dtype=torch.bool)}
    masks["a"][0, 3] = masks["a"][1, 5] = True
    masks["b"][0, 5] = masks["b"][1, 4] = True
    st = pattern_statistics(cross, kind="cross", group_masks=masks)
    assert st["mass:a"].tolist() == [1.0, 1.0] and st["mass:b"].tolist() == [0.0, 0.0]
    assert math.isclose(float(st["share:a"][0]), 1 / 8)
    with pytest.raises(ValueError, match="square grid"):
        pattern_statistics(torch.full((1, 1, 6, 6), 1 / 6), kind="self")
    with pytest.raises(ValueError, match="mask shape"):
        pattern_statistics(cross, kind="cross", group_masks={"a": torch.zeros(3, 8, dtype=torch.bool)})


def _manual_stats(pattern_steps):
    """Entropy and mean attended distance from cached patterns [T, b, h, q, k], computed here directly."""
    p = pattern_steps.double()
    ent = (-(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])).mean(dim=(0, 1, 3))
    side = int(round(math.sqrt(p.shape[-1])))
    ys, xs = np.divmod(np.arange(p.shape[-1]), side)
    d = torch.tensor(np.hypot(ys[:, None] - ys[None], xs[:, None] - xs[None]))
    mean_d = (p * d).sum(-1).mean(dim=(0, 1, 3))
    return ent, mean_d


@pytest.mark.parametrize("family", ["unet", "pixart"])
def test_statistics_match_cached_patterns(family):
    from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline

    torch.manual_seed(0)
    if family == "unet":
        hooked = as_hooked_pipeline(_tiny.sd_pipeline())
        prompts, kw = ["a cat", "a dog"], {}
        module = "down_blocks.1.attentions.0.transformer_blocks.0"
        groups = [{"animal": [3, 4, 5]}, {"animal": [3, 4, 5]}]
    else:
        hooked = as_hooked_pipeline(_tiny.pixart_pipeline())
        prompts, kw = ["x"], _tiny.dit_call_kwargs("pixart")
        for k in ("num_inference_steps", "output_type", "guidance_scale"):
            kw.pop(k)
        module = "transformer_blocks.1"
        groups = [{"animal": [2, 3]}]
    mods = [f"{module}.attn1", f"{module}.attn2"]
    run = dict(num_inference_steps=2, guidance_scale=3.0, seed=0)
    stats = attention_head_statistics(hooked, prompts if family == "unet" else prompts, groups, modules=mods, **run, **kw)
    names = [f"{m}.hook_pattern" for m in mods]
    args = (prompts,) if family == "unet" else ()
    _, cache = hooked.run_with_cache(*args, names_filter=names, cfg_branch="cond", num_inference_steps=2, guidance_scale=3.0,
                                     generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    self_p, cross_p = cache.stack(names[0]), cache.stack(names[1])
    n_heads = self_p.shape[2]
    assert stats.kinds == ["self"] * n_heads + ["cross"] * n_heads
    ent, mean_d = _manual_stats(self_p)
    torch.testing.assert_close(stats.values["entropy"][:n_heads].double(), ent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.values["mean_distance"][:n_heads].double(), mean_d, atol=1e-4, rtol=1e-4)
    mass = torch.stack([cross_p[:, r, :, :, groups[r]["animal"]].sum(-1) for r in range(len(prompts))], 1).mean(dim=(0, 1, 3))
    torch.testing.assert_close(stats.values["mass:animal"][n_heads:].double(), mass.double(), atol=1e-4, rtol=1e-4)
    assert torch.isnan(stats.values["mass:animal"][:n_heads]).all() and torch.isnan(stats.values["locality"][n_heads:]).all()
    frame = stats.to_frame()
    assert len(frame) == 2 * n_heads and set(frame["kind"]) == {"self", "cross"}


def test_joint_attention_statistics_match_cached_pattern():
    """SD3 joint attention ([image, text] keys in one softmax): the image block and the text block of the
    image queries, each renormalised, against the cached joint pattern split here."""
    from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline

    torch.manual_seed(0)
    hooked = as_hooked_pipeline(_tiny.sd3_pipeline())
    kw = _tiny.dit_call_kwargs("sd3")
    for k in ("num_inference_steps", "output_type", "guidance_scale"):
        kw.pop(k)
    module = "transformer_blocks.1.attn"
    groups = [{"w": [1, 2]}]
    stats = attention_head_statistics(hooked, ["x"], groups, modules=[module], num_inference_steps=2, guidance_scale=3.0,
                                      seed=0, **kw)
    _, cache = hooked.run_with_cache(names_filter=[f"{module}.hook_pattern"], cfg_branch="cond", num_inference_steps=2,
                                     guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    joint = cache.stack(f"{module}.hook_pattern").double()  # [T, b, h, n_img + n_txt, n_img + n_txt]
    n_txt = 7  # the tiny prompt embeddings' length
    n_img = joint.shape[-1] - n_txt
    img = joint[..., :n_img, :n_img]
    img = img / img.sum(-1, keepdim=True)
    txt = joint[..., :n_img, n_img:]
    share = txt.sum(-1).mean(dim=(0, 1, 3))
    txt = txt / txt.sum(-1, keepdim=True)
    ent, mean_d = _manual_stats(img)
    assert stats.kinds == ["joint"] * joint.shape[2]
    torch.testing.assert_close(stats.values["entropy"].double(), ent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.values["mean_distance"].double(), mean_d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.values["text_share"].double(), share, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.values["mass:w"].double(), txt[..., [1, 2]].sum(-1).mean(dim=(0, 1, 3)),
                               atol=1e-4, rtol=1e-4)
    roles = assign_head_roles(stats, joint_text_min=0.0)  # every head read as cross-attention
    assert all(r == "text-global" or r.startswith("semantic:") for r in roles["role"])


def test_role_rule():
    heads = [Component("m.attn1", 0), Component("m.attn1", 1), Component("m.attn1", 2),
             Component("m.attn2", 0), Component("m.attn2", 1)]
    nan = float("nan")
    values = {
        "entropy": torch.tensor([0.3, 0.9, 0.5, 0.8, 0.8]),
        "locality": torch.tensor([0.4, 0.95, 0.95, nan, nan]),
        "enrichment:color": torch.tensor([nan, nan, nan, 3.0, 1.0]),
        "enrichment:shape": torch.tensor([nan, nan, nan, 1.2, 1.1]),
    }
    stats = HeadStatistics(heads=heads, kinds=["self"] * 3 + ["cross"] * 2, values=values, groups=("color", "shape"))
    dp = torch.tensor([[0.0, -0.05], [0.0, 0.0], [-0.01, 0.0], [-0.2, 0.0], [0.0, -0.019]])
    ablation = AblationResult(components=heads, method="mean", factors=("color", "shape"), accuracy=torch.zeros(5, 2),
                              p_true=dp + 0.5, pixel_mse=torch.zeros(5), baseline_accuracy=torch.zeros(2),
                              baseline_p_true=torch.full((2,), 0.5), n_prompts=1, num_inference_steps=1, seed=0)
    roles = assign_head_roles(stats, ablation)
    assert roles["role"].tolist() == ["local (edge/texture)", "composition (global)", "regional", "semantic:color", "text-global"]
    assert roles["effect"].tolist() == ["shape", "none (redundant)", "none (redundant)", "color", "none (redundant)"]
    assert roles["d_p_color"].tolist()[3] == pytest.approx(-0.2)


class _BrightnessJudge:
    """A stand-in judge: 'light' when the image's mean pixel value is above 127."""

    factors = ("bright",)
    values = {"bright": ["dark", "light"]}
    membership = {"bright": torch.eye(2)}

    def probabilities(self, images):
        light = torch.tensor(images.reshape(len(images), -1).mean(-1) > 127, dtype=torch.float32)
        return torch.stack([1 - light, light], -1)


def test_bottleneck_ablation_on_tiny_unet():
    torch.manual_seed(0)
    pipe = _tiny.sd_pipeline()
    world = FactorWorld("fake", {"bright": ("dark", "light")}, lambda p: f"a {p['bright']} thing",
                        lambda n, seed: [], _BrightnessJudge)
    prompts = [{"bright": "dark"}, {"bright": "light"}, {"bright": "dark"}]
    feats = lambda imgs: torch.tensor(imgs.reshape(len(imgs), -1)[:, :6], dtype=torch.float32)  # noqa: E731
    refs = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    result = bottleneck_ablation(pipe, prompts, {"nothing": [], "mid block": ["mid_block.resnets.0", "mid_block.attentions.0",
                                                                              "mid_block.resnets.1"]},
                                 world=world, features=feats, reference_images=refs, num_inference_steps=2)
    # skipping nothing reproduces the baseline exactly; skipping the mid block changes the images
    assert float(result.pixel_mse[0]) == 0.0 and float(result.feature_distance[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(result.accuracy_drop_pct[0]) == 0.0 and float(result.fd_increase_pct[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(result.pixel_mse[1]) > 0.0  # tiny random VAE: small images differences, but not none
    table = result.to_table()
    assert table["skipped"].tolist() == ["nothing", "mid block"] and table["blocks"].tolist() == [0, 3]
    with pytest.raises(KeyError, match="not a block"):
        bottleneck_ablation(pipe, prompts, {"bad": ["mid_block.nothing.0"]}, world=world, num_inference_steps=1)


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean shifted by (2, 0, 0): distance |shift|^2 = 4
    assert frechet_distance(a, a + torch.tensor([2.0, 0, 0])) == pytest.approx(4.0, rel=1e-6)


# --------------------------------------------------------------------------- shipped weights
@pytest.mark.slow
@pytest.mark.shipped_weights
def test_shapes_diffusion_head_roles_and_bottleneck():
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline
    from sae_lens_multimodal.world.diffusion_heads import HEAD_FACTORS, head_role_study

    roles, ablation, bottleneck = head_role_study(load_shapes_pipeline(), n_prompts=12, num_inference_steps=6, seed=0)
    assert len(roles) == 32 and set(roles["kind"]) == {"self", "cross"}
    mid0 = roles[(roles["module"] == "mid_block.attentions.0.transformer_blocks.0.attn2") & (roles["head"] == 0)].iloc[0]
    # Measured (12 prompts, 6 steps, seed 0): mean-ablating cross-attention head 0 of the mid block lowers
    # the judged probability of the position by 0.082 (next largest drop: texture 0.030). Margin 0.04.
    assert mid0["d_p_position"] <= -0.04 and mid0["effect"] == "position"
    # Self-attention at 8x8 is global in this model: measured locality 0.99-1.08 for all 16 heads.
    assert (roles[roles["kind"] == "self"]["locality"] > 0.85).all()
    table = bottleneck.to_table().set_index("skipped")
    # Measured: skipping every 8x8 attention block drops the mean accuracy by 37.0%; skipping the mid
    # block raises the CLIP-feature Fréchet distance to real images by 442%. Margins 17 and 342 points.
    assert table.loc["lowest-resolution attention (all)", "accuracy_drop_pct"] >= 20
    assert table.loc["mid block (all)", "fd_increase_pct"] >= 100
    assert list(bottleneck.factors) == list(HEAD_FACTORS)


@pytest.mark.slow
@pytest.mark.shipped_weights
def test_shapes_dit_head_roles_and_lens():
    from sae_lens_multimodal.world.diffusion_heads import head_role_study, lens_study
    from sae_lens_multimodal.world.dit import load_shapes_dit_pipeline

    pipe = load_shapes_dit_pipeline()
    roles, _, bottleneck = head_role_study(pipe, n_prompts=12, num_inference_steps=6, seed=0)
    assert len(roles) == 24 and set(roles["kind"]) == {"joint"}
    head = roles[(roles["module"] == "transformer_blocks.0.attn") & (roles["head"] == 2)].iloc[0]
    # Measured on the shipped 15000-step weights (12 prompts, 6 steps, seed 0): mean-ablating head 2 of block 0
    # lowers the judged probability of shape by 0.497, position 0.488, size 0.400, texture 0.327 and colour
    # 0.203, though it sends 17% of its attention to text. Margins 0.2 (shape, position), 0.1 (colour).
    assert head["d_p_shape"] <= -0.29 and head["d_p_position"] <= -0.28 and head["d_p_color"] <= -0.1
    assert head["text_share"] < 0.25
    # Measured: mean-ablating head 2 of the last block lowers texture by 0.301 (every other factor by <= 0.06):
    # the last block's heads carry the detail. Margin 0.15.
    last = roles[(roles["module"] == "transformer_blocks.5.attn") & (roles["head"] == 2)].iloc[0]
    assert last["d_p_texture"] <= -0.15 and last["effect"] == "texture"
    # Measured: skipping every block but the first and last drops accuracy by 23.7%, FD +719%. Margins 11, 419.
    table = bottleneck.to_table().set_index("skipped")
    assert table.loc["all but first and last", "accuracy_drop_pct"] >= 12
    assert table.loc["all but first and last", "fd_increase_pct"] >= 300
    lens = lens_study(pipe, n_prompts=8, num_inference_steps=6, seed=0)
    f = {k: i for i, k in enumerate(lens.factors)}
    # Measured at t=999: colour 0.0 / 0.125 / 0.25 after blocks 0-2, 0.75 / 1.0 / 1.0 after blocks 3-5;
    # position 0.0 after block 0, 1.0 after every later block: position is laid out by block 1, colour by
    # mid-depth (8 prompts: one prompt is 0.125).
    acc0 = lens.accuracy[:, 0]
    assert (acc0[:3, f["color"]] <= 0.375).all() and (acc0[3:, f["color"]] >= 0.625).all()
    assert acc0[0, f["position"]] <= 0.25 and (acc0[1:, f["position"]] >= 0.75).all()
