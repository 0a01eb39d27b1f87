"""``sae-lens-mm dashboards``: feature dashboards for a named model and SAE from the command line, their pages
in headless Chromium, and its errors."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sae_lens_multimodal.cli import main
from sae_lens_multimodal.world import ShapesWorld, to_tensor

VISION = ["--model", "shapes-clip", "--release", "shapes-clip-saes", "--sae-id", "blocks.2.hook_resid_post"]
DIFFUSION = ["--model", "shapes-diffusion", "--release", "shapes-diffusion-saes",
             "--sae-id", "up_blocks.0.attentions.1.hook_out"]
VISION_SECTIONS = ["summary", "labels", "top", "histogram", "steering"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["dashboards", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _check_pages(browser, out_dir, pages, sections, index_sections):
    """The index and each feature page load in Chromium without errors, every image decodes, the expected
    sections exist, and every local link resolves."""
    index = browser.check(out_dir / "index.html", sections=index_sections)
    assert index.ok, index.problems
    linked = [h for h in index.links if h and not h.startswith("#")]
    assert sorted(linked) == sorted(pages), linked
    for name in pages:
        page = browser.check(out_dir / name, sections=sections)
        assert page.ok, (name, page.problems)
        assert page.n_images >= 3
        assert all((out_dir / h).is_file() for h in page.links if h and not h.startswith("#"))


def _write_pngs(folder, images, sizes=None):
    folder.mkdir()
    names = []
    for i, im in enumerate(images):
        pil = Image.fromarray(im)
        if sizes is not None:
            pil = pil.resize(sizes[i % len(sizes)], Image.NEAREST)
        name = f"img_{i:02d}.png"
        pil.save(folder / name)
        names.append(name)
    return names


def test_vision_dashboards_on_shapes_images(tmp_path, capsys, browser):
    out = tmp_path / "v"
    rc, stdout, err = _run(capsys, *VISION, "--images", "shapes:16", "--features", "3,17", "--out", str(out),
                           "--steer-images", "8")
    assert rc == 0, err
    assert f"{out / 'index.html'}" in stdout and "2 features" in stdout and "16 shapes-world images" in stdout
    pages = ["vision-feature-3.html", "vision-feature-17.html"]
    assert sorted(p.name for p in out.glob("*.html")) == sorted(["index.html", *pages])
    page = (out / "vision-feature-3.html").read_text()
    # the shapes defaults: world captions under the top images, labels from the world's words, 162 classes
    assert re.search(r"a (red|green|blue|yellow|purple|orange) (circle|square|triangle)", page)
    assert "zero-shot over 162 classes on 8 images" in html.unescape(page)
    _check_pages(browser, out, pages, VISION_SECTIONS, ["vision-features"])


@torch.no_grad()
def test_vision_dashboards_on_a_folder_of_pngs(tmp_path, capsys, browser, shapes_clip):
    from sae_lens import SAE

    from sae_lens_multimodal.reports.cli import load_images

    images, _ = ShapesWorld(image_size=32, seed=5).sample(6)
    folder = tmp_path / "pngs"
    names = _write_pngs(folder, images)
    (folder / "notes.txt").write_text("not an image")
    # the folder's images go through the model's own preprocessing: the shapes CLIP's normalisation
    loaded = load_images(str(folder), shapes_clip.vision)
    assert loaded.captions == names
    torch.testing.assert_close(loaded.inputs, to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3), atol=1e-6, rtol=0)

    out = tmp_path / "folder"
    rc, stdout, err = _run(capsys, *VISION, "--images", str(folder), "--features", "5", "--top-k", "3",
                           "--out", str(out))
    assert rc == 0, err
    assert "6 images from" in stdout
    # the first top image is the one where the feature is strongest (computed here, independently)
    sae = SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post")
    _, cache = shapes_clip.vision.run_with_cache(loaded.inputs, names_filter=["blocks.2.hook_resid_post"])
    strength = sae.encode(cache["blocks.2.hook_resid_post"])[..., 5].amax(1)
    page = html.unescape((out / "vision-feature-5.html").read_text())
    shown = re.findall(r"([0-9.]+) (?:\(CLS\) )?\u00b7 (img_\d\d\.png)", page)
    assert shown and shown[0][1] == names[int(strength.argmax())]
    assert float(shown[0][0]) == pytest.approx(float(strength.max()), abs=0.006)
    _check_pages(browser, out, ["vision-feature-5.html"], VISION_SECTIONS, ["vision-features"])


def test_diffusion_dashboards_from_a_prompts_file(tmp_path, capsys, browser):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n\na blue square at the top\n")
    out = tmp_path / "d"
    rc, stdout, err = _run(capsys, *DIFFUSION, "--prompts", str(prompts), "--steps", "3", "--top-features", "1",
                           "--steer-prompts", "1", "--out", str(out))
    assert rc == 0, err
    assert "2 prompts" in stdout
    pages = [p.name for p in out.glob("diffusion-feature-*.html")]
    assert len(pages) == 1
    page = (out / pages[0]).read_text()
    assert "a red circle on the left" in page and "CLIP: " in page  # prompts as captions, read by shapes-clip
    _check_pages(browser, out, pages, ["summary", "top", "histogram", "timesteps", "generations", "steering"],
                 ["diffusion-features"])


@torch.no_grad()
def test_a_transformers_vit_directory_and_an_sae_directory(tmp_path, capsys, browser):
    """A model that is not registered and not a CLIP loads as a HookedViT; the SAE comes from --sae-path;
    images of different sizes go through the checkpoint's own image processor."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    vit_dir = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    sae.W_enc.normal_()
    sae.b_enc.fill_(0.1)
    sae.save_model(tmp_path / "sae")
    images, _ = ShapesWorld(image_size=32, seed=2).sample(5)
    _write_pngs(tmp_path / "pngs", images, sizes=[(32, 32), (48, 40)])

    base = ["--model", str(vit_dir), "--sae-path", str(tmp_path / "sae"), "--images", str(tmp_path / "pngs")]
    rc, _, err = _run(capsys, *base, "--classes", str(tmp_path / "x.txt"), "--out", str(tmp_path / "no"))
    assert rc == 2 and "--classes needs a CLIP" in err
    out = tmp_path / "vit-dash"
    rc, stdout, err = _run(capsys, *base, "--top-features", "2", "--out", str(out))
    assert rc == 0, err
    assert "vision model" in stdout and "5 images from" in stdout
    pages = sorted(p.name for p in out.glob("vision-feature-*.html"))
    assert len(pages) == 2
    assert "No text labels or zero-shot steering" in (out / pages[0]).read_text()
    _check_pages(browser, out, pages, ["summary", "top", "histogram"], ["vision-features"])


def test_display_of_transformers_preprocessed_images_is_unnormalised_with_the_processors_statistics():
    from transformers import CLIPImageProcessor

    from sae_lens_multimodal.models.conversions._hf_common import HFImagePreprocess
    from sae_lens_multimodal.reports.dashboard_data import _model_inputs

    class Tower:
        preprocess = HFImagePreprocess(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32))

    images, _ = ShapesWorld(image_size=32, seed=1).sample(2)
    x = torch.stack([Tower.preprocess(Image.fromarray(im)) for im in images])
    _, display = _model_inputs(Tower(), x)
    diff = np.abs(np.stack(display).astype(int) - images.astype(int))
    assert diff.max() <= 1, diff.max()  # with min-max scaling of the batch the colours would be off


@pytest.mark.parametrize("argv, message", [
    (["--model", "shapes-clip", "--images", "shapes:4"], "No SAE given"),
    ([*VISION, "--images", "{tmp}/missing"], "No images folder at"),
    ([*VISION, "--images", "{tmp}/empty"], "No image files in"),
    ([*VISION, "--images", "shapes:x"], "shapes:N"),
    (["--model", "shapes-clip", "--release", "shapes-clip-saes", "--images", "shapes:4"], "--release and --sae-id go together"),
    ([*VISION, "--sae-path", "{tmp}", "--images", "shapes:4"], "not both"),
    ([*VISION, "--prompts", "shapes:2"], "give it --images"),
    ([*DIFFUSION, "--images", "shapes:2"], "give it --prompts"),
    ([*DIFFUSION, "--prompts", "{tmp}/empty/prompts.txt"], "has no prompts"),
    (["--model", "./no-such-model", "--release", "shapes-clip-saes", "--sae-id", "blocks.2.hook_resid_post"],
     "No model directory"),
    # the SAE's hook is not in the model: the package's unknown-hook error, with close matches
    (["--model", "shapes-clip", "--release", "shapes-diffusion-saes", "--sae-id", "up_blocks.0.attentions.1.hook_out",
      "--images", "shapes:4"], "Unknown vision hook of this SAE 'up_blocks.0.attentions.1.hook_out'"),
    (["--model", "shapes-diffusion", "--release", "shapes-clip-saes", "--sae-id", "blocks.2.hook_resid_post",
      "--prompts", "shapes:1", "--steps", "1"], "Unknown hook 'blocks.2.hook_resid_post'"),
    ([*DIFFUSION, "--prompts", "shapes:1", "--judge-clip", "{tmp}/empty"], "needs --classes FILE"),
])
def test_errors_name_the_problem(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "prompts.txt").write_text("\n\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, stdout, err = _run(capsys, *argv, "--out", str(tmp_path / "out"))
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_features_and_top_features_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dashboards", *VISION, "--features", "1,2", "--top-features", "3", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_foreign_output_directory_is_refused_before_any_work(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    rc, _, err = _run(capsys, "--model", "shapes-clip", "--out", str(mine))  # no SAE: the directory is checked first
    assert rc == 2 and "not written by sae-lens-mm" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
