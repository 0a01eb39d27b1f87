"""Training SAEs on image or diffusion activations with SAELens's own ``SAETrainer``.

``train_sae`` builds SAELens's ``SAETrainerConfig`` and ``SAETrainer`` with one of our data providers
and calls ``fit()``; the SAE is any SAELens ``TrainingSAE`` (standard, topk, batchtopk, jumprelu, ...) or
one of our timestep-aware training SAEs, which get their rows' timesteps through the provider.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_multimodal.compat import sae_trainer_progress_bar
from sae_lens_multimodal.core.sae_metadata import sae_model_metadata
from sae_lens_multimodal.training.cache import ActivationCacheReader
from sae_lens_multimodal.training.evaluate import evaluate_sae
from sae_lens_multimodal.training.providers import activation_provider, chunk_stream, coverage_filter

__all__ = ["estimate_bucket_scaling_factors", "final_metrics_line", "train_sae"]


class _Trainer(SAETrainer):
    """SAELens's ``SAETrainer`` with a progress bar that counts every step: SAELens moves it by 100 steps
    at a time, so a run of 195 steps ended at 51% and one of under 100 steps at 0%."""

    def _update_pbar(self, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
        done = min(self.n_training_samples, self.cfg.total_training_samples)
        if self.n_training_steps % update_interval == 0 or done >= self.cfg.total_training_samples:
            losses = " | ".join(f"{name}: {float(value.item() if hasattr(value, 'item') else value):.5f}"
                                for name, value in step_output.losses.items())
            pbar.set_description(f"{self.n_training_steps}| {losses}")
        if done > pbar.n:
            pbar.update(done - pbar.n)


def final_metrics_line(sae: Any, data: Any, *, n_rows: int = 16384, batch_size: int = 4096) -> str:
    """One line of the trained ``sae``'s MSE, L0, explained variance and dead latents on up to ``n_rows``
    rows of ``data`` (what ``sae-lens-mm train`` prints at the end; ``evaluate`` gives the full picture)."""
    was_training = sae.training
    try:
        m = evaluate_sae(sae, data, n_rows=n_rows, batch_size=batch_size, per_timestep=False)["overall"]
    finally:
        sae.train(was_training)
    if not m.get("n_rows"):
        return "Final metrics: no rows to evaluate on."
    return (f"Final metrics on {m['n_rows']} rows: MSE {m['mse']:.4g}, L0 {m['l0']:.2f}, explained variance "
            f"{m['explained_variance']:.4f}, dead latents {m['dead_latents']}/{sae.cfg.d_sae}")


def _no_bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=True, **kwargs)


def _data_facts(data: Any, hook: Optional[str]) -> dict[str, Any]:
    """hook name / model name / d_in recorded with the data, to fill in the SAE's metadata."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        data = ActivationCacheReader(data)
    if isinstance(data, ActivationCacheReader):
        return {"hook_name": data.hook_name, **sae_model_metadata(data.metadata["model"]), "d_in": data.d_in}
    if hasattr(data, "describe") and hasattr(data, "hook_names"):
        names = list(data.hook_names)
        hook = hook or (names[0] if len(names) == 1 else None)
        if hook is None:
            return {}
        meta = data.describe(hook)
        return {"hook_name": hook, **sae_model_metadata(meta["model"]), "d_in": meta["d_in"]}
    return {}


@torch.no_grad()
def estimate_bucket_scaling_factors(sae: Any, data: Any, *, hook: Optional[str] = None, n_rows: int = 65536,
                                    seed: int = 0) -> list[float]:
    """Per-bucket ``sqrt(d_in) / mean ||x||`` (SAELens's 'expected_average_only_in' factor, per bucket).

    Sets ``sae.cfg.bucket_scaling_factors`` and returns it; buckets without rows get 1.0.
    """
    keep = coverage_filter(sae)
    n_buckets = len(sae.cfg.timestep_ranges)
    norm_sum = torch.zeros(n_buckets, dtype=torch.float64)
    count = torch.zeros(n_buckets, dtype=torch.float64)
    seen = 0
    for chunk in chunk_stream(data, hook=hook, epochs=1, seed=seed):
        chunk = keep(chunk) if keep is not None else chunk
        if len(chunk) == 0:
            continue
        plan = sae.plan_rows(chunk.timestep.shape, chunk.timestep.device, labels=(chunk.timestep, chunk.branch),
                             out_of_range="passthrough")
        norms = chunk.acts.double().norm(dim=-1)
        norm_sum.index_add_(0, plan.bucket, norms)
        count.index_add_(0, plan.bucket, torch.ones_like(norms))
        seen += len(chunk)
        if seen >= n_rows:
            break
    factors = [math.sqrt(sae.cfg.d_in) / (s / c) if c > 0 and s > 0 else 1.0
               for s, c in zip(norm_sum.tolist(), count.tolist())]
    sae.cfg.bucket_scaling_factors = factors
    sae.cfg.metadata.bucket_scaling_factors = factors
    return factors


def train_sae(
    sae: TrainingSAE[Any],
    data: Any,
    *,
    total_training_samples: int,
    batch_size: int = 4096,
    hook: Optional[str] = None,
    lr: float = 3e-4,
    lr_end: Optional[float] = None,
    lr_scheduler_name: str = "constant",
    lr_warm_up_steps: int = 0,
    lr_decay_steps: int = 0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    device: str = "cpu",
    autocast: bool = False,
    dead_feature_window: int = 1000,
    feature_sampling_window: int = 2000,
    n_batches_for_norm_estimate: int = 100,
    normalize_per_bucket: bool = False,
    buffer_rows: Optional[int] = None,
    prefetch: int = 2,
    seed: int = 0,
    checkpoint_path: Optional[str] = None,
    n_checkpoints: int = 0,
    save_final_checkpoint: bool = False,
    trainer_config: Optional[SAETrainerConfig] = None,
    progress: bool = True,
) -> TrainingSAE[Any]:
    """Train ``sae`` on ``data`` with SAELens's ``SAETrainer`` and return it (trained in place).

    ``data``: an ``ImageActivationStore`` / ``DiffusionActivationStore`` (activations computed on the
    fly), an activation cache (reader or directory), or a (rows, d_in) tensor; ``hook`` picks the hook
    of a multi-hook store. The data is repeated as needed to reach ``total_training_samples``.
    Timestep-aware SAEs train every bucket from the rows of its timesteps (rows they do not cover are
    skipped); ``normalize_per_bucket`` first sets per-bucket input scaling factors from the data.
    ``trainer_config`` overrides every trainer setting at once (a SAELens ``SAETrainerConfig``).
    ``progress``: show the progress bar (it reaches 100% at the last step).
    The SAE's ``metadata.hook_name`` / ``model_name`` / ``model_fingerprint`` are filled in from the data when unset.
    """
    torch.manual_seed(seed)
    facts = _data_facts(data, hook)
    if facts.get("d_in") is not None and facts["d_in"] != sae.cfg.d_in:
        raise ValueError(f"The SAE has d_in={sae.cfg.d_in} but the activations have width {facts['d_in']}.")
    for key in ("hook_name", "model_name", "model_fingerprint"):
        if facts.get(key) and sae.cfg.metadata.get(key) is None:
            sae.cfg.metadata[key] = facts[key]
    timestep_aware = hasattr(sae, "set_row_timesteps")
    if timestep_aware and hasattr(sae.cfg, "dead_feature_window"):
        sae.cfg.dead_feature_window = dead_feature_window  # bucketed SAEs track dead latents per bucket
    if normalize_per_bucket:
        if not timestep_aware:
            raise ValueError("normalize_per_bucket needs a timestep-aware SAE; use normalize_activations for others.")
        estimate_bucket_scaling_factors(sae, data, hook=hook, n_rows=n_batches_for_norm_estimate * batch_size,
                                        seed=seed)
    cfg = trainer_config or SAETrainerConfig(
        total_training_samples=total_training_samples, train_batch_size_samples=batch_size, lr=lr,
        lr_end=lr if lr_end is None else lr_end, lr_scheduler_name=lr_scheduler_name,
        lr_warm_up_steps=lr_warm_up_steps, lr_decay_steps=lr_decay_steps, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, device=device, autocast=autocast, dead_feature_window=dead_feature_window,
        feature_sampling_window=feature_sampling_window, n_checkpoints=n_checkpoints,
        checkpoint_path=checkpoint_path, save_final_checkpoint=save_final_checkpoint,
        n_batches_for_norm_estimate=n_batches_for_norm_estimate,
    )
    provider = activation_provider(data, cfg.train_batch_size_samples, sae=sae, hook=hook, buffer_rows=buffer_rows,
                                   seed=seed, prefetch=prefetch, device=cfg.device)
    try:
        trainer = _Trainer(cfg=cfg, sae=sae, data_provider=provider)
        if progress:
            trainer.fit()
        else:
            with sae_trainer_progress_bar(_no_bar):
                trainer.fit()
    finally:
        provider.close()
    return sae

