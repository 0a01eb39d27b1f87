"""TransformerLens / SAELens / nnsight workflows on HookedViT, run unchanged.

Models: open_clip vision towers with random weights (ViT-B-32 at its real size where the hook names or
widths matter, a small open_clip tower where many forwards run), and small HookedViTConfig models for
layouts open_clip does not have (registers, no CLS, attention pooling, distillation token).
"""

from __future__ import annotations

import re
from pathlib import Path

import nnsight
import open_clip
import pytest
import torch
from open_clip.transformer import VisionTransformer
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import patching
from transformer_lens.ActivationCache import ActivationCache

import sae_lens_multimodal.models.components as components
from sae_lens_multimodal import HookedViT, HookedViTConfig
from sae_lens_multimodal.analysis import image_patching_index, patching_shape, tokens_per_image
from sae_lens_multimodal.core import is_observed
from sae_lens_multimodal.models import ViTActivationCache

DOCS = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"


# ----------------------------------------------------------------------------------------------- models
def small_open_clip(layers: int = 4, **kwargs) -> VisionTransformer:
    g = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        return VisionTransformer(
            image_size=32, patch_size=8, width=64, layers=layers, heads=4, mlp_ratio=4, output_dim=32, **kwargs
        ).eval()


def random_vit(**overrides) -> HookedViT:
    """A small HookedViT with random weights (HookedViT itself initialises parameters to zero)."""
    kw = dict(n_layers=3, d_model=32, n_heads=4, d_mlp=64, image_size=32, patch_size=8)
    kw.update(overrides)
    model = HookedViT(HookedViTConfig(**kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") and p.ndim == 1:  # LayerNorm weights near 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def clip_b32() -> HookedViT:
    """open_clip ViT-B-32 (real architecture, random weights) converted to a HookedViT."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return HookedViT.from_pretrained(open_clip.create_model("ViT-B-32", pretrained=None))


@pytest.fixture(scope="module")
def clip_small() -> HookedViT:
    return HookedViT.from_pretrained(small_open_clip())


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model: torch.nn.Module) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in model.modules()
    )


# ----------------------------------------------------------------------------------------------- run_with_cache
def test_run_with_cache_returns_vit_activation_cache(clip_small):
    x = images()
    out, cache = clip_small.run_with_cache(x)
    assert isinstance(cache, ViTActivationCache) and isinstance(cache, ActivationCache)
    assert set(cache.keys()) == set(clip_small.hook_dict)  # every hook fires in a full forward
    torch.testing.assert_close(cache["hook_out"], out, rtol=0, atol=0)
    _, raw = clip_small.run_with_cache(x, return_cache_object=False)
    assert type(raw) is dict


def test_names_filter_str_list_predicate(clip_small):
    x = images()
    _, full = clip_small.run_with_cache(x)
    _, one = clip_small.run_with_cache(x, names_filter="blocks.2.hook_resid_post")
    assert list(one.keys()) == ["blocks.2.hook_resid_post"]
    names = ["blocks.0.attn.hook_pattern", "blocks.3.mlp.hook_post"]
    _, two = clip_small.run_with_cache(x, names_filter=names)
    assert sorted(two.keys()) == sorted(names)
    _, pred = clip_small.run_with_cache(x, names_filter=lambda n: n.endswith("hook_z"))
    assert sorted(pred.keys()) == [f"blocks.{i}.attn.hook_z" for i in range(4)]
    for c in (one, two, pred):
        for k in c.keys():
            torch.testing.assert_close(c[k], full[k], rtol=0, atol=1e-5)


def test_stop_at_layer_runs_only_early_blocks(clip_small):
    x = images()
    out, cache = clip_small.run_with_cache(x, stop_at_layer=2)
    layers = {int(m.group(1)) for k in cache.keys() if (m := re.match(r"blocks\.(\d+)\.", k))}
    assert layers == {0, 1}
    assert not any(k.startswith(("ln_final", "hook_pooled", "hook_out")) for k in cache.keys())
    assert out.shape == (2, clip_small.cfg.n_ctx, clip_small.cfg.d_model)
    torch.testing.assert_close(out, cache["blocks.1.hook_resid_post"], rtol=0, atol=0)
    # Negative values count from the end, as in TransformerLens.
    torch.testing.assert_close(clip_small(x, stop_at_layer=-2), out, rtol=0, atol=1e-5)  # fast vs observed path


def test_accumulated_resid(clip_small):
    model, cfg = clip_small, clip_small.cfg
    _, cache = model.run_with_cache(images())
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(cfg.n_layers)] + ["final_post"]
    assert acc.shape == (cfg.n_layers + 1, 2, cfg.n_ctx, cfg.d_model)
    torch.testing.assert_close(acc[0], cache["ln_pre.hook_normalized"], rtol=0, atol=0)
    torch.testing.assert_close(acc[-1], cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"], rtol=0, atol=0)
    # apply_ln at the end is ln_final itself; pos_slice=0 is the CLS token, which open_clip pools.
    cls_ln = cache.accumulated_resid(apply_ln=True, pos_slice=0)
    assert cls_ln.shape == (cfg.n_layers + 1, 2, cfg.d_model)
    torch.testing.assert_close(cls_ln[-1], cache["ln_final.hook_normalized"][:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(cls_ln[-1], cache["hook_pooled"], rtol=0, atol=1e-5)
    # apply_ln at an inner layer uses that block's cached ln1 scale.
    at2 = cache.accumulated_resid(layer=2, apply_ln=True)
    ln1 = model.blocks[2].ln1
    torch.testing.assert_close(at2[-1] * ln1.w + ln1.b, cache["blocks.2.ln1.hook_normalized"], rtol=0, atol=1e-5)


def _no_ln_pre_model() -> HookedViT:
    return random_vit(has_ln_pre=False, n_registers=2, n_pos_prefix_tokens=1)


@pytest.mark.parametrize("kind", ["clip_ln_pre", "no_ln_pre"])
def test_decompose_resid_sums_to_residual(kind, clip_small):
    model = clip_small if kind == "clip_ln_pre" else _no_ln_pre_model()
    cfg = model.cfg
    _, cache = model.run_with_cache(images())
    for layer in (0, 1, cfg.n_layers):
        for mlp_input in (False, True) if layer < cfg.n_layers else (False,):
            comps, labels = cache.decompose_resid(layer=layer, mlp_input=mlp_input, return_labels=True)
            if layer == cfg.n_layers:
                target = cache[f"blocks.{layer - 1}.hook_resid_post"]
            else:
                target = cache[f"blocks.{layer}.hook_resid_{'mid' if mlp_input else 'pre'}"]
            torch.testing.assert_close(comps.sum(0), target, rtol=0, atol=1e-5)
            assert labels[0] == ("ln_pre" if cfg.has_ln_pre else "embed")
            assert len(labels) == comps.shape[0]
    if not cfg.has_ln_pre:
        assert cache.decompose_resid(layer=0, return_labels=True)[1] == ["embed", "pos_embed"]


@pytest.mark.parametrize("kind", ["clip_ln_pre", "no_ln_pre"])
def test_apply_ln_to_stack_matches_ln_final(kind, clip_small):
    model = clip_small if kind == "clip_ln_pre" else _no_ln_pre_model()
    _, cache = model.run_with_cache(images())
    ln = model.ln_final
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    # The cached scale normalises the real residual exactly as ln_final did.
    normed = cache.apply_ln_to_stack(resid[None], layer=None)[0]
    torch.testing.assert_close(normed * ln.w + ln.b, cache["ln_final.hook_normalized"], rtol=0, atol=1e-5)
    # LayerNorm with a cached scale is linear, so normalised components sum to the normalised residual.
    comps = cache.decompose_resid(apply_ln=True, pos_slice=0)
    torch.testing.assert_close(comps.sum(0), normed[:, 0], rtol=0, atol=1e-5)


def test_apply_ln_with_final_ln_after_pool():
    """transformers CLIP / timm fc_norm layout: ln_final sees only the pooled CLS vector."""
    model = random_vit(has_ln_pre=True, final_ln_after_pool=True)
    _, cache = model.run_with_cache(images(3))
    assert cache["ln_final.hook_scale"].shape == (3, 1)
    comps = cache.decompose_resid(apply_ln=True, pos_slice=0)
    ln = model.ln_final
    # Each image uses its own scale (TransformerLens alone would apply image 0's to all).
    torch.testing.assert_close(comps.sum(0) * ln.w + ln.b, cache["ln_final.hook_normalized"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pos_slice=0"):
        cache.decompose_resid(apply_ln=True)


def test_stack_activation(clip_small):
    _, cache = clip_small.run_with_cache(images())
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (4, 2, clip_small.cfg.n_ctx, clip_small.cfg.d_model)
    for i in range(4):
        assert torch.equal(stacked[i], cache[f"blocks.{i}.hook_resid_post"])
    assert cache.stack_activation("pattern", layer=2).shape == (2, 2, 4, 17, 17)


# ----------------------------------------------------------------------------------------------- hooks
def test_run_with_hooks_ablation_and_reading(clip_small):
    x = images()
    clean = clip_small(x)
    seen = {}

    def read(act, hook):
        seen[hook.name] = act.clone()

    def zero(act, hook):
        return torch.zeros_like(act)

    out = clip_small.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", read)])
    torch.testing.assert_close(out, clean, rtol=0, atol=0)  # a reading hook changes nothing
    _, cache = clip_small.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"], rtol=0, atol=0)
    ablated = clip_small.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    assert (ablated - clean).abs().max() > 1e-3
    # Zeroing mlp_out is the same as resid_post := resid_mid.
    same = clip_small.run_with_hooks(
        x, fwd_hooks=[("blocks.1.hook_resid_mid", read), ("blocks.1.hook_resid_post", lambda a, hook: seen["blocks.1.hook_resid_mid"])]
    )
    torch.testing.assert_close(same, ablated, rtol=0, atol=1e-5)
    with clip_small.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", zero)]):
        torch.testing.assert_close(clip_small(x), ablated, rtol=0, atol=0)
    assert no_hooks_left(clip_small)
    torch.testing.assert_close(clip_small(x), clean, rtol=0, atol=0)


def _doc_shapes() -> list[tuple[re.Pattern, str]]:
    rows = re.findall(r"^\| `([^`]+)` \| `(\[[^`]*\])` \|", DOCS.read_text(), flags=re.M)
    assert len(rows) > 40, "docs/hooks.md hook tables not found"
    out = []
    for name, shape in rows:
        rx = re.escape(name).replace(r"\{L\}", r"\d+").replace("<hook>", ".+")
        out.append((re.compile(rf"^{rx}$"), shape))
    return out


LAYOUTS = {
    "open_clip_small": None,  # converted from open_clip (ln_pre, CLS, projection head)
    "dinov2_like": dict(has_ln_pre=False, n_registers=4, n_pos_prefix_tokens=1, eps=1e-6),
    "siglip_like": dict(has_cls_token=False, n_pos_prefix_tokens=0, pool_type="attn", act_fn="gelu_pytorch_tanh"),
    "deit_distilled": dict(has_dist_token=True, n_pos_prefix_tokens=2, pool_type="cls_dist", head_type="linear", d_out=10),
    "hf_clip_like": dict(has_ln_pre=True, final_ln_after_pool=True, head_type="linear", d_out=16),
    "distilled_fc_norm": dict(has_dist_token=True, n_pos_prefix_tokens=2, pool_type="cls_dist", final_ln_after_pool=True),
    "mean_pool_tanh": dict(pool_type="mean", head_type="linear_tanh", d_out=32),
    "no_pool_head": dict(has_cls_token=False, n_pos_prefix_tokens=0, pool_type="none", head_type="linear", d_out=8),
    "no_pool": dict(has_cls_token=False, n_pos_prefix_tokens=0, pool_type="none"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hook_shapes_match_docs(layout, clip_small):
    model = clip_small if LAYOUTS[layout] is None else random_vit(**LAYOUTS[layout])
    cfg = model.cfg
    documented = _doc_shapes()
    batch = 2
    sae = StandardSAE(StandardSAEConfig(d_in=cfg.d_model, d_sae=48, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    _, cache = model.run_with_cache_with_saes(images(batch), saes=[sae], use_error_term=True)
    # While spliced, the SAE's wrapper replaces the hook point itself (as in SAELens).
    assert set(cache.keys()) == set(model.hook_dict) - {"blocks.1.hook_resid_post"} | {
        f"blocks.1.hook_resid_post.hook_sae_{s}" for s in ("input", "acts_pre", "acts_post", "recons", "error", "output")
    }
    dims = dict(batch=batch, pos=cfg.n_ctx, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
                d_mlp=cfg.d_mlp, d_out=cfg.d_out or -1, d_in=cfg.d_model, d_sae=48)
    for name in cache.keys():
        shapes = [s for rx, s in documented if rx.match(name)]
        assert shapes, f"{name} is not documented in docs/hooks.md"
        expected = [tuple(int(t) if t.isdigit() else dims[t] for t in s.strip("[]").split(", ")) for s in shapes]
        assert tuple(cache[name].shape) in expected, f"{name}: {tuple(cache[name].shape)} not in {shapes}"


@pytest.mark.parametrize("kind", ["clip_b32", "siglip_like"])
def test_fast_paths_match_observed_paths(kind, request):
    """SDPA / F.layer_norm (nothing hooked) vs explicit softmax / step-by-step LayerNorm (all hooked)."""
    model = request.getfixturevalue("clip_b32") if kind == "clip_b32" else random_vit(**LAYOUTS["siglip_like"])
    x = images(2, model.cfg.image_size[0])
    with torch.no_grad():
        fast_resid = model(x, stop_at_layer=model.cfg.n_layers)
        fast = model(x)
        out, cache = model.run_with_cache(x)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    assert (cache[last] - fast_resid).abs().max() <= 1e-5
    assert (out - fast).abs().max() <= 1e-5


def test_fast_path_used_only_when_unobserved(clip_small, monkeypatch):
    calls = {"sdpa": 0, "layer_norm": 0}
    sdpa, layer_norm = components.F.scaled_dot_product_attention, components.F.layer_norm

    class CountingF:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def scaled_dot_product_attention(self, *a, **k):
            calls["sdpa"] += 1
            return sdpa(*a, **k)

        def layer_norm(self, *a, **k):
            calls["layer_norm"] += 1
            return layer_norm(*a, **k)

    monkeypatch.setattr(components, "F", CountingF())
    x = images()
    clip_small(x)
    assert calls == {"sdpa": 4, "layer_norm": 2 * 4 + 2}  # ln_pre, 2 per block, ln_final
    calls.update(sdpa=0, layer_norm=0)
    clip_small.run_with_cache(x, names_filter=["blocks.2.attn.hook_pattern", "blocks.0.ln1.hook_scale"])
    assert calls == {"sdpa": 3, "layer_norm": 2 * 4 + 1}
    calls.update(sdpa=0)
    hp = clip_small.blocks[3].attn.hook_pattern
    hp._always_observed = True  # the documented fallback for tools that use no hooks
    try:
        assert is_observed(hp)
        clip_small(x)
        assert calls["sdpa"] == 3
    finally:
        del hp._always_observed
    assert not is_observed(hp)


# ----------------------------------------------------------------------------------------------- SAELens
def _sae(kind: str, d_in: int, hook_name: str, seed: int = 0, **cfg_kwargs):
    cls, cfg_cls, extra = {
        "standard": (StandardSAE, StandardSAEConfig, {}),
        "topk": (TopKSAE, TopKSAEConfig, {"k": 16}),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    }[kind]
    sae = cls(cfg_cls(d_in=d_in, d_sae=4 * d_in, metadata=SAEMetadata(hook_name=hook_name), **extra, **cfg_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_((0.05 if p.ndim > 1 else 0.01) * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_sae_splicing_vit_b32(kind, clip_b32):
    model, x = clip_b32, images(2, 224)
    hook = "blocks.9.hook_resid_post"
    sae = _sae(kind, 768, hook)
    with torch.no_grad():
        clean = model(x)
        # use_error_term=True: SAELens adds (input - reconstruction) back, so the output is clean up to
        # fp32 rounding of x_hat + (x - x_hat) (measured ~1.5e-6 at this scale; exact in float64, below).
        spliced = model.run_with_saes(x, saes=[sae], use_error_term=True)
        assert (spliced - clean).abs().max() <= 1e-5
        assert not model.acts_to_saes and type(model.blocks[9].hook_resid_post).__name__ == "HookPoint"
        without = model.run_with_saes(x, saes=[sae])
        assert (without - clean).abs().max() > 1e-2
        out, cache = model.run_with_cache_with_saes(x, saes=[sae])
    feats = cache[f"{hook}.hook_sae_acts_post"]
    assert feats.shape == (2, 50, 4 * 768)
    torch.testing.assert_close(feats, sae.encode(cache[f"{hook}.hook_sae_input"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, without, rtol=0, atol=1e-5)
    if kind == "topk":
        assert int((feats[0, 0] != 0).sum()) <= 16
    # add_sae keeps it attached until reset_saes.
    model.add_sae(sae)
    try:
        assert set(model.acts_to_saes) == {hook}
        with torch.no_grad():
            torch.testing.assert_close(model(x), without, rtol=0, atol=1e-5)
    finally:
        model.reset_saes()
    assert not model.acts_to_saes and no_hooks_left(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), clean, rtol=0, atol=0)


def test_sae_error_term_exact_in_float64():
    model = HookedViT.from_pretrained(small_open_clip(), dtype=torch.float64)
    sae = _sae("standard", 64, "blocks.2.hook_mlp_out").to(torch.float64)
    x = images().double()
    with torch.no_grad():
        clean = model(x)
        spliced = model.run_with_saes(x, saes=[sae], use_error_term=True)
    assert (spliced - clean).abs().max() <= 1e-6


def test_sae_on_mlp_and_hook_z(clip_small):
    model, x = clip_small, images()
    with torch.no_grad():
        clean = model(x)
        sae = _sae("standard", model.cfg.d_mlp, "blocks.1.mlp.hook_post")
        assert (model.run_with_saes(x, saes=[sae]) - clean).abs().max() > 1e-3
        n_z = model.cfg.n_heads * model.cfg.d_head
        z_sae = _sae("standard", n_z, "blocks.1.attn.hook_z", reshape_activations="hook_z")
        out, cache = model.run_with_cache_with_saes(x, saes=[z_sae])
        assert (out - clean).abs().max() > 1e-3
        with pytest.raises(ValueError, match="64"):  # per-head width 16 is not n_heads * d_head
            model.add_sae(_sae("standard", model.cfg.d_head, "blocks.1.attn.hook_z", reshape_activations="hook_z"))
    assert cache["blocks.1.attn.hook_z.hook_sae_acts_post"].shape == (2, model.cfg.n_ctx, z_sae.cfg.d_sae)
    assert cache["blocks.1.attn.hook_z.hook_sae_output"].shape == (2, model.cfg.n_ctx, 4, 16)


def test_sae_on_observed_only_hook_runs(clip_small):
    """hook_result is computed only when observed; a spliced SAE there must still run."""
    model, x = clip_small, images()
    with torch.no_grad():
        clean = model(x)
        sae = _sae("standard", model.cfg.d_model, "blocks.1.attn.hook_result")
        assert (model.run_with_saes(x, saes=[sae]) - clean).abs().max() > 1e-3


def test_sae_wrong_width_and_unknown_hook_refused(clip_b32):
    model = clip_b32
    with pytest.raises(ValueError) as err:
        model.add_sae(_sae("standard", 512, "blocks.9.hook_resid_post"))
    msg = str(err.value)
    assert "512" in msg and "768" in msg and "blocks.9.hook_resid_post" in msg
    with pytest.raises(ValueError, match="3072"):
        model.run_with_saes(images(1, 224), saes=[_sae("standard", 768, "blocks.9.mlp.hook_post")])
    with pytest.raises(KeyError) as err:
        model.add_sae(_sae("standard", 768, "blocks.9.hook_resid_pots"))
    assert "blocks.9.hook_resid_post" in str(err.value)
    assert not model.acts_to_saes and no_hooks_left(model)


# ----------------------------------------------------------------------------------------------- patching
def test_activation_patching_resid_pre_and_heads(clip_small, monkeypatch):
    monkeypatch.setattr(patching, "tqdm", lambda it, **k: it)  # quiet progress bars
    model, cfg = clip_small, clip_small.cfg
    clean_x, corrupt_x = images(1, seed=1), images(1, seed=2)
    with torch.no_grad():
        clean_out, clean_cache = model.run_with_cache(clean_x)
        corrupt_out = model(corrupt_x)
    direction = clean_out - corrupt_out

    def metric(out):
        return (out * direction).sum()

    clean_m, corrupt_m = metric(clean_out).item(), metric(corrupt_out).item()
    assert clean_m - corrupt_m > 1e-3

    index_df = image_patching_index(model, ("layer", "pos"))
    assert len(index_df) == cfg.n_layers * cfg.n_ctx and tokens_per_image(model, corrupt_x) == cfg.n_ctx
    with torch.no_grad():
        flat = patching.get_act_patch_resid_pre(
            model, corrupt_x, clean_cache, metric, index_axis_names=None, index_df=index_df
        )
    grid = flat.reshape(patching_shape(index_df))
    assert grid.shape == (cfg.n_layers, cfg.n_ctx)
    # The CLS token entering block 0 does not depend on the image, so patching it changes nothing.
    assert abs(grid[0, 0].item() - corrupt_m) < 1e-4
    # One entry recomputed by hand: layer 2, token 5.
    def put(act, hook):
        act[:, 5] = clean_cache["blocks.2.hook_resid_pre"][:, 5]
        return act

    with torch.no_grad():
        manual = metric(model.run_with_hooks(corrupt_x, fwd_hooks=[("blocks.2.hook_resid_pre", put)])).item()
    assert abs(grid[2, 5].item() - manual) < 1e-4
    # Sanity: the whole clean residual at layer 0 (every position) gives back the clean metric.
    with torch.no_grad():
        full = model.run_with_hooks(
            corrupt_x, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: clean_cache["blocks.0.hook_resid_pre"])]
        )
    assert abs(metric(full).item() - clean_m) < 1e-4
    # Without index_df TransformerLens takes the image width as the number of positions.
    assert corrupt_x.shape[-1] != cfg.n_ctx

    with torch.no_grad():
        heads = patching.get_act_patch_attn_head_out_all_pos(model, corrupt_x, clean_cache, metric)
    assert heads.shape == (cfg.n_layers, cfg.n_heads)

    def put_head(z, hook):
        z[:, :, 2] = clean_cache["blocks.1.attn.hook_z"][:, :, 2]
        return z

    with torch.no_grad():
        manual = metric(model.run_with_hooks(corrupt_x, fwd_hooks=[("blocks.1.attn.hook_z", put_head)])).item()
    assert abs(heads[1, 2].item() - manual) < 1e-4
    assert no_hooks_left(model)


def test_image_patching_index_axes(clip_small):
    df = image_patching_index(clip_small, ("layer", "head_index", "dest_pos"))
    assert list(df.columns) == ["layer", "head_index", "dest_pos"]
    assert patching_shape(df) == (4, 4, 17)
    big = random_vit(pos_embed_interpolation="bicubic")
    assert tokens_per_image(big, images(1, 48)) == 1 + 36
    assert patching_shape(image_patching_index(big, ("layer", "pos"), images=(48, 48))) == (3, 37)
    with pytest.raises(ValueError, match="Unknown patching axes"):
        image_patching_index(clip_small, ("layer", "token"))
    with pytest.raises(ValueError, match="first axis"):
        image_patching_index(clip_small, ("pos", "layer"))


# ----------------------------------------------------------------------------------------------- nnsight
def test_nnsight_save_and_edit(clip_small):
    model, x = clip_small, images()
    wrapped = nnsight.NNsight(model)
    with torch.no_grad():
        with wrapped.trace(x):
            resid = wrapped.blocks[3].hook_resid_post.output.save()
            out = wrapped.output.save()
        _, cache = model.run_with_cache(x, names_filter="blocks.3.hook_resid_post")
        assert torch.equal(resid, cache["blocks.3.hook_resid_post"])
        assert torch.equal(out, model(x))
        with wrapped.trace(x):
            wrapped.blocks[3].hook_resid_post.output[:] = 0
            edited = wrapped.output.save()
        expected = model.run_with_hooks(x, fwd_hooks=[("blocks.3.hook_resid_post", lambda a, hook: torch.zeros_like(a))])
    assert (edited - out).abs().max() > 1e-3
    torch.testing.assert_close(edited, expected, rtol=0, atol=0)


def test_nnsight_attention_pattern_with_sdpa_fast_path(clip_small):
    """nnsight registers no torch hooks; is_observed still sees that a trace wants the pattern."""
    model, x = clip_small, images()
    wrapped = nnsight.NNsight(model)
    hp = model.blocks[2].attn.hook_pattern
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="blocks.2.attn.hook_pattern")
        with wrapped.trace(x):
            q = wrapped.blocks[2].attn.hook_q.output.save()  # an earlier read in the same block
            pattern = wrapped.blocks[2].attn.hook_pattern.output.save()
        torch.testing.assert_close(pattern, cache["blocks.2.attn.hook_pattern"], rtol=0, atol=0)
        assert q.shape == (2, 17, 4, 16)
        # Editing the pattern through nnsight = editing it with a TransformerLens hook.
        uniform = torch.full_like(pattern, 1 / pattern.shape[-1])
        with wrapped.trace(x):
            wrapped.blocks[2].attn.hook_pattern.output = uniform
            edited = wrapped.output.save()
        expected = model.run_with_hooks(x, fwd_hooks=[("blocks.2.attn.hook_pattern", lambda a, hook: uniform)])
        torch.testing.assert_close(edited, expected, rtol=0, atol=0)
        # tracer.cache over the pattern hook point works too.
        with wrapped.trace(x) as tracer:
            nn_cache = tracer.cache(modules=[wrapped.blocks[2].attn.hook_pattern])
        assert nn_cache.keys() == ["model.blocks.2.attn.hook_pattern"]
        cached = nn_cache["model.blocks.2.attn.hook_pattern"].output
        torch.testing.assert_close(cached, cache["blocks.2.attn.hook_pattern"], rtol=0, atol=0)
    # Outside a trace the wrapped model is back on the fast path.
    assert not is_observed(hp)
    assert no_hooks_left(model)


def test_nnsight_rewrap_after_sae_splicing(clip_small):
    """SAELens swaps hook-point modules; a wrapper made after the swap sees the current ones (docs/hooks.md)."""
    model, x = clip_small, images()
    hook = "blocks.1.hook_resid_post"
    model.add_sae(_sae("standard", model.cfg.d_model, hook))
    try:
        wrapped = nnsight.NNsight(model)
        with torch.no_grad(), wrapped.trace(x):
            feats = wrapped.blocks[1].hook_resid_post.hook_sae_acts_post.output.save()
        _, cache = model.run_with_cache(x, names_filter=f"{hook}.hook_sae_acts_post")
        torch.testing.assert_close(feats, cache[f"{hook}.hook_sae_acts_post"], rtol=0, atol=0)
    finally:
        model.reset_saes()
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(x):
        resid = wrapped.blocks[1].hook_resid_post.output.save()
    _, cache = model.run_with_cache(x, names_filter=hook)
    assert torch.equal(resid, cache[hook])
