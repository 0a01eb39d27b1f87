"""The command-line options several ``sae-lens-mm`` subcommands share, registered by one function each so
that every subcommand spells and explains them the same way.

Old spellings keep working through :func:`add_deprecated_alias`: the value lands where the new spelling's
would, and a one-line deprecation message goes to stderr.

================================  ==========================================================
option                            old spellings (deprecated)
================================  ==========================================================
``--model-kind vision``           ``--model-kind vit``
``--sae-path DIR``                ``--sae DIR`` (``evaluate``)
``--num-inference-steps N``       ``--steps N`` (``dashboards``, ``demo``)
``--n-images N``                  ``--images N`` (``demo``, where it was a count)
``--n-prompts N``                 ``--prompts N`` (``demo``, where it was a count)
``--top-features N``              ``--features N`` (``demo``, where it was a count)
================================  ==========================================================
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Union

from sae_lens_multimodal.core.denoising import CFG_BRANCHES
from sae_lens_multimodal.core.sae_metadata import MODEL_KIND_ALIASES, MODEL_KINDS

__all__ = [
    "add_deprecated_alias",
    "add_model_option",
    "add_model_kind_option",
    "add_sae_options",
    "add_num_inference_steps_option",
    "add_cfg_branch_option",
    "add_seed_option",
    "add_no_progress_option",
]

Group = Union[argparse.ArgumentParser, "argparse._ArgumentGroup"]

def _deprecation(old: str, new: str, prog: str = "sae-lens-mm") -> None:
    print(f"{prog}: warning: {old} is deprecated; use {new}.", file=sys.stderr)


class _DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new option's destination and says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, canonical: str = "", **kwargs: Any) -> None:
        self.canonical = canonical
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        _deprecation(str(option_string), self.canonical, parser.prog)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(group: Group, old: str, canonical: argparse.Action) -> argparse.Action:
    """Register ``old`` as a deprecated spelling of the option ``canonical`` (same destination, type
    and choices); it is listed in --help as deprecated."""
    new = canonical.option_strings[0]
    return group.add_argument(old, dest=canonical.dest, action=_DeprecatedAlias, canonical=new,
                              type=canonical.type, choices=canonical.choices, metavar=canonical.metavar,
                              default=canonical.default, help=f"deprecated spelling of {new}")


def add_model_option(group: Group, *, required: bool = True, help: Optional[str] = None) -> argparse.Action:
    """``--model NAME``: anything :func:`sae_lens_multimodal.models.loading.load_model` loads."""
    return group.add_argument(
        "--model", required=required,
        help=help or "model name or directory: a registered name (shapes-clip, shapes-diffusion), a library-prefixed "
                     "name (open-clip:ViT-B-32/<tag>, timm:<name>), a Hugging Face repo id or a local directory "
                     "(a diffusers pipeline has a model_index.json)")


def _model_kind(value: str) -> str:
    if value in MODEL_KIND_ALIASES:
        _deprecation(f"--model-kind {value}", f"--model-kind {MODEL_KIND_ALIASES[value]}")
        return MODEL_KIND_ALIASES[value]
    return value


def add_model_kind_option(group: Group, *, help_suffix: str = "") -> argparse.Action:
    """``--model-kind {vision,clip,vlm,diffusion}`` (default: detected from --model)."""
    return group.add_argument(
        "--model-kind", type=_model_kind, choices=MODEL_KINDS, metavar="{" + ",".join(MODEL_KINDS) + "}",
        default=None,
        help="what --model is: a vision transformer alone, a CLIP (image and text towers), a vision-language "
             "model or a diffusion pipeline (default: detected from the name; 'vit' is the deprecated spelling "
             "of 'vision')" + help_suffix)


def add_sae_options(group: Group, *, deprecated_sae: bool = False) -> tuple[argparse.Action, ...]:
    """``--release R --sae-id ID`` (``SAE.from_pretrained``) or ``--sae-path DIR`` (``SAE.load_from_disk``);
    with ``deprecated_sae`` also the old ``--sae DIR``."""
    release = group.add_argument("--release", help="SAE release for SAE.from_pretrained (list them: sae-lens-mm releases)")
    sae_id = group.add_argument("--sae-id", help="SAE id within --release")
    path = group.add_argument("--sae-path", metavar="DIR",
                              help="directory of an SAE saved with SAELens (save_model / save_inference_model; "
                                   "SAE.load_from_disk), instead of --release")
    if deprecated_sae:
        add_deprecated_alias(group, "--sae", path)
    return release, sae_id, path


def add_num_inference_steps_option(group: Group, *, default: Optional[int] = 20,
                                   deprecated_steps: bool = False, type: Any = int) -> argparse.Action:
    """``--num-inference-steps N``: denoising steps of a diffusion pipeline (``--steps`` deprecated)."""
    action = group.add_argument(
        "--num-inference-steps", type=type, default=default,
        help="diffusion: denoising steps" + (f" (default: {default})" if default is not None else ""))
    if deprecated_steps:
        add_deprecated_alias(group, "--steps", action)
    return action


def add_cfg_branch_option(group: Group, help: str) -> argparse.Action:
    """``--cfg-branch {cond,uncond,both}`` (the classifier-free guidance branch vocabulary)."""
    return group.add_argument("--cfg-branch", choices=CFG_BRANCHES, help=help)


def add_seed_option(group: Group, *, default: Optional[int] = 0, help: str = "random seed") -> argparse.Action:
    return group.add_argument("--seed", type=int, default=default,
                              help=help + (f" (default: {default})" if default is not None else ""))


def add_no_progress_option(group: Group) -> argparse.Action:
    return group.add_argument("--no-progress", action="store_true", help="no progress bars")
