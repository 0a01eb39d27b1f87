"""Worlds of factor prompts: what patching, ablation and probes need to know when the answer is known.

The diffusion analyses (:func:`~sae_lens_multimodal.analysis.diffusion_patching.diffusion_patching`,
:func:`~sae_lens_multimodal.analysis.ablation.ablate_components`,
:func:`~sae_lens_multimodal.analysis.temporal.timestep_probes`) take prompts as factor dicts
(``{"color": "red", "shape": "circle", "position": "left"}``) where the ground truth is known. A
:class:`FactorWorld` says how such a world captions a dict, which values each factor takes, how it draws a
balanced prompt set, and which judge (an image classifier per factor) scores a generated image. A world
registers itself for the pipeline classes that draw it, so the analyses find it from the pipeline alone:

>>> register_factor_world(FactorWorld("my-world", values, caption, sample, "my_pkg.judge:Judge"),
...                       pipeline_classes=["MyPipeline"])

or a caller passes ``world=`` explicitly. The shapes world registers itself in
:mod:`sae_lens_multimodal.world` (for ``ShapesDiffusionPipeline``); nothing here imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

__all__ = ["FactorWorld", "FACTOR_WORLDS", "register_factor_world", "factor_world_for", "captions"]

Prompt = Union[str, Mapping[str, str]]


@dataclass(frozen=True)
class FactorWorld:
    """A text-to-image world whose prompts are factor dicts with known ground truth.

    ``judge`` builds the classifier that scores generated images: a callable, or ``"module:attribute"``
    (imported on first use, so registering a world costs no import of its judge's dependencies). A judge
    has ``factors``, ``values`` (factor -> its values), ``membership`` (factor -> [n_classes, n_values]
    one-hot) and ``probabilities(images)`` (uint8 [n, H, W, 3] -> [n, n_classes])."""

    name: str
    #: factor -> its values, in label order (what the probes predict)
    factor_values: Mapping[str, Sequence[str]]
    #: factor dict -> the prompt text
    caption: Callable[[Mapping[str, str]], str]
    #: ``(n, seed)`` -> ``n`` factor dicts covering each factor's values evenly
    sample_prompts: Callable[[int, int], list[dict[str, str]]]
    judge: Union[Callable[[], Any], str]

    def make_judge(self) -> Any:
        """A new judge (see the class doc)."""
        factory = self.judge
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory()

    def captions(self, prompts: Sequence[Prompt]) -> list[str]:
        """Prompt texts: strings as they are, factor dicts captioned."""
        return [p if isinstance(p, str) else self.caption(p) for p in prompts]


#: pipeline class name -> the world it draws
FACTOR_WORLDS: dict[str, FactorWorld] = {}


def register_factor_world(world: FactorWorld, pipeline_classes: Sequence[str], *, overwrite: bool = False) -> None:
    """Register ``world`` for the diffusers pipeline classes (by class name) that draw it."""
    if isinstance(pipeline_classes, str):
        raise TypeError(f"pipeline_classes must be a list of class names; got the string {pipeline_classes!r}.")
    for name in pipeline_classes:
        old = FACTOR_WORLDS.get(name)
        if old is not None and old != world and not overwrite:
            raise ValueError(f"Pipeline class {name!r} already draws the factor world {old.name!r}; pass "
                             f"overwrite=True to replace it with {world.name!r}.")
    for name in pipeline_classes:
        FACTOR_WORLDS[name] = world


def factor_world_for(pipe: Any) -> FactorWorld:
    """The factor world registered for ``pipe``'s class (a diffusers pipeline or a HookedDiffusionPipeline)."""
    inner = getattr(pipe, "pipe", pipe)  # a HookedDiffusionPipeline wraps the diffusers pipeline
    name = type(inner).__name__
    world = FACTOR_WORLDS.get(name)
    if world is None:
        raise ValueError(
            f"No factor world is registered for the pipeline class {name!r}, so factor-dict prompts cannot be "
            f"captioned or judged. Pass world=FactorWorld(...), register one with register_factor_world(world, "
            f"[{name!r}]), or pass string prompts (registered: {sorted(FACTOR_WORLDS) or 'none'})."
        )
    return world


def captions(prompts: Sequence[Prompt], pipe: Any, world: Optional[FactorWorld] = None) -> list[str]:
    """Prompt texts for ``pipe``: strings as they are; factor dicts captioned by ``world`` (default: the
    world registered for ``pipe``)."""
    if all(isinstance(p, str) for p in prompts):
        return list(prompts)  # type: ignore[arg-type]
    return (world or factor_world_for(pipe)).captions(prompts)
