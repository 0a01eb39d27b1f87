"""SAE training on several processes (torchrun), through SAELens's own ``SAETrainer``.

* :func:`train_sae_data_parallel`: ONE SAE on N ranks. Every rank holds the same SAE and optimizer and
  trains on its disjoint part of each global batch (training/parallel_data.py); after every backward pass
  the gradients are averaged over the ranks, before SAELens clips them and steps the optimizer, so the
  ranks stay identical and N ranks with ``B / N`` rows each take the step one process takes with ``B``.
* :func:`train_saes_distributed`: several SAEs (hooks, layers) at once, SAE ``i`` on rank ``i mod N``
  (training/parallel_modules.py: the buckets of one bucketed SAE, and SAEs trained on the fly).
* Checkpoints (:func:`latest_checkpoint`) written atomically by rank 0; ``resume=True`` continues the run.

Why not ``DistributedDataParallel``: ``SAETrainer`` calls ``sae.training_forward_pass`` (not ``forward``)
and reads ``sae.cfg`` / ``sae.device`` / ``sae.fold_*``, so it cannot drive a DDP wrapper; DDP also needs
every parameter to get a gradient on every rank, which a timestep-bucketed SAE does not give (a bucket
with no rows on one rank). We hook the training loss instead (:class:`GradientAverager`): when its
backward pass ends, all gradients are averaged in one all-reduce, as DDP's reducer does.

Batch-dependent state, synchronised after each step so every rank sees what one process would:
SAETrainer's dead-latent counters (min over ranks) and firing counts (sum), a bucketed SAE's per-bucket
dead-latent counters, changed floating buffers (BatchTopK's threshold estimate: mean of the ranks'
updates), and the ``expected_average_only_in`` scaling factor (from the mean norm over all ranks' rows).
BatchTopK selects its top ``k x B`` activations over the global batch (training/parallel_batchtopk.py).
Not identical to one process: the inner BatchTopK buckets of a timestep-bucketed SAE select within each
rank's rows; ``covariance_whitening`` is refused with more than one rank.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import ACTIVATION_SCALER_CFG_FILENAME, TRAINER_STATE_FILENAME
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_multimodal.compat import sae_trainer_progress_bar
from sae_lens_multimodal.core.atomic import atomic_directory, atomic_write_json
from sae_lens_multimodal.core.files import load_safetensors, load_torch_weights
from sae_lens_multimodal.training import distributed
from sae_lens_multimodal.training.cache import ActivationCacheReader, ActivationChunk
from sae_lens_multimodal.training.parallel_batchtopk import global_batch_topk
from sae_lens_multimodal.training.parallel_data import data_parallel_provider
from sae_lens_multimodal.training.train import _data_facts, estimate_bucket_scaling_factors

__all__ = [
    "DataParallelSAETrainer",
    "GradientAverager",
    "ModuleJob",
    "TrainingStopped",
    "latest_checkpoint",
    "train_sae_data_parallel",
    "train_saes_distributed",
]

CHECKPOINT_PREFIX = "step_"
_WEIGHTS = "sae_weights.safetensors"
_RUN_STATE = "run_state.pt"
_PROGRESS = "progress.json"


class TrainingStopped(Exception):
    """Raised by :func:`train_sae_data_parallel` when ``stop_after_steps`` is reached (a checkpoint was
    written first; run again with ``resume=True`` to continue)."""

    def __init__(self, steps: int, checkpoint: Optional[Path]):
        super().__init__(f"Stopped after {steps} steps; checkpoint {checkpoint}. Resume with resume=True / --resume.")
        self.steps = steps
        self.checkpoint = checkpoint


def latest_checkpoint(checkpoint_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint under ``checkpoint_dir`` (None if there is none).

    Checkpoints are folders ``step_<n>`` swapped into place whole (core/atomic.py), so any one present is
    complete; hidden ``.step_*`` leftovers of an interrupted write are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / _PROGRESS).exists()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


class GradientAverager:
    """``with GradientAverager(sae, world_size):`` averages the SAE's gradients over the ranks in every backward
    pass of its training loss, in place. Does nothing for one rank.

    Overlapped (``overlap=None`` picks it for SAEs without timestep buckets): each parameter's all-reduce
    starts as soon as its gradient is accumulated (``register_post_accumulate_grad_hook``, as DDP's reducer
    does), so the decoder's gradients travel while the encoder's are computed; the backward pass ends when
    all have arrived. That needs every rank to produce the same gradients in the same order, which an SAE
    whose parameters all take part in every step does. Otherwise (timestep buckets or conditioning, where a
    bucket may have no rows on one rank) the all-reduces start at the end of the backward pass, after the
    ranks agree on which parameters have a gradient: one that no rank has keeps ``grad=None``, as in one
    process."""

    def __init__(self, sae: torch.nn.Module, world_size: int, *, overlap: Optional[bool] = None):
        self.sae = sae
        self.world_size = world_size
        self.params = [p for p in sae.parameters() if p.requires_grad]
        self.overlap = not hasattr(sae, "set_row_timesteps") if overlap is None else overlap
        self._armed = False
        self._works: list[tuple[torch.Tensor, Any]] = []
        self._handles: list[Any] = []

    def average(self) -> None:
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32,
                           device=self.params[0].device if self.params else None)
        dist.all_reduce(has)
        works = []
        for p, present in zip(self.params, has.tolist()):
            if not present:
                continue  # no rank has a gradient for it: it stays None everywhere
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            works.append((p.grad, dist.all_reduce(p.grad, async_op=True)))  # in place, no flat copy
        for grad, work in works:
            work.wait()
            grad.div_(self.world_size)

    def _launch(self, p: torch.Tensor) -> None:
        if not self._armed or p.grad is None:
            return
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        self._works.append((p.grad, dist.all_reduce(p.grad, async_op=True)))

    def _finish(self) -> None:
        self._armed = False
        works, self._works = self._works, []
        if len(works) != len(self.params):
            raise RuntimeError(f"{len(self.params) - len(works)} parameters of the SAE got no gradient in this step; "
                               "overlapped gradient averaging needs every parameter in every step (overlap=False).")
        for grad, work in works:
            work.wait()
            grad.div_(self.world_size)

    def __enter__(self) -> "GradientAverager":
        if self.world_size > 1:
            original = self.sae.training_forward_pass
            averager = self
            if self.overlap:
                self._handles = [p.register_post_accumulate_grad_hook(self._launch) for p in self.params]

            def training_forward_pass(step_input: Any) -> TrainStepOutput:
                out = original(step_input)

                def at_backward_start(grad: torch.Tensor) -> torch.Tensor:
                    # queue_callback: run once the whole backward pass has accumulated every gradient
                    averager._armed = True
                    torch.autograd.Variable._execution_engine.queue_callback(
                        averager._finish if averager.overlap else averager.average)
                    return grad

                out.loss.register_hook(at_backward_start)
                return out

            self.sae.training_forward_pass = training_forward_pass  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sae.__dict__.pop("training_forward_pass", None)
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DataParallelSAETrainer(SAETrainer):
    """SAELens's ``SAETrainer`` plus what data-parallel training needs after each step: the batch-dependent
    statistics merged over the ranks, a global progress bar, atomic checkpoints by rank 0, and a stop after
    a given step. Its ``cfg`` describes ONE rank (batch ``B / N``, ``total / N`` samples)."""

    def __init__(self, cfg: SAETrainerConfig, sae: TrainingSAE[Any], data_provider: Any, *, world_size: int = 1,
                 rank: int = 0, global_batch_size: int, checkpoint_dir: Optional[Union[str, Path]] = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 2, stop_after_steps: Optional[int] = None,
                 run_info: Optional[dict[str, Any]] = None, data_position: Callable[[], int] = lambda: 0):
        super().__init__(cfg=cfg, sae=sae, data_provider=data_provider)
        self.world_size, self.rank = world_size, rank
        self.global_batch_size = global_batch_size
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = max(1, keep_checkpoints)
        self.stop_after_steps = stop_after_steps
        self.run_info = run_info or {}
        self.data_position = data_position
        self.last_checkpoint: Optional[Path] = None
        self.n_loop_steps = math.ceil(cfg.total_training_samples / cfg.train_batch_size_samples)

    # ------------------------------------------------------------------ one step
    def _bucket_counters(self) -> Optional[torch.Tensor]:
        return self.sae.steps_since_fired if hasattr(self.sae, "steps_since_fired") else None

    def _buckets_present(self) -> Optional[torch.Tensor]:
        """Which buckets of a bucketed SAE have rows in this rank's coming batch (from its pending labels)."""
        pending = self.sae.__dict__.get("_pending_timesteps")
        if self._bucket_counters() is None or pending is None:
            return None
        plan = self.sae.plan_rows(pending[0].shape, self.sae.device, labels=pending, out_of_range="passthrough")
        idx = plan.bucket[plan.bucket >= 0]
        return torch.bincount(idx, minlength=self.sae.n_buckets).to(self.sae.device) > 0

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        prev = None
        if self.world_size > 1:
            counters = self._bucket_counters()
            prev = {"freq": self.act_freq_scores.clone(), "frac": self.n_frac_active_samples,
                    "buffers": [b.detach().clone() for b in self._float_buffers()],
                    "buckets": None if counters is None else (counters.clone(), self._buckets_present())}
        out = super().step(batch)
        if prev is not None:
            self._merge_statistics(prev)
        done = self.n_training_steps + 1
        stop = self.stop_after_steps is not None and done >= self.stop_after_steps \
            and done < self.n_loop_steps
        if self.checkpoint_dir is not None and (stop or (self.checkpoint_every and done % self.checkpoint_every == 0)):
            self.write_checkpoint(done)
        if stop:
            raise TrainingStopped(done, self.last_checkpoint)
        return out

    def _float_buffers(self) -> list[torch.Tensor]:
        return [b for b in self.sae.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def _merge_statistics(self, prev: dict[str, Any]) -> None:
        # each rank added 1 to every counter and zeroed those its rows fired: the minimum is the one-process value
        dist.all_reduce(self.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)
        delta = self.act_freq_scores - prev["freq"]
        dist.all_reduce(delta)
        self.act_freq_scores = prev["freq"] + delta
        self.n_frac_active_samples = prev["frac"] + self.global_batch_size
        for buf, before in zip(self._float_buffers(), prev["buffers"]):
            change = buf - before
            dist.all_reduce(change)
            buf.copy_(before + change / self.world_size)
        if prev["buckets"] is not None:
            before, present = prev["buckets"]
            counters = self._bucket_counters()
            assert counters is not None
            fired = (counters == 0) & present[:, None]
            flags = torch.stack([fired.float(), present[:, None].float().expand_as(fired)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            merged = torch.where(flags[1] > 0, before + 1, before)
            counters.copy_(torch.where(flags[0] > 0, torch.zeros_like(merged), merged))

    def _update_pbar(self, step_output: TrainStepOutput, pbar: Any, update_interval: int = 100) -> None:
        pbar.set_global(self.n_training_steps * self.global_batch_size)

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, steps: int) -> Optional[Path]:
        """Rank 0 writes ``checkpoint_dir/step_<steps>`` atomically (other ranks hold the same state)."""
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{steps:09d}"
        self.last_checkpoint = path
        if self.rank != 0:
            return path
        with atomic_directory(path) as tmp:
            weights = {k: v.detach().cpu().clone().contiguous() for k, v in self.sae.state_dict().items()}
            save_file(weights, str(tmp / _WEIGHTS))
            self.save_trainer_state(tmp)  # SAELens: optimizer, lr + coefficient schedulers, dead-latent stats, scaler
            counters = self._bucket_counters()
            torch.save({"rng": torch.get_rng_state(),
                        "bucket_steps_since_fired": None if counters is None else counters.cpu()}, tmp / _RUN_STATE)
            atomic_write_json(tmp / _PROGRESS, {
                "steps": steps, "global_samples": steps * self.global_batch_size,
                "data_batches": self.data_position(), "world_size": self.world_size, **self.run_info,
            }, indent=1)
        old = sorted((p for p in self.checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                      and p.name[len(CHECKPOINT_PREFIX):].isdigit()), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for stale in old[:-self.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in self.checkpoint_dir.glob(f".{CHECKPOINT_PREFIX}*"):  # hidden folders of a killed write
            shutil.rmtree(leftover, ignore_errors=True)
        return path

    def load_checkpoint(self, path: Union[str, Path]) -> dict[str, Any]:
        """Restore the SAE, optimizer, schedulers, statistics and step count from a checkpoint folder."""
        path = Path(path)
        progress = json.loads((path / _PROGRESS).read_text())
        for key, value in self.run_info.items():
            if progress.get(key) != value:
                raise ValueError(
                    f"The checkpoint {path} was written by a run with {key}={progress.get(key)!r}, but this run has "
                    f"{key}={value!r}. Resume with the same settings, or start over in another checkpoint directory."
                )
        device = self.cfg.device
        self.sae.load_state_dict(load_safetensors(path / _WEIGHTS, what="checkpoint SAE weights", device=device))
        self.activation_scaler.load(path / ACTIVATION_SCALER_CFG_FILENAME)
        state = load_torch_weights(path / TRAINER_STATE_FILENAME, what="checkpoint trainer state", device=device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.act_freq_scores = state["act_freq_scores"]
        self.n_forward_passes_since_fired = state["n_forward_passes_since_fired"]
        self.n_frac_active_samples = state["n_frac_active_samples"]
        self.started_fine_tuning = state["started_fine_tuning"]
        for name, scheduler_state in state["coefficient_schedulers"].items():
            self.coefficient_schedulers[name].load_state_dict(scheduler_state)
        run = load_torch_weights(path / _RUN_STATE, what="checkpoint run state")
        torch.set_rng_state(run["rng"])
        counters = self._bucket_counters()
        if counters is not None and run["bucket_steps_since_fired"] is not None:
            counters.copy_(run["bucket_steps_since_fired"].to(counters.device))
        # counted per rank: the saved value is rank 0's, possibly with another number of ranks
        self.n_training_steps = int(progress["steps"])
        self.n_training_samples = self.n_training_steps * self.cfg.train_batch_size_samples
        return progress

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def estimate_scaling_factor(self, n_batches: int) -> float:
        """SAELens's ``expected_average_only_in`` factor ``sqrt(d_in) / mean ||x||`` over the next
        ``n_batches`` global batches, from every rank's rows (the same rows one process would use)."""
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(n_batches):
            norms = next(self.data_provider).float().norm(dim=-1)
            total += torch.tensor([norms.double().sum().item(), norms.numel()], dtype=torch.float64)
        if self.world_size > 1:
            total = total.to(self.sae.device)
            dist.all_reduce(total)
        factor = math.sqrt(self.sae.cfg.d_in) / (total[0] / total[1]).item()
        self.activation_scaler.scaling_factor = factor
        return factor


def _broadcast_sae(sae: torch.nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers (as DDP does at construction)."""
    with torch.no_grad():
        for t in list(sae.parameters()) + list(sae.buffers()):
            dist.broadcast(t.data, src=0)


def _rank_config(cfg_kwargs: dict[str, Any], total: int, batch_size: int, world_size: int) -> SAETrainerConfig:
    """One rank's trainer config: batch ``B / N`` and a sample budget giving the same step count (the
    training loop runs ``ceil(total / B)`` steps, the lr schedule spans ``total // B``)."""
    local = batch_size // world_size
    full, rest = divmod(total, batch_size)
    return SAETrainerConfig(total_training_samples=full * local + (1 if rest else 0),
                            train_batch_size_samples=local, **cfg_kwargs)


def train_sae_data_parallel(
    sae: TrainingSAE[Any],
    data: Union[str, Path, ActivationCacheReader],
    *,
    total_training_samples: int,
    batch_size: int = 4096,
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
    normalize_per_bucket: bool = False,
    window_rows: Optional[int] = None,
    prefetch: int = 2,
    seed: int = 0,
    checkpoint_dir: Optional[Union[str, Path]] = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = False,
    stop_after_steps: Optional[int] = None,
    progress: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    row_filter: Optional[Callable[[ActivationChunk], ActivationChunk]] = None,
    scaling_factor: Optional[float] = None,
) -> TrainingSAE[Any]:
    """Train ``sae`` on an activation cache with SAELens's ``SAETrainer``, data-parallel over the ranks of
    the running process group (torchrun; one process without it). ``batch_size`` is the GLOBAL batch: each
    rank trains on ``batch_size / N`` rows of it (module docstring). The result does not depend on N.

    ``checkpoint_dir`` + ``checkpoint_every`` (steps): rank 0 writes ``step_<n>`` folders atomically and
    keeps the last ``keep_checkpoints``. ``resume=True`` continues from the newest one (step count,
    optimizer and schedulers, statistics, data position; also with another N). ``stop_after_steps``
    checkpoints and raises :class:`TrainingStopped` after that many steps (time-limited jobs).
    ``rank`` / ``world_size`` default to the process group's; ``world_size=1`` trains alone.
    ``row_filter`` trains on some rows only, chosen from their labels (the buckets of training/parallel_modules.py);
    ``scaling_factor`` is a fixed input scale (instead of an estimate), folded into the SAE at the end.
    """
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    if world_size > 1 and not distributed.is_distributed():
        raise RuntimeError("world_size > 1 needs a process group: launch with torchrun and call init_distributed().")
    reader = data if isinstance(data, ActivationCacheReader) else ActivationCacheReader(data)
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of ranks ({world_size}).")
    if world_size > 1 and sae.cfg.normalize_activations == "covariance_whitening":
        raise ValueError("normalize_activations='covariance_whitening' is not synchronised across ranks; use "
                         "expected_average_only_in, or train on one rank.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where the run's checkpoints are).")
    if device is None:  # under torchrun: this rank's GPU when there is one (as init_distributed picks)
        use_gpu = torch.cuda.is_available() and distributed.launched_by_torchrun()
        device = f"cuda:{distributed.local_rank()}" if use_gpu else "cpu"
    torch.manual_seed(seed)
    facts = _data_facts(reader, None)
    if facts["d_in"] != sae.cfg.d_in:
        raise ValueError(f"The SAE has d_in={sae.cfg.d_in} but the activations have width {facts['d_in']}.")
    for key in ("hook_name", "model_name", "model_fingerprint"):
        if sae.cfg.metadata.get(key) is None and facts.get(key):
            sae.cfg.metadata[key] = facts[key]
    timestep_aware = hasattr(sae, "set_row_timesteps")
    if timestep_aware and hasattr(sae.cfg, "dead_feature_window"):
        sae.cfg.dead_feature_window = dead_feature_window
    sae.to(device)
    if world_size > 1:
        _broadcast_sae(sae)
    found = latest_checkpoint(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if normalize_per_bucket and found is None:
        if not timestep_aware:
            raise ValueError("normalize_per_bucket needs a timestep-aware SAE; use normalize_activations for others.")
        factors = None
        if rank == 0:
            factors = estimate_bucket_scaling_factors(sae, reader, n_rows=n_batches_for_norm_estimate * batch_size,
                                                      seed=seed)
        factors = distributed.broadcast_object(factors) if world_size > 1 else factors
        sae.cfg.bucket_scaling_factors = factors
        sae.cfg.metadata.bucket_scaling_factors = factors
    cfg = _rank_config(dict(
        lr=lr, lr_end=lr if lr_end is None else lr_end, lr_scheduler_name=lr_scheduler_name,
        lr_warm_up_steps=lr_warm_up_steps, lr_decay_steps=lr_decay_steps, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, device=device, autocast=autocast, dead_feature_window=dead_feature_window,
        feature_sampling_window=feature_sampling_window, n_batches_for_norm_estimate=n_batches_for_norm_estimate,
    ), total_training_samples, batch_size, world_size)
    run_info = {"global_batch_size": batch_size, "seed": seed, "total_training_samples": total_training_samples,
                "window_rows": window_rows or 64 * batch_size, "hook_name": reader.hook_name, "cache_rows": reader.n_rows,
                "architecture": sae.cfg.architecture(), "d_sae": sae.cfg.d_sae}
    start = json.loads((found / _PROGRESS).read_text())["data_batches"] if found is not None else 0
    provider = data_parallel_provider(reader, batch_size, rank=rank, world_size=world_size, sae=sae, seed=seed,
                                      window_rows=window_rows, start_batch=start, prefetch=prefetch, device=device,
                                      row_filter=row_filter)
    local = batch_size // world_size
    trainer = DataParallelSAETrainer(
        cfg, sae, provider, world_size=world_size, rank=rank, global_batch_size=batch_size,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
        stop_after_steps=stop_after_steps, run_info=run_info,
        data_position=lambda: start + provider.rows_served // local,
    )
    if found is not None:
        trainer.load_checkpoint(found)
    elif scaling_factor is not None:
        trainer.activation_scaler.scaling_factor = scaling_factor
    if sae.cfg.normalize_activations == "expected_average_only_in" and trainer.activation_scaler.scaling_factor is None:
        trainer.estimate_scaling_factor(n_batches_for_norm_estimate)
    n_steps = math.ceil(total_training_samples / batch_size)

    bars: list[distributed.NodeProgressBar] = []

    def bar(**_: Any) -> distributed.NodeProgressBar:  # one per machine, counting every rank's rows
        bars.append(distributed.node_progress_bar(n_steps * batch_size, initial=trainer.n_training_steps * batch_size,
                                                  desc="Training SAE", unit="rows", disable=not progress))
        return bars[-1]

    try:
        with GradientAverager(sae, world_size), global_batch_topk(sae, world_size), sae_trainer_progress_bar(bar):
            trainer.fit()
    finally:
        provider.close()
        for b in bars:
            b.close()
    return sae


@dataclass
class ModuleJob:
    """One SAE of :func:`train_saes_distributed`: how to build it, its cache, where to save it."""

    make_sae: Callable[[], TrainingSAE[Any]]
    cache: Union[str, Path]
    out: Union[str, Path]
    checkpoint_dir: Optional[Union[str, Path]] = None


def save_sae_atomically(sae: TrainingSAE[Any], out: Union[str, Path]) -> Path:
    """``sae.save_inference_model`` into ``out`` through core/atomic.py (readers never see half a folder)."""
    with atomic_directory(out) as tmp:
        sae.save_inference_model(str(tmp))
    return Path(out)


def train_saes_distributed(jobs: Sequence[ModuleJob], **train_kwargs: Any) -> list[Optional[TrainingSAE[Any]]]:
    """Train several SAEs at once, job ``i`` on rank ``i mod N``, each alone on its rank (as
    :func:`train_sae_data_parallel` with ``world_size=1``) from its own cache, and save each to its ``out``.
    Returns this rank's SAEs (None for the others' jobs); every rank waits for all at the end."""
    rank, world = distributed.rank(), distributed.world_size()
    out: list[Optional[TrainingSAE[Any]]] = []
    for i, job in enumerate(jobs):
        if i % world != rank:
            out.append(None)
            continue
        sae = job.make_sae()
        train_sae_data_parallel(sae, job.cache, rank=0, world_size=1, checkpoint_dir=job.checkpoint_dir, **train_kwargs)
        save_sae_atomically(sae, job.out)
        out.append(sae)
    distributed.barrier()
    return out
