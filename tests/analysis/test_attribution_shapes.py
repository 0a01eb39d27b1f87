"""Attribution patching validated against exact activation patching on the shipped shapes-world CLIP.

Three image pairs per contrast (a large plain circle / triangle, red / green, at the left / top left /
bottom); the corrupted image changes one factor: the colour (to blue), the shape (to a square) or the
position (mirrored). The metric is the CLIP logit of the true caption minus the foil caption (the
corrupted image's), averaged over the pairs, from the full HookedCLIP (both towers run).

Ground truth that needs no reference run: at the first block, tokens whose pixels are the same in both
images carry the same activation, so their estimate must be exactly 0; likewise in the text tower, every
position before the changed word.

Against exact patching (``circuits_exact.exact_patching``, and ``transformer_lens.patching`` for the residual
stream): Pearson r and top-k agreement over every unit of a hook type (all 4 layers), thresholds measured
first and set below the measurement with margin (docs/circuits.md has the full table). The default run
checks the colour contrast on the residual stream and the keys; ``-m slow`` runs every contrast and hook type.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformer_lens import patching

from sae_lens_multimodal.analysis.attribution import attribution_patching
from sae_lens_multimodal.analysis.circuits_exact import exact_patching
from sae_lens_multimodal.analysis.patching import image_patching_index, patching_shape
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.world import ShapesWorld, caption, to_tensor
from sae_lens_multimodal.world.shapes import COLORS

LAYERS = 4
N_PAIRS = 3


@pytest.fixture(scope="module")
def clip():
    return HookedCLIP.from_pretrained("shapes-clip")


@pytest.fixture(scope="module")
def world_bases():
    world = ShapesWorld(image_size=32, seed=3)
    bases = world.sample_factors(N_PAIRS, shape=["circle", "triangle"], color=["red", "green"],
                                 position=["left", "top left", "bottom"], size="large", texture="plain")
    return world, bases


def corrupt(f, factor: str):
    if factor == "color":
        return replace(f, color="blue", rgb=COLORS["blue"])
    if factor == "shape":
        return replace(f, shape="square" if f.shape != "square" else "circle")
    mirror = {"left": "right", "top left": "top right", "bottom": "top"}[f.position]
    cx, cy = f.center
    return replace(f, position=mirror, center=(32 - cx, cy) if "right" in mirror else (cx, 32 - cy))


def contrast(world_bases, factor: str):
    """(clean inputs, corrupted inputs, metric, clean pixels, corrupted pixels) for the full HookedCLIP."""
    world, bases = world_bases
    bad = [corrupt(f, factor) for f in bases]
    x = to_tensor(world.render(list(bases) + bad), mean=(0.5,) * 3, std=(0.5,) * 3)
    texts = [caption(f) for f in bases] + [caption(f) for f in bad]
    rows = torch.arange(N_PAIRS)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[rows, rows] - logits[rows, rows + N_PAIRS]).mean()

    return {"images": x[:N_PAIRS], "texts": texts}, {"images": x[N_PAIRS:], "texts": texts}, metric, x[:N_PAIRS], x[N_PAIRS:]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def top_k_agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    k = min(k, a.numel())
    return len(set(a.flatten().abs().topk(k).indices.tolist()) & set(b.flatten().abs().topk(k).indices.tolist())) / k


def stacked(result, hooks) -> torch.Tensor:
    return torch.stack([result[h] for h in hooks])


def test_unchanged_tokens_get_exactly_zero(clip, world_bases):
    clean, corrupted, metric, x, x2 = contrast(world_bases, "color")
    hook = "vision.blocks.0.hook_resid_pre"
    est = attribution_patching(clip, clean, corrupted, metric, hooks=[hook])
    assert est.clean_metric > 3 and est.corrupted_metric < -3  # the corruption flips every pair's prediction
    changed = (x != x2).any(1).reshape(N_PAIRS, 8, 4, 8, 4).any(-1).any(2).any(0).flatten()  # per patch, any pair
    patches = est[hook][1:]
    assert patches[~changed].abs().max() == 0 and est[hook][0] == 0  # CLS and the untouched patches
    assert patches[changed].abs().max() > 0.1


@pytest.mark.shipped_weights
def test_text_tower(clip, world_bases):
    """The text tower: the caption's colour word swapped; positions before it cannot change at block 0.

    Run in the denoising direction (clean = the foil caption, corrupted = the true one): with the true
    caption as the clean run the image-text cosine sits near its maximum, where the gradient says little,
    and the estimate fails (measured r = -0.71 on the residual stream; docs/circuits.md)."""
    world, bases = world_bases
    x = to_tensor(world.render(list(bases)), mean=(0.5,) * 3, std=(0.5,) * 3)
    true = [caption(f) for f in bases]
    foil = [caption(corrupt(f, "color")) for f in bases]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits.diagonal().mean()

    resid = [f"text.blocks.{i}.hook_resid_pre" for i in range(3)]
    mlp = [f"text.blocks.{i}.hook_mlp_out" for i in range(3)]
    clean, corrupted = {"images": x, "texts": foil}, {"images": x, "texts": true}
    est = attribution_patching(clip, clean, corrupted, metric, hooks=resid + mlp)
    ref = exact_patching(clip, clean, corrupted, metric, hooks=resid + mlp)
    word = true[0].split().index(bases[0].color) + 1  # after the start token ("a red ..." -> 2)
    assert est[resid[0]][:word].abs().max() == 0 and est[resid[0]][word].abs() > 0
    assert est.total_change > 5
    # Measured: r = 0.705 (residual stream), 0.916 (MLP outputs); top-5 agreement 0.8 for both.
    assert pearson(stacked(est, resid), stacked(ref, resid)) > 0.55
    assert pearson(stacked(est, mlp), stacked(ref, mlp)) > 0.8
    assert top_k_agreement(stacked(est, mlp), stacked(ref, mlp), 5) >= 0.6


def test_colour_residual_stream_against_transformer_lens(clip, world_bases):
    """The residual stream per (layer, token) against transformer_lens.patching, run on the vision tower with
    the roles of AtP (the corrupted activation patched into the clean run)."""
    clean, corrupted, metric, x, x2 = contrast(world_bases, "color")
    hooks = [f"vision.blocks.{i}.hook_resid_pre" for i in range(LAYERS)]
    est = stacked(attribution_patching(clip, clean, corrupted, metric, hooks=hooks), hooks)
    vision = clip.part("vision")
    with torch.no_grad():
        text = clip.encode_text(clean["texts"])
        _, corrupt_cache = vision.run_with_cache(x2)
        base = float(metric(clip.logits_from_embeddings(vision(x), text)))

    def tl_metric(embeds: torch.Tensor) -> torch.Tensor:
        return metric(clip.logits_from_embeddings(embeds, text)) - base

    index_df = image_patching_index(vision, ("layer", "pos"))
    with torch.no_grad():
        ref = patching.get_act_patch_resid_pre(vision, x, corrupt_cache, tl_metric, index_axis_names=None, index_df=index_df)
    ref = ref.reshape(patching_shape(index_df))
    # Measured: r = 0.916, top-5 agreement 0.8 (0.61 / 0.80 / 0.93 / 0.99 per layer).
    assert pearson(est, ref) > 0.85
    assert top_k_agreement(est, ref, 5) >= 0.6
    assert pearson(est[-1], ref[-1]) > 0.95


@pytest.mark.shipped_weights
def test_colour_keys_qk_fix(clip, world_bases):
    clean, corrupted, metric, _, _ = contrast(world_bases, "color")
    hooks = ["vision.blocks.2.attn.hook_k", "vision.blocks.3.attn.hook_k"]
    ref = stacked(exact_patching(clip, clean, corrupted, metric, hooks=hooks, per="head_position"), hooks)
    fixed = stacked(attribution_patching(clip, clean, corrupted, metric, hooks=hooks, per="head_position"), hooks)
    linear = stacked(attribution_patching(clip, clean, corrupted, metric, hooks=hooks, per="head_position",
                                          attention_fix=False), hooks)
    # Measured on layers 2-3: fixed r = 0.99+, linear r = 0.69 / 0.19 (saturated softmax: the linear
    # estimate through it misses most of the keys' effect).
    assert pearson(fixed, ref) > 0.95
    assert pearson(linear, ref) < 0.8
    assert top_k_agreement(fixed, ref, 10) >= 0.7


#: hook type -> (hook template, per, attention_fix); the slow table.
HOOK_TYPES = {
    "resid_pre": ("vision.blocks.{}.hook_resid_pre", "position", True),
    "attn_out": ("vision.blocks.{}.hook_attn_out", "position", True),
    "mlp_out": ("vision.blocks.{}.hook_mlp_out", "position", True),
    "z": ("vision.blocks.{}.attn.hook_z", "head_position", True),
    "pattern": ("vision.blocks.{}.attn.hook_pattern", "head_position", True),
    "q": ("vision.blocks.{}.attn.hook_q", "head_position", True),
    "k": ("vision.blocks.{}.attn.hook_k", "head_position", True),
}
#: (contrast, hook type) -> (min Pearson r, min top-10 agreement); measured values in docs/circuits.md.
THRESHOLDS: dict[tuple[str, str], tuple[float, float]] = {
    ("color", "resid_pre"): (0.85, 0.3), ("color", "attn_out"): (0.95, 0.6), ("color", "mlp_out"): (0.95, 0.6),
    ("color", "z"): (0.95, 0.7), ("color", "pattern"): (0.93, 0.7), ("color", "q"): (0.95, 0.7),
    ("color", "k"): (0.95, 0.7),
    ("shape", "resid_pre"): (0.95, 0.7), ("shape", "attn_out"): (0.97, 0.6), ("shape", "mlp_out"): (0.97, 0.8),
    ("shape", "z"): (0.97, 0.8), ("shape", "pattern"): (0.97, 0.8), ("shape", "q"): (0.97, 0.7),
    ("shape", "k"): (0.97, 0.8),
    ("position", "resid_pre"): (0.85, 0.5), ("position", "attn_out"): (0.97, 0.7),
    ("position", "mlp_out"): (0.88, 0.4), ("position", "z"): (0.97, 0.8), ("position", "pattern"): (0.95, 0.7),
    ("position", "q"): (0.85, 0.5), ("position", "k"): (0.97, 0.7),
}


@pytest.mark.shipped_weights
@pytest.mark.slow
@pytest.mark.parametrize("factor", ["color", "shape", "position"])
def test_every_hook_type_against_exact(clip, world_bases, factor):
    clean, corrupted, metric, _, _ = contrast(world_bases, factor)
    failures = []
    for kind, (template, per, fix) in HOOK_TYPES.items():
        hooks = [template.format(i) for i in range(LAYERS)]
        est = stacked(attribution_patching(clip, clean, corrupted, metric, hooks=hooks, per=per, attention_fix=fix), hooks)
        ref = stacked(exact_patching(clip, clean, corrupted, metric, hooks=hooks, per=per), hooks)
        r_min, top_min = THRESHOLDS[(factor, kind)]
        r, top = pearson(est, ref), top_k_agreement(est, ref, 10)
        if r < r_min or top < top_min:
            failures.append(f"{kind}: r={r:.3f} (min {r_min}), top-10 {top:.2f} (min {top_min})")
    assert not failures, failures
