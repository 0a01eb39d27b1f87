"""timm VisionTransformer / DeiT-distilled -> HookedViT: exact equivalence against timm's own outputs.

Models are built by timm at their real configurations with random weights (no downloads). timm initialises
LayerNorms to (1, 0), biases to 0, LayerScale to ~1e-5 and the class/register tokens to ~1e-6, which would let a
conversion that drops or misplaces any of them pass; so those are randomised before converting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from sae_lens_multimodal.models import HookedViT  # noqa: E402
from sae_lens_multimodal.models.conversions import UnsupportedModelError  # noqa: E402

TOL = 1e-4


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every parameter that timm initialises to a constant (or near zero) clearly non-trivial."""
    from timm.layers import LayerScale

    g = torch.Generator().manual_seed(seed)

    def rnd(p: torch.Tensor, scale: float, shift: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=g) * scale + shift)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                rnd(m.weight, 0.3, 1.0)
                rnd(m.bias, 0.2)
            elif isinstance(m, LayerScale):
                rnd(m.gamma, 0.5)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                rnd(m.bias, 0.05)
        for name in ("cls_token", "reg_token", "dist_token"):
            p = getattr(model, name, None)
            if p is not None:
                rnd(p, 0.5)
    return model.eval()


def build(name: str, **kwargs: Any) -> nn.Module:
    return randomize_(timm.create_model(name, pretrained=False, **kwargs))


def with_block_outputs(blocks: list[nn.Module], run: Callable[[], torch.Tensor]):
    """Run ``run()`` recording every block's output with forward hooks (always removed)."""
    outs: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda _m, _i, out, i=i: outs.__setitem__(i, out.detach().clone()))
        for i, b in enumerate(blocks)
    ]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, outs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# name -> (create_model kwargs, what it exercises)
CASES = {
    "vit_base_patch16_224": ({}, "CLS token, token pooling, classifier head"),
    "deit_small_distilled_patch16_224": ({}, "distillation token, mean of the two heads"),
    "vit_base_patch16_reg4_gap_256": ({}, "4 registers, no CLS, no_embed_class, avg pooling + fc_norm"),
    "vit_small_patch14_reg4_dinov2": ({}, "CLS + registers, LayerScale, no_embed_class, no head"),
    "vit_base_patch32_clip_quickgelu_224": ({}, "pre_norm (ln_pre), QuickGELU, no patch bias, projection head"),
    "vit_base_patch16_siglip_224": ({}, "no CLS, MAP attention pooling"),
    "vit_base_patch16_siglip_gap_224": ({}, "avg pooling without fc_norm"),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    """(name, timm model, input, timm output, timm per-block outputs, timm final tokens, timm head input)."""
    name = request.param
    kwargs, _ = CASES[name]
    model = build(name, **kwargs)
    h, w = model.patch_embed.img_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.norm.register_forward_hook(lambda _m, _i, out: seen.__setitem__("tokens", out.detach().clone())),
        model.head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("pre_logits", args[0].detach().clone())),
    ]
    try:
        with torch.no_grad():
            ref, ref_blocks = with_block_outputs(list(model.blocks), lambda: model(x))
    finally:
        for handle in handles:
            handle.remove()
    return name, model, x, ref, ref_blocks, seen


def test_equivalence_every_block_and_output(case):
    name, model, x, ref, ref_blocks, seen = case
    hooked = HookedViT.from_pretrained(model)
    assert hooked.cfg.n_layers == len(model.blocks)
    names = ("hook_resid_post", "hook_pooled", "ln_final.hook_normalized")
    with torch.no_grad():
        out, cache = hooked.run_with_cache(x, names_filter=lambda n: n.endswith(names))
    errs = {i: max_err(cache[f"blocks.{i}.hook_resid_post"], ref_blocks[i]) for i in range(len(model.blocks))}
    assert max(errs.values()) <= TOL, f"{name}: per-block residual errors {errs}"
    assert max_err(out, ref) <= TOL, f"{name}: output error {max_err(out, ref)}"
    if not hooked.cfg.final_ln_after_pool:  # timm's `norm` output: the final normalised tokens
        assert max_err(cache["ln_final.hook_normalized"], seen["tokens"]) <= TOL
    if hooked.cfg.pool_type != "cls_dist":  # timm's distilled head reads the two tokens separately
        assert max_err(cache["hook_pooled"], seen["pre_logits"]) <= TOL


def test_fold_ln_and_center_writing_weights_keep_outputs(case):
    name, model, x, ref, _, _ = case
    hooked = HookedViT.from_pretrained(model, fold_ln=True, center_writing_weights=True)
    assert all(not b.ln1.has_weights and not b.ln2.has_weights for b in hooked.blocks)
    if not hooked.cfg.has_ln_pre:
        assert hooked.embed.W_pos.mean(-1).abs().max() < 1e-6  # centering really happened
    assert hooked.blocks[0].attn.W_O.mean(-1).abs().max() < 1e-6
    with torch.no_grad():
        out = hooked(x)
    assert max_err(out, ref) <= TOL, f"{name}: output error after folding {max_err(out, ref)}"


def test_config_fields_follow_the_source():
    deit = timm.create_model("deit_small_distilled_patch16_224", pretrained=False)
    cfg = HookedViT.from_pretrained(deit).cfg
    assert (cfg.has_cls_token, cfg.has_dist_token, cfg.n_pos_prefix_tokens, cfg.pool_type) == (True, True, 2, "cls_dist")
    reg = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False)
    cfg = HookedViT.from_pretrained(reg).cfg
    assert (cfg.has_cls_token, cfg.n_registers, cfg.n_pos_prefix_tokens) == (False, 4, 0)
    assert (cfg.pool_type, cfg.final_ln_after_pool, cfg.image_size) == ("mean", True, (256, 256))


def test_dynamic_img_size_resizes_position_embeddings_like_timm():
    # no_embed_class + LayerScale (DeiT-III) with dynamic_img_size, at a non-native, non-square size.
    model = build("deit3_small_patch16_224", dynamic_img_size=True)
    hooked = HookedViT.from_pretrained(model)
    assert hooked.cfg.pos_embed_interpolation == "bicubic_antialias"
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        ref, ref_blocks = with_block_outputs(list(model.blocks), lambda: model(x))
        out, cache = hooked.run_with_cache(x)
    for i in range(len(model.blocks)):
        assert max_err(cache[f"blocks.{i}.hook_resid_post"], ref_blocks[i]) <= TOL, i
    assert max_err(out, ref) <= TOL


def test_fixed_size_model_refuses_other_sizes():
    hooked = HookedViT.from_pretrained(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    with pytest.raises(ValueError, match="224x224"):
        hooked(torch.randn(1, 3, 160, 160))


def test_pil_input_matches_timm_transform():
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    model = build("vit_tiny_patch16_224")
    hooked = HookedViT.from_pretrained(model)
    gen = torch.Generator().manual_seed(2)
    images = [
        Image.fromarray(torch.randint(0, 256, (250, 300, 3), generator=gen, dtype=torch.uint8).numpy()),
        Image.fromarray(torch.randint(0, 256, (320, 240, 3), generator=gen, dtype=torch.uint8).numpy()),
    ]
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    assert torch.equal(hooked.preprocess(images[0]), transform(images[0]))
    with torch.no_grad():
        ref = model(torch.stack([transform(i) for i in images]))
        assert max_err(hooked(images), ref) <= TOL


def test_pil_input_for_a_model_built_at_another_size():
    from PIL import Image

    # timm's data config still says 224 here; the preprocess must produce what the model accepts.
    hooked = HookedViT.from_pretrained(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96))
    image = Image.new("RGB", (130, 100), color=(30, 60, 90))
    assert hooked.preprocess(image).shape == (3, 96, 96)
    assert hooked(image).shape == (1, 1000)


# ---------------------------------------------------------------- unsupported features are refused by name
def _tiny(**kwargs: Any) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_norm=True), "qk_norm"),
        (dict(norm_layer="rmsnorm"), "only LayerNorm"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(class_token=True, global_pool="map"), "'map' pooling over patch tokens only"),
        ("swiglu", "SwiGLU"),
        ("respost", "ResPostBlock"),
        (dict(dynamic_img_pad=True, dynamic_img_size=True), "dynamic_img_pad"),
        (dict(scale_attn_norm=True), "scale_attn_norm"),
    ],
    ids=["qk_norm", "rmsnorm", "max_pool", "map_with_cls", "swiglu", "res_post_block", "img_pad", "attn_norm"],
)
def test_unsupported_features_are_refused_with_the_feature_named(kwargs, message):
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import ResPostBlock

    if kwargs == "swiglu":
        kwargs = dict(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=2.0)
    elif kwargs == "respost":
        kwargs = dict(block_fn=ResPostBlock)
    with pytest.raises(UnsupportedModelError, match=message):
        HookedViT.from_pretrained(_tiny(**kwargs))


def test_unsupported_timm_subclass_is_named():
    from timm.models.vision_transformer import VisionTransformer

    class MyViT(VisionTransformer):
        pass

    with pytest.raises(UnsupportedModelError, match="MyViT.*VisionTransformer, VisionTransformerDistilled"):
        HookedViT.from_pretrained(MyViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2))


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(UnsupportedModelError, match="vit_base_patch16_224"):
        HookedViT.from_pretrained("timm:vit_base_patch16_2244", pretrained=False)


def test_timm_name_passes_kwargs_to_create_model():
    hooked = HookedViT.from_pretrained("timm:vit_tiny_patch16_224", pretrained=False, num_classes=7)
    assert (hooked.cfg.d_model, hooked.cfg.d_out, hooked.cfg.model_name[:25]) == (192, 7, "timm:vit_tiny_patch16_224")


# ---------------------------------------------------------------- loading from timm's on-disk / hub layout
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A vit_tiny saved by timm's own hub writer (config.json with "architecture" + model.safetensors)."""
    from timm.models import save_for_hf

    model = build("vit_tiny_patch16_224")
    folder = tmp_path_factory.mktemp("timm_tiny")
    save_for_hf(model, str(folder), safe_serialization=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert "architecture" in json.loads((folder / "config.json").read_text())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    return folder, x, ref


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as huggingface_hub's cache stores a downloaded snapshot of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache (huggingface_hub reads these constants at call time)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("prefix", ["timm:local-dir:", "timm:", ""], ids=["timm_local_dir", "timm_path", "bare_path"])
def test_load_from_local_dir_in_timm_layout(saved_tiny, prefix):
    folder, x, ref = saved_tiny
    hooked = HookedViT.from_pretrained(f"{prefix}{folder}")
    assert hooked.cfg.original_architecture == "timm.VisionTransformer"
    with torch.no_grad():
        assert max_err(hooked(x), ref) <= TOL


@pytest.mark.parametrize(
    "name",
    ["timm:hf-hub:test-org/tiny-vit", "timm:test-org/tiny-vit", "test-org/tiny-vit"],
    ids=["timm_hf_hub", "timm_repo_id", "bare_repo_id"],
)
def test_load_from_offline_hub_cache(saved_tiny, offline_hub_cache, name):
    folder, x, ref = saved_tiny
    make_hub_cache(offline_hub_cache, "test-org/tiny-vit", {f: folder / f for f in ("config.json", "model.safetensors")})
    hooked = HookedViT.from_pretrained(name)
    with torch.no_grad():
        assert max_err(hooked(x), ref) <= TOL


def test_missing_pretrained_weights_offline_says_what_to_do(offline_hub_cache):
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError, match="pretrained=False"):
        HookedViT.from_pretrained("timm:vit_tiny_patch16_224.augreg_in21k")
