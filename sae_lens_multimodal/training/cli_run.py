"""What ``sae-lens-mm cache | train | evaluate`` do once their options are parsed (``training/cli.py`` builds
the parsers and their YAML fallback): load the model, images and prompts the options name, then cache
activations, train an SAE or evaluate one. Heavy libraries are imported inside the functions, so building the
command-line parser stays light."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from sae_lens_multimodal.cli_options import check_output_dir

__all__ = ["build_training_sae", "load_cli_model", "load_images", "load_prompts", "run_cache", "run_evaluate",
           "run_train"]


# ---------------------------------------------------------------------- loading
def load_cli_model(args: argparse.Namespace, device: Optional[str]) -> tuple[Any, str]:
    """(model, kind) for ``--model`` / ``--model-kind`` (None: detected), through the package's one loader."""
    # Imported when a command runs, not when the parser is built (it loads every model class).
    from sae_lens_multimodal.models.loading import load_model, model_kind_of

    model = load_model(args.model, args.model_kind, device=device)
    return model, model_kind_of(model)


_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # datasets' save_to_disk


def load_images(args: argparse.Namespace, preprocess: Any = None) -> Any:
    """An image folder (its files checked first: training/sources.py FolderImages), a dataset saved with
    ``save_to_disk``, or a Hugging Face dataset by name; at most ``--max-images`` of them."""
    if args.dataset:
        import datasets

        ds = datasets.load_dataset(args.dataset, split=args.split, streaming=args.streaming)
    elif args.images:
        path = Path(args.images)
        if any((path / f).exists() for f in _SAVED_DATASET_FILES):
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[args.split]
            if args.streaming:
                ds = ds.to_iterable_dataset()
        else:
            from sae_lens_multimodal.training.sources import FolderImages

            return FolderImages(path, preprocess, limit=args.max_images)  # (preprocess: the model's, set later)
    else:
        raise ValueError("Give the images: --images <folder or saved dataset> or --dataset <name>.")
    if args.max_images is not None and not isinstance(ds, str):
        ds = ds.take(args.max_images) if hasattr(ds, "take") else ds.select(range(min(args.max_images, len(ds))))
    return ds


def load_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("Give prompts: --prompt TEXT (repeatable) or --prompts FILE (one per line).")
    return prompts


def _pipeline_kwargs(args: argparse.Namespace, guidance_scale: Optional[float] = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_inference_steps": args.num_inference_steps}
    scale = args.guidance_scale if args.guidance_scale is not None else guidance_scale
    if scale is not None:  # else the pipeline's own default (recorded in the cache's metadata)
        kw["guidance_scale"] = scale
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    if args.output_type:
        kw["output_type"] = args.output_type
    return kw


def _floats(text: Optional[str], option: str = "--timesteps") -> Optional[list[float]]:
    if text in (None, ""):
        return None
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers (scheduler timesteps), e.g. "
                         "'999,500,1'.") from None



# ---------------------------------------------------------------------- cache
def run_cache(args: argparse.Namespace) -> int:
    from sae_lens_multimodal.training import distributed

    if not distributed.launched_by_torchrun():
        return _run_cache(args, args.device)
    # Under torchrun: every rank runs this same command and writes its share of the shards (docs/distributed.md).
    with distributed.distributed_session(args.device) as device:
        return _run_cache(args, str(device))


def _run_cache(args: argparse.Namespace, device: Optional[str]) -> int:
    from sae_lens_multimodal.training.caching import cache_activations
    from sae_lens_multimodal.training.distributed import rank

    check_output_dir(args.out, "cache", forbid_inside=[args.images] if args.images else [])
    # (images first: a folder that cannot be read is refused before the model loads)
    images = load_images(args) if (args.images or args.dataset) and not (args.prompt or args.prompts) else None
    model, kind = load_cli_model(args, device)
    hooks = args.hook if isinstance(args.hook, list) else [args.hook]
    if kind == "diffusion":
        from sae_lens_multimodal.training.diffusion_store import DiffusionActivationStore

        store: Any = DiffusionActivationStore(
            model, hooks, load_prompts(args), seed_offset=args.seed_offset, timesteps=_floats(args.timesteps),
            cfg_branch=None if args.cfg_branch == "both" else args.cfg_branch, tokens_per_sample=args.tokens_per_sample, batch_size=args.batch_size,
            pipeline_kwargs=_pipeline_kwargs(args), dtype=args.dtype, progress=not args.no_progress,
            model_name=args.model,
        )
    else:
        from sae_lens_multimodal.training.image_store import ImageActivationStore

        store = ImageActivationStore(
            model, hooks, images if images is not None else load_images(args), token_policy=args.token_policy,
            batch_size=args.batch_size,
            image_column=args.image_column, dtype=args.dtype, progress=not args.no_progress, model_name=args.model,
        )
    readers = cache_activations(store, args.out, items_per_shard=args.items_per_shard,
                                shard_size_mb=args.shard_size_mb)
    for hook, reader in readers.items():
        if rank() == 0:  # (under torchrun, one summary)
            print(f"{hook}: {reader.n_rows} rows in {len(reader.shards)} shards at {reader.directory}")
    return 0


# ---------------------------------------------------------------------- train
def _ranges(args: argparse.Namespace, reader: Any, n_train: int) -> list[list[float]]:
    from sae_lens_multimodal.saes import TimestepBuckets

    if args.timestep_ranges:
        out = []
        for part in str(args.timestep_ranges).split(","):
            lo, _, hi = part.partition(":")
            try:
                out.append([float(lo), float(hi)])
            except ValueError:
                raise ValueError(f"--timestep-ranges {args.timestep_ranges!r}: {part!r} is not START:END; give "
                                 "comma-separated ranges in scheduler units, e.g. '0:500,500:1000'.") from None
            if not out[-1][0] < out[-1][1]:
                raise ValueError(f"--timestep-ranges: the range {part!r} is empty; give START < END.")
        return out
    if args.per_timestep:
        return TimestepBuckets.per_timestep(reader.timesteps(), n_train).to_list()
    return TimestepBuckets.uniform(args.n_buckets, n_train).to_list()


def build_training_sae(args: argparse.Namespace, reader: Any) -> Any:
    """The TrainingSAE the options describe (SAELens architectures or our timestep-aware ones)."""
    from sae_lens.registry import get_sae_training_class

    d_in = reader.d_in
    d_sae = args.d_sae or int(args.expansion_factor * d_in)
    if d_sae < 1:
        raise ValueError(f"--expansion-factor {args.expansion_factor} x d_in {d_in} gives no latents; give a larger "
                         "--expansion-factor or --d-sae.")
    try:
        inner: dict[str, Any] = json.loads(args.inner_config) if args.inner_config else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--inner-config is not valid JSON ({e}); give an object, e.g. "
                         "'{\"aux_loss_coefficient\": 0.5}'.") from None
    if not isinstance(inner, dict):
        raise ValueError(f"--inner-config must be a JSON object of settings, got {args.inner_config!r}.")
    if args.k is not None:
        if args.k > d_sae:
            raise ValueError(f"--k {args.k:g} is more than the SAE's {d_sae} latents; give a --k of at most "
                             "--d-sae.")
        inner["k"] = int(args.k) if float(args.k).is_integer() else float(args.k)
    if args.l1_coefficient is not None:
        inner["l1_coefficient"] = args.l1_coefficient
    if args.l0_coefficient is not None:
        inner["l0_coefficient"] = args.l0_coefficient
    metadata = {"hook_name": reader.hook_name, "model_name": reader.metadata["model"]["name"]}
    if args.input_kind:
        metadata["input_kind"] = args.input_kind
    if args.cfg_branch:
        metadata["cfg_branch"] = args.cfg_branch
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations=args.normalize_activations,
                  metadata=SAEMetadata(**metadata))
    if args.architecture in ("timestep_bucketed", "timestep_conditioned"):
        diffusion = reader.metadata.get("diffusion") or {}
        n_train = args.num_train_timesteps or diffusion.get("num_train_timesteps")
        if not n_train:
            raise ValueError("--num-train-timesteps is needed (the cache does not record the scheduler's).")
        sae_cls, cfg_cls = get_sae_training_class(args.architecture)
        cfg = cfg_cls(**common, inner_architecture=args.inner_architecture, inner_config=inner,
                      timestep_ranges=_ranges(args, reader, int(n_train)), num_train_timesteps=int(n_train),
                      out_of_range=args.out_of_range)
        return sae_cls(cfg)
    sae_cls, cfg_cls = get_sae_training_class(args.architecture)
    return sae_cls(cfg_cls(**common, **inner))


def run_train(args: argparse.Namespace) -> int:
    from sae_lens_multimodal.training.cache import ActivationCacheReader
    from sae_lens_multimodal.training.train import final_metrics_line, train_sae

    caches = args.cache if isinstance(args.cache, list) else [args.cache]
    check_output_dir(args.out, "sae", forbid_inside=caches)
    if args.checkpoint_path:
        check_output_dir(args.checkpoint_path, "sae", forbid_inside=caches)
    readers = [ActivationCacheReader(c).require_complete() for c in caches]
    model, kind = load_cli_model(args, None) if args.model else (None, None)
    identity = None
    if model is not None:
        from sae_lens_multimodal.training.cache import model_identity
        from sae_lens_multimodal.training.image_store import vision_tower

        target = model.denoiser if kind == "diffusion" else vision_tower(model)
        identity = model_identity(target)
    for reader in readers:
        reader.check(model=identity, hook_name=args.hook)
    from sae_lens_multimodal.training.parallel_cli import run_train_distributed, wants_distributed_training

    if wants_distributed_training(args, len(readers)):  # torchrun, several caches, checkpoints to resume
        return run_train_distributed(args, readers, build_training_sae)
    reader = readers[0]
    sae = build_training_sae(args, reader)
    train_sae(
        sae, reader, total_training_samples=args.total_training_samples, batch_size=args.batch_size, lr=args.lr,
        lr_end=args.lr_end, lr_scheduler_name=args.lr_scheduler, lr_warm_up_steps=args.lr_warm_up_steps,
        lr_decay_steps=args.lr_decay_steps, device=args.device or "cpu", dead_feature_window=args.dead_feature_window,
        normalize_per_bucket=args.normalize_per_bucket, seed=args.seed, checkpoint_path=args.checkpoint_path,
        n_checkpoints=args.n_checkpoints, progress=not args.no_progress,
    )
    print(final_metrics_line(sae, reader, batch_size=args.batch_size))
    sae.save_inference_model(args.out)
    print(f"Saved the trained {sae.cfg.architecture()} SAE to {args.out} "
          f"(load with sae_lens.SAE.load_from_disk({str(args.out)!r}))")
    return 0


# ---------------------------------------------------------------------- evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    from sae_lens import SAE

    from sae_lens_multimodal.training.cache import ActivationCacheReader
    from sae_lens_multimodal.training.evaluate import (
        clip_zero_shot,
        diffusion_downstream,
        evaluate_sae,
        image_embedding_cosine,
    )

    if not args.sae_path and not args.release:
        raise ValueError("Give the SAE: --sae-path <directory> or --release NAME --sae-id ID.")
    reader = None
    if args.cache:  # (the cache first: a missing or incomplete one is refused before the SAE loads)
        reader = ActivationCacheReader(args.cache).require_complete()
    if args.json:
        json_out = Path(args.json)
        if json_out.is_dir():
            raise ValueError(f"--json {json_out} is a folder; give a file name, e.g. {json_out / 'evaluation.json'}.")
        if reader is not None and reader.directory.resolve() in json_out.resolve().parents:
            raise ValueError(f"--json {json_out} lies inside the cache {reader.directory}; write it elsewhere.")
    from sae_lens_multimodal.pretrained.local import load_sae_dir  # a damaged --sae-path names its file

    if args.release:  # a typo of the release or SAE id lists close matches
        from sae_lens_multimodal.pretrained.registry import check_pretrained_name

        check_pretrained_name(args.release, args.sae_id)
    sae = SAE.from_pretrained(args.release, args.sae_id) if args.release else load_sae_dir(args.sae_path)
    results: dict[str, Any] = {}
    if reader is not None:
        reader.check(hook_name=sae.cfg.metadata.hook_name, d_in=sae.cfg.d_in)
        results["reconstruction"] = evaluate_sae(sae, reader, n_rows=args.n_rows, batch_size=args.batch_size,
                                                 dense_threshold=args.dense_threshold)
    if args.model:
        model, kind = load_cli_model(args, args.device)
        if kind == "diffusion":
            recorded = ((reader.metadata.get("diffusion") or {}).get("pipeline_kwargs") or {}) if reader else {}
            kwargs = _pipeline_kwargs(args, recorded.get("guidance_scale"))  # the cache's, unless given
            calls = [{"prompt": p, **kwargs} for p in load_prompts(args)]
            results["diffusion"] = diffusion_downstream(model, sae, calls,
                                                        seeds=[args.seed_offset + i for i in range(len(calls))])
        else:
            images = _image_tensor(model, args)
            for label, error_term in (("embedding_cosine", False), ("embedding_cosine_error_term", True)):
                results[label] = image_embedding_cosine(model, sae, images, batch_size=args.batch_size,
                                                        use_error_term=error_term)
            if args.class_names:
                if kind != "clip":
                    raise ValueError(f"Zero-shot evaluation needs a CLIP; {args.model!r} loads as a {kind} model.")
                labels = [int(v) for v in Path(args.labels).read_text().split()]
                classes = [c.strip() for c in Path(args.class_names).read_text().splitlines() if c.strip()]
                results["zero_shot"] = clip_zero_shot(model, sae, images, labels, classes, batch_size=args.batch_size)
    if not results:
        raise ValueError("Nothing to evaluate: give --cache (reconstruction metrics) and/or --model (downstream).")
    text = json.dumps(results, indent=1, default=str)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text if not args.json else f"Wrote {args.json}")
    return 0


def _image_tensor(model: Any, args: argparse.Namespace) -> Any:
    from sae_lens_multimodal.training.image_store import vision_tower
    from sae_lens_multimodal.training.sources import image_source

    preprocess = vision_tower(model).preprocess
    source = image_source(load_images(args, preprocess), preprocess, args.image_column)
    import torch

    return torch.cat([pixels for _, pixels in source.batches(args.batch_size)])
