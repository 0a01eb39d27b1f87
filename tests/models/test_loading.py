"""load_model: one loader for every model kind, with the kind detected from the name (registered names, library
prefixes, local directories of each layout), and the registries a plug-in (the shapes world) registers through."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sae_lens_multimodal.core.sae_metadata import MODEL_KINDS  # noqa: E402
from sae_lens_multimodal.diffusion import HookedDiffusionPipeline, register_pipeline_class  # noqa: E402
from sae_lens_multimodal.diffusion.pipeline_classes import SUPPORTED_PIPELINES  # noqa: E402
from sae_lens_multimodal.models.hooked_clip import HookedCLIP  # noqa: E402
from sae_lens_multimodal.models.hooked_vit import HookedViT  # noqa: E402
from sae_lens_multimodal.models.loading import detect_model_kind, load_model, model_kind_of  # noqa: E402
from sae_lens_multimodal.models.registry import (  # noqa: E402
    MODEL_REGISTRY,
    list_models,
    model_info,
    register_model,
    register_model_provider,
    resolve_model_name,
)
from sae_lens_multimodal.models.vlm import HookedVLM  # noqa: E402
from tests.diffusion import _tiny  # noqa: E402


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64, image_size=32, patch_size=8),
                                  add_pooling_layer=False)
    path = tmp_path_factory.mktemp("vit")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "pipe"
    _tiny.sd_pipeline().save_pretrained(path)
    return path


def test_kind_detection_from_names_and_directories(vit_dir, clip_dir, sd_dir, tmp_path):
    assert detect_model_kind("shapes-clip") == "clip"
    assert detect_model_kind("shapes-clip-typographic") == "clip"
    assert detect_model_kind("shapes-diffusion") == "diffusion"
    assert detect_model_kind("open-clip:ViT-B-32/laion2b_s34b_b79k") == "clip"
    assert detect_model_kind("timm:vit_tiny_patch16_224") == "vision"
    assert detect_model_kind(vit_dir) == "vision"
    assert detect_model_kind(clip_dir) == "clip"
    assert detect_model_kind(sd_dir) == "diffusion"
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert detect_model_kind(llava) == "vlm"
    open_clip_dir = tmp_path / "oc"
    open_clip_dir.mkdir()
    (open_clip_dir / "open_clip_config.json").write_text("{}")
    assert detect_model_kind(open_clip_dir) == "clip"
    (tmp_path / "no-markers").mkdir()
    assert detect_model_kind(tmp_path / "no-markers") is None
    assert detect_model_kind("plain-name-without-clues") is None
    with pytest.raises(FileNotFoundError, match="No model directory at"):
        detect_model_kind(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="No model directory at"):
        detect_model_kind("weights.safetensors")


def test_load_model_returns_each_kind(vit_dir, clip_dir, sd_dir):
    vit = load_model(str(vit_dir))
    assert type(vit) is HookedViT and model_kind_of(vit) == "vision"
    clip = load_model(str(clip_dir))
    assert type(clip) is HookedCLIP and model_kind_of(clip) == "clip"
    # a CLIP asked for as a vision model: its vision tower alone, the same weights
    shapes_clip = load_model("shapes-clip")
    tower = load_model("shapes-clip", kind="vision")
    assert type(shapes_clip) is HookedCLIP and type(tower) is HookedViT and model_kind_of(tower) == "vision"
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower(pixels), shapes_clip.vision(pixels))
    pipe = load_model(str(sd_dir), device="cpu")
    assert type(pipe) is HookedDiffusionPipeline and model_kind_of(pipe) == "diffusion"
    assert pipe.pipe._progress_bar_config.get("disable") is True  # callers show their own progress


def test_load_model_vlm(tmp_path):
    from sae_lens_multimodal.testing import tiny_random_llava

    source = tiny_random_llava()
    source.save_pretrained(tmp_path / "llava")
    vlm = load_model(str(tmp_path / "llava"))
    assert type(vlm) is HookedVLM and model_kind_of(vlm) == "vlm"


def test_model_kind_spellings(vit_dir):
    assert set(MODEL_KINDS) == {"vision", "clip", "vlm", "diffusion"}
    assert type(load_model(str(vit_dir), kind="vit")) is HookedViT  # the old spelling of "vision"
    with pytest.raises(ValueError, match=r"'vison' is not a model kind.*'vision'"):
        load_model(str(vit_dir), kind="vison")
    with pytest.raises(TypeError, match="not one of the model kinds"):
        model_kind_of(torch.nn.Linear(2, 2))


def test_a_users_registered_name_and_lazy_provider(vit_dir, tmp_path, monkeypatch):
    register_model("test-loading-vit", str(vit_dir), "a tiny HF ViT", kind="vision", overwrite=True)
    try:
        assert detect_model_kind("test-loading-vit") == "vision"
        assert type(load_model("test-loading-vit")) is HookedViT
    finally:
        MODEL_REGISTRY.pop("test-loading-vit")

    # A provider module registers its names only when one of them is first looked up.
    (tmp_path / "my_model_zoo.py").write_text(textwrap.dedent(f"""
        from sae_lens_multimodal.models.registry import register_model
        register_model("zoo-vit", {str(vit_dir)!r}, "from a provider", kind="vision")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    register_model_provider("zoo-", "my_model_zoo")
    try:
        assert "my_model_zoo" not in sys.modules
        assert resolve_model_name("other-name") == "other-name" and "my_model_zoo" not in sys.modules
        assert model_info("zoo-vit").kind == "vision" and "my_model_zoo" in sys.modules
        assert "zoo-vit" in list_models(kind="vision")
        with pytest.raises(ValueError, match="already provided"):
            register_model_provider("zoo-", "another_module")
    finally:
        from sae_lens_multimodal.models import registry

        registry.MODEL_PROVIDERS.pop("zoo-")
        MODEL_REGISTRY.pop("zoo-vit", None)
        sys.modules.pop("my_model_zoo", None)


class RenamedStableDiffusionPipeline(_tiny.StableDiffusionPipeline):
    """A pipeline class diffusers does not know by name (as the shapes world's ShapesDiffusionPipeline)."""


def test_a_pipeline_class_outside_diffusers_loads_once_registered(sd_dir, tmp_path):
    import shutil

    path = tmp_path / "renamed"
    shutil.copytree(sd_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    index["_class_name"] = "RenamedStableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(Exception):  # diffusers looks the class up in its own namespace only
        HookedDiffusionPipeline.from_pretrained(str(path))
    register_pipeline_class("RenamedStableDiffusionPipeline",
                            "tests.models.test_loading:RenamedStableDiffusionPipeline", cfg_layout="batched")
    try:
        pipe = HookedDiffusionPipeline.from_pretrained(str(path))
        assert type(pipe.pipe).__name__ == "RenamedStableDiffusionPipeline"
        assert pipe.cfg_mode(["a"], guidance_scale=3.0) == "batched"
        with pytest.raises(ValueError, match="already registered"):
            register_pipeline_class("RenamedStableDiffusionPipeline", "elsewhere:Cls")
        with pytest.raises(ValueError, match="cfg_layout"):
            register_pipeline_class("Other", "elsewhere:Cls", cfg_layout="interleaved")
    finally:
        from sae_lens_multimodal.diffusion import pipeline_classes

        pipeline_classes.PIPELINE_CLASSES.pop("RenamedStableDiffusionPipeline")
        SUPPORTED_PIPELINES.pop("RenamedStableDiffusionPipeline")


def test_the_shapes_world_registers_through_the_public_registries():
    from sae_lens_multimodal.diffusion.pipeline_classes import PIPELINE_CLASSES
    from sae_lens_multimodal.world.paths import SHAPES_DIFFUSION_DIR

    assert {"shapes-clip", "shapes-clip-typographic", "shapes-diffusion"} <= set(list_models())
    assert model_info("shapes-diffusion").source == str(SHAPES_DIFFUSION_DIR)
    assert "ShapesDiffusionPipeline" in PIPELINE_CLASSES
    pipe = load_model("shapes-diffusion")
    assert type(pipe.pipe).__name__ == "ShapesDiffusionPipeline"
