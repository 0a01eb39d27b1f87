"""transformers vision families (CLIP, ViT, DINOv2 with/without registers, SigLIP) -> HookedViT.

Equivalence is checked against transformers' own intermediates (``output_hidden_states``) at the real
architecture configs with random weights, after randomising every parameter transformers initialises to a
constant (LayerNorm weights/biases, layer scales, biases, register tokens) so folding and every bias path
are exercised. Loading tests write checkpoints with ``save_pretrained`` into a local directory and into a
Hugging Face hub cache layout, and load them offline by name; they use 2-layer models (the loader does not
depend on depth; depth-exactness is covered by the equivalence tests).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sae_lens_multimodal.models.conversions import UnsupportedModelError  # noqa: E402
from sae_lens_multimodal.models.hooked_vit import HookedViT  # noqa: E402

TOL = 1e-4
DINO_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)


@torch.no_grad()
def randomise_constant_params(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every parameter transformers initialises to a constant (LayerNorm w/b, layer scale, zero
    biases, zero register tokens) with random values, so that conversions of these cannot hide."""
    for name, p in model.named_parameters():
        if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            is_scale = (name.endswith("weight") and "norm" in name) or "lambda1" in name
            if is_scale:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- cases: (build, run original) pairs
def _clip_vision():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig())


def _clip_projection():
    return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig())


def _clip_model():  # real vision tower; the text tower is never converted, so keep it to one layer
    return transformers.CLIPModel(transformers.CLIPConfig(text_config={"num_hidden_layers": 1}))


def _vit_model():
    return transformers.ViTModel(transformers.ViTConfig())


def _vit_classifier():
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10))


def _dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(**DINO_S))


def _dinov2_registers():
    return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**DINO_S))


def _siglip_vision():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig())


def _siglip_model():  # real vision tower; one-layer text tower (not converted)
    return transformers.SiglipModel(transformers.SiglipConfig(text_config={"num_hidden_layers": 1}))


def run_original(model: Any, pixels: torch.Tensor) -> dict[str, Any]:
    """The original's hidden states, last_hidden_state, pooled and final output (what HookedViT's
    hook_out must equal), from its own forward."""
    name = type(model).__name__
    if name in ("CLIPModel", "SiglipModel"):
        o = model.get_image_features(pixel_values=pixels, output_hidden_states=True)
        tower = model.vision_model(pixel_values=pixels)
        return dict(hidden=o.hidden_states, last=tower.last_hidden_state, pooled=tower.pooler_output,
                    out=o.pooler_output)
    o = model(pixel_values=pixels, output_hidden_states=True)
    if name == "CLIPVisionModelWithProjection":
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        return dict(hidden=o.hidden_states, last=o.last_hidden_state, pooled=pooled, out=o.image_embeds)
    if name == "ViTForImageClassification":
        last = model.vit(pixel_values=pixels).last_hidden_state
        return dict(hidden=o.hidden_states, last=last, pooled=last[:, 0], out=o.logits)
    if name == "ViTModel":
        return dict(hidden=o.hidden_states, last=o.last_hidden_state, pooled=o.last_hidden_state[:, 0],
                    out=o.pooler_output if o.pooler_output is not None else o.last_hidden_state[:, 0])
    return dict(hidden=o.hidden_states, last=o.last_hidden_state, pooled=o.pooler_output, out=o.pooler_output)


EQUIVALENCE_CASES = {
    "clip_vision_b32": (_clip_vision, 224),
    "clip_vision_projection_b32": (_clip_projection, 224),
    "clip_model_b32": (_clip_model, 224),
    "vit_model_b16": (_vit_model, 224),
    "vit_classifier_b16": (_vit_classifier, 224),
    "dinov2_s14_at_224": (_dinov2, 224),  # config image_size 518: position embeddings interpolated
    "dinov2_registers_s14_at_224": (_dinov2_registers, 224),
    "siglip_vision_b16": (_siglip_vision, 224),
    "siglip_model_b16": (_siglip_model, 224),
}


def _compared_hooks(name: str) -> bool:
    return name.endswith("hook_resid_post") or name in ("blocks.0.hook_resid_pre", "hook_pooled")


def check_equivalence(build: Callable[[], Any], size: int, batch: int = 2) -> None:
    torch.manual_seed(0)
    source = randomise_constant_params(build())
    pixels = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        ref = run_original(source, pixels)
        hooked = HookedViT.from_pretrained(source)
        out, cache = hooked.run_with_cache(pixels, names_filter=_compared_hooks)
        hidden = ref["hidden"]
        assert len(hidden) == hooked.cfg.n_layers + 1
        # hidden_states[0] is the first block's input (after ln_pre for CLIP), hidden_states[i+1] block i's output
        errs = {"blocks.0.hook_resid_pre": max_err(cache["blocks.0.hook_resid_pre"], hidden[0])}
        for i in range(hooked.cfg.n_layers):
            errs[f"blocks.{i}.hook_resid_post"] = max_err(cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1])
        errs["tokens"] = max_err(hooked(pixels, return_type="tokens"), ref["last"])
        if ref["pooled"] is not None:
            errs["pooled"] = max_err(cache["hook_pooled"], ref["pooled"])
        errs["output"] = max_err(out, ref["out"])
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        assert not bad, bad
        folded = HookedViT.from_pretrained(source, fold_ln=True, center_writing_weights=True)
        assert folded.cfg.normalization_type == "LNPre"
        assert max_err(folded(pixels), ref["out"]) <= TOL


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_every_block_and_output_match_transformers(case: str) -> None:
    build, size = EQUIVALENCE_CASES[case]
    check_equivalence(build, size)


@pytest.mark.slow  # ~15 s: the native 37x37 grid (no interpolation); the default run covers 224
@pytest.mark.parametrize("build", [_dinov2, _dinov2_registers], ids=["dinov2", "dinov2_registers"])
def test_dinov2_at_native_518(build) -> None:
    check_equivalence(build, 518, batch=1)


def test_hook_layout_per_family() -> None:
    """Token order and pooling facts the module docstrings state, checked on the converted configs."""
    torch.manual_seed(0)
    small = dict(num_hidden_layers=1)
    clip = HookedViT.from_pretrained(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small)))
    assert clip.cfg.has_ln_pre and clip.cfg.final_ln_after_pool and clip.cfg.head_type == "none"
    assert clip.cfg.act_fn == "quick_gelu" and clip.cfg.eps == 1e-5 and not clip.cfg.patch_embed_bias
    vit = HookedViT.from_pretrained(transformers.ViTModel(transformers.ViTConfig(**small)))
    assert vit.cfg.head_type == "linear_tanh" and vit.cfg.eps == 1e-12 and vit.cfg.patch_embed_bias
    reg = HookedViT.from_pretrained(
        transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**{**DINO_S, **small}))
    )
    assert (reg.cfg.n_registers, reg.cfg.n_pos_prefix_tokens, reg.cfg.n_ctx) == (4, 1, 1 + 4 + 37 * 37)
    assert reg.cfg.pos_embed_interpolation == "bicubic_antialias" and reg.cfg.eps == 1e-6
    sig = HookedViT.from_pretrained(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**small)))
    assert (sig.cfg.has_cls_token, sig.cfg.n_pos_prefix_tokens, sig.cfg.pool_type) == (False, 0, "attn")
    assert sig.cfg.act_fn == "gelu_pytorch_tanh"
    _, cache = sig.run_with_cache(torch.randn(1, 3, 224, 224), names_filter="attn_pool.attn.hook_pattern")
    assert cache["attn_pool.attn.hook_pattern"].shape == (1, 12, 1, 196)


def test_vit_interpolation_opt_in_matches_interpolate_pos_encoding() -> None:
    torch.manual_seed(0)
    source = randomise_constant_params(transformers.ViTModel(transformers.ViTConfig(num_hidden_layers=2)))
    hooked = HookedViT.from_pretrained(source)
    pixels = torch.randn(2, 3, 160, 192)
    with pytest.raises(ValueError, match="224x224"):
        hooked(pixels)
    hooked.cfg.pos_embed_interpolation = "bicubic"
    with torch.no_grad():
        ref = source(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
        assert max_err(hooked(pixels), ref) <= TOL


def test_siglip_without_head_outputs_last_hidden_state() -> None:
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(num_hidden_layers=2, vision_use_head=False)
    source = randomise_constant_params(transformers.SiglipVisionModel(cfg))
    hooked = HookedViT.from_pretrained(source)
    assert hooked.cfg.pool_type == "none"
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert max_err(hooked(pixels), source(pixel_values=pixels).last_hidden_state) <= TOL


# ---------------------------------------------------------------- loading by name
def _small(build_cfg: Callable[..., Any], **kw: Any) -> Any:
    return build_cfg(num_hidden_layers=2, **kw)


def _two_tower(config_cls: Any, vision_cls: Any, text_cls: Any) -> Any:
    return config_cls(
        vision_config=vision_cls(num_hidden_layers=2).to_dict(), text_config=text_cls(num_hidden_layers=1).to_dict()
    )


LOAD_CASES: dict[str, Callable[[], Any]] = {
    "clip_model": lambda: transformers.CLIPModel(
        _two_tower(transformers.CLIPConfig, transformers.CLIPVisionConfig, transformers.CLIPTextConfig)
    ),
    "clip_vision": lambda: transformers.CLIPVisionModel(_small(transformers.CLIPVisionConfig)),
    "clip_vision_projection": lambda: transformers.CLIPVisionModelWithProjection(_small(transformers.CLIPVisionConfig)),
    "vit_model": lambda: transformers.ViTModel(_small(transformers.ViTConfig)),
    "vit_model_no_pooler": lambda: transformers.ViTModel(_small(transformers.ViTConfig), add_pooling_layer=False),
    "vit_classifier": lambda: transformers.ViTForImageClassification(_small(transformers.ViTConfig, num_labels=10)),
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**{**DINO_S, "num_hidden_layers": 2})),
    "dinov2_registers": lambda: transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**{**DINO_S, "num_hidden_layers": 2})
    ),
    "siglip_model": lambda: transformers.SiglipModel(
        _two_tower(transformers.SiglipConfig, transformers.SiglipVisionConfig, transformers.SiglipTextConfig)
    ),
    "siglip_vision": lambda: transformers.SiglipVisionModel(_small(transformers.SiglipVisionConfig)),
}


def _saved(case: str, directory: Path) -> Any:
    torch.manual_seed(0)
    source = randomise_constant_params(LOAD_CASES[case]())
    source.save_pretrained(directory)
    return source


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_from_local_directory(case: str, tmp_path: Path) -> None:
    source = _saved(case, tmp_path / "ckpt")
    hooked = HookedViT.from_pretrained(str(tmp_path / "ckpt"))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert max_err(hooked(pixels), run_original(source, pixels)["out"]) <= TOL


def _write_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, blobs/<hash>, snapshots/<sha>/<file> -> blob}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("case", ["clip_model", "dinov2_registers", "siglip_model", "vit_classifier"])
def test_load_from_hub_cache_offline(case: str, tmp_path: Path, hub_cache: Path) -> None:
    source = _saved(case, tmp_path / "ckpt")
    _write_hub_cache(hub_cache, "some-org/some-model", tmp_path / "ckpt")
    hooked = HookedViT.from_pretrained("some-org/some-model")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert max_err(hooked(pixels), run_original(source, pixels)["out"]) <= TOL


def _test_image():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (300, 260, 3), generator=g, dtype=torch.uint8).numpy())


# (case, processor saved with the checkpoint or None, processor the original is run with)
PREPROCESS_CASES = {
    "clip_saved_processor": (
        "clip_model",
        lambda: transformers.CLIPImageProcessor(
            size={"shortest_edge": 250}, crop_size={"height": 224, "width": 224}, image_mean=[0.4, 0.5, 0.6]
        ),
        None,
    ),
    "dinov2_saved_processor_at_224": (  # config image_size 518; the processor crops to 224: interpolation
        "dinov2",
        lambda: transformers.BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        ),
        None,
    ),
    "siglip_default_processor": (
        "siglip_model", None, lambda: transformers.SiglipImageProcessor(size={"height": 224, "width": 224})
    ),
    "vit_default_processor": (
        "vit_classifier", None, lambda: transformers.ViTImageProcessor(size={"height": 224, "width": 224})
    ),
}


@pytest.mark.parametrize("name", list(PREPROCESS_CASES))
def test_pil_input_uses_the_models_processor(name: str, tmp_path: Path, hub_cache: Path) -> None:
    case, saved_processor, default_processor = PREPROCESS_CASES[name]
    source = _saved(case, tmp_path / "ckpt")
    processor = saved_processor() if saved_processor else default_processor()
    if saved_processor:
        processor.save_pretrained(tmp_path / "ckpt")
    _write_hub_cache(hub_cache, "org/with-processor", tmp_path / "ckpt")
    image = _test_image()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = run_original(source, pixels)["out"]
        for name_or_dir in (str(tmp_path / "ckpt"), "org/with-processor"):
            hooked = HookedViT.from_pretrained(name_or_dir)
            assert max_err(hooked.preprocess(image), pixels[0]) == 0.0
            assert max_err(hooked(image), ref) <= TOL
            assert max_err(hooked([image, image]), torch.cat([ref, ref])) <= TOL
    if saved_processor:  # the saved settings matter: the family's default would give other pixels
        default = HookedViT.from_pretrained(source).preprocess  # built in memory: no processor file to read
        assert default(image).shape != pixels[0].shape or max_err(default(image), pixels[0]) > 1e-3


# ---------------------------------------------------------------- errors
def test_unsupported_model_type_lists_supported_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModelError, match="'bert'") as info:
        HookedViT.from_pretrained(str(tmp_path))
    for family in ("hf_clip", "hf_vit", "hf_dinov2", "hf_siglip"):
        assert family in str(info.value)


def test_unsupported_transformers_object_lists_supported_families() -> None:
    model = transformers.DeiTModel(transformers.DeiTConfig(num_hidden_layers=1, hidden_size=64,
                                                           num_attention_heads=2, intermediate_size=128))
    with pytest.raises(UnsupportedModelError, match="DeiTModel") as info:
        HookedViT.from_pretrained(model)
    assert "hf_vit" in str(info.value)


def test_dinov2_swiglu_is_refused() -> None:
    cfg = transformers.Dinov2Config(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, use_swiglu_ffn=True)
    with pytest.raises(UnsupportedModelError, match="use_swiglu_ffn"):
        HookedViT.from_pretrained(transformers.Dinov2Model(cfg))


def test_checkpoint_missing_weights_is_refused(tmp_path: Path) -> None:
    """A config naming a classifier over a checkpoint without one would load a random classifier."""
    transformers.ViTModel(_small(transformers.ViTConfig)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["ViTForImageClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="classifier"):
        HookedViT.from_pretrained(str(tmp_path))
