"""What :class:`~sae_lens_multimodal.diffusion.HookedDiffusionPipeline` knows about a diffusers pipeline
class: how it batches classifier-free guidance, and, for a class that is not one of diffusers' own, where
to import it from.

diffusers looks up the class named in a saved pipeline's ``model_index.json`` (``_class_name``) in its own
namespace only, so a pipeline class defined elsewhere (such as the shapes world's
``ShapesDiffusionPipeline``) has to be registered before ``HookedDiffusionPipeline.from_pretrained`` can
load its directory:

>>> register_pipeline_class("MyPipeline", "my_package.pipelines:MyPipeline", cfg_layout="batched")
>>> HookedDiffusionPipeline.from_pretrained("path/to/saved/my-pipeline")

The target is a class or a ``"module:attribute"`` string, imported on first use (so registering costs no
import of diffusers).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from sae_lens_multimodal.core.files import check_weight_files, refuse_partial_loads
from sae_lens_multimodal.models.registry import load_model_providers

__all__ = ["SUPPORTED_PIPELINES", "CFG_LAYOUTS", "PIPELINE_CLASSES", "register_pipeline_class", "pipeline_class_for",
           "load_checked"]

T = TypeVar("T")

#: the ways a pipeline runs classifier-free guidance: both branches in one batch ``[uncond, cond]``, or a
#: second denoiser call per step for the negative prompt (Flux's true CFG)
CFG_LAYOUTS = ("batched", "sequential")

#: pipeline class name -> how it batches classifier-free guidance (unlisted classes: "batched")
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "batched",
    "StableDiffusionXLPipeline": "batched",
    "PixArtAlphaPipeline": "batched",
    "PixArtSigmaPipeline": "batched",
    "StableDiffusion3Pipeline": "batched",
    "FluxPipeline": "sequential",
    "DenoisingLoop": "batched",
}

#: class name -> the class, or "module:attribute" to import it from (pipeline classes outside diffusers)
PIPELINE_CLASSES: dict[str, Union[type, str]] = {}


def register_pipeline_class(name: str, target: Union[type, str], *, cfg_layout: str = "batched",
                            overwrite: bool = False) -> None:
    """Register a diffusers pipeline class defined outside diffusers under its class ``name`` (the
    ``_class_name`` its ``save_pretrained`` writes to ``model_index.json``), with its guidance layout."""
    if cfg_layout not in CFG_LAYOUTS:
        raise ValueError(f"cfg_layout must be one of {CFG_LAYOUTS}; got {cfg_layout!r}.")
    if isinstance(target, str) and target.count(":") != 1:
        raise ValueError(f"Pipeline class target {target!r} must be a class or 'module:attribute'.")
    old = PIPELINE_CLASSES.get(name)
    if old is not None and old != target and not overwrite:
        raise ValueError(f"Pipeline class {name!r} is already registered as {old!r}; pass overwrite=True to "
                         f"replace it with {target!r}.")
    PIPELINE_CLASSES[name] = target
    SUPPORTED_PIPELINES[name] = cfg_layout


def _resolve(name: str) -> type:
    target = PIPELINE_CLASSES[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        PIPELINE_CLASSES[name] = target
    return target


def pipeline_class_for(source: Union[str, os.PathLike]) -> Any:
    """The class to call ``from_pretrained(source)`` on: the registered class named by a local
    ``model_index.json``, else diffusers' ``DiffusionPipeline`` (which finds its own classes)."""
    from diffusers import DiffusionPipeline  # optional heavy dependency

    index = Path(source) / "model_index.json"
    if not index.is_file():
        return DiffusionPipeline
    name = json.loads(index.read_text()).get("_class_name")
    if isinstance(name, str) and name not in PIPELINE_CLASSES:
        import diffusers  # optional heavy dependency, as above

        if not hasattr(diffusers, name):
            load_model_providers()  # a class from a package that registers itself lazily
    if isinstance(name, str) and name in PIPELINE_CLASSES:
        return _resolve(name)
    return DiffusionPipeline


def load_checked(load: Callable[[], T], source: Union[str, os.PathLike], *, what: str,
                 subfolder: Optional[str] = None) -> T:
    """Run a diffusers ``from_pretrained`` (``load``) of ``source`` so that a checkpoint it cannot fully load is
    refused, naming the file: in a local directory (``subfolder`` of it, when that exists) every component with a
    ``config.json`` must hold a complete weights file, and weights the library would initialise randomly
    (diffusers only logs them) raise :class:`~sae_lens_multimodal.core.files.IncompleteCheckpointError`."""
    path = Path(source).expanduser()
    if subfolder and (path / subfolder).is_dir():
        path = path / subfolder
    if path.is_dir():
        components = [path] if (path / "config.json").is_file() else []
        components += sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
        for component in components:
            check_weight_files(component, what=f"{what}: component directory {component}")
    with refuse_partial_loads(f"{what} ({source})"):
        return load()
