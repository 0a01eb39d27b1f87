"""The shapes-world demo end to end (small configuration), its command line, and its pages in Chromium."""

from __future__ import annotations

import re

import pytest

from sae_lens_multimodal.world.demo import (
    DIFFUSION_RELEASE,
    VISION_RELEASE,
    BundledSAEMissingError,
    DemoConfig,
    load_bundled_sae,
    run_shapes_demo,
)
from sae_lens_multimodal.world import ShapesWorld, to_tensor
from tests.reports._saes import concept_sae, random_timestep_sae
from tests.reports.conftest import browser, shapes_clip, shapes_pipe  # noqa: F401  (the report tests' fixtures)

REPORT_SECTIONS = ["setup", "activations", "labels", "top-images", "steering", "timesteps", "generations", "vlm",
                   "diffusion-models", "dashboards"]


def _bundled_available() -> bool:
    try:
        load_bundled_sae(*VISION_RELEASE)
        load_bundled_sae(*DIFFUSION_RELEASE)
    except BundledSAEMissingError:
        return False
    return True


def _check_site(browser, result, tmp_path):
    """Open the report, the dashboard index and one page per kind; every local link must resolve."""
    report = browser.check(result.report, sections=REPORT_SECTIONS, screenshot=tmp_path / "report.png")
    assert report.ok, report.problems
    assert report.n_images >= 20
    local = [h for h in report.links if h and not h.startswith("#")]
    assert local and all((result.out_dir / h).is_file() for h in local), local
    pages = [result.dashboards_index] + [result.out_dir / "dashboards" / next(d.file_name for d in result.dashboards
                                                                             if d.kind == k) for k in ("vision", "diffusion")]
    for p in pages:
        check = browser.check(p)
        assert check.ok, (p, check.problems)
        assert all((p.parent / h).is_file() for h in check.links if h and not h.startswith("#"))
    assert (tmp_path / "report.png").stat().st_size > 20_000
    return report


def test_quick_demo_writes_a_complete_report(tmp_path, browser, shapes_clip, capsys):
    images, factors = ShapesWorld(image_size=32, seed=3).sample(160)
    vision_sae = concept_sae(shapes_clip, to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3), factors, images)
    cfg = DemoConfig.quick()
    result = run_shapes_demo(tmp_path / "out", cfg, vision_sae=vision_sae, diffusion_sae=random_timestep_sae(),
                             progress=True)
    # the stage bar reaches its end (the VLM stage once left it at 6/7)
    bar = re.findall(r"shapes demo: *(\d+)%\|[^|]*\| *(\d+)/(\d+)", capsys.readouterr().err)
    assert bar and bar[-1][0] == "100" and bar[-1][1] == bar[-1][2]
    kinds = [d.kind for d in result.dashboards]
    assert kinds.count("vision") == cfg.n_vision_features and kinds.count("diffusion") == cfg.n_diffusion_features
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.html", "dashboards", ".sae-lens-mm-report"}
    assert len(list((tmp_path / "out" / "dashboards").glob("*.html"))) == len(kinds) + 1
    html = result.report.read_text()
    # the labels table states, per feature, the labels and the ground-truth factor its top images share
    for check in result.label_checks:
        assert f"feature {check['feature']}" in html and 0 < check["shared_count"] <= check["n_top"]
        assert check["causal"] is not None and check["direct_path"] is not None
    assert re.search(r"steered|clamped t \d+", html) and "CLIP: " in html
    # the shapes-vlm section: one question per factor on a few images, the knockout curve, steered answers
    assert "what color is the shape ?" in html and "bridge blocks:" in html and "clamped: red (feature" in html
    assert "shapes-vlm: answers, knockout, steering" in result.timings
    # diffusion models side by side (world/diffusion_report.py): both models, the lens, head roles, features over time
    assert "diffusion models side by side" in result.timings
    assert "shapes-dit (DiT)" in html and "Diffusion lens" in html and "Features across time" in html
    _check_site(browser, result, tmp_path)
    assert set(result.timings) >= {"load models and SAEs", "cache activations", "total", "write report"}


def test_demo_command_loads_the_bundled_saes_by_name(tmp_path, capsys):
    from sae_lens_multimodal.cli import main

    rc = main(["demo", "--out", str(tmp_path / "cli"), "--quick", "--no-progress", "--images", "48"])
    out, err = capsys.readouterr()
    if _bundled_available():
        assert rc == 0, err
        assert f"Report: {tmp_path / 'cli' / 'report.html'}" in out
        assert (tmp_path / "cli" / "dashboards" / "index.html").is_file()
    else:  # not shipped in this checkout: a clear error naming the release and how to get it
        assert rc == 2 and "shapes-" in err and "train_saes" in err


def test_demo_refuses_a_foreign_output_directory_before_working(tmp_path, capsys):
    from sae_lens_multimodal.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    assert main(["demo", "--out", str(mine), "--quick", "--no-progress"]) == 2
    assert "not written by sae-lens-mm" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_a_missing_release_is_a_clear_error():
    with pytest.raises(BundledSAEMissingError, match="(?s)no-such-release.*run_shapes_demo"):
        load_bundled_sae("no-such-release", "blocks.2.hook_resid_post")


@pytest.mark.slow
def test_full_demo_with_the_bundled_saes(tmp_path, browser):
    if not _bundled_available():
        pytest.skip("the bundled shapes SAE releases are not in this checkout")
    result = run_shapes_demo(tmp_path / "full", DemoConfig(), progress=False)
    _check_site(browser, result, tmp_path)
    named = sum(1 for c in result.label_checks if c["causal"] == c["shared_value"])
    print(f"demo: {result.timings['total']:.0f} s; causal label names the shared factor for {named}/"
          f"{len(result.label_checks)} features")
