"""One check per kind of runtime argument of the public API: feature indices, finite numbers, step counts,
guidance scales, prompts and hooks of the right layout.

Every analysis, steering and diffusion entry point routes its arguments through these functions, so a bad
value gets the same kind of answer wherever it is given: what was wrong, what was expected, and the fix.
(CLI options have their own validators in ``cli_options.py``.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.core.contract import LAYOUTS, HookSpec

__all__ = [
    "FeatureIndexError",
    "as_feature_indices",
    "as_feature_index",
    "as_indices",
    "as_layer_indices",
    "finite_float",
    "finite_values",
    "positive_int",
    "check_guidance_scale",
    "check_timesteps",
    "check_generation_args",
    "check_prompts",
    "non_negative_latents",
    "check_latent_value",
    "hook_with_layout",
    "check_layout",
    "FEATURE_LAYOUTS",
]

#: Layouts whose last dimension is a feature dimension: what an SAE, a direction or a probe can read.
FEATURE_LAYOUTS = ("tokens", "heads", "pooled", "spatial", "flat_tokens")

#: SAELens architectures (and this package's inner architectures) whose latents are never negative: a
#: ReLU, TopK-with-ReLU or JumpReLU activation. (``abstopk`` and matching pursuit can be negative.)
NON_NEGATIVE_ARCHITECTURES = frozenset({
    "standard", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated",
    "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
})


class FeatureIndexError(IndexError, ValueError):
    """A feature index outside ``0 .. d_sae - 1`` (an IndexError, and a ValueError for callers catching
    bad arguments in general)."""


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} numpy array of shape {x.shape}"
    return f"{type(x).__name__} {x!r}"


def _one_index(v: Any, what: str, noun: str) -> int:
    """An integer index from an int, a numpy integer or a 0-d integer tensor / array (bools and floats refused)."""
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{what} must be integer {noun} indices; got the bool {v!r}. Pass the index itself, e.g. 3.")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        v = float(v)
        hint = f" Pass int({v!r})." if v.is_integer() else ""
        raise TypeError(f"{what} must be integer {noun} indices; got the float {v!r}.{hint}")
    raise TypeError(f"{what} must be integer {noun} indices (an int, a list of ints or an integer tensor); got {_describe(v)}.")


def as_indices(x: Any, n: int, *, what: str, noun: str, owner: str, allow_duplicates: bool = False) -> list[int]:
    """Indices into ``n`` things as a list of ints, each in ``0 .. n - 1`` (:func:`as_feature_indices` for
    the accepted forms). ``noun`` names one thing (``"feature"``, ``"layer"``), ``owner`` says who has ``n``
    of them (``"this SAE has d_sae=64 latents"``)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.ndim > 1:
            raise ValueError(f"{what} must be one index or a 1-d list of indices; got {_describe(x)}. Flatten it first.")
        kind = x.dtype.is_floating_point or x.dtype.is_complex if isinstance(x, torch.Tensor) else x.dtype.kind in "fc"
        is_bool = x.dtype == torch.bool if isinstance(x, torch.Tensor) else x.dtype.kind == "b"
        if kind or is_bool:
            raise TypeError(
                f"{what} must be integer {noun} indices; got {_describe(x)}. Pass an integer tensor "
                "(x.long()), or mask.nonzero() for a boolean mask."
            )
        items = [x.item()] if x.ndim == 0 else x.tolist()
    elif isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be integer {noun} indices; got the string {x!r}.")
    elif isinstance(x, dict):
        raise TypeError(f"{what} must be integer {noun} indices; got a dict.")
    elif isinstance(x, (set, frozenset)):
        items = sorted(x)
    elif isinstance(x, Iterable):
        items = list(x)
    else:
        items = [x]
    ids = [_one_index(v, what, noun) for v in items]
    n = int(n)
    if not ids:
        raise ValueError(f"{what} is empty: pass at least one {noun} index (0 .. {n - 1}).")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        neg = " Negative indices are not counted from the end here." if bad[0] < 0 else ""
        raise FeatureIndexError(
            f"{noun.capitalize()} index {bad[0]} in {what} is out of range: {owner} (indices 0..{n - 1}).{neg}"
        )
    if not allow_duplicates and len(set(ids)) != len(ids):
        seen: set[int] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"{noun.capitalize()} index {dup} is given twice in {what}; pass each {noun} once.")
    return ids


def as_feature_indices(x: Any, d_sae: int, *, what: str = "features", allow_duplicates: bool = False) -> list[int]:
    """Feature (SAE latent) indices as a list of ints, each in ``0 .. d_sae - 1``.

    Accepts an int, a list / tuple / range of ints, a 0-d or 1-d integer tensor or numpy array (or numpy
    integers). Refuses floats, bools, strings, 2-d arrays, an empty selection, negative or out-of-range
    indices (:class:`FeatureIndexError`) and, unless ``allow_duplicates``, an index given twice.
    """
    return as_indices(x, d_sae, what=what, noun="feature", owner=f"this SAE has d_sae={int(d_sae)} latents",
                      allow_duplicates=allow_duplicates)


def as_layer_indices(x: Any, n_layers: int, *, what: str = "layers", model: str = "this model") -> list[int]:
    """Block indices ``0 .. n_layers - 1`` (same accepted forms and refusals as :func:`as_feature_indices`)."""
    return as_indices(x, n_layers, what=what, noun="layer", owner=f"{model} has n_layers={int(n_layers)} blocks")


def as_feature_index(x: Any, d_sae: int, *, what: str = "feature") -> int:
    """One feature index (an int, numpy integer or 0-d integer tensor) in ``0 .. d_sae - 1``."""
    if isinstance(x, (list, tuple, range)) or (isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim != 0):
        raise TypeError(f"{what} is one feature index; got {_describe(x)}. Call once per feature.")
    return as_feature_indices(x, d_sae, what=what)[0]


def finite_float(x: Any, what: str) -> float:
    """``x`` as a Python float; a number that is NaN or infinite, a bool, a string or a tensor of several
    values is refused, naming ``what``."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if (x.size if isinstance(x, np.ndarray) else x.numel()) != 1:
            raise TypeError(f"{what} must be one number; got {_describe(x)}.")
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be a number; got {_describe(x)}.")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number; got {v}. Pass a finite value.")
    return v


def finite_values(x: Any, what: str) -> torch.Tensor:
    """One number or several as a 1-d float64 tensor, every entry finite."""
    if isinstance(x, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{what} must be a number or a list of numbers; got {_describe(x)}.")
    try:
        v = torch.as_tensor(x.tolist() if isinstance(x, np.ndarray) else x).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what} must be a number or a list of numbers; got {_describe(x)}.") from err
    if v.dtype == torch.bool or v.dtype.is_complex:
        raise TypeError(f"{what} must be real numbers; got {_describe(x)}.")
    v = v.to(torch.float64)
    if v.numel() == 0:
        raise ValueError(f"{what} is empty: pass a number.")
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"{what} must be finite; entry {i} is {float(v[i])} ({int(bad.sum())} non-finite of {v.numel()}). "
            "Pass finite values."
        )
    return v


def positive_int(x: Any, what: str) -> int:
    """``x`` as an int >= 1 (ints, numpy integers, integral 0-d tensors; bools and floats refused)."""
    if isinstance(x, (torch.Tensor, np.ndarray)) and (x.numel() if isinstance(x, torch.Tensor) else x.size) == 1:
        x = x.item()
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer; got {_describe(x)}.")
    if int(x) < 1:
        raise ValueError(f"{what} must be at least 1; got {int(x)}.")
    return int(x)


def check_guidance_scale(x: Any, what: str = "guidance_scale") -> Optional[float]:
    """A classifier-free guidance scale: None, or a finite number >= 0 (<= 1 turns guidance off)."""
    if x is None:
        return None
    v = finite_float(x, what)
    if v < 0:
        raise ValueError(
            f"{what} must be >= 0; got {v}. A negative scale pushes images away from the prompt; values <= 1 turn "
            "classifier-free guidance off, values > 1 turn it on."
        )
    return v


def check_prompts(prompts: Any, what: str = "prompt") -> None:
    """A prompt, or a non-empty list of them (strings, or factor dicts for the analyses)."""
    if prompts is None:
        return
    if isinstance(prompts, str):
        return
    if isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        if len(prompts) == 0:
            raise ValueError(f"{what} is an empty list: pass at least one prompt.")
        bad = [p for p in prompts if not isinstance(p, (str, dict))]
        if bad:
            raise TypeError(f"{what} must be strings (or factor dicts); got {_describe(bad[0])} in the list.")
        return
    raise TypeError(f"{what} must be a string or a list of strings; got {_describe(prompts)}.")


def check_timesteps(values: Sequence[Any], what: str = "timesteps") -> list[Any]:
    """Timesteps as given (numbers), each a finite number >= 0; bools, strings and NaN refused. Whether they are
    in a run's schedule is checked when the schedule is known (``TimestepSelector.validate``)."""
    out = []
    for v in values:
        if isinstance(v, (torch.Tensor, np.ndarray)) and (v.numel() if isinstance(v, torch.Tensor) else v.size) == 1:
            v = v.item()
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{what} must be numbers (scheduler timesteps such as 999 or 500.0); got {_describe(v)}.")
        if not math.isfinite(float(v)) or v < 0:
            raise ValueError(
                f"{what} must be scheduler timesteps, finite numbers >= 0 (e.g. 0..999 for a 1000-step scheduler); "
                f"got {v}."
            )
        out.append(v.item() if isinstance(v, np.generic) else v)
    return out


#: Pipeline-call arguments checked by :func:`check_generation_args` (the rest are the pipeline's own business).
_POSITIVE_INT_ARGS = ("num_inference_steps", "num_images_per_prompt", "height", "width")
_SCALE_ARGS = ("guidance_scale", "true_cfg_scale")


def check_generation_args(call: Any, args: tuple, kwargs: dict) -> None:
    """Check a diffusers pipeline call's arguments before it runs: step counts and sizes are integers >= 1,
    guidance scales finite and >= 0, prompts a string or a non-empty list of strings (diffusers returns
    noise for 0 steps and fails deep inside for the rest)."""
    import inspect

    try:
        bound = dict(inspect.signature(call).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):  # the pipeline reports its own signature errors
        bound = dict(kwargs)
    extra = bound.pop("kwargs", None)
    if isinstance(extra, dict):
        bound.update(extra)
    for key in _POSITIVE_INT_ARGS:
        if bound.get(key) is not None:
            positive_int(bound[key], key)
    for key in _SCALE_ARGS:
        check_guidance_scale(bound.get(key), key)
    for key in ("prompt", "prompt_2", "negative_prompt"):
        if key in bound:
            check_prompts(bound[key], key)


def _architecture(sae: Any) -> Optional[str]:
    cfg = getattr(sae, "cfg", None)
    arch_fn = getattr(type(cfg), "architecture", None) if cfg is not None else None
    try:
        arch = arch_fn() if callable(arch_fn) else None
    except Exception:  # a config class without an architecture name
        arch = None
    if arch in ("timestep_bucketed", "timestep_conditioned"):
        arch = getattr(cfg, "inner_architecture", arch)
    return arch


def non_negative_latents(sae: Any) -> bool:
    """Whether ``sae``'s latents are never negative (ReLU / TopK / JumpReLU / gated architectures)."""
    return _architecture(sae) in NON_NEGATIVE_ARCHITECTURES


def check_latent_value(sae: Any, mode: str, value: torch.Tensor, what: str = "value") -> None:
    """Refuse an edit that would set non-negative latents to a negative value (``clamp`` to < 0, ``scale``
    by < 0): such an SAE never produces it, so its decoder's answer means nothing."""
    if not non_negative_latents(sae) or mode not in ("clamp", "scale"):
        return
    if bool((value < 0).any()):
        neg = float(value[value < 0][0])
        verb = "clamping" if mode == "clamp" else "scaling"
        raise ValueError(
            f"{what}={neg} would make latents negative ({verb}), but this SAE's latents are never negative "
            f"(architecture {_architecture(sae)!r}). Use a value >= 0, mode='ablate' to remove a feature, or a "
            "DirectionSteer along -W_dec[feature] to push against it."
        )


def hook_with_layout(model: Any, name: str, layouts: Sequence[str] = FEATURE_LAYOUTS, *, purpose: str = "this") -> HookSpec:
    """The spec of hook ``name`` on ``model`` (unknown names: the model's KeyError with close matches),
    refused with a ValueError when its layout is not one of ``layouts``, naming hooks that are."""
    if not isinstance(name, str):
        raise TypeError(f"A hook name is a string such as 'blocks.0.hook_resid_post'; got {_describe(name)}.")
    return check_layout(model, model.locate(name), layouts, purpose=purpose)


def check_layout(model: Any, spec: HookSpec, layouts: Sequence[str] = FEATURE_LAYOUTS, *, purpose: str = "this") -> HookSpec:
    """``spec`` if its layout is one of ``layouts``; else a ValueError naming the layout, the expected ones and
    hooks of the same block that fit."""
    if spec.layout in layouts:
        return spec
    suggestions = [s.name for s in model.hook_specs().values()
                   if s.layout in layouts and s.layer == spec.layer and s.part == spec.part][:3]
    hint = f" Hooks that fit near it: {', '.join(repr(s) for s in suggestions)}." if suggestions else ""
    expected = "; ".join(f"{k} {LAYOUTS[k]}" for k in layouts)
    raise ValueError(
        f"Hook {spec.name!r} has layout {spec.layout!r} ({LAYOUTS[spec.layout]}), which {purpose} cannot use: "
        f"it needs one of: {expected}.{hint}"
    )
