"""The shapes-world generator: determinism, and that every image shows what its factors and caption say
(checked from the pixels, not from the generator's own bookkeeping)."""

import numpy as np
import pytest
import torch

from sae_lens_multimodal.world import (
    ShapesDataset,
    ShapesWorld,
    all_captions,
    caption,
    class_factor_combinations,
)
from sae_lens_multimodal.world.shapes import COLORS, POSITIONS, SHAPES, caption_vocabulary


def _saturated(images: np.ndarray) -> np.ndarray:
    """Shape pixels: coloured ones. Background is black and words are white, both unsaturated."""
    x = images.astype(int)
    return (x.max(-1) - x.min(-1)) > 25


@pytest.fixture(scope="module")
def sample():
    return ShapesWorld(image_size=32, seed=3, text_prob=0.5).sample(600)


def test_same_seed_same_images_and_factors():
    a_img, a_f = ShapesWorld(image_size=32, seed=7, text_prob=0.3).sample(200)
    b_img, b_f = ShapesWorld(image_size=32, seed=7, text_prob=0.3).sample(200)
    c_img, _ = ShapesWorld(image_size=32, seed=8, text_prob=0.3).sample(200)
    assert np.array_equal(a_img, b_img) and a_f == b_f
    assert not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.uint8 and a_img.shape == (200, 32, 32, 3)


def test_every_factor_value_occurs(sample):
    _, factors = sample
    assert {f.shape for f in factors} == set(SHAPES)
    assert {f.color for f in factors} == set(COLORS)
    assert {f.position for f in factors} == set(POSITIONS)
    assert {f.size for f in factors} == {"small", "large"}
    assert {f.texture for f in factors} == {"plain", "striped"}
    n_text = sum(f.text is not None for f in factors)
    assert 200 < n_text < 400  # text_prob 0.5 of 600


@pytest.mark.parametrize("image_size", [32, 64])
def test_centre_pixel_has_the_factor_colour(image_size):
    images, factors = ShapesWorld(image_size=image_size, seed=1, text_prob=0.5).sample(400)
    palette = np.array(list(COLORS.values()))
    names = list(COLORS)
    for img, f in zip(images, factors):
        x, y = int(f.center[0]), int(f.center[1])
        pixel = img[y, x].astype(int)
        assert names[int(np.argmin(((palette - pixel) ** 2).sum(1)))] == f.color
        assert np.abs(pixel - np.array(COLORS[f.color])).max() <= 15  # the documented jitter


def test_centroid_lies_in_the_position_cell(sample):
    images, factors = sample
    mask = _saturated(images)
    for m, f in zip(mask, factors):
        ys, xs = np.nonzero(m)
        row, col = min(int(ys.mean() / (32 / 3)), 2), min(int(xs.mean() / (32 / 3)), 2)
        assert POSITIONS[3 * row + col] == f.position


def test_shape_and_size_visible_in_the_mask():
    world = ShapesWorld(image_size=64, seed=2)
    images, factors = world.sample(300, texture="plain")
    mask = _saturated(images)
    fill = {s: [] for s in SHAPES}
    area = {(s, z): [] for s in SHAPES for z in ("small", "large")}
    for m, f in zip(mask, factors):
        ys, xs = np.nonzero(m)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill[f.shape].append(m.sum() / box)
        area[f.shape, f.size].append(m.sum())
    # Fraction of the bounding box covered: square ~1, circle ~pi/4, triangle ~1/2.
    assert min(fill["square"]) > 0.85
    assert 0.68 < min(fill["circle"]) and max(fill["circle"]) < 0.92
    assert max(fill["triangle"]) < 0.65
    for shape in SHAPES:  # radii differ 0.16 / 0.11, so areas ~2.1x
        assert min(area[shape, "large"]) > 1.5 * max(area[shape, "small"])


def test_stripes_only_on_striped_shapes():
    images, factors = ShapesWorld(image_size=64, seed=4).sample(200, size="large", shape="square")
    for img, f in zip(images, factors):
        x, y = int(f.center[0]), int(f.center[1])
        column = img[:, x].astype(int).sum(-1)
        inside = column[int(y - 0.6 * f.radius): int(y + 0.6 * f.radius)]  # well inside the square
        dark = inside < 0.6 * column[y]
        assert dark.any() == (f.texture == "striped")


def test_words_are_written_in_their_row_only():
    images, factors = ShapesWorld(image_size=64, seed=5, text_prob=0.5).sample(300)
    white = images.min(-1) > 180
    for w, f in zip(white, factors):
        if f.text is None:
            assert not w.any()
            continue
        ys = np.nonzero(w.any(1))[0]
        row = ["top", "middle", "bottom"].index(f.text_row)
        assert ys.min() >= row * 64 // 3 - 1 and ys.max() <= (row + 1) * 64 // 3 + 1
        assert f.text_row != ["top", "middle", "bottom"][POSITIONS.index(f.position) // 3]
    # Different words leave different marks.
    world = ShapesWorld(image_size=64, seed=0)
    red, _ = world.sample(1, text_prob=1.0, text="red", position="center")
    world = ShapesWorld(image_size=64, seed=0)
    blue, _ = world.sample(1, text_prob=1.0, text="blue", position="center")
    assert not np.array_equal(red.min(-1) > 180, blue.min(-1) > 180)


def test_captions():
    world = ShapesWorld(image_size=32, seed=0)
    _, (f,) = world.sample(1, color="orange", shape="circle", position="left", size="large", texture="striped")
    assert caption(f) == "an orange circle on the left"
    assert caption(f, size=True, texture=True) == "a large striped orange circle on the left"
    _, (g,) = world.sample(1, color="red", position="top right", text_prob=1.0, text="blue")
    assert caption(g).startswith("a red ") and caption(g).endswith(" in the top right with the word blue")
    assert caption(g, text=False).endswith("in the top right")
    _, (h,) = world.sample(1, color="blue", shape="square", position="top", size="small", texture="plain")
    assert caption(h, size=True, texture=True) == "a small plain blue square at the top"
    caps = all_captions()
    assert len(caps) == len(set(caps)) == 6 * 3 * 9
    for c, factors in zip(caps, class_factor_combinations()):
        assert caption(factors) == c
    assert len(set(all_captions(("color", "shape", "position", "size")))) == 6 * 3 * 9 * 2
    with_words = all_captions(("color", "shape", "position", "text"))
    assert len(set(with_words)) == 6 * 3 * 9 * 9 and with_words[0] == "a red circle in the top left with the word red"
    vocab = set(caption_vocabulary())
    assert all(set(c.split()) <= vocab for c in caps)


def test_restrictions_and_errors():
    world = ShapesWorld(image_size=32, seed=0)
    _, fs = world.sample(50, color=["red", "blue"], shape="triangle")
    assert {f.color for f in fs} <= {"red", "blue"} and {f.shape for f in fs} == {"triangle"}
    with pytest.raises(ValueError, match="color values are"):
        world.sample(1, color="pink")
    with pytest.raises(ValueError, match="image_size"):
        ShapesWorld(image_size=8)
    with pytest.raises(ValueError, match="probability"):
        ShapesWorld(text_prob=2.0)


def test_thousand_images_generate():
    images, factors = ShapesWorld(image_size=64, seed=0, text_prob=0.3).sample(1000)
    assert images.shape == (1000, 64, 64, 3) and len(factors) == 1000
    x, _ = ShapesWorld(image_size=32, seed=0).sample(4, as_tensor=True)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_render_reproduces_sample():
    world = ShapesWorld(image_size=32, seed=9, text_prob=0.5)
    images, factors = world.sample(50)
    assert np.array_equal(world.render(factors), images)


def test_dataset():
    ds = ShapesDataset(20, seed=1, image_size=32)
    x, cap = ds[3]
    assert x.shape == (3, 32, 32) and cap == caption(ds.factors[3])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 32, 32) and len(batch[1]) == 8
    labels = ds.labels()
    assert [COLORS_LIST[i] for i in labels["color"]] == [f.color for f in ds.factors]


COLORS_LIST = list(COLORS)
