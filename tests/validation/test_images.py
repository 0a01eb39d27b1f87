"""Image inputs at every public entry point (HookedViT, HookedCLIP.encode_image, run_with_cache, HookedVLM
pixel_values): bad images raise an error naming the problem and the fix; numpy uint8 images are accepted and
converted exactly as the same PIL images are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_lens_multimodal.core.images import as_image_batch, check_finite_pixels
from sae_lens_multimodal.models import HookedViT, HookedViTConfig


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    import torchvision.transforms as T

    cfg = HookedViTConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, image_size=32, patch_size=8)
    model = HookedViT(cfg, preprocess=T.Compose([T.Resize((32, 32)), T.ToTensor()]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained("shapes-clip").eval()


def _pixels(seed: int, shape=(2, 40, 30, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _no_hooks(model) -> bool:
    return not any(hp._forward_hooks or hp._forward_pre_hooks for hp in model.hook_dict.values())


# ----------------------------------------------------------------------------------- accepted inputs
def test_numpy_uint8_hwc_and_nhwc_equal_the_same_pil_images(vit):
    from PIL import Image

    raw = _pixels(0)
    pil = [Image.fromarray(a) for a in raw]
    expected = vit(pil)
    torch.testing.assert_close(vit(raw), expected)  # an (N, H, W, C) batch
    torch.testing.assert_close(vit(raw[0]), expected[:1])  # one (H, W, C) image
    torch.testing.assert_close(vit([raw[0], raw[1]]), expected)  # a list of (H, W, C) images


def test_float_nchw_array_is_used_like_the_tensor(vit):
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(vit(x.numpy()), vit(x))
    torch.testing.assert_close(vit(list(x)), vit(x))  # a list of (C, H, W) tensors is stacked


def test_clip_takes_numpy_images_like_pil(clip):
    from PIL import Image

    raw = _pixels(1, (2, 32, 32, 3))
    torch.testing.assert_close(clip.encode_image(raw), clip.encode_image([Image.fromarray(a) for a in raw]))


# ----------------------------------------------------------------------------------- non-finite pixels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_name_count_and_position(vit, bad):
    x = torch.rand(2, 3, 32, 32)
    x[1, 2, 5, 7] = bad
    x[1, 0, 9, 9] = bad
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*image 1, channel 0, row 9, column 9.*nan_to_num"):
        vit(x)


def test_non_finite_pixels_refused_on_every_entry_point(vit, clip):
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        vit.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    assert _no_hooks(vit)
    with pytest.raises(ValueError, match="non-finite"):
        vit.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: a)])
    assert _no_hooks(vit)
    with pytest.raises(ValueError, match="non-finite"):
        clip.encode_image(x)
    with pytest.raises(ValueError, match="non-finite"):
        clip(x, ["a red circle"])
    with pytest.raises(ValueError, match="non-finite"):
        vit(x.numpy())  # a float array goes through the same check
    with pytest.raises(ValueError, match="non-finite"):
        check_finite_pixels(torch.tensor([[[[float("inf")]]]]))


# ----------------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("empty", [
    torch.zeros(0, 3, 32, 32), np.zeros((0, 3, 32, 32), np.float32), np.zeros((0, 32, 32, 3), np.uint8), [], (),
])
def test_empty_batch_is_a_clear_error(vit, empty):
    with pytest.raises(ValueError, match="empty (batch|list).*at least one image"):
        vit(empty)


def test_empty_batch_on_clip(clip):
    with pytest.raises(ValueError, match="empty batch"):
        clip.encode_image(torch.zeros(0, 3, 32, 32))


# ----------------------------------------------------------------------------------- layouts and dtypes
@pytest.mark.parametrize("array, pattern", [
    (np.zeros((3, 32, 32), np.uint8), r"channel-first uint8 array \(3, 32, 32\).*a\.transpose\(1, 2, 0\)"),
    (np.zeros((2, 3, 32, 32), np.uint8), r"channel-first.*a\.transpose\(0, 2, 3, 1\)"),
    (np.zeros((32, 32), np.uint8), r"2-d uint8 array.*grayscale.*np\.stack"),
    (np.zeros((32, 32, 4), np.uint8), r"4-channel \(RGBA\?\).*a\[\.\.\., :3\]"),
    (np.zeros((32, 32, 5), np.uint8), r"5 channels.*\(H, W, 3\)"),
    (np.zeros((1, 1, 32, 32, 3), np.uint8), r"5-d uint8 array.*\(N, H, W, 3\)"),
    (np.zeros((2, 32, 32, 3), np.float32), r"channel-last float32 array.*astype\(np\.uint8\)"),
    (np.zeros((32, 32, 3), np.float64), r"channel-last float64 array.*preprocessed"),
])
def test_numpy_layouts_are_accepted_or_named(vit, array, pattern):
    with pytest.raises(ValueError, match=pattern):
        vit(array)


@pytest.mark.parametrize("array", [np.zeros((2, 32, 32, 3), np.int64), np.zeros((2, 3, 32, 32), bool),
                                   np.zeros((2, 32, 32, 3), np.uint16)])
def test_numpy_dtypes_other_than_uint8_and_float(vit, array):
    with pytest.raises(TypeError, match=rf"dtype {array.dtype}.*uint8.*float"):
        vit(array)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_tensor_dtypes_other_than_float(vit, dtype):
    with pytest.raises(TypeError, match=rf"preprocessed floats.*got a {dtype} tensor.*model\.preprocess"):
        vit(torch.zeros(1, 3, 32, 32, dtype=dtype))


@pytest.mark.parametrize("shape, pattern", [
    ((2, 1, 32, 32), r"Expected images of shape \(B, 3, H, W\), got \(2, 1, 32, 32\)"),
    ((2, 4, 32, 32), r"\(B, 3, H, W\), got \(2, 4, 32, 32\)"),
    ((2, 32, 32, 3), r"channel-last\? use x\.permute\(0, 3, 1, 2\)"),
    ((3, 32, 32), r"one image of shape \(3, 32, 32\).*unsqueeze\(0\)"),
    ((2, 3, 48, 40), r"Expected 32x32 images, got 48x40.*resize"),
    ((32, 32), r"\(B, 3, H, W\), got \(32, 32\)"),
])
def test_wrong_channels_and_sizes_name_expected_and_got(vit, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        vit(torch.rand(*shape))


# ----------------------------------------------------------------------------------- lists and other objects
def test_lists_mixing_kinds_are_refused(vit):
    from PIL import Image

    pil = Image.new("RGB", (32, 32))
    raw = np.zeros((32, 32, 3), np.uint8)
    t = torch.rand(3, 32, 32)
    for items, first, other in [([t, raw], "tensor", "numpy array"), ([pil, t], "PIL image", "tensor"),
                                ([raw, raw, pil], "numpy array", "PIL image")]:
        with pytest.raises(TypeError, match=rf"mixes kinds: item 0 is a {first}, item \d a {other}.*one kind"):
            vit(items)


def test_list_of_tensors_of_different_sizes(vit):
    with pytest.raises(ValueError, match=r"different shapes.*\(3, 32, 32\).*\(3, 40, 40\).*preprocess"):
        vit([torch.rand(3, 32, 32), torch.rand(3, 40, 40)])


@pytest.mark.parametrize("thing", ["cat.png", __import__("pathlib").Path("cat.png"), ["cat.png", "dog.png"]])
def test_paths_are_refused_with_how_to_open_them(vit, thing):
    with pytest.raises(TypeError, match=r"path 'cat\.png'.*PIL\.Image\.open\(path\)\.convert\('RGB'\)"):
        vit(thing)


@pytest.mark.parametrize("thing", [3, 2.5, None, {"image": 1}, [object()]])
def test_other_objects_are_refused(vit, thing):
    with pytest.raises(TypeError, match=r"Cannot read a \w+ as an image.*PIL images.*uint8 numpy arrays"):
        vit(thing)


def test_raw_pixels_without_preprocess_say_how_to_fix():
    cfg = HookedViTConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, image_size=32, patch_size=8)
    model = HookedViT(cfg)
    with pytest.raises(TypeError, match=r"ndarray input but this HookedViT has no preprocess.*model\.preprocess"):
        model(np.zeros((32, 32, 3), np.uint8))


def test_preprocess_that_returns_no_tensor():
    with pytest.raises(TypeError, match=r"model\.preprocess returned Image, not a \(C, H, W\) tensor"):
        as_image_batch(np.zeros((8, 8, 3), np.uint8), 3, preprocess=lambda img: img)


# ----------------------------------------------------------------------------------- VLM pixel_values
@pytest.fixture(scope="module")
def vlm_model():
    from sae_lens_multimodal.models.vlm import HookedVLM
    from sae_lens_multimodal.testing import tiny_random_llava
    from tests.models.test_hooked_vlm import images, prompt

    return HookedVLM.from_pretrained(tiny_random_llava("llava", "llama", seed=11)), prompt(), images()


def test_vlm_pixel_values_checks(vlm_model):
    model, ids, px = vlm_model
    for bad, pattern in [(px.numpy(), r"float tensor the model's processor returns.*got ndarray"),
                         (px.to(torch.uint8), r"got Tensor of dtype torch\.uint8")]:
        with pytest.raises(TypeError, match=pattern):
            model(ids, bad)
    nan = px.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\).*image 0, channel 1, row 2, column 3"):
        model(ids, nan)
