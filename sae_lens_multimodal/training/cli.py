"""``sae-lens-mm cache | train | evaluate``: activation caching, SAE training and evaluation from the
command line. Every option can also come from a YAML file (``--config run.yaml``; keys are the option
names, with ``-`` or ``_``); options given on the command line win over the file. This module builds the
parsers; what each command then does is in ``training/cli_run.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sae_lens_multimodal.cli_options import (
    add_cfg_branch_option,
    add_model_kind_option,
    add_model_option,
    add_no_progress_option,
    add_num_inference_steps_option,
    add_sae_options,
    add_seed_option,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from sae_lens_multimodal.core.sae_metadata import INPUT_KINDS, TOKEN_POLICIES
from sae_lens_multimodal.training.cli_run import run_cache, run_evaluate, run_train

__all__ = ["add_cache_command", "add_evaluate_command", "add_train_command"]

SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


# ---------------------------------------------------------------------- YAML configs
class _Unset:
    """Default of every option while parsing, to tell 'not given' from 'given with the default value'."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help="YAML file of options (keys are option names, e.g. 'total-training-samples: 1000000'); "
                             "options given on the command line override it")


def _handler(parser: argparse.ArgumentParser, run: Any) -> Any:
    """Make ``parser``'s options fall back to the YAML file, then to their defaults, and check required ones."""
    actions = [a for a in parser._actions if a.dest not in ("help", "config") and a.dest != argparse.SUPPRESS]
    defaults = {a.dest: a.default for a in actions}
    for a in actions:
        # (repeatable options keep None: argparse appends to the default; None already means 'not given')
        a.default = None if isinstance(a, argparse._AppendAction) else _UNSET

    def handle(args: argparse.Namespace) -> int:
        config: dict[str, Any] = {}
        if getattr(args, "config", None):
            import yaml

            try:
                data = yaml.safe_load(Path(args.config).read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{args.config} is not valid YAML ({str(e).splitlines()[0]}); fix the file.") from None
            if not isinstance(data, dict):
                raise ValueError(f"{args.config} must hold a mapping of option names to values.")
            for key, value in data.items():
                dest = str(key).replace("-", "_")
                if dest not in defaults:
                    raise ValueError(
                        f"Unknown option {key!r} in {args.config}; known: {sorted(d.replace('_', '-') for d in defaults)}"
                    )
                config[dest] = value
        for a in actions:
            value = getattr(args, a.dest, _UNSET)
            if value is _UNSET or (value is None and isinstance(a, argparse._AppendAction)):
                value = config.get(a.dest, defaults[a.dest])
                if a.dest in config:
                    if isinstance(a, argparse._AppendAction) and not isinstance(value, list):
                        value = [value]
                    option = f"{a.dest.replace('_', '-')} in {args.config}"
                    if a.nargs == 0 and not isinstance(value, bool):  # a flag (store_true)
                        raise ValueError(f"{option}: {value!r} is not true or false; write 'true' or 'false'.")
                    if a.type is not None and value is not None:
                        try:  # before the choices check, as argparse does
                            value = [a.type(v) for v in value] if isinstance(value, list) else a.type(value)
                        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                            raise ValueError(f"{option}: {e}") from None
                    if a.choices is not None and value is not None and value not in a.choices:
                        raise ValueError(f"{a.dest.replace('_', '-')}: {value!r} is not one of {list(a.choices)}")
            setattr(args, a.dest, value)
            if getattr(a, "_required_option", False) and value is None:
                raise ValueError(f"--{a.dest.replace('_', '-')} is required (on the command line or in --config).")
        return run(args)

    return handle


def _required(action: argparse.Action) -> argparse.Action:
    action._required_option = True  # type: ignore[attr-defined]
    return action


def _fraction(value: Any) -> float:
    """A number in [0, 1] (argparse ``type=``)."""
    number = non_negative_float(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction: give a number from 0 to 1")
    return number


# ---------------------------------------------------------------------- shared options
def _model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    a = add_model_option(p, required=False)
    if required:
        _required(a)
    add_model_kind_option(p, help_suffix="; images are read by a CLIP's or VLM's vision tower")
    p.add_argument("--device", default=None, help="torch device for the model and training (default: cpu)")


def _image_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images (vit / clip)")
    g.add_argument("--images", help="image folder, or a datasets dataset saved with save_to_disk")
    g.add_argument("--dataset", help="Hugging Face dataset name for datasets.load_dataset (needs hub access)")
    g.add_argument("--split", default="train", help="dataset split (default: train)")
    g.add_argument("--image-column", help="dataset column holding the images (default: the Image-typed column)")
    g.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    g.add_argument("--max-images", type=positive_int, help="use at most this many images")
    g.add_argument("--token-policy", choices=TOKEN_POLICIES, default="all",
                   help="which tokens become rows: all, the CLS token only, or patch tokens only (default: all)")


def _diffusion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusion")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--prompts", metavar="FILE", help="text file with one prompt per line")
    g.add_argument("--seed-offset", type=non_negative_int, default=0,
                   help="prompt i is generated with seed SEED_OFFSET + i (default: 0)")
    add_num_inference_steps_option(g, default=20, type=positive_int)
    g.add_argument("--guidance-scale", type=non_negative_float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's own, e.g. 2 for shapes-diffusion, "
                        "7.5 for Stable Diffusion; cache records the value used, evaluate reuses a --cache's)")
    g.add_argument("--height", type=positive_int, help="image height in pixels (default: the pipeline's)")
    g.add_argument("--width", type=positive_int, help="image width in pixels (default: the pipeline's)")
    g.add_argument("--output-type", default=None,
                   help="pipeline output_type, e.g. 'latent' to skip VAE decoding (default: the pipeline's)")


# ---------------------------------------------------------------------- cache
def add_cache_command(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "cache", help="cache a model's activations at some hooks to disk (resumable)",
        description="Run images (ViT / CLIP) or prompts (diffusion) through a model and write the activations at each "
                    "--hook to OUT/<hook>/ (format: docs/activation-cache.md). Re-running the same command resumes an "
                    "interrupted cache; a directory holding another model's or hook's cache is refused. Under torchrun "
                    "(torchrun --nproc-per-node=N -m sae_lens_multimodal cache ...) the ranks share the shards "
                    "(docs/distributed.md).",
    )
    _add_config(p)
    _model_options(p)
    _required(p.add_argument("--hook", action="append", help="hook name to record (repeat for several)"))
    _required(p.add_argument("--out", help="output directory (one cache per hook under it)"))
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per forward pass, or prompts per pipeline call (default: 32)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="storage dtype of the activations (default: float32)")
    p.add_argument("--items-per-shard", type=positive_int,
                   help="images / trajectories per shard (default: shards of about --shard-size-mb)")
    p.add_argument("--shard-size-mb", type=positive_float, default=256.0, help="target shard size in MiB (default: 256)")
    add_no_progress_option(p)
    _image_options(p)
    _diffusion_options(p)
    g = p._action_groups[-1]
    g.add_argument("--timesteps", help="comma-separated scheduler timesteps to record (default: all)")
    add_cfg_branch_option(g, "record one CFG branch only, or both (default: both)")
    g.add_argument("--tokens-per-sample", type=positive_int,
                   help="keep this many random spatial positions per sample and timestep (default: all)")
    p.set_defaults(handler=_handler(p, run_cache))


# ---------------------------------------------------------------------- train
def add_train_command(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an SAE on cached activations with SAELens's SAETrainer",
        description="Train a SAELens SAE (standard, topk, batchtopk, jumprelu, ...) or a timestep-aware one "
                    "(timestep_bucketed, timestep_conditioned) on a cache written by `sae-lens-mm cache`, with "
                    "SAELens's SAETrainer, and save it for SAE.load_from_disk.",
    )
    _add_config(p)
    _required(p.add_argument("--cache", nargs="+", metavar="DIR",
                             help="cache directory of one hook (OUT/<hook> of `sae-lens-mm cache`); several: one SAE "
                                  "per cache, saved under --out/<cache folder name>"))
    _required(p.add_argument("--out", help="directory to save the trained SAE in (with several caches: their parent)"))
    add_model_option(p, required=False,
                     help="optional: model name/directory; the cache is refused if another model made it")
    add_model_kind_option(p)
    p.add_argument("--hook", help="optional: the hook the cache must hold (refused otherwise)")
    p.add_argument("--device", default=None, help="training device (default: cpu)")
    g = p.add_argument_group("SAE")
    g.add_argument("--architecture", default="topk",
                   help="SAELens training architecture, or timestep_bucketed / timestep_conditioned (default: topk)")
    g.add_argument("--inner-architecture", default="topk",
                   help="architecture inside each bucket / of the shared dictionary of a timestep-aware SAE "
                        "(default: topk)")
    g.add_argument("--d-sae", type=positive_int, help="number of latents (default: expansion factor x d_in)")
    g.add_argument("--expansion-factor", type=positive_float, default=8.0,
                   help="d_sae / d_in when --d-sae is not given (default: 8)")
    g.add_argument("--k", type=positive_float, help="k of topk / batchtopk architectures")
    g.add_argument("--l1-coefficient", type=non_negative_float, help="L1 coefficient of the standard architecture")
    g.add_argument("--l0-coefficient", type=non_negative_float, help="L0 coefficient of the jumprelu architecture")
    g.add_argument("--inner-config", help="JSON object of further architecture settings, e.g. '{\"aux_loss_coefficient\": 0.5}'")
    g.add_argument("--normalize-activations", default="none",
                   choices=("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale"),
                   help="SAELens activation normalisation (default: none)")
    t = p.add_argument_group("timesteps (timestep_bucketed / timestep_conditioned)")
    t.add_argument("--timestep-ranges", help="comma-separated START:END ranges in scheduler units, e.g. '0:500,500:1000'")
    t.add_argument("--n-buckets", type=positive_int, default=1, help="equal-width buckets when no ranges are given (default: 1 = pooled)")
    t.add_argument("--per-timestep", action="store_true", help="one bucket per timestep present in the cache")
    t.add_argument("--num-train-timesteps", type=positive_int, help="scheduler num_train_timesteps (default: from the cache)")
    t.add_argument("--out-of-range", choices=("error", "passthrough"), default="error",
                   help="what a spliced SAE does at a timestep outside every range (default: error)")
    add_cfg_branch_option(t, "CFG branch the SAE applies to (recorded in metadata; rows of the other branch pass "
                             "through)")
    t.add_argument("--input-kind", choices=INPUT_KINDS,
                   help="which activation the hook carries, e.g. block_output or residual_update (recorded in "
                        "metadata; see core/sae_metadata.INPUT_KINDS)")
    t.add_argument("--normalize-per-bucket", action="store_true",
                   help="scale each bucket's inputs to norm sqrt(d_in) on average (factors saved in the config)")
    o = p.add_argument_group("optimisation (SAELens SAETrainerConfig)")
    _required(o.add_argument("--total-training-samples", type=positive_int, help="activation rows to train on"))
    o.add_argument("--batch-size", type=positive_int, default=4096, help="rows per training step (default: 4096)")
    o.add_argument("--lr", type=positive_float, default=3e-4, help="learning rate (default: 3e-4)")
    o.add_argument("--lr-end", type=non_negative_float,
                   help="final learning rate of decaying schedules (default: --lr)")
    o.add_argument("--lr-scheduler", default="constant", help="SAELens lr scheduler name (default: constant)")
    o.add_argument("--lr-warm-up-steps", type=non_negative_int, default=0,
                   help="learning-rate warm-up steps (default: 0)")
    o.add_argument("--lr-decay-steps", type=non_negative_int, default=0, help="learning-rate decay steps (default: 0)")
    o.add_argument("--dead-feature-window", type=positive_int, default=1000,
                   help="steps without firing after which a latent counts as dead (default: 1000)")
    add_seed_option(o)
    o.add_argument("--checkpoint-path", help="directory for SAETrainer checkpoints")
    o.add_argument("--n-checkpoints", type=non_negative_int, default=0,
                   help="intermediate checkpoints to save (default: 0)")
    add_no_progress_option(o)
    d = p.add_argument_group("distributed (torchrun; docs/distributed.md)")
    d.add_argument("--distribute-modules", action="store_true",
                   help="with several caches: train their SAEs at the same time, SAE i on rank i mod N (default: "
                        "each SAE in turn, data-parallel over all ranks)")
    d.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="write a resumable checkpoint (step_<n> under --checkpoint-path) every this many steps")
    d.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint under --checkpoint-path (any number of ranks)")
    d.add_argument("--stop-after-steps", type=positive_int,
                   help="checkpoint and stop after this many steps (e.g. a time-limited job); resume later")
    p.set_defaults(handler=_handler(p, run_train))


# ---------------------------------------------------------------------- evaluate
def add_evaluate_command(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate an SAE: reconstruction/sparsity on cached activations, downstream effects",
        description="Reconstruction (explained variance, FVU, MSE), sparsity (L0, dead and dense latents) overall, per "
                    "timestep bucket and per timestep on a cache; and, with --model, the downstream effect of splicing "
                    "the SAE in: image-embedding cosine (ViT/CLIP), zero-shot accuracy with the logit scale (CLIP), "
                    "denoiser-output MSE per timestep and final-image difference with and without the error term "
                    "(diffusion).",
    )
    _add_config(p)
    add_sae_options(p, deprecated_sae=True)
    p.add_argument("--cache", help="cache directory of the SAE's hook, for reconstruction/sparsity metrics")
    p.add_argument("--n-rows", type=positive_int, default=100_000,
                   help="rows of the cache to evaluate on (default: 100000)")
    p.add_argument("--batch-size", type=positive_int, default=1024,
                   help="rows (or images) per evaluation batch (default: 1024)")
    p.add_argument("--dense-threshold", type=_fraction, default=0.1,
                   help="a latent active on more than this fraction of rows counts as dense (default: 0.1)")
    p.add_argument("--json", metavar="FILE", help="write the results to this JSON file instead of printing them")
    _model_options(p, required=False)
    _image_options(p)
    g = p._action_groups[-1]
    g.add_argument("--class-names", metavar="FILE", help="zero-shot: file with one class name per line (CLIP)")
    g.add_argument("--labels", metavar="FILE", help="zero-shot: whitespace-separated class index of each image")
    _diffusion_options(p)
    p.set_defaults(handler=_handler(p, run_evaluate))


if __name__ == "__main__":  # pragma: no cover
    from sae_lens_multimodal.cli import main

    sys.exit(main())
