"""HTML building blocks: image encoding, heatmaps, tables, pages and atomic report directories."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sae_lens_multimodal.reports.html import (
    REPORT_MARKER,
    Page,
    comparison_grid,
    heatmap_overlay,
    histogram_png,
    image_grid,
    png_data_uri,
    table,
    timestep_curve_png,
    to_uint8_image,
    write_site,
)


def decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_png_round_trip_and_pixel_upscaling():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert (decode(png_data_uri(img)) == img).all()
    big = decode(png_data_uri(img, scale=3))
    assert big.shape == (18, 15, 3) and (big[::3, ::3] == img).all() and (big[2::3, 2::3] == img).all()


def test_image_inputs_are_read_as_uint8_and_bad_ranges_refused():
    t = torch.zeros(3, 4, 4)
    t[0] = 1.0  # red, channel-first, in [0, 1]
    arr = to_uint8_image(t)
    assert arr.shape == (4, 4, 3) and (arr[..., 0] == 255).all() and (arr[..., 1:] == 0).all()
    assert to_uint8_image(np.full((2, 2), 0.5)).shape == (2, 2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_image(np.full((2, 2, 3), -0.8))  # a normalised model input: say how to fix it


def test_heatmap_leaves_inactive_patches_untouched_and_colours_the_strongest():
    img = np.full((8, 8, 3), 40, dtype=np.uint8)
    values = np.zeros((2, 2))
    values[1, 0] = 3.0
    out = heatmap_overlay(img, values, alpha=0.5)
    assert (out[:4] == img[:4]).all() and (out[4:, 4:] == img[4:, 4:]).all()  # value 0: the image itself
    patch = out[4:, :4].reshape(-1, 3)
    assert (patch == patch[0]).all() and not (patch[0] == 40).all()  # one colour over the whole patch
    from matplotlib import colormaps

    top = np.array(colormaps["inferno"](1.0)[:3]) * 255
    assert np.abs(patch[0] - (0.5 * 40 + 0.5 * top)).max() <= 1  # full value: alpha-blend of the top colour
    half = heatmap_overlay(img, values, vmax=6.0, alpha=0.5)[4:, :4].reshape(-1, 3)[0]
    assert not (half == patch[0]).all()  # a shared scale changes the colour
    with pytest.raises(ValueError, match="does not tile"):
        heatmap_overlay(img, np.zeros((3, 3)))


def test_tables_escape_text_and_blocks_check_shapes():
    html = table([["<script>alert(1)</script>", 0.12345, 7]], ["name", "x", "n"], digits=2)
    assert "<script>" not in html and "&lt;script&gt;" in html and ">0.12<" in html and ">7<" in html
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        table([["a", 1]], ["a", "b", "c"])
    with pytest.raises(ValueError, match="1 images for 2 columns"):
        comparison_grid([[np.zeros((4, 4, 3), np.uint8)]], ["clean", "steered"])
    grid = image_grid([(np.zeros((4, 4, 3), np.uint8), "a <b>")])
    assert grid.count("<img") == 1 and "a &lt;b&gt;" in grid


def test_plots_are_png_data_uris():
    assert decode(histogram_png(np.random.default_rng(0).exponential(size=500))).shape[0] > 50
    assert decode(histogram_png([])).shape[0] > 50  # empty: a labelled empty plot, not an error
    uri = timestep_curve_png([999, 500, 1], {"f": ([0, 1, 2], [0, 0.5, 1], [0, 1.5, 3])})
    assert decode(uri).shape[1] > 100
    with pytest.raises(ValueError, match="one value per timestep"):
        timestep_curve_png([1, 2], {"f": ([0], [0], [0])})


def test_page_has_no_external_resources():
    page = Page("T <1>", subtitle="s", nav=[("other.html", "other")]).add("Part A", "<p>x</p>").add("Part A", "<p>y</p>")
    html = page.to_html()
    assert html.startswith("<!DOCTYPE html>") and "T &lt;1&gt;" in html
    assert 'id="s-part-a"' in html and 'id="s-part-a-1"' in html  # repeated headings get distinct ids
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_write_site_is_atomic_and_never_replaces_foreign_directories(tmp_path):
    out = tmp_path / "report"
    write_site(out, {"index.html": "<p>one</p>", "features/a.html": "<p>a</p>"})
    assert (out / "features" / "a.html").read_text() == "<p>a</p>" and (out / REPORT_MARKER).is_file()
    write_site(out, {"index.html": "<p>two</p>"})  # a report replaces a report, whole
    assert (out / "index.html").read_text() == "<p>two</p>" and not (out / "features").exists()
    with pytest.raises(ValueError, match="leaves the report directory"):
        write_site(out, {"index.html": "<p>three</p>", "../escape.html": "x"})
    assert (out / "index.html").read_text() == "<p>two</p>"  # the failed write left the old report
    assert sorted(os.listdir(tmp_path)) == ["report"]  # and no temporary directories
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by sae-lens-mm"):
        write_site(mine, {"index.html": ""})
    assert (mine / "notes.txt").read_text() == "keep me"
