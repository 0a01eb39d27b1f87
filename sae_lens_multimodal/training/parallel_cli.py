"""``sae-lens-mm train`` on several processes: under torchrun, with several caches, or with resumable
checkpoints (docs/distributed.md). Called by training/cli_run.py's ``run_train``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

import torch

from sae_lens_multimodal.training import distributed
from sae_lens_multimodal.training.cache import ActivationCacheReader
from sae_lens_multimodal.training.train import final_metrics_line
from sae_lens_multimodal.training.parallel_modules import train_buckets_distributed
from sae_lens_multimodal.training.parallel_train import (
    ModuleJob,
    TrainingStopped,
    save_sae_atomically,
    train_sae_data_parallel,
    train_saes_distributed,
)

__all__ = ["run_train_distributed", "wants_distributed_training"]


def wants_distributed_training(args: argparse.Namespace, n_caches: int) -> bool:
    """The data-parallel path (training/parallel_train.py) runs under torchrun, for several caches, and
    whenever a run is to be checkpointed for resuming; a plain one-cache run keeps ``train_sae``."""
    return (distributed.launched_by_torchrun() or n_caches > 1 or bool(args.distribute_modules)
            or bool(args.resume) or bool(args.checkpoint_every) or args.stop_after_steps is not None)


def _outputs(args: argparse.Namespace, readers: list[ActivationCacheReader]) -> list[Path]:
    if len(readers) == 1:
        return [Path(args.out)]
    names = [r.directory.resolve().name for r in readers]
    if len(set(names)) != len(names):
        raise ValueError(f"Caches with the same folder name {names}: each SAE is saved under --out/<cache folder "
                         "name>, so give the caches distinct folder names.")
    return [Path(args.out) / n for n in names]


def run_train_distributed(args: argparse.Namespace, readers: list[ActivationCacheReader],
                          build_sae: Callable[[argparse.Namespace, ActivationCacheReader], Any]) -> int:
    if (args.resume or args.checkpoint_every or args.stop_after_steps is not None) and not args.checkpoint_path:
        raise ValueError("--resume / --checkpoint-every / --stop-after-steps need --checkpoint-path (the folder "
                         "of the run's checkpoints).")
    with distributed.distributed_session(args.device) as device:
        return _train(args, readers, build_sae, device)


def _train(args: argparse.Namespace, readers: list[ActivationCacheReader],
           build_sae: Callable[[argparse.Namespace, ActivationCacheReader], Any], device: torch.device) -> int:
    outs = _outputs(args, readers)
    n_steps = math.ceil(args.total_training_samples / args.batch_size)
    every = args.checkpoint_every or (math.ceil(n_steps / (args.n_checkpoints + 1)) if args.n_checkpoints else 0)
    common: dict[str, Any] = dict(
        total_training_samples=args.total_training_samples, batch_size=args.batch_size, lr=args.lr,
        lr_end=args.lr_end, lr_scheduler_name=args.lr_scheduler, lr_warm_up_steps=args.lr_warm_up_steps,
        lr_decay_steps=args.lr_decay_steps, device=str(device), dead_feature_window=args.dead_feature_window,
        normalize_per_bucket=args.normalize_per_bucket, seed=args.seed, checkpoint_every=every,
        resume=bool(args.resume), stop_after_steps=args.stop_after_steps,
    )

    def make(reader: ActivationCacheReader) -> Callable[[], Any]:
        def build() -> Any:
            torch.manual_seed(args.seed)  # the same SAE whichever rank builds it
            return build_sae(args, reader)
        return build

    def checkpoints(i: int) -> Any:
        if not args.checkpoint_path:
            return None
        return Path(args.checkpoint_path) / outs[i].name if len(readers) > 1 else Path(args.checkpoint_path)

    is_main = distributed.rank() == 0
    try:
        if args.distribute_modules and len(readers) == 1:
            sae = make(readers[0])()
            if not hasattr(sae, "buckets"):
                raise ValueError("--distribute-modules with one cache spreads the buckets of a timestep_bucketed SAE "
                                 "over the ranks; give several caches (one SAE each), or --architecture "
                                 "timestep_bucketed.")
            train_buckets_distributed(sae, readers[0], out=outs[0], checkpoint_dir=checkpoints(0), **common)
            if is_main:
                print(f"Saved the timestep-bucketed SAE ({sae.n_buckets} buckets over {distributed.world_size()} "
                      f"ranks) to {outs[0]}")
            return 0
        if args.distribute_modules:
            jobs = [ModuleJob(make(r), r.directory, outs[i], checkpoints(i)) for i, r in enumerate(readers)]
            mine = train_saes_distributed(jobs, **common)
            for job, sae, reader in zip(jobs, mine, readers):
                if sae is not None:
                    print(f"[rank {distributed.rank()}] {final_metrics_line(sae, reader, batch_size=args.batch_size)}")
                    print(f"[rank {distributed.rank()}] saved the trained {sae.cfg.architecture()} SAE to {job.out}")
            return 0
        for i, reader in enumerate(readers):
            sae = make(reader)()
            train_sae_data_parallel(sae, reader, checkpoint_dir=checkpoints(i), **common)
            if is_main:
                print(final_metrics_line(sae, reader, batch_size=args.batch_size))
                save_sae_atomically(sae, outs[i])
                print(f"Saved the trained {sae.cfg.architecture()} SAE to {outs[i]} "
                      f"(load with sae_lens.SAE.load_from_disk({str(outs[i])!r}))")
            distributed.barrier()
    except TrainingStopped as stopped:
        if is_main or args.distribute_modules:
            print(f"Stopped after {stopped.steps} steps; checkpoint {stopped.checkpoint}. Run the same command with "
                  "--resume to continue.")
    return 0
