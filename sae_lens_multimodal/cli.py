"""Command line: ``sae-lens-mm <subcommand> ...`` (also ``python -m sae_lens_multimodal``).

Each subcommand is one ``add_<name>_command(subparsers)`` function that registers its parser and sets
``handler`` to the function that runs it; add new subcommands to :data:`COMMANDS`.

Errors: every exception a handler raises becomes one line ``sae-lens-mm <command>: error: <message>`` on
stderr and exit status 2 (argparse's own errors too: ``sae-lens-mm <command>: error: ... (see --help)``);
``--debug`` (or ``SAE_LENS_MM_DEBUG=1``) shows the traceback instead. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Callable, NoReturn, Optional

from sae_lens_multimodal._version import __version__
from sae_lens_multimodal.cli_options import DEBUG_ENV, add_global_options, add_model_kind_option, apply_threads

__all__ = ["main", "build_parser", "COMMANDS", "SUBCOMMANDS", "error_line"]

# Command modules import their work (torch, sae_lens, stores, models, the shapes world) inside the handlers,
# and main() builds only the parser of the command it runs: `sae-lens-mm --help` imports no torch.

# ----------------------------------------------------------------------------------------- releases
def _check_release_filters(args: argparse.Namespace) -> None:
    """A --release / --model / --hook that matches no registered SAE is a typo: say so, with close matches,
    instead of printing an empty table."""
    from sae_lens_multimodal.core.names import unknown_name_message
    from sae_lens_multimodal.pretrained import get_release, list_releases, registered_releases

    releases = registered_releases()
    if args.runs:
        get_release(args.runs)  # KeyError with close matches
    if args.release and not any(args.release.lower() in name.lower() for name in releases):
        raise KeyError(unknown_name_message("release (--release, a substring of the name)", args.release, releases,
                                            see="List them with: sae-lens-mm releases."))
    if args.model and not any(args.model.lower() in r.model.lower() for r in releases.values()):
        models = sorted({r.model for r in releases.values()})
        raise KeyError(unknown_name_message("model (--model, a substring of the name)", args.model, models))
    if args.hook and not list_releases(hook=args.hook):
        hooks = sorted({row.hook_name for row in list_releases()})
        raise KeyError(unknown_name_message("hook (--hook, a substring or glob)", args.hook, hooks,
                                            see="Hooks with SAEs are listed by: sae-lens-mm releases."))


def run_releases(args: argparse.Namespace) -> int:
    from sae_lens_multimodal.pretrained import expand_manifest_release, get_release, list_releases

    _check_release_filters(args)
    if args.runs:
        release = get_release(args.runs)
        if not release.manifest:
            print(f"Release {args.runs!r} has a fixed list of SAEs (no manifest); showing it.", file=sys.stderr)
        else:
            expand_manifest_release(args.runs, download=True)
        table = list_releases(release=args.runs, model=args.model, hook=args.hook)
        table = type(table)(row for row in table if row.release == args.runs)
    else:
        table = list_releases(model=args.model, hook=args.hook, release=args.release)
    if args.json:
        print(json.dumps([{**asdict(row), "unverified": list(row.unverified)} for row in table], indent=1, default=str))
    else:
        print(table.to_text())
        if not table:
            print("No SAE matches all of these filters together (each matches some); drop one to see more.",
                  file=sys.stderr)
    return 0


def add_releases_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "releases",
        help=COMMANDS["releases"][0],
        description="List the SAE releases registered with SAELens by sae-lens-multimodal. Load one with "
                    "sae_lens.SAE.from_pretrained(release, sae_id).",
    )
    parser.add_argument("--model", help="only models whose name contains this (case-insensitive)")
    parser.add_argument("--hook", help="only SAEs at hooks containing this, or matching this glob")
    parser.add_argument("--release", help="only releases whose name contains this")
    parser.add_argument("--runs", metavar="RELEASE",
                        help="read RELEASE's manifest (downloading it unless offline) and list every run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run_releases)


# ----------------------------------------------------------------------------------------- demo
def add_demo_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    # deferred (as every command's own module): `sae-lens-mm --help` loads no torch; the demo is the shapes world's
    from sae_lens_multimodal.world.demo import add_demo_arguments

    parser = subparsers.add_parser(
        "demo",
        help=COMMANDS["demo"][0],
        description="Load the shipped shapes CLIP, diffusion models (UNet and DiT) and VLM and the bundled SAEs by "
                    "name, label, steer and trace features, set the two diffusion models side by side, and write "
                    "DIR/report.html (opens from disk, no network).",
    )
    add_demo_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from sae_lens_multimodal.world.demo import run_from_args

        return run_from_args(args)

    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------------------- ground truth
def add_ground_truth_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from sae_lens_multimodal.world.ground_truth import add_arguments

    parser = subparsers.add_parser(
        "ground-truth",
        help=COMMANDS["ground-truth"][0],
        description="Run the shapes-world ground-truth checks on the shipped models and bundled SAEs and print "
                    "one line per row of README.md's table 'What the shapes world lets us check' (--checks selects).",
    )
    add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from sae_lens_multimodal.world.ground_truth import run_from_args

        run_from_args(args)
        return 0

    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------------------- dashboards
def add_dashboards_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from sae_lens_multimodal.reports.cli import add_dashboards_arguments

    parser = subparsers.add_parser(
        "dashboards",
        help=COMMANDS["dashboards"][0],
        description="Load a vision (CLIP / ViT) or diffusion model and an SAE by name, run the SAE on images or "
                    "prompts, and write DIR/index.html with one page per feature (top images with patch heatmaps, "
                    "histogram, text labels, steering effect; per-timestep curves for diffusion).",
    )
    add_dashboards_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from sae_lens_multimodal.reports.cli import run_from_args

        return run_from_args(args)

    parser.set_defaults(handler=run)



# ----------------------------------------------------------------------------------------- hooks
def hook_shape(spec: Any) -> str:
    """The shape of the tensor a hook sees, from its :class:`~sae_lens_multimodal.core.contract.HookSpec`:
    ``[batch, 50, 768]`` for a ViT-B/32's residual stream (CLS + 7x7 patches); ``pos`` where the number of
    positions depends on the input (text)."""
    pos = spec.n_tokens if spec.grid is not None else "pos"
    width = "?" if spec.width is None else spec.width
    shapes = {
        "tokens": ["batch", pos, width],
        "heads": ["batch", pos, spec.n_heads, width],
        "pattern": ["batch", spec.n_heads, pos, pos],
        "scale": ["batch", pos, 1],
        "pooled": ["batch", width],
        "pooled_scale": ["batch", 1],
        "spatial": ["batch", *(spec.grid or ("H", "W")), width],  # channel-last; H, W depend on the input size
        "flat_tokens": ["n_tokens", width],
    }
    return "[" + ", ".join(str(d) for d in shapes[spec.layout]) + "]"


def run_hooks(args: argparse.Namespace) -> int:
    from sae_lens_multimodal.models.loading import load_model

    model = load_model(args.model, kind=args.model_kind)
    if not hasattr(model, "hook_specs"):
        raise TypeError(f"{args.model!r} loaded as {type(model).__name__}, which does not describe its hooks "
                        f"(no hook_specs()): give a model of this package's kinds, or --model-kind.")
    specs = list(model.hook_specs().values())
    if args.filter:
        specs = [s for s in specs if fnmatch.fnmatchcase(s.name, args.filter) or args.filter in s.name]
        if not specs:
            from sae_lens_multimodal.core.names import close_matches

            near = close_matches(args.filter, model.hook_specs())
            hint = f" Close names: {', '.join(near)}." if near else ""
            raise ValueError(f"No hook of {args.model!r} matches --filter {args.filter!r}.{hint} Give a substring "
                             f"or a glob such as 'blocks.*.hook_resid_post'.")
    rows = [{"name": s.name, "part": s.part, "layout": s.layout, "shape": hook_shape(s), "width": s.width,
             "n_heads": s.n_heads, "n_prefix_tokens": s.n_prefix_tokens,
             "grid": list(s.grid) if s.grid else None, "layer": s.layer} for s in specs]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    headers = ("name", "part", "layout", "shape")
    widths = [max([len(h)] + [len(str(r[h])) for r in rows]) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)).rstrip())
    print(f"({len(rows)} hooks)")
    return 0


def add_hooks_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "hooks", help=COMMANDS["hooks"][0],
        description="Load MODEL and list every hook it has (the model contract, model.hook_specs()): its name, the "
                    "part of the model it is in, its layout and the shape of the tensor it sees at the model's "
                    "native input size. Use the names with --hook in cache / dashboards and with run_with_cache.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="model name or directory, as --model of the other commands (shapes-clip, "
                             "open-clip:ViT-B-32/<tag>, timm:<name>, a Hugging Face repo id, a local directory)")
    add_model_kind_option(parser)
    parser.add_argument("--filter", metavar="GLOB",
                        help="only hooks whose name matches this glob (blocks.*.hook_resid_post) or contains it")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.set_defaults(handler=run_hooks)


# ----------------------------------------------------------------------------------------- the parser
#: name -> (one-line help shown by ``sae-lens-mm --help``, "module:registrar"). The registrar adds the
#: subcommand's parser (with the same help; tests/validation/test_cli.py checks that they agree); it is
#: imported only when its command runs, or for the full parser of :func:`build_parser`.
COMMANDS: dict[str, tuple[str, str]] = {
    "releases": ("list the pretrained vision/diffusion SAE releases (load with sae_lens.SAE.from_pretrained)",
                 f"{__name__}:add_releases_command"),
    "hooks": ("list a model's hooks with their layout and shape", f"{__name__}:add_hooks_command"),
    "cache": ("cache a model's activations at some hooks to disk (resumable)",
              "sae_lens_multimodal.training.cli:add_cache_command"),
    "train": ("train an SAE on cached activations with SAELens's SAETrainer",
              "sae_lens_multimodal.training.cli:add_train_command"),
    "evaluate": ("evaluate an SAE: reconstruction/sparsity on cached activations, downstream effects",
                 "sae_lens_multimodal.training.cli:add_evaluate_command"),
    "steerability": ("measure how far clamping each vision SAE feature moves a CLIP's text-space probabilities",
                     "sae_lens_multimodal.steering.cli:add_steerability_command"),
    "demo": ("run the offline shapes-world demo and write an HTML report with feature dashboards",
             f"{__name__}:add_demo_command"),
    "dashboards": ("write static HTML feature dashboards for any supported model and SAE",
                   f"{__name__}:add_dashboards_command"),
    "ground-truth": ("check label accuracy, steerability and per-timestep probes against the shapes world's "
                     "ground truth", f"{__name__}:add_ground_truth_command"),
    "circuit": ("find a sparse feature circuit (SAE features, error nodes, edges) and write it as JSON and an "
                "HTML graph", "sae_lens_multimodal.analysis.circuit_cli:add_circuit_command"),
}

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrar(name: str) -> Registrar:
    module, _, function = COMMANDS[name][1].partition(":")
    return getattr(importlib.import_module(module), function)


def __getattr__(name: str) -> Any:
    if name == "SUBCOMMANDS":  # the registrars in --help order (imports every command module)
        return [_registrar(command) for command in COMMANDS]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's usage errors as one line, ``sae-lens-mm <command>: error: <message> (see ... --help)``,
    exit status 2, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``sae-lens-mm`` parser. ``commands``: the subcommands to build in full (default: all); the
    others get a parser with only their name and help (enough for ``sae-lens-mm --help``), so that
    building them imports nothing heavy."""
    parser = OneLineErrorParser(
        prog="sae-lens-mm",
        description="sae-lens-multimodal: TransformerLens hooks and SAELens SAEs for vision and diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_global_options(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        if commands is None or name in commands:
            _registrar(name)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
        add_global_options(subparsers.choices[name], top_level=False)
    return parser


def _command_in(argv: Sequence[str]) -> Optional[str]:
    """The subcommand ``argv`` names (the first word that is not an option or an option's value)."""
    takes_value = {"--threads"}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _subparser(parser: argparse.ArgumentParser, command: Optional[str]) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def error_line(command: Optional[str], error: BaseException) -> str:
    """The one stderr line an exception becomes: the message of the errors library code raises for bad
    input (ValueError, KeyError unquoted, TypeError, OSError, this package's own), the type name as well
    for anything else, with a pointer to ``--debug``."""
    message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    message = " ".join(str(message).split()) or type(error).__name__
    expected = isinstance(error, (ValueError, KeyError, TypeError, OSError)) or \
        type(error).__module__.startswith("sae_lens_multimodal.")
    if not expected:
        message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
    return f"sae-lens-mm{' ' + command if command else ''}: error: {message}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sae-lens-mm`` script and of ``python -m sae_lens_multimodal``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, so that the line names the command
        _subparser(parser, getattr(args, "command", None)).error(f"unrecognized arguments: {' '.join(extra)}")
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        apply_threads(getattr(args, "threads", None))
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"sae-lens-mm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error is one line; --debug shows the traceback)
        if debug:
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
