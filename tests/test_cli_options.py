"""Shared command-line options: one spelling across subcommands, the old spellings still work and say so."""

from __future__ import annotations

import argparse

import pytest

from sae_lens_multimodal.cli import build_parser


def _parse(capsys, *argv):
    args = build_parser().parse_args(list(argv))
    return args, capsys.readouterr().err


def _subparsers():
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command, old, new, dest, value", [
    ("evaluate", "--sae", "--sae-path", "sae_path", "some/dir"),
    ("dashboards", "--steps", "--num-inference-steps", "num_inference_steps", 3),
    ("demo", "--steps", "--num-inference-steps", "num_inference_steps", 3),
    ("demo", "--images", "--n-images", "n_images", 48),
    ("demo", "--prompts", "--n-prompts", "n_prompts", 5),
    ("demo", "--features", "--top-features", "top_features", 4),
])
def test_an_old_spelling_sets_the_new_option_and_says_it_is_deprecated(capsys, command, old, new, dest, value):
    required = {"evaluate": [], "dashboards": ["--model", "m", "--out", "o"], "demo": []}[command]
    args, err = _parse(capsys, command, *required, old, str(value))
    assert getattr(args, dest) == value
    assert f"{old} is deprecated; use {new}" in err
    args, err = _parse(capsys, command, *required, new, str(value))
    assert getattr(args, dest) == value and "deprecated" not in err


def test_model_kind_vit_is_the_deprecated_spelling_of_vision(capsys):
    args, err = _parse(capsys, "cache", "--model", "m", "--model-kind", "vit")
    assert args.model_kind == "vision" and "--model-kind vit is deprecated; use --model-kind vision" in err
    for kind in ("vision", "clip", "vlm", "diffusion"):
        args, err = _parse(capsys, "train", "--model-kind", kind)
        assert args.model_kind == kind and err == ""
    with pytest.raises(SystemExit):
        _parse(capsys, "cache", "--model-kind", "unet")
    assert "invalid choice" in capsys.readouterr().err


def test_shared_options_are_spelled_and_valued_the_same_everywhere():
    sub = _subparsers()
    seen: dict[str, dict[str, tuple]] = {}
    for command, parser in sub.items():
        for action in parser._actions:
            for opt in action.option_strings:
                seen.setdefault(opt, {})[command] = (tuple(action.choices) if action.choices else None)
    # one spelling for the SAE directory and the denoising steps; the old ones only as deprecated aliases
    assert set(seen["--sae-path"]) == {"evaluate", "dashboards", "steerability", "circuit"}
    assert set(seen["--sae"]) == {"evaluate"}
    assert set(seen["--num-inference-steps"]) >= {"cache", "evaluate", "dashboards", "demo"}
    assert set(seen["--model-kind"]) == {"cache", "train", "evaluate", "dashboards", "steerability", "hooks", "circuit"}
    assert len(set(seen["--model-kind"].values())) == 1
    assert set(seen["--cfg-branch"].values()) == {("cond", "uncond", "both")}
    for opt in ("--release", "--sae-id", "--sae-path"):  # (`releases --release` filters the list: another meaning)
        helps = {c: next(a.help for a in sub[c]._actions if opt in a.option_strings) for c in seen[opt] if c != "releases"}
        assert len(set(helps.values())) == 1, (opt, helps)
