"""The public surface: the top level exports exactly the names below, and every name a subpackage lists in
``__all__`` resolves. HTML building blocks, constants and result records stay importable from their modules
without being re-exported."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import sae_lens_multimodal

TOP_LEVEL = {
    "__version__",
    "HookedViT",
    "HookedViTConfig",
    "HookedCLIP",
    "HookedText",
    "HookedTextConfig",
    "register_with_ecosystem",
    "HookedUNet",
    "HookedDiT",
    "HookedDiffusionPipeline",
    "DiffusionCache",
    "current_timestep",
    "current_branch",
    "HookedVLM",
    "load_model",
    "list_releases",
    "TimestepBucketedSAE",
    "TimestepConditionedSAE",
    "timestep_context",
    "ImageActivationStore",
    "DiffusionActivationStore",
    "cache_activations",
    "train_sae",
    "evaluate_sae",
    "FeatureSteer",
    "DirectionSteer",
    "steer",
    "steering_hooks",
    "steerability",
    "SteerabilityResult",
    "write_feature_dashboards",
}

# Modules that only run as scripts (``python -m``) or need an optional extra; not part of the import surface.
SKIP_PREFIXES = ("sae_lens_multimodal.world.training",)


def _packages() -> list[str]:
    names = ["sae_lens_multimodal"]
    for info in pkgutil.walk_packages(sae_lens_multimodal.__path__, "sae_lens_multimodal."):
        if info.ispkg and not info.name.startswith(SKIP_PREFIXES):
            names.append(info.name)
    return names


def test_top_level_all_is_pinned():
    assert sorted(sae_lens_multimodal.__all__) == sorted(TOP_LEVEL)
    assert len(sae_lens_multimodal.__all__) == len(set(sae_lens_multimodal.__all__)), "duplicate names in __all__"


@pytest.mark.parametrize("package", _packages())
def test_every_exported_name_resolves(package: str):
    module = importlib.import_module(package)
    exported = getattr(module, "__all__", [])
    assert len(exported) == len(set(exported)), f"duplicate names in {package}.__all__"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"


@pytest.mark.parametrize(
    "package, name, home",
    [
        ("sae_lens_multimodal.training", "train_transcoder", "sae_lens_multimodal.training.transcoders"),
        ("sae_lens_multimodal.training", "evaluate_transcoder", "sae_lens_multimodal.training.transcoders"),
    ],
)
def test_subpackages_re_export_their_entry_points(package: str, name: str, home: str):
    module = importlib.import_module(package)
    assert name in module.__all__
    assert getattr(module, name) is getattr(importlib.import_module(home), name)


@pytest.mark.parametrize(
    "package, name, home",
    [
        ("sae_lens_multimodal.reports", "Page", "sae_lens_multimodal.reports.html"),
        ("sae_lens_multimodal.reports", "table", "sae_lens_multimodal.reports.html"),
        ("sae_lens_multimodal.reports", "TopExample", "sae_lens_multimodal.reports.dashboard_data"),
        ("sae_lens_multimodal.steering", "MODES", "sae_lens_multimodal.steering.specs"),
        ("sae_lens_multimodal.analysis", "shapes_prompts", "sae_lens_multimodal.world.causal"),
        ("sae_lens_multimodal.steering", "label_accuracy", "sae_lens_multimodal.world.feature_checks"),
        ("sae_lens_multimodal.diffusion", "SUPPORTED_UNETS", "sae_lens_multimodal.diffusion.hooked"),
    ],
)
def test_building_blocks_and_constants_stay_in_their_modules(package: str, name: str, home: str):
    assert name not in importlib.import_module(package).__all__
    assert hasattr(importlib.import_module(home), name)
