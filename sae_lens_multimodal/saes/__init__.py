"""Timestep-aware SAE architectures for diffusion models, registered with SAELens.

* ``timestep_bucketed`` (:class:`TimestepBucketedSAE`): one SAELens dictionary per timestep range.
* ``timestep_conditioned`` (:class:`TimestepConditionedSAE`): one dictionary, encoder modulated by a
  learned per-timestep-bucket scale and bias.

Both load with ``SAE.load_from_disk`` / ``SAE.from_pretrained`` and splice with ``run_with_saes``; they
read the current timestep from :mod:`sae_lens_multimodal.core.denoising` (set by the diffusion pipeline, or
explicitly with :func:`timestep_context`, re-exported here).
"""

from __future__ import annotations

from sae_lens_multimodal.core.denoising import timestep_context
from sae_lens_multimodal.saes.bucketed import (
    TimestepBucketedSAE,
    TimestepBucketedSAEConfig,
    TimestepBucketedTrainingSAE,
    TimestepBucketedTrainingSAEConfig,
)
from sae_lens_multimodal.saes.conditioned import (
    TimestepConditionedSAE,
    TimestepConditionedSAEConfig,
    TimestepConditionedTrainingSAE,
    TimestepConditionedTrainingSAEConfig,
)
from sae_lens_multimodal.saes.timesteps import TimestepBuckets

__all__ = [
    "TimestepBucketedSAE",
    "TimestepBucketedSAEConfig",
    "TimestepBucketedTrainingSAE",
    "TimestepBucketedTrainingSAEConfig",
    "TimestepBuckets",
    "TimestepConditionedSAE",
    "TimestepConditionedSAEConfig",
    "TimestepConditionedTrainingSAE",
    "TimestepConditionedTrainingSAEConfig",
    "register_sae_classes",
    "timestep_context",
]

_ARCHITECTURES = {
    "timestep_bucketed": (
        (TimestepBucketedSAE, TimestepBucketedSAEConfig),
        (TimestepBucketedTrainingSAE, TimestepBucketedTrainingSAEConfig),
    ),
    "timestep_conditioned": (
        (TimestepConditionedSAE, TimestepConditionedSAEConfig),
        (TimestepConditionedTrainingSAE, TimestepConditionedTrainingSAEConfig),
    ),
}


def register_sae_classes() -> None:
    """Register our architectures with SAELens's registry (idempotent).

    SAELens's ``register_sae_class`` raises on a second registration; after ``importlib.reload`` our
    classes are new objects, so an entry that is already ours is replaced with the current class
    instead. A different library's class under the same name is an error.
    """
    from sae_lens import registry

    for name, (inference, training) in _ARCHITECTURES.items():
        for table, register, entry in (
            (registry.SAE_CLASS_REGISTRY, registry.register_sae_class, inference),
            (registry.SAE_TRAINING_CLASS_REGISTRY, registry.register_sae_training_class, training),
        ):
            existing = table.get(name)
            if existing is None:
                register(name, *entry)
            elif existing != entry:
                if not existing[0].__module__.startswith("sae_lens_multimodal."):
                    raise ValueError(
                        f"SAE architecture {name!r} is already registered by {existing[0].__module__}; "
                        "sae_lens_multimodal cannot register its own under the same name."
                    )
                table[name] = entry
