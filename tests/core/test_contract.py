"""The hook contract over every model family and kind: each hook's HookSpec against the tensor it sees.

For every registered vision conversion family (open_clip, transformers CLIP / ViT / DINOv2 / SigLIP, timm
ViT / DeiT / register / MAP / CLIP variants), HookedCLIP (open_clip, transformers CLIP, SigLIP), the text
towers, HookedVLM, the hooked UNet and the DiTs (PixArt, DiT, SD3's joint attention, Flux's double and
single streams), at toy size with random weights: every hook point has exactly one spec, and every tensor
``run_with_cache`` returns has the shape the spec's layout, width, head count, prefix tokens and patch grid
say. Then ``locate`` / ``part`` / ``parts`` and the unknown-name error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from sae_lens_multimodal.core.contract import LAYOUTS, PARTS, HookSpec  # noqa: E402
from sae_lens_multimodal.models.hooked_clip import HookedCLIP  # noqa: E402
from sae_lens_multimodal.models.hooked_text import HookedText  # noqa: E402
from sae_lens_multimodal.models.hooked_vit import HookedViT  # noqa: E402
from sae_lens_multimodal.models.vlm import HookedVLM  # noqa: E402
from sae_lens_multimodal.testing import tiny_random_llava  # noqa: E402
from tests.models.test_hooked_clip import small_open_clip, text_ids  # noqa: E402

BATCH = 2
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                  max_position_embeddings=16)


# ----------------------------------------------------------------------------------------------- the check
def shape_problem(spec: HookSpec, t: torch.Tensor, batch: int | None) -> str | None:
    """What is wrong with tensor ``t`` for ``spec`` (None when it matches). ``batch`` None: not checked."""
    expected_ndim = {"tokens": 3, "heads": 4, "pattern": 4, "scale": 3, "pooled": 2, "pooled_scale": 2,
                     "spatial": 4, "flat_tokens": 2}[spec.layout]
    shape = tuple(t.shape)
    if t.ndim != expected_ndim:
        return f"{spec.layout} needs {expected_ndim} dims, got {shape}"
    if batch is not None and spec.layout != "flat_tokens" and shape[0] != batch:
        return f"batch {shape[0]} != {batch}"
    if spec.layout in ("scale", "pooled_scale"):
        if shape[-1] != 1 or spec.width is not None:
            return f"a scale is [..., 1] with width None, got {shape} / width {spec.width}"
    elif spec.layout == "pattern":
        if shape[1] != spec.n_heads or spec.width is not None:
            return f"pattern heads {shape[1]} != n_heads {spec.n_heads} (width {spec.width})"
    elif spec.width is None or shape[-1] != spec.width:
        return f"last dim {shape[-1]} != width {spec.width}"
    if spec.layout == "heads" and shape[2] != spec.n_heads:
        return f"heads {shape[2]} != n_heads {spec.n_heads}"
    if spec.grid is not None:
        n_tokens = spec.n_prefix_tokens + spec.grid[0] * spec.grid[1]
        positions = shape[2:] if spec.layout == "pattern" else shape[1:2]
        if any(p != n_tokens for p in positions):
            return f"positions {positions} != {spec.n_prefix_tokens} prefix tokens + grid {spec.grid}"
    return None


def check_contract(model: Any, run: Callable[[Any], tuple[Any, Any]], batch: int | None = BATCH,
                   must_fire: Callable[[HookSpec], bool] = lambda s: True) -> dict[str, HookSpec]:
    specs = model.hook_specs()
    hook_names = set(model.hook_dict)
    assert hook_names == set(specs), (
        f"hooks without specs: {sorted(hook_names - set(specs))[:8]}; specs without hooks: "
        f"{sorted(set(specs) - hook_names)[:8]}"
    )
    for name, spec in specs.items():
        assert spec.name == name and spec.part in PARTS and spec.layout in LAYOUTS
        assert spec.local_name is not None and name.endswith(spec.local_name)
    with torch.no_grad():
        _, cache = run(model)
    problems = {name: shape_problem(specs[name], t, batch) for name, t in cache.items()}
    problems = {k: v for k, v in problems.items() if v is not None}
    assert not problems, problems
    silent = sorted(n for n, s in specs.items() if n not in cache and must_fire(s))
    assert not silent, f"specs of hooks that never fired: {silent[:8]}"
    return specs


def images(size: int = 32, n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _vit_run(size: int = 32) -> Callable[[Any], tuple[Any, Any]]:
    return lambda m: m.run_with_cache(images(size))


# ----------------------------------------------------------------------------------------------- vision families
def _timm(**kw: Any) -> Any:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, **kw).eval()


def _timm_deit() -> Any:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)


VISION_FAMILIES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    # name -> (source builder, expected spec facts for the token hooks)
    "open_clip": (lambda: small_open_clip().visual, dict(n_prefix_tokens=1, grid=(4, 4))),
    "hf_clip_projection": (
        lambda: transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=16, **SMALL)),
        dict(n_prefix_tokens=1, grid=(4, 4)),
    ),
    "hf_vit_classifier": (
        lambda: transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=3, **SMALL)),
        dict(n_prefix_tokens=1, grid=(4, 4)),
    ),
    "hf_dinov2_registers": (
        lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            num_register_tokens=4, **{**SMALL, "image_size": 32})),
        dict(n_prefix_tokens=5, grid=(4, 4)),
    ),
    "hf_dinov2": (
        lambda: transformers.Dinov2Model(transformers.Dinov2Config(**SMALL)),
        dict(n_prefix_tokens=1, grid=(4, 4)),
    ),
    "hf_siglip_vision": (
        lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL)),
        dict(n_prefix_tokens=0, grid=(4, 4)),
    ),
    "timm_vit": (lambda: _timm(num_classes=3), dict(n_prefix_tokens=1, grid=(4, 4))),
    "timm_deit_distilled": (_timm_deit, dict(n_prefix_tokens=2, grid=(4, 4))),
    "timm_registers_gap": (
        lambda: _timm(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg", fc_norm=True,
                      num_classes=0),
        dict(n_prefix_tokens=4, grid=(4, 4)),
    ),
    "timm_siglip_map": (lambda: _timm(class_token=False, global_pool="map", num_classes=0),
                        dict(n_prefix_tokens=0, grid=(4, 4))),
    "timm_clip_pre_norm": (lambda: _timm(pre_norm=True, num_classes=16), dict(n_prefix_tokens=1, grid=(4, 4))),
}


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_every_vision_family_matches_its_specs(family: str) -> None:
    build, facts = VISION_FAMILIES[family]
    model = HookedViT.from_pretrained(build())
    specs = check_contract(model, _vit_run())
    resid = specs["blocks.1.hook_resid_post"]
    assert (resid.part, resid.layout, resid.width, resid.layer) == ("vision", "tokens", model.cfg.d_model, 1)
    assert {"n_prefix_tokens": resid.n_prefix_tokens, "grid": resid.grid} == facts
    z, cfg = specs["blocks.0.attn.hook_z"], model.cfg
    assert (z.layout, z.n_heads, z.width, z.flat_width) == ("heads", cfg.n_heads, cfg.d_head, cfg.d_model)
    assert specs["blocks.0.attn.hook_result"].layout == "heads"  # per-head: the one list is the layout
    assert model.parts() == ("vision",) and model.part("vision") is model


# ----------------------------------------------------------------------------------------------- CLIP and text towers
def _hf_clip() -> Any:
    return transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=SMALL, text_config={**SMALL_TEXT, "eos_token_id": 98}, projection_dim=16))


def _siglip() -> Any:
    return transformers.SiglipModel(transformers.SiglipConfig(vision_config=SMALL, text_config=SMALL_TEXT))


CLIPS: dict[str, tuple[Callable[[], Any], int, int]] = {  # name -> (source, text length, vocabulary size)
    "open_clip": (small_open_clip, 12, 100),
    "hf_clip": (_hf_clip, 16, 99),
    "siglip": (_siglip, 16, 99),
}


@pytest.mark.parametrize("kind", list(CLIPS))
def test_clip_and_its_text_tower_match_their_specs(kind: str) -> None:
    build, length, vocab = CLIPS[kind]
    model = HookedCLIP.from_pretrained(build())
    ids = text_ids(BATCH, length, vocab)
    specs = check_contract(model, lambda m: m.run_with_cache(images(), ids))
    assert model.parts() == ("vision", "text")
    assert model.part("vision") is model.vision and model.part("text") is model.text
    vision, text = specs["vision.blocks.1.hook_resid_post"], specs["text.blocks.1.hook_resid_post"]
    assert (vision.part, vision.local_name, vision.grid) == ("vision", "blocks.1.hook_resid_post", (4, 4))
    assert (text.part, text.local_name, text.grid, text.n_prefix_tokens) == ("text", "blocks.1.hook_resid_post", None, 0)
    assert specs["text.hook_out"].layout == "pooled" and specs["text.hook_out"].width == model.cfg.d_embed
    # The text tower alone reports the same specs without the prefix.
    tower = model.text
    assert isinstance(tower, HookedText) and tower.parts() == ("text",)
    alone = check_contract(tower, lambda m: m.run_with_cache(ids))
    assert alone["blocks.1.hook_resid_post"] == dataclasses.replace(text, name="blocks.1.hook_resid_post")


# ----------------------------------------------------------------------------------------------- VLM
VLMS = {
    "llava_llama_clip": dict(architecture="llava", text_model="llama"),
    "llava_qwen2_siglip_full": dict(architecture="llava", text_model="qwen2", vision_model="siglip",
                                    vision_feature_select_strategy="full"),
}


@pytest.mark.parametrize("kind", list(VLMS))
def test_vlm_matches_its_specs(kind: str) -> None:
    kw = VLMS[kind]
    model = HookedVLM.from_pretrained(tiny_random_llava(seed=1, vision_feature_layer=-1, **kw))
    ids = torch.tensor([[1, 5, 6] + [255] * 16 + [7, 8, 9, 10]] * BATCH)  # 4x4 patches, no CLS
    # The vision tower runs only as far as the feature layer: its pooling and output hooks stay silent.
    specs = check_contract(model, lambda m: m.run_with_cache(ids, images()),
                           must_fire=lambda s: s.part != "vision" or s.layer is not None)
    assert model.parts() == ("vision", "projector", "language_model")
    assert model.part("language_model") is model.lm and model.part("lm") is model.lm
    assert model.part("vision") is model.vision
    k, q = specs["lm.blocks.0.attn.hook_k"], specs["lm.blocks.0.attn.hook_q"]
    assert (k.part, k.local_name, q.n_heads) == ("language_model", "blocks.0.attn.hook_k", 4)
    assert k.n_heads == (2 if kw["text_model"] == "qwen2" else 4)  # grouped-query attention
    proj = specs["projector.hook_in"]
    assert proj.grid == (4, 4) and proj.n_prefix_tokens == 0  # CLS dropped ("default") or none (SigLIP)
    assert specs["hook_image_features"].layout == "flat_tokens"


# ----------------------------------------------------------------------------------------------- diffusion
def _unet_case() -> tuple[Any, Callable[[Any], tuple[Any, Any]]]:
    from sae_lens_multimodal.diffusion import HookedUNet
    from tests.diffusion import _tiny
    from tests.diffusion.test_hooked_unet import _inputs

    args, kwargs = _inputs("sd", batch=BATCH)
    return HookedUNet.from_pretrained(_tiny.sd_unet()), lambda m: m.run_with_cache(*args, **kwargs)


def _dit_case(family: str) -> tuple[Any, Callable[[Any], tuple[Any, Any]]]:
    from sae_lens_multimodal.diffusion import HookedDiT
    from tests.diffusion.test_hooked_dit import BUILDERS, _inputs

    kwargs = _inputs(family)
    return HookedDiT.from_pretrained(BUILDERS[family]()), lambda m: m.run_with_cache(**kwargs)


DENOISERS = {"unet": _unet_case, **{f: (lambda f=f: _dit_case(f)) for f in ("pixart", "dit", "sd3", "flux")}}


@pytest.mark.parametrize("kind", list(DENOISERS))
def test_denoisers_match_their_specs(kind: str) -> None:
    model, run = DENOISERS[kind]()
    batch = BATCH if kind == "unet" else 1
    specs = check_contract(model, run, batch=batch)
    assert model.parts() == ("denoiser",) and model.part("denoiser") is model
    layouts = {s.layout for s in specs.values()}
    if kind == "unet":
        assert "spatial" in layouts  # resnets and Transformer2D blocks see channel-last feature maps
        resnet = specs["down_blocks.0.resnets.0.hook_out"]
        assert (resnet.layout, resnet.width) == ("spatial", 32)
        # An alias resolves to the same spec.
        assert model.hook_spec("down.0.0.hook_out") == specs["down_blocks.0.attentions.0.hook_out"]
    if kind in ("sd3", "flux"):
        joint = [s for s in specs.values() if s.name.startswith("transformer_blocks.0.")
                 and s.layout in ("tokens", "heads") and ".attn2." not in s.name]  # attn2: SD3.5's image-only attention
        assert joint and {s.stream for s in joint} == {"image", "text"}
        text = [s for s in specs.values() if s.name.endswith("attn.hook_q_text")]
        assert text and all(s.stream == "text" and s.layout == "heads" for s in text)


# ----------------------------------------------------------------------------------------------- locate and errors
def _sae(d_in: int, hook_name: str, reshape_activations: str = "none", **meta: Any) -> StandardSAE:
    cfg = StandardSAEConfig(d_in=d_in, d_sae=8, reshape_activations=reshape_activations)  # type: ignore[arg-type]
    cfg.metadata.hook_name = hook_name
    for k, v in meta.items():
        setattr(cfg.metadata, k, v)
    return StandardSAE(cfg)


@pytest.fixture(scope="module")
def clip() -> HookedCLIP:
    return HookedCLIP.from_pretrained(small_open_clip())


def test_locate_resolves_names_parts_and_saes(clip: HookedCLIP) -> None:
    bare = "blocks.1.hook_resid_post"
    assert clip.locate(bare).name == "vision.blocks.1.hook_resid_post"  # bare names prefer the vision tower
    assert clip.locate(bare, part="text").name == "text.blocks.1.hook_resid_post"
    assert clip.locate("text.hook_out").part == "text"
    assert clip.locate(_sae(48, bare)).name == "text.blocks.1.hook_resid_post"  # only the text width fits
    assert clip.locate(_sae(64, bare)).name == "vision.blocks.1.hook_resid_post"
    assert clip.locate(_sae(48, bare, model_class_name="HookedText")).part == "text"
    assert clip.vision.locate(bare) == clip.vision.hook_spec(bare)
    with pytest.raises(KeyError, match="no part 'language_model'"):
        clip.locate(bare, part="language_model")
    with pytest.raises(KeyError, match="no part 'denoiser'"):
        clip.part("denoiser")
    with pytest.raises(ValueError, match="no cfg.metadata.hook_name"):
        clip.locate(StandardSAE(StandardSAEConfig(d_in=64, d_sae=8)))


def test_vlm_locate_bare_vision_and_language_model_names() -> None:
    model = HookedVLM.from_pretrained(tiny_random_llava(seed=1))
    assert model.locate("blocks.0.hook_resid_post").name == "vision.blocks.0.hook_resid_post"
    lm = model.locate("blocks.0.hook_resid_post", part="language_model")
    assert (lm.name, lm.width) == ("lm.blocks.0.hook_resid_post", 64)
    assert model.locate(_sae(64, "blocks.0.hook_resid_post")).part == "language_model"  # by width
    assert model.locate("projector.hook_out").part == "projector"


def test_unknown_names_raise_with_close_matches(clip: HookedCLIP) -> None:
    with pytest.raises(KeyError, match="Did you mean.*vision.blocks.1.hook_resid_post"):
        clip.hook_spec("vision.blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="Did you mean.*blocks.1.hook_resid_post"):
        clip.vision.hook_spec("blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="Did you mean"):
        clip.locate("blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="Did you mean"):
        clip.vision.hook_width("blocks.1.hook_mlp_outt")


def test_add_sae_reads_the_spec_width(clip: HookedCLIP) -> None:
    with pytest.raises(ValueError, match="width 64"):
        clip.vision.add_sae(_sae(48, "blocks.1.hook_resid_post"))
    flat_heads = _sae(64, "blocks.1.hook_resid_post")
    flat_heads.cfg.reshape_activations = "hook_z"  # (SAELens refuses it at construction for a non-hook_z name)
    with pytest.raises(ValueError, match="no head axis"):
        clip.vision.add_sae(flat_heads)
    clip.vision.add_sae(_sae(64, "blocks.1.attn.hook_z", reshape_activations="hook_z"))  # 4 heads x 16
    clip.vision.reset_saes()
