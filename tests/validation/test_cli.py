"""The command line's boundary (issue 15): every error is ONE stderr line ``sae-lens-mm <command>: error:
<message>`` naming the offending value, exit status 2, no traceback unless ``--debug``; argparse's own
errors look the same. Also ``--version``, ``--threads``, the lazy ``--help`` and ``sae-lens-mm hooks``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_lens_multimodal import cli
from sae_lens_multimodal._version import __version__
from sae_lens_multimodal.cli import COMMANDS, build_parser, main

SHAPES_CLIP_RELEASE = "shapes-clip-saes"


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) as the console script runs it: argparse's exits become their status."""
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(capsys, argv: list[str], command: str | None, *named: str) -> str:
    rc, out, err = _run(capsys, argv)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].strip(), err
    prefix = f"sae-lens-mm {command}: error: " if command else "sae-lens-mm: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------- argparse's own errors
@pytest.mark.parametrize("argv, command, named", [
    (["releases", "--bogus"], "releases", ["--bogus", "--help"]),
    (["releases", "--threads", "0"], "releases", ["'0'", "positive integer"]),
    (["--threads", "-3", "releases"], None, ["'-3'", "positive integer"]),
    (["hooks"], "hooks", ["MODEL"]),
    (["no-such-command"], None, ["'no-such-command'"]),
    (["demo", "--n-images", "-5"], "demo", ["'-5'", "--n-images"]),
    (["demo", "--n-prompts", "0"], "demo", ["'0'", "--n-prompts"]),
    (["demo", "--num-inference-steps", "0"], "demo", ["'0'", "--num-inference-steps"]),
    (["dashboards", "--model", "m", "--out", "o", "--top-k", "0"], "dashboards", ["'0'", "--top-k"]),
    (["dashboards", "--model", "m", "--out", "o", "--steer-prompts", "-1"], "dashboards", ["'-1'", "--steer-prompts"]),
    (["dashboards", "--model", "m", "--out", "o", "--clamp-multiplier", "nan"], "dashboards", ["'nan'"]),
    (["dashboards", "--model", "m", "--out", "o", "--guidance-scale", "-2"], "dashboards", ["'-2'"]),
    (["steerability", "--model", "m", "--sae-path", "s", "--quantile", "1.5"], "steerability", ["'1.5'", "quantile"]),
    (["steerability", "--model", "m", "--sae-path", "s", "--n-images", "0"], "steerability", ["'0'", "--n-images"]),
    (["steerability", "--model", "m", "--sae-path", "s", "--batch-size", "-8"], "steerability", ["'-8'"]),
    (["ground-truth", "--threads", "0"], "ground-truth", ["'0'"]),
    (["cache", "--threads", "two"], "cache", ["'two'"]),
])
def test_argparse_errors_are_one_line_naming_the_value(capsys, argv, command, named):
    _one_error_line(capsys, argv, command, *named)


# ------------------------------------------------------------------------------- errors of the handlers
@pytest.mark.parametrize("argv, named", [
    (["releases", "--release", "nonexistent"], ["'nonexistent'", "sae-lens-mm releases"]),
    (["releases", "--runs", "shapes-clip-sae"], ["'shapes-clip-sae'", "Did you mean", "'shapes-clip-saes'"]),
    (["releases", "--model", "no-such-model-at-all"], ["'no-such-model-at-all'", "'shapes-clip'"]),
    (["releases", "--hook", "blocks.3.hook_resid_pst"], ["'blocks.3.hook_resid_pst'", "'blocks.3.hook_resid_post'"]),
])
def test_release_filters_that_match_nothing_are_typos_with_close_matches(capsys, argv, named):
    _one_error_line(capsys, argv, "releases", *named)


def test_filters_that_each_match_but_not_together_print_an_empty_table(capsys):
    rc, out, err = _run(capsys, ["releases", "--model", "sdxl-turbo", "--hook", "blocks.0.hook_resid_post"])
    assert rc == 0 and "(0 SAEs)" in out and "drop one" in err


def test_model_name_typo_lists_close_matches(capsys):
    _one_error_line(capsys, ["hooks", "shapes-clp"], "hooks", "'shapes-clp'", "Did you mean", "'shapes-clip'")


def test_hooks_filter_matching_nothing(capsys):
    _one_error_line(capsys, ["hooks", "shapes-clip", "--filter", "blocks.1.hook_resid_pst"], "hooks",
                    "'blocks.1.hook_resid_pst'", "vision.blocks.1.hook_resid_post")


def test_sae_id_and_release_typos_name_close_matches(tmp_path, capsys):
    base = ["dashboards", "--model", "shapes-clip", "--out", str(tmp_path / "out")]
    _one_error_line(capsys, base + ["--release", SHAPES_CLIP_RELEASE, "--sae-id", "blocks.2.hook_resid_pst"],
                    "dashboards", "'blocks.2.hook_resid_pst'", "'blocks.2.hook_resid_post'")
    _one_error_line(capsys, base + ["--release", "shapes-clip-sae", "--sae-id", "blocks.2.hook_resid_post"],
                    "dashboards", "'shapes-clip-sae'", "'shapes-clip-saes'")
    assert not (tmp_path / "out").exists()


def _existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    return path


def test_out_that_is_an_existing_file_is_refused(tmp_path, capsys):
    path = _existing_file(tmp_path)
    sae = ["--release", SHAPES_CLIP_RELEASE, "--sae-id", "blocks.2.hook_resid_post"]
    _one_error_line(capsys, ["dashboards", "--model", "shapes-clip", *sae, "--out", str(path)], "dashboards", str(path))
    _one_error_line(capsys, ["demo", "--quick", "--out", str(path)], "demo", str(path))
    assert path.read_text() == "mine"


def test_out_holding_another_artefact_is_refused(tmp_path, capsys):
    sae_dir = tmp_path / "my-sae"
    sae_dir.mkdir()
    (sae_dir / "cfg.json").write_text("{}")
    sae = ["--release", SHAPES_CLIP_RELEASE, "--sae-id", "blocks.2.hook_resid_post"]
    line = _one_error_line(capsys, ["dashboards", "--model", "shapes-clip", *sae, "--out", str(sae_dir)],
                           "dashboards", str(sae_dir))
    assert "SAE" in line
    _one_error_line(capsys, ["demo", "--quick", "--out", str(sae_dir)], "demo", str(sae_dir))
    assert sorted(p.name for p in sae_dir.iterdir()) == ["cfg.json"]


def test_a_non_image_file_in_images_is_refused_naming_it(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "photo.png").write_text("this is no PNG")
    out = tmp_path / "out"
    _one_error_line(capsys, ["dashboards", "--model", "shapes-clip", "--release", SHAPES_CLIP_RELEASE, "--sae-id",
                             "blocks.2.hook_resid_post", "--images", str(images), "--out", str(out)],
                    "dashboards", "photo.png")
    assert not out.exists()


# ------------------------------------------------------------------------------- the one-line format
def _raising_handler(monkeypatch, error: BaseException) -> None:
    def handler(args):
        raise error

    monkeypatch.setattr(cli, "run_releases", handler)


def test_an_unexpected_exception_is_one_line_with_its_type_and_the_debug_hint(monkeypatch, capsys):
    _raising_handler(monkeypatch, RuntimeError("shape mismatch deep inside\nsecond line"))
    line = _one_error_line(capsys, ["releases"], "releases", "RuntimeError", "shape mismatch deep inside second line",
                           "--debug")
    assert line.endswith("(run with --debug for the traceback)")


def test_expected_errors_show_their_message_only_and_key_errors_unquoted(monkeypatch, capsys):
    _raising_handler(monkeypatch, KeyError("Unknown thing 'x'. Did you mean: 'y'?"))
    line = _one_error_line(capsys, ["releases"], "releases")
    assert line == "sae-lens-mm releases: error: Unknown thing 'x'. Did you mean: 'y'?"
    _raising_handler(monkeypatch, FileNotFoundError("No file at /nowhere: give an existing file."))
    assert _one_error_line(capsys, ["releases"], "releases").endswith("No file at /nowhere: give an existing file.")


@pytest.mark.parametrize("argv", [["--debug", "releases"], ["releases", "--debug"]])
def test_debug_before_or_after_the_command_shows_the_traceback(monkeypatch, capsys, argv):
    _raising_handler(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_debug_environment_variable(monkeypatch):
    _raising_handler(monkeypatch, ValueError("bad"))
    monkeypatch.setenv("SAE_LENS_MM_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        main(["releases"])


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    _raising_handler(monkeypatch, KeyboardInterrupt())
    rc, _, err = _run(capsys, ["releases"])
    assert rc == 130 and err.strip().splitlines() == ["sae-lens-mm releases: interrupted"]


def test_version(capsys):
    rc, out, _ = _run(capsys, ["--version"])
    assert rc == 0 and out.strip() == f"sae-lens-mm {__version__}"


# ------------------------------------------------------------------------------- --threads
@pytest.mark.parametrize("argv, threads", [
    (["--threads", "1", "releases", "--release", "shapes-clip-saes"], 1),
    (["releases", "--release", "shapes-clip-saes", "--threads", "2"], 2),
])
def test_threads_before_or_after_the_command_sets_torch_threads(capsys, argv, threads):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert main(argv) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert "shapes-clip-saes" in capsys.readouterr().out


def test_every_command_takes_threads_and_debug():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(sub) == set(COMMANDS)
    for name, parser in sub.items():
        options = {o for a in parser._actions for o in a.option_strings}
        assert {"--threads", "--debug"} <= options, name


def test_the_help_listing_matches_each_command_parser():
    action = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    assert helps == {name: help_text for name, (help_text, _) in COMMANDS.items()}


# ------------------------------------------------------------------------------- lazy --help, python -m
def test_help_imports_no_torch_sae_lens_or_transformers():
    code = ("import json, sys\nfrom sae_lens_multimodal.cli import build_parser, main\nbuild_parser([])\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([m for m in ('torch', 'sae_lens', 'transformers', 'transformer_lens', 'diffusers') "
            "if m in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "COMMAND" in run.stdout and "hooks" in run.stdout
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_python_dash_m_is_the_same_command_with_the_same_errors():
    run = subprocess.run([sys.executable, "-m", "sae_lens_multimodal", "releases", "--release", "nonexistent"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sae-lens-mm releases: error: ") and "'nonexistent'" in lines[0]


# ------------------------------------------------------------------------------- hooks
def test_hooks_lists_shapes_clip_hooks_of_both_towers(capsys):
    rc, out, _ = _run(capsys, ["hooks", "shapes-clip", "--filter", "*.blocks.0.hook_resid_post", "--json"])
    rows = {r["name"]: r for r in json.loads(out)}
    assert rc == 0 and set(rows) == {"vision.blocks.0.hook_resid_post", "text.blocks.0.hook_resid_post"}
    assert rows["vision.blocks.0.hook_resid_post"]["part"] == "vision"
    assert rows["text.blocks.0.hook_resid_post"]["shape"].startswith("[batch, pos, ")  # text length varies
    rc, out, _ = _run(capsys, ["hooks", "shapes-clip", "--filter", "vision.blocks.0.attn.hook_z"])
    assert rc == 0 and "vision.blocks.0.attn.hook_z" in out and "heads" in out and "(1 hooks)" in out


def test_hooks_shapes_are_the_shapes_a_forward_pass_records(tmp_path, capsys):
    import torch
    from transformers import ViTConfig, ViTModel

    from sae_lens_multimodal.models.loading import load_model

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                       image_size=24, patch_size=6), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    rc, out, _ = _run(capsys, ["hooks", str(tmp_path / "vit"), "--model-kind", "vision", "--json"])
    assert rc == 0
    listed = {r["name"]: r["shape"] for r in json.loads(out)}
    model = load_model(str(tmp_path / "vit"), kind="vision")
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randn(2, 3, 24, 24))
    recorded = {name: str(list(t.shape)).replace("'", "") for name, t in cache.items()}
    common = set(recorded) & set(listed)
    assert len(common) >= 0.8 * len(listed)  # hooks of the forward pass, as listed
    assert {n: listed[n].replace("batch", "2") for n in common} == {n: recorded[n] for n in common}
    assert listed["blocks.0.hook_resid_post"] == "[batch, 17, 24]"  # CLS + (24/6)^2 patches, width 24


# ------------------------------------------------------------------------------- name typos in the library
def test_library_name_typos_list_close_matches():
    from sae_lens_multimodal.models.registry import UnknownModelError, model_info
    from sae_lens_multimodal.pretrained import get_release

    with pytest.raises(UnknownModelError, match="Did you mean: 'shapes-clip'"):
        model_info("shapes-clp")
    with pytest.raises(KeyError, match="Did you mean: 'shapes-diffusion-saes'"):
        get_release("shapes-diffusion-sae")


def test_timm_architecture_typo_lists_close_matches():
    pytest.importorskip("timm")
    from sae_lens_multimodal.models.conversions import UnsupportedModelError
    from sae_lens_multimodal.models.loading import load_model

    with pytest.raises(UnsupportedModelError, match="(?s)vit_base_patch16_22.*Did you mean.*vit_base_patch16_224"):
        load_model("timm:vit_base_patch16_22", kind="vision")
