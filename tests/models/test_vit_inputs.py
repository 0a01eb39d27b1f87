"""Bad inputs to HookedViT raise errors that name the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_lens_multimodal.models import HookedViT, HookedViTConfig
from sae_lens_multimodal.models.conversions import UnsupportedModelError


@pytest.fixture(scope="module")
def model() -> HookedViT:
    # Input validation does not depend on the weights; a tiny random model keeps this file fast.
    cfg = HookedViTConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, image_size=32, patch_size=8)
    hooked = HookedViT(cfg)
    with torch.no_grad():
        for p in hooked.parameters():
            p.normal_(0, 0.1)
    return hooked.eval()


def _pil(size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, color=(10, 200, 30))


def test_valid_batch_runs(model):
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_single_image_without_batch_dim(model):
    with pytest.raises(ValueError, match=r"one image of shape \(3, 32, 32\).*unsqueeze\(0\)"):
        model(torch.randn(3, 32, 32))


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match=r"Expected images of shape \(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


def test_channel_last_tensor(model):
    with pytest.raises(ValueError, match=r"channel-last\? use x\.permute\(0, 3, 1, 2\)"):
        model(torch.randn(2, 32, 32, 3))


def test_wrong_image_size_names_expected_size(model):
    with pytest.raises(ValueError, match=r"Expected 32x32 images, got 48x40.*resize"):
        model(torch.randn(2, 3, 48, 40))


def test_wrong_size_with_interpolation_names_patch_size():
    cfg = HookedViTConfig(
        n_layers=1, d_model=16, n_heads=2, d_mlp=32, image_size=32, patch_size=8, pos_embed_interpolation="bicubic"
    )
    hooked = HookedViT(cfg)
    assert hooked(torch.randn(1, 3, 48, 40)).shape == (1, 16)  # multiples of the patch size are fine
    with pytest.raises(ValueError, match=r"multiples of the patch size 8x8"):
        hooked(torch.randn(1, 3, 45, 40))


def test_pil_without_preprocess(model):
    assert model.preprocess is None
    with pytest.raises(TypeError, match=r"Got Image input.*no preprocess function.*\(B, C, H, W\) tensor"):
        model(_pil())


def test_pil_with_preprocess_is_batched(model):
    import torchvision.transforms as T

    model.preprocess = T.Compose([T.Resize((32, 32)), T.ToTensor()])
    try:
        out = model([_pil(), _pil((20, 50))])
        assert out.shape == (2, 16)
        assert torch.allclose(model(_pil()), out[:1], atol=1e-6)
    finally:
        model.preprocess = None


def test_empty_list(model):
    with pytest.raises(ValueError, match="empty list"):
        model([])


def test_unsupported_object_lists_supported_families():
    with pytest.raises(UnsupportedModelError, match=r"Unsupported vision model type torch\.nn.*Linear") as err:
        HookedViT.from_pretrained(nn.Linear(3, 3))
    assert "open_clip" in str(err.value) and "timm" in str(err.value)
    assert isinstance(err.value, TypeError)  # callers catching TypeError keep working


def test_source_kwargs_with_a_model_object_are_refused():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(TypeError, match=r"only apply when loading by name"):
        HookedViT.from_pretrained(model, pretrained=False)


def test_unknown_open_clip_model_name():
    pytest.importorskip("open_clip")
    with pytest.raises(UnsupportedModelError, match=r"Unknown open_clip model 'ViT-Q-99'.*list_models\(\)"):
        HookedViT.from_pretrained("open-clip:ViT-Q-99")


def test_unrecognised_name_lists_name_forms(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"Cannot tell which library.*'open-clip:\.\.\.'.*'timm:\.\.\.'"):
        HookedViT.from_pretrained(str(tmp_path))  # an empty directory: no config, no marker file
