"""Distribute modules on the fly: SAEs for several hooks trained at once from ONE shared model forward per batch.

With N ranks and M SAEs (jobs), job ``i`` belongs to rank ``i mod N`` (round-robin). Every step:

1. the global batch of ``images_per_step`` source items (images, or diffusion trajectories) is cut into N
   contiguous slices; rank ``r`` runs the model once on slice ``r``, capturing every requested hook in that
   one forward (the store's hooks, stopped after the deepest block a hook needs), so the model compute is
   divided N ways and no rank runs the model twice per batch;
2. the rows of hook ``h`` are gathered (``torch.distributed.gather``) to each rank that owns an SAE on
   ``h``, concatenated in rank order, which is the order of the items, so the owner gets exactly the rows
   one process would get from a forward over the whole batch;
3. each owner pushes those rows through a seeded mixing buffer (:class:`RowMixer`) per SAE and steps
   SAELens's ``SAETrainer`` (its public ``step`` seam, as SAELens's own ``MultiSAETrainer`` drives it)
   whenever a batch of ``batch_size`` rows is ready.

Why not rank 0 runs the model and scatters: rank 0 would do all the model compute while the others wait;
here every rank does 1/N of it and only the activations each owner needs move. The result does not depend on
N: one process (N = 1) trains the same SAEs from the same rows in the same order (tested with gloo).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_multimodal.training import distributed
from sae_lens_multimodal.training.cache import ActivationCacheReader, ActivationChunk
from sae_lens_multimodal.training.parallel_train import (
    TrainingStopped,
    _broadcast_sae,
    save_sae_atomically,
    train_sae_data_parallel,
)
from sae_lens_multimodal.training.providers import coverage_filter
from sae_lens_multimodal.training.train import _data_facts, estimate_bucket_scaling_factors

__all__ = ["HookSAE", "RowMixer", "bucket_rows", "item_slices", "train_buckets_distributed", "train_saes_on_the_fly"]


@dataclass
class HookSAE:
    """One SAE of :func:`train_saes_on_the_fly`: the hook it reads, how to build it, where to save it."""

    hook: str
    make_sae: Callable[[], TrainingSAE[Any]]
    out: Optional[Union[str, Path]] = None


class RowMixer:
    """A mixing buffer fed by pushes: rows are collected until ``buffer_rows`` are pending, then shuffled
    (with ``generator``) and served in batches of ``batch_size``, keeping ``mix_fraction`` of the buffer to
    mix with the next rows (as SAELens's ``mixing_buffer``; labels travel with their rows)."""

    def __init__(self, batch_size: int, buffer_rows: int, *, mix_fraction: float = 0.5,
                 generator: Optional[torch.Generator] = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if buffer_rows < batch_size:
            raise ValueError(f"buffer_rows ({buffer_rows}) must be >= batch_size ({batch_size})")
        self.batch_size, self.buffer_rows = batch_size, buffer_rows
        self.keep = int(buffer_rows * mix_fraction)
        self.generator = generator
        self.pending: list[ActivationChunk] = []
        self.n_pending = 0

    def add(self, chunk: ActivationChunk) -> Iterator[ActivationChunk]:
        """Push ``chunk``; yields the batches that became ready (none until the buffer is full)."""
        if len(chunk):
            self.pending.append(chunk)
            self.n_pending += len(chunk)
        if self.n_pending < self.buffer_rows:
            return
        buffer = ActivationChunk.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
        buffer = buffer.select(torch.randperm(len(buffer), generator=self.generator))
        n_serve = max(1, (len(buffer) - self.keep) // self.batch_size) * self.batch_size
        rest = buffer.select(slice(n_serve, None))  # type: ignore[arg-type]
        self.pending, self.n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        for i in range(0, n_serve, self.batch_size):
            yield buffer.select(slice(i, i + self.batch_size))  # type: ignore[arg-type]


def item_slices(step: int, n_items: int, images_per_step: int, world_size: int) -> list[tuple[int, int]]:
    """The items ``[start, stop)`` each rank forwards at global step ``step``: the step's items (epochs
    repeat the source; the last batch of an epoch may be short) cut into ``world_size`` contiguous parts."""
    per_epoch = math.ceil(n_items / images_per_step)
    lo = (step % per_epoch) * images_per_step
    hi = min(lo + images_per_step, n_items)
    cuts = [lo + (hi - lo) * r // world_size for r in range(world_size + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]


class _OwnedSAE:
    """One SAE this rank trains: SAELens's SAETrainer driven through its ``step`` seam, as ``fit`` does."""

    def __init__(self, index: int, job: HookSAE, cfg: SAETrainerConfig, mixer: RowMixer, n_norm: int,
                 facts: dict[str, Any]):
        self.index, self.job = index, job
        self.sae = job.make_sae()
        if facts["d_in"] != self.sae.cfg.d_in:
            raise ValueError(f"The SAE of job {index} has d_in={self.sae.cfg.d_in} but hook {job.hook!r} gives "
                             f"activations of width {facts['d_in']}.")
        for key in ("hook_name", "model_name", "model_fingerprint"):  # as train_sae: from the data when unset
            if self.sae.cfg.metadata.get(key) is None and facts.get(key):
                self.sae.cfg.metadata[key] = facts[key]
        self.sae.to(cfg.device)
        self.trainer: SAETrainer[Any, Any] = SAETrainer(cfg=cfg, sae=self.sae, data_provider=iter(()))
        self.mixer = mixer
        self.keep = coverage_filter(self.sae)
        self.total = cfg.total_training_samples
        norm = self.sae.cfg.normalize_activations
        self.norm_kind = norm if norm in ("expected_average_only_in", "covariance_whitening") else None
        self.n_norm = n_norm if self.norm_kind else 0
        self.norm_batches: list[torch.Tensor] = []
        self.done = False

    def feed(self, chunk: ActivationChunk) -> int:
        """Push the rows of one step; train on every batch that is ready. Returns the rows kept."""
        if self.done:
            return 0
        if self.keep is not None:
            chunk = self.keep(chunk)
        for batch in self.mixer.add(chunk):
            if self.done:
                break
            self._consume(batch)
        return len(chunk)

    def _consume(self, batch: ActivationChunk) -> None:
        trainer = self.trainer
        if len(self.norm_batches) < self.n_norm:  # as SAETrainer.fit: the first batches estimate the scaling
            self.norm_batches.append(batch.acts)
            if len(self.norm_batches) == self.n_norm:
                estimate = (trainer.activation_scaler.estimate_scaling_factor
                            if self.norm_kind == "expected_average_only_in"
                            else trainer.activation_scaler.estimate_whitening)
                estimate(d_in=self.sae.cfg.d_in, data_provider=iter(self.norm_batches),
                         n_batches_for_norm_estimate=self.n_norm)
                self.norm_batches = []
                self.n_norm = 0
            return
        if batch.timestep is not None and hasattr(self.sae, "set_row_timesteps"):
            self.sae.set_row_timesteps(batch.timestep, batch.branch)
        trainer.maybe_reset_sparsity()
        trainer.step(batch.acts)
        trainer.n_training_steps += 1
        self.done = trainer.n_training_samples >= self.total

    def finish(self) -> TrainingSAE[Any]:
        """What ``SAETrainer.fit`` does after its loop: fold the normalisation, record the final metadata."""
        scaler = self.trainer.activation_scaler
        if scaler.scaling_factor is not None:
            self.sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
            scaler.scaling_factor = None
        if scaler.whitening is not None:
            self.sae.fold_activation_whitening(mean=scaler.whitening.mean,
                                               whitening_matrix=scaler.whitening.matrix,
                                               unwhitening_matrix=scaler.whitening.inverse_matrix)
            scaler.whitening = None
        self.trainer.set_final_sae_metadata()
        return self.sae


def _forward_slice(store: Any, hooks: list[str], start: int, stop: int) -> dict[str, ActivationChunk]:
    """The rows of every hook for items ``[start, stop)``, from the store's forward(s) over them."""
    parts: dict[str, list[ActivationChunk]] = {h: [] for h in hooks}
    if stop > start:
        for _, _, chunks in store.iter_chunks(start, stop):
            for h in hooks:
                parts[h].append(chunks[h])
    out = {}
    labelled = getattr(store, "kind", "image") == "diffusion"
    for h in hooks:
        if parts[h]:
            out[h] = ActivationChunk.cat(parts[h]) if len(parts[h]) > 1 else parts[h][0]
        else:  # a slice with no items (a short last batch split over many ranks)
            out[h] = ActivationChunk(torch.zeros(0, store.d_in(h), dtype=store.dtype), torch.zeros(0, dtype=torch.int64),
                                     torch.zeros(0, dtype=torch.float64) if labelled else None,
                                     torch.zeros(0, dtype=torch.int8) if labelled else None)
    return out


def _labels(chunk: ActivationChunk, with_labels: bool) -> torch.Tensor:
    """(rows, 1 or 3) float64: the item index (+ timestep and CFG branch), to travel with the rows."""
    cols = [chunk.sample.double()]
    if with_labels:
        cols += [chunk.timestep.double(), chunk.branch.double()]  # type: ignore[union-attr]
    return torch.stack(cols, dim=1)


def _gather_rows(chunks: dict[str, ActivationChunk], owners: dict[str, list[int]], rank: int, world: int,
                 device: torch.device, with_labels: bool) -> dict[str, ActivationChunk]:
    """Every rank's rows of hook ``h``, in rank order, on each rank in ``owners[h]``."""
    hooks = list(owners)
    counts = torch.tensor([len(chunks[h]) for h in hooks], dtype=torch.int64, device=device)
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    table = torch.stack(every).cpu()  # (world, hooks)
    pending = []
    for j, h in enumerate(hooks):
        most = int(table[:, j].max())
        mine = chunks[h]
        payloads = [mine.acts, _labels(mine, with_labels)]
        for dst in owners[h]:
            for k, payload in enumerate(payloads):
                padded = payload.new_zeros((most,) + tuple(payload.shape[1:]), device=device)
                padded[:len(payload)] = payload.to(device)
                bufs = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
                work = dist.gather(padded, gather_list=bufs, dst=dst, async_op=True)
                pending.append((h, dst, k, bufs, work))
    got: dict[str, list[Optional[list[torch.Tensor]]]] = {h: [None, None] for h in hooks}
    for h, dst, k, bufs, work in pending:
        work.wait()
        if rank == dst:
            got[h][k] = [b[:int(table[r, hooks.index(h)])] for r, b in enumerate(bufs)]  # type: ignore[arg-type]
    out = {}
    for h, (acts, labels) in got.items():
        if acts is None:
            continue
        lab = torch.cat(labels).cpu()  # type: ignore[arg-type]
        out[h] = ActivationChunk(torch.cat(acts), lab[:, 0].long(),
                                 lab[:, 1] if with_labels else None,
                                 lab[:, 2].to(torch.int8) if with_labels else None)
    return out


def train_saes_on_the_fly(
    store: Any,
    jobs: Sequence[HookSAE],
    *,
    total_training_samples: int,
    batch_size: int = 4096,
    images_per_step: Optional[int] = None,
    buffer_rows: Optional[int] = None,
    lr: float = 3e-4,
    lr_end: Optional[float] = None,
    lr_scheduler_name: str = "constant",
    lr_warm_up_steps: int = 0,
    lr_decay_steps: int = 0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    device: Optional[str] = None,
    autocast: bool = False,
    dead_feature_window: int = 1000,
    feature_sampling_window: int = 2000,
    n_batches_for_norm_estimate: int = 100,
    seed: int = 0,
    progress: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> list[Optional[TrainingSAE[Any]]]:
    """Train the SAEs of ``jobs`` at once on the activations ``store`` computes on the fly (module docstring).

    ``store``: an ``ImageActivationStore`` (or ``DiffusionActivationStore``) recording every job's hook, the
    same on every rank (same model, source and hooks; checked). ``images_per_step``: source items per global
    step (default: ``store.batch_size * N``, so each rank runs one forward of ``store.batch_size`` items per
    step; pass the same number to get the same SAEs with another N). ``batch_size``: rows per training step
    of each SAE; ``buffer_rows`` (default ``64 * batch_size``) its mixing buffer. Each SAE is trained by
    SAELens's ``SAETrainer`` on ``total_training_samples`` rows (after ``n_batches_for_norm_estimate`` batches
    for its normalisation, when it has one), folded as ``fit`` does, and saved atomically to ``job.out`` by its
    rank. Returns this rank's SAEs (None for the other ranks' jobs). Every rank takes part in every step
    until all SAEs are done.
    """
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world_size is None else world_size
    if world > 1 and not distributed.is_distributed():
        raise RuntimeError("world_size > 1 needs a process group: launch with torchrun and call init_distributed().")
    if not jobs:
        raise ValueError("Give at least one HookSAE job.")
    unknown = sorted({j.hook for j in jobs} - set(store.hook_names))
    if unknown:
        raise ValueError(f"The store does not record the hooks {unknown}; build it with hook_names={store.hook_names} "
                         f"+ {unknown} (one forward captures them all).")
    n_items = store.n_items
    if n_items is None:
        raise ValueError("Training on the fly needs a source of known length (not a streaming dataset): the items "
                         "of every step are cut into one slice per rank. Cache the activations instead.")
    step_items = images_per_step or store.batch_size * world
    if step_items < world:
        raise ValueError(f"images_per_step ({step_items}) must be at least the number of ranks ({world}).")
    if device is None:
        use_gpu = torch.cuda.is_available() and distributed.launched_by_torchrun()
        device = f"cuda:{distributed.local_rank()}" if use_gpu else "cpu"
    settings = {"model": store.describe(jobs[0].hook)["model"], "hooks": {h: store.describe(h) for h in store.hook_names},
                "jobs": [j.hook for j in jobs], "images_per_step": step_items, "batch_size": batch_size,
                "total_training_samples": total_training_samples, "seed": seed}
    distributed.check_ranks_agree(settings, "training settings")
    cfg = SAETrainerConfig(
        total_training_samples=total_training_samples, train_batch_size_samples=batch_size, lr=lr,
        lr_end=lr if lr_end is None else lr_end, lr_scheduler_name=lr_scheduler_name,
        lr_warm_up_steps=lr_warm_up_steps, lr_decay_steps=lr_decay_steps, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, device=device, autocast=autocast, dead_feature_window=dead_feature_window,
        feature_sampling_window=feature_sampling_window, n_batches_for_norm_estimate=n_batches_for_norm_estimate,
    )
    owned: list[_OwnedSAE] = []
    for i, job in enumerate(jobs):
        if i % world == rank:
            mixer = RowMixer(batch_size, buffer_rows or 64 * batch_size,
                             generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            facts = _data_facts(store, job.hook)
            owned.append(_OwnedSAE(i, job, cfg, mixer, n_batches_for_norm_estimate, facts))
    hooks = list(dict.fromkeys(j.hook for j in jobs))
    owners = {h: sorted({i % world for i, j in enumerate(jobs) if j.hook == h}) for h in hooks}
    with_labels = getattr(store, "kind", "image") == "diffusion"
    comm_device = torch.device(device) if dist.is_available() and dist.is_initialized() \
        and dist.get_backend() == "nccl" else torch.device("cpu")
    bar = distributed.node_progress_bar(None, desc="Training SAEs on the fly", unit="item", disable=not progress)
    steps_per_epoch = math.ceil(n_items / step_items)
    step, seen = 0, 0
    fed_this_epoch = {o.index: 0 for o in owned}
    store_progress, store.progress = getattr(store, "progress", False), False  # one node bar instead
    try:
        while True:
            # 0: all my SAEs are done, 1: training, 2: an SAE got no row in a whole epoch (it never would)
            stuck = step and step % steps_per_epoch == 0 and any(not o.done and not fed_this_epoch[o.index] for o in owned)
            state = torch.tensor([2 if stuck else int(not all(o.done for o in owned))], device=comm_device)
            if world > 1:
                dist.all_reduce(state, op=dist.ReduceOp.MAX)
            if state.item() == 0:
                break
            if state.item() == 2:
                raise ValueError("An SAE got no activation row in a whole pass over the source (a timestep-aware SAE "
                                 "whose timestep ranges / CFG branch select none of the rows?): nothing to train on.")
            if step % steps_per_epoch == 0:
                fed_this_epoch = dict.fromkeys(fed_this_epoch, 0)
            slices = item_slices(step, n_items, step_items, world)
            chunks = _forward_slice(store, hooks, *slices[rank])
            if world > 1:
                chunks = _gather_rows(chunks, owners, rank, world, comm_device, with_labels)
            for o in owned:
                fed_this_epoch[o.index] += o.feed(chunks[o.job.hook])
            seen += slices[-1][1] - slices[0][0]
            bar.set_global(seen)
            step += 1
    finally:
        store.progress = store_progress
        bar.close()
    out: list[Optional[TrainingSAE[Any]]] = [None] * len(jobs)
    for o in owned:
        out[o.index] = o.finish()
        if o.job.out is not None:
            save_sae_atomically(o.sae, o.job.out)
    distributed.barrier()
    return out


def bucket_rows(sae: Any, bucket: int) -> Callable[[ActivationChunk], ActivationChunk]:
    """A row filter keeping the rows of bucket ``bucket`` of a timestep-bucketed SAE (from their labels)."""

    def keep(chunk: ActivationChunk) -> ActivationChunk:
        if chunk.timestep is None:
            raise ValueError("Training the buckets of a timestep-bucketed SAE needs timestep-labelled rows: train "
                             "on a diffusion activation cache.")
        plan = sae.plan_rows(chunk.timestep.shape, chunk.timestep.device, labels=(chunk.timestep, chunk.branch),
                             out_of_range="passthrough")
        return chunk.select(plan.bucket == bucket)

    return keep


def train_buckets_distributed(
    sae: Any,
    data: Union[str, Path, ActivationCacheReader],
    *,
    out: Optional[Union[str, Path]] = None,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    normalize_per_bucket: bool = False,
    n_batches_for_norm_estimate: int = 100,
    batch_size: int = 4096,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    **train_kwargs: Any,
) -> Any:
    """Train the buckets of a timestep-bucketed SAE as modules: bucket ``b`` on rank ``b mod N``, each as its own
    SAELens SAE (its own batches of ``batch_size`` rows of its timesteps, optimizer and dead-latent window, as
    :func:`train_sae_data_parallel` alone), from the diffusion cache ``data``. Then every rank receives every
    bucket's weights from its rank, and rank 0 saves the assembled SAE atomically to ``out``.

    Normalisation ends folded into each bucket: ``normalize_activations="expected_average_only_in"`` estimates
    one factor per bucket from its own rows; ``bucket_scaling_factors`` (or ``normalize_per_bucket``, estimated
    by rank 0) are used as each bucket's fixed factor. The assembled SAE has neither left to apply. Returns
    the SAE (assembled, on every rank). ``checkpoint_dir``: one ``bucket_<b>`` folder of checkpoints per bucket.
    """
    if not hasattr(sae, "buckets") or not hasattr(sae, "plan_rows"):
        raise TypeError(f"{type(sae).__name__} has no timestep buckets; train it with train_sae_data_parallel.")
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world_size is None else world_size
    if world > 1 and not distributed.is_distributed():
        raise RuntimeError("world_size > 1 needs a process group: launch with torchrun and call init_distributed().")
    reader = data if isinstance(data, ActivationCacheReader) else ActivationCacheReader(data)
    device = train_kwargs.pop("device", None)
    if device is None:  # as train_sae_data_parallel: this rank's GPU under torchrun when there is one
        use_gpu = torch.cuda.is_available() and distributed.launched_by_torchrun()
        device = f"cuda:{distributed.local_rank()}" if use_gpu else "cpu"
    sae.to(device)
    if world > 1:
        _broadcast_sae(sae)  # every rank assembles into the same SAE
    if normalize_per_bucket:
        factors = None
        if rank == 0:
            factors = estimate_bucket_scaling_factors(sae, reader, n_rows=n_batches_for_norm_estimate * batch_size,
                                                      seed=seed)
        sae.cfg.bucket_scaling_factors = distributed.broadcast_object(factors) if world > 1 else factors
    factors = sae.cfg.bucket_scaling_factors
    per_bucket_estimate = sae.cfg.normalize_activations == "expected_average_only_in"
    stopped: Optional[TrainingStopped] = None
    for b in range(sae.n_buckets):
        if b % world != rank:
            continue
        inner = sae.bucket_sae(b)
        if factors is None and per_bucket_estimate:
            inner.cfg.normalize_activations = "expected_average_only_in"
        try:
            train_sae_data_parallel(
                inner, reader, rank=0, world_size=1, row_filter=bucket_rows(sae, b), batch_size=batch_size, seed=seed,
                device=device,
                scaling_factor=None if factors is None else factors[b], n_batches_for_norm_estimate=n_batches_for_norm_estimate,
                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"bucket_{b}", **train_kwargs)
        except TrainingStopped as e:
            stopped = e
            break
        finally:
            inner.cfg.normalize_activations = "none"  # folded into its weights by SAETrainer.fit
    mine = None if stopped is None else (stopped.steps, stopped.checkpoint)
    stops = [s for s in (distributed.all_gather_object(mine) if world > 1 else [mine]) if s is not None]
    if stops:  # no rank assembles a half-trained SAE
        raise stopped or TrainingStopped(*stops[0])
    if world > 1:
        with torch.no_grad():
            for b in range(sae.n_buckets):
                for t in sae.bucket_sae(b).state_dict().values():
                    dist.broadcast(t, src=b % world)
    sae.cfg.bucket_scaling_factors = None
    sae.cfg.metadata.bucket_scaling_factors = None
    sae.cfg.normalize_activations = "none"
    if out is not None and rank == 0:
        save_sae_atomically(sae, out)
    distributed.barrier()
    return sae
