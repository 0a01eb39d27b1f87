"""Activation stores, the on-disk activation cache, SAE (and MLP transcoder) training through SAELens's
SAETrainer, and evaluation, for image models (HookedViT / HookedCLIP) and diffusion models; data-parallel and per-module
training on several processes (docs/distributed.md)."""

from __future__ import annotations

from sae_lens_multimodal.training.cache import (
    ActivationCacheReader,
    ActivationCacheWriter,
    ActivationChunk,
    CacheMismatchError,
    model_identity,
)
from sae_lens_multimodal.training.caching import cache_activations
from sae_lens_multimodal.training.diffusion_store import DiffusionActivationStore
from sae_lens_multimodal.training.evaluate import (
    clip_zero_shot,
    diffusion_downstream,
    evaluate_sae,
    image_embedding_cosine,
)
from sae_lens_multimodal.training.image_store import ImageActivationStore
from sae_lens_multimodal.training.parallel_modules import HookSAE, train_saes_on_the_fly
from sae_lens_multimodal.training.parallel_train import (
    ModuleJob,
    TrainingStopped,
    train_sae_data_parallel,
    train_saes_distributed,
)
from sae_lens_multimodal.training.providers import ActivationProvider, activation_provider
from sae_lens_multimodal.training.train import estimate_bucket_scaling_factors, train_sae
from sae_lens_multimodal.training.transcoders import evaluate_transcoder, train_transcoder

__all__ = [
    "ActivationCacheReader",
    "ActivationCacheWriter",
    "ActivationChunk",
    "ActivationProvider",
    "CacheMismatchError",
    "DiffusionActivationStore",
    "HookSAE",
    "ImageActivationStore",
    "ModuleJob",
    "TrainingStopped",
    "activation_provider",
    "cache_activations",
    "clip_zero_shot",
    "diffusion_downstream",
    "estimate_bucket_scaling_factors",
    "evaluate_sae",
    "evaluate_transcoder",
    "image_embedding_cosine",
    "model_identity",
    "train_sae",
    "train_sae_data_parallel",
    "train_saes_distributed",
    "train_saes_on_the_fly",
    "train_transcoder",
]
