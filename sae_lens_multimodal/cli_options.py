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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

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
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "ARTEFACTS",
    "artefacts_in",
    "check_output_dir",
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
    # here, not at the top: core/denoising imports torch, and `sae-lens-mm --help` imports none (the commands
    # with this option load torch anyway)
    from sae_lens_multimodal.core.denoising import CFG_BRANCHES

    return group.add_argument("--cfg-branch", choices=CFG_BRANCHES, help=help)


def add_seed_option(group: Group, *, default: Optional[int] = 0, help: str = "random seed") -> argparse.Action:
    return group.add_argument("--seed", type=int, default=default,
                              help=help + (f" (default: {default})" if default is not None else ""))


def add_no_progress_option(group: Group) -> argparse.Action:
    return group.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------- options of every command
#: Set to 1 for the same effect as ``--debug``.
DEBUG_ENV = "SAE_LENS_MM_DEBUG"


def add_global_options(parser: argparse.ArgumentParser, *, top_level: bool) -> argparse._ArgumentGroup:
    """``--threads N`` and ``--debug``, accepted before the subcommand (``top_level``) and after it. The
    subcommand's copies default to SUPPRESS so that they do not overwrite a value given before it."""
    group = parser.add_argument_group("options of every command")
    default: Any = None if top_level else argparse.SUPPRESS
    existing = parser._option_string_actions.get("--threads")
    if existing is not None:  # a command module's own --threads (ground-truth's script): keep it, same meaning
        existing.default = default
        existing.type = positive_int
    else:
        group.add_argument(
            "--threads", type=positive_int, metavar="N", default=default,
            help="torch CPU threads (torch.set_num_threads) for this run (default: torch's own, one per core). "
                 "Give 1 or 2 on a busy machine or when several jobs share it: a 20-step shapes-diffusion "
                 "generation takes 0.4 s with 1 thread and 10-30 s with the default on a loaded 2-core machine")
    group.add_argument(
        "--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
        help=f"show the full traceback of an error instead of one line (or set {DEBUG_ENV}=1)")
    return group


def apply_threads(threads: Optional[int]) -> None:
    """``--threads N``: torch's intra-op threads, and its inter-op threads when torch still allows
    changing them (only before its first parallel work). None leaves torch's defaults."""
    if threads is None:
        return
    import torch  # only here: building the parsers imports no torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already started: the intra-op setting above is what matters on a CPU
        pass


# ---------------------------------------------------------------------- value checks (argparse ``type=``)
# Each takes the text argparse gives (or a YAML value) and raises ArgumentTypeError naming the value and
# the fix; argparse turns that into one ``error: argument --x: ...`` line, exit status 2.
def _number(value: Any, kind: type) -> Union[int, float]:
    if isinstance(value, bool):  # a YAML ``true`` is no count
        raise ValueError(value)
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(str(value).strip())
    number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(value)
    return number


def _checked(value: Any, kind: type, ok: Any, wanted: str, fix: str) -> Any:
    try:
        number = _number(value, kind)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not {wanted}: {fix}") from None
    if not ok(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not {wanted}: {fix}")
    return number


def positive_int(value: Any) -> int:
    """A whole number >= 1 (sizes, counts, batch sizes)."""
    return _checked(value, int, lambda n: n >= 1, "a positive integer", "give a whole number of 1 or more")


def non_negative_int(value: Any) -> int:
    """A whole number >= 0 (offsets, warm-up steps, 'how many extra')."""
    return _checked(value, int, lambda n: n >= 0, "a non-negative integer", "give a whole number of 0 or more")


def positive_float(value: Any) -> float:
    """A finite number > 0 (learning rates, sizes in MiB, scales)."""
    return _checked(value, float, lambda n: n > 0, "a positive number", "give a finite number greater than 0")


def non_negative_float(value: Any) -> float:
    """A finite number >= 0 (coefficients, thresholds)."""
    return _checked(value, float, lambda n: n >= 0, "a non-negative number", "give a finite number of 0 or more")


# ---------------------------------------------------------------------- output directories
# How each artefact a command writes is recognised in a folder. The cache format name is
# training.cache.FORMAT_NAME, spelled here so that building a parser does not import torch.
_CACHE_FORMAT = "sae-lens-multimodal/activation-cache"
ARTEFACTS = {
    "cache": "an activation cache (metadata.json)",
    "sae": "a saved SAE (cfg.json / sae_weights.safetensors)",
    "report": "an HTML report (report.html / index.html)",
}


def _is_cache(folder: Path) -> bool:
    meta = folder / "metadata.json"
    if not meta.is_file():
        return False
    try:
        return _CACHE_FORMAT in meta.read_text(errors="replace")[:10_000]
    except OSError:
        return False


def _holds(folder: Path) -> set[str]:
    """The artefacts ``folder`` itself is (no look into sub-folders)."""
    found = set()
    if _is_cache(folder):
        found.add("cache")
    if (folder / "cfg.json").is_file() or (folder / "sae_weights.safetensors").is_file():
        found.add("sae")
    if (folder / "report.html").is_file() or (folder / "index.html").is_file():
        found.add("report")
    return found


def artefacts_in(folder: Union[str, Path]) -> set[str]:
    """The artefacts (keys of :data:`ARTEFACTS`) ``folder`` holds, itself or in its direct sub-folders
    (``cache --out`` holds one cache per hook, ``train`` with several caches one SAE per cache)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    found = _holds(folder)
    try:
        children = [c for c in folder.iterdir() if c.is_dir()]
    except OSError:
        return found
    for child in children:
        found |= _holds(child) - {"report"}  # (a report's own sub-pages are no separate artefact)
    return found


def check_output_dir(path: Union[str, Path], artefact: str, *, forbid_inside: Sequence[Union[str, Path]] = ()) -> Path:
    """Refuse (ValueError naming the path and the fix) an output folder that would mix ``artefact`` with
    something else: an existing file, a folder that is or holds another artefact (see
    :data:`ARTEFACTS`), a folder inside another artefact, or a folder inside one of ``forbid_inside``
    (e.g. the cache ``train`` reads). A folder already holding the same artefact is accepted (caches
    resume, SAEs are replaced). Returns the path."""
    if artefact not in ARTEFACTS:
        raise ValueError(f"Unknown artefact {artefact!r}; known: {sorted(ARTEFACTS)}.")
    out = Path(path)
    what = ARTEFACTS[artefact]
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output path {out} is an existing file, not a folder: give a new folder (or one holding "
                         f"{what}) for --out.")
    resolved = out.resolve()
    for inside in forbid_inside:
        other = Path(inside).resolve()
        if resolved == other or other in resolved.parents:
            where = "is" if resolved == other else "lies inside"
            raise ValueError(f"Output folder {out} {where} {inside}, which this command reads: give --out a "
                             f"folder outside it.")
    others = artefacts_in(out) - {artefact}
    if others:
        kinds = " and ".join(ARTEFACTS[o] for o in sorted(others))
        raise ValueError(f"Output folder {out} already holds {kinds}; writing {what} there would mix them: give "
                         f"--out a new or empty folder.")
    for parent in resolved.parents:
        held = _holds(parent) - {artefact}
        if held:
            raise ValueError(f"Output folder {out} lies inside {parent}, which holds "
                             f"{ARTEFACTS[sorted(held)[0]]}: give --out a folder outside it.")
    return out
