"""HookedDiffusionPipeline: cache and intervene per actual denoising timestep and CFG branch.

The wrapped diffusers pipeline runs its own ``__call__`` (so images equal the plain pipeline's for the
same seed). Hook functions learn which denoiser call they are in from state set at every denoiser call
(:mod:`sae_lens_multimodal.core.denoising`): the scheduler timestep the denoiser was actually given
(snapped to ``scheduler.timesteps``), its index in the schedule, and the CFG branch of each batch row.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sae_lens_multimodal.core.arguments import check_generation_args, check_guidance_scale, check_timesteps, positive_int
from sae_lens_multimodal.core.denoising import (
    CFG_BATCH_ORDER,
    DenoisingState,
    branch_override,
    branch_rows,
    cfg_row_labels,
    cfg_row_split,
    check_cfg_branch,
    current_denoising_state,
)
from sae_lens_multimodal.core.sae_metadata import record_model_names
from sae_lens_multimodal.diffusion.cache import DiffusionCache, _same
from sae_lens_multimodal.diffusion.hooked import (
    SUPPORTED_DITS,
    SUPPORTED_UNETS,
    HookedDenoiser,
    _scalar_timestep,
)
from sae_lens_multimodal.diffusion.pipeline_classes import SUPPORTED_PIPELINES, load_checked, pipeline_class_for
from sae_lens_multimodal.models.registry import model_name_aliases, resolve_model_name

__all__ = ["HookedDiffusionPipeline", "DenoisingLoop", "TimestepSelector", "SUPPORTED_PIPELINES"]

TimestepSpec = Any  # None | range | number | Iterable[number] | Callable[[t], bool]


class TimestepSelector:
    """Which denoiser calls a cache or a hook applies to, by ACTUAL scheduler timestep.

    * ``None``: every call.
    * a ``range`` with step 1 / -1: timesteps ``t`` in the half-open interval it spans
      (``range(0, 500)``: ``0 <= t < 500``; ``range(999, 499, -1)``: ``499 < t <= 999``); other steps
      behave like the list of their values.
    * a number or an iterable of numbers: exactly those timesteps; each must be in the schedule.
    * a callable ``t -> bool``.
    """

    def __init__(self, spec: TimestepSpec) -> None:
        self.spec = spec
        self.values: list[Any] | None = None
        self.interval: tuple[float, float, bool] | None = None  # (lo, hi, reversed)
        self.predicate: Callable[[Any], bool] | None = None
        if spec is None:
            return
        if isinstance(spec, range) and len(spec) == 0:
            fix = f"range({spec.stop}, {spec.start})" if spec.step > 0 else f"range({spec.stop}, {spec.start}, 1)"
            raise ValueError(
                f"The timestep window {spec!r} is empty (start {'>=' if spec.step > 0 else '<='} end). For the "
                f"window between {min(spec.start, spec.stop)} and {max(spec.start, spec.stop)} write {fix}."
            )
        if isinstance(spec, range) and abs(spec.step) == 1:
            self.interval = (spec.start, spec.stop, spec.step < 0)
            check_timesteps([spec.start, spec.stop - spec.step], "timesteps")
        elif callable(spec) and not isinstance(spec, (range, torch.Tensor)):
            self.predicate = spec
        elif isinstance(spec, (str, bytes)):
            raise TypeError(f"timesteps must be None, a range, numbers or a predicate; got the string {spec!r}.")
        elif isinstance(spec, (torch.Tensor, np.ndarray)):
            self.values = check_timesteps(spec.flatten().tolist(), "timesteps")
        elif isinstance(spec, Iterable):
            self.values = check_timesteps(list(spec), "timesteps")
        elif isinstance(spec, (int, float)) or hasattr(spec, "__float__"):
            self.values = check_timesteps([spec], "timesteps")
        else:
            raise TypeError(f"timesteps must be None, a range, numbers or a predicate; got {type(spec).__name__}")

    def validate(self, schedule: list[Any]) -> None:
        """Raise if a requested timestep is not in the schedule (listing the actual ones); snap to it."""
        if self.values is not None:
            missing = [v for v in self.values if not any(_same(s, v) for s in schedule)]
            if missing:
                raise ValueError(
                    f"Timestep(s) {missing} are not in this run's schedule. The scheduler's actual timesteps are "
                    f"{schedule}. Pick from these (they depend on the scheduler and num_inference_steps), or "
                    "pass a range / predicate."
                )
            self.values = [next(s for s in schedule if _same(s, v)) for v in self.values]
        elif self.interval is not None and not any(self(t) for t in schedule):
            raise ValueError(f"No timestep of this run's schedule falls in {self.spec!r}. The schedule is {schedule}.")

    def __call__(self, t: Any) -> bool:
        if self.spec is None:
            return True
        if t is None or isinstance(t, torch.Tensor):
            return False
        if self.interval is not None:
            lo, hi, rev = self.interval
            return hi < t <= lo if rev else lo <= t < hi
        if self.predicate is not None:
            return bool(self.predicate(t))
        return any(_same(t, v) for v in self.values or [])


def _py(t: Any) -> Any:
    return t.item() if isinstance(t, torch.Tensor) else t


@dataclass
class _Run:
    """Book-keeping for one pipeline call."""

    cfg_mode: str  # "none" | "batched" | "sequential"
    selectors: list[TimestepSelector] = field(default_factory=list)
    schedule: list[Any] | None = None
    index: dict[Any, int] = field(default_factory=dict)
    calls: int = 0
    full_batch: int | None = None
    visits: dict[Any, int] = field(default_factory=dict)


@dataclass
class LoopOutput:
    images: torch.Tensor


class DenoisingLoop:
    """A plain text-conditioned denoising loop over a UNet2DConditionModel-like denoiser and a scheduler.

    ``__call__(prompt_embeds, negative_prompt_embeds=None, num_inference_steps=..., guidance_scale=...,
    latents=None, height=None, width=None, generator=None, added_cond_kwargs=None)`` returns
    ``LoopOutput(images=final_latents)``. With ``guidance_scale > 1`` it batches [uncond, cond] like
    diffusers pipelines. The denoiser is called as ``denoiser(sample, t, encoder_hidden_states=...)``.
    """

    def __init__(self, denoiser: nn.Module, scheduler: Any) -> None:
        self.unet = denoiser
        self.scheduler = scheduler

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
                 num_inference_steps: int = 20, guidance_scale: float = 1.0, latents: torch.Tensor | None = None,
                 height: int | None = None, width: int | None = None, generator: torch.Generator | None = None,
                 added_cond_kwargs: dict | None = None) -> LoopOutput:
        num_inference_steps = positive_int(num_inference_steps, "num_inference_steps")
        check_guidance_scale(guidance_scale)
        cfg = self.unet.config
        param = next(self.unet.parameters())
        batch = prompt_embeds.shape[0]
        if latents is None:
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            shape = (batch, cfg.in_channels, height or size, width or size)
            latents = torch.randn(shape, generator=generator, dtype=param.dtype).to(param.device)
        self.scheduler.set_timesteps(num_inference_steps, device=param.device)
        latents = latents * self.scheduler.init_noise_sigma
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # CFG_BATCH_ORDER: unconditional first
        else:
            embeds = prompt_embeds
        for t in self.scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added_cond_kwargs,
                             return_dict=False)[0]
            if do_cfg:
                uncond, cond = (pred[rows] for rows in cfg_row_split(pred.shape[0]))
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
        return LoopOutput(images=latents)


class HookedDiffusionPipeline(HookedDenoiser):
    """A diffusers text-to-image pipeline whose denoiser has TransformerLens hook points.

    Hook names are the denoiser's (``up_blocks.1.attentions.1.hook_out``, aliases such as
    ``up.1.1.hook_out``, ``transformer_blocks.18.hook_out``); see docs/hooks-diffusion.md.
    ``forward(*args, **kwargs)`` calls the pipeline and returns its images.
    """

    _supported = {**SUPPORTED_UNETS, **SUPPORTED_DITS}

    def __init__(self, pipe: Any = None, *, denoiser: nn.Module | None = None, scheduler: Any = None) -> None:
        if pipe is None:
            if denoiser is None or scheduler is None:
                raise ValueError("Pass a diffusers pipeline, or denoiser=... and scheduler=... for a plain loop.")
            pipe = DenoisingLoop(denoiser, scheduler)
        den = getattr(pipe, "unet", None)
        if den is None:
            den = getattr(pipe, "transformer", None)
        if den is None:
            raise TypeError(
                f"{type(pipe).__name__} has no .unet or .transformer denoiser. Supported pipelines: "
                f"{', '.join(SUPPORTED_PIPELINES)} (or HookedDiffusionPipeline(denoiser=..., scheduler=...))."
            )
        super().__init__(den)
        self.__dict__["pipe"] = pipe
        self.__dict__["_run"] = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> HookedDiffusionPipeline:
        """``DiffusionPipeline.from_pretrained(name_or_path, **kwargs)`` wrapped. Registered names
        (``"shapes-diffusion"``, models/registry.py) resolve to their directory first; a pipeline class
        from outside diffusers is found through :func:`~sae_lens_multimodal.diffusion.pipeline_classes.register_pipeline_class`."""
        source = resolve_model_name(str(name_or_path))
        # Pipeline classes outside diffusers come from diffusion/pipeline_classes.py's registry.
        pipeline_class = pipeline_class_for(source)
        hooked = cls(load_checked(lambda: pipeline_class.from_pretrained(source, **kwargs), source,
                                  what="diffusion pipeline"))
        return record_model_names(hooked, model_name_aliases(str(name_or_path)))  # for SAE model checks

    def to(self, *args: Any, **kwargs: Any) -> HookedDiffusionPipeline:  # type: ignore[override]
        """Move the whole pipeline (text encoders, VAE, denoiser)."""
        self.pipe.to(*args, **kwargs)
        return self

    # -------------------------------------------------------------- CFG layout and denoising state
    def cfg_mode(self, *args: Any, **kwargs: Any) -> str:
        """How this call would run guidance: 'none', 'batched' ([uncond, cond] in one batch) or 'sequential'."""
        name = type(self.pipe).__name__
        layout = SUPPORTED_PIPELINES.get(name, "batched")
        try:
            bound = inspect.signature(self.pipe.__call__).bind_partial(*args, **kwargs)
        except TypeError:
            bound = None
        params = inspect.signature(self.pipe.__call__).parameters

        def arg(key: str) -> Any:
            if bound is not None and key in bound.arguments:
                return bound.arguments[key]
            if key in kwargs:
                return kwargs[key]
            p = params.get(key)
            return None if p is None or p.default is inspect.Parameter.empty else p.default

        if layout == "sequential":  # Flux: true CFG runs a second, negative-prompt call per step
            has_neg = arg("negative_prompt") is not None or (
                arg("negative_prompt_embeds") is not None and arg("negative_pooled_prompt_embeds") is not None
            )
            scale = arg("true_cfg_scale")
            return "sequential" if scale is not None and scale > 1 and has_neg else "none"
        scale = arg("guidance_scale")
        if scale is None or scale <= 1:
            return "none"
        if name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
            if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
                return "none"  # guidance-embedded (LCM-style) UNets run a single branch
        return "batched"

    def _guidance_hint(self) -> str:
        if SUPPORTED_PIPELINES.get(type(self.pipe).__name__) == "sequential":
            return "pass true_cfg_scale > 1 and a negative_prompt (or negative prompt embeddings)"
        return "pass guidance_scale > 1"

    def _state(self, args: tuple, kwargs: dict, raw: Any) -> DenoisingState:
        run: _Run = self._run
        inst = self._installation
        if run.schedule is None:
            run.schedule = [_py(t) for t in self.pipe.scheduler.timesteps]
            for i, t in enumerate(run.schedule):
                run.index.setdefault(t, i)
            for selector in run.selectors:
                selector.validate(run.schedule)
        t = _scalar_timestep(raw, inst.timestep_scale)
        if t is not None and not isinstance(t, torch.Tensor) and t not in run.index:
            t = next((s for s in run.schedule if _same(s, t)), t)  # Flux's t/1000*1000 rounding
        step = run.index.get(t) if not isinstance(t, torch.Tensor) else None
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) else None
        rows: tuple[str, ...] | None = None
        if run.cfg_mode == "none":
            branch = "cond"
        elif run.cfg_mode == "batched":
            if run.full_batch is None:
                run.full_batch = batch
                if batch is not None and batch % 2:
                    raise RuntimeError(
                        f"Guidance is on but the denoiser got an odd batch ({batch}); cannot tell the "
                        "unconditional half from the conditional half."
                    )
            if batch == run.full_batch:
                branch = "both"
                rows = cfg_row_labels(batch) if batch else None
            else:
                branch = "cond"  # e.g. SD3 skip-layer guidance: an extra conditional-only call
        else:
            seen = run.visits.get(t, 0)
            run.visits[t] = seen + 1
            branch = "cond" if seen % 2 == 0 else "uncond"  # diffusers' Flux calls cond first, then uncond
        if rows is None and batch is not None and branch != "both":
            rows = (branch,) * batch
        state = DenoisingState(timestep=t, branch=branch, step_index=step, call_index=run.calls,
                               batch_branches=rows)
        run.calls += 1
        return state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline (same arguments as the diffusers pipeline) and return its images."""
        return self._call(args, kwargs, [])

    def _call(self, args: tuple, kwargs: dict, selectors: list[TimestepSelector]) -> Any:
        check_generation_args(self.pipe.__call__, args, kwargs)
        if self._run is not None:
            raise RuntimeError("This HookedDiffusionPipeline is already running (re-entrant call).")
        inst = self._installation
        self.__dict__["_run"] = _Run(cfg_mode=self.cfg_mode(*args, **kwargs), selectors=selectors)
        previous = inst.state_provider
        inst.state_provider = self._state
        try:
            out = self.pipe(*args, **kwargs)
        finally:
            inst.state_provider = previous
            self.__dict__["_run"] = None
        if hasattr(out, "images"):
            return out.images
        return out[0] if isinstance(out, tuple) else out

    def _check_branch(self, cfg_branch: str | None, args: tuple, kwargs: dict) -> str:
        check_cfg_branch(cfg_branch)
        check_generation_args(self.pipe.__call__, args, kwargs)
        mode = self.cfg_mode(*args, **kwargs)
        if mode == "none" and cfg_branch in ("uncond", "both"):
            raise ValueError(
                f"cfg_branch={cfg_branch!r} asks for the unconditional classifier-free-guidance branch, but "
                f"guidance is off for this call, so only the conditional branch runs. Use cfg_branch='cond' "
                f"(or None), or {self._guidance_hint()}."
            )
        return mode

    # -------------------------------------------------------------- caching
    def run_with_cache(  # type: ignore[override]
        self,
        *args: Any,
        names_filter: Any = None,
        timesteps: TimestepSpec = None,
        cfg_branch: str | None = None,
        offload: str | os.PathLike | None = None,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, DiffusionCache | dict]:
        """Run the pipeline and cache activations per (hook, actual timestep, CFG branch).

        Args:
            names_filter: hook name(s) (aliases allowed) or a predicate on canonical names; None = all hooks.
            timesteps: which denoiser calls to keep (see :class:`TimestepSelector`); None = all.
            cfg_branch: 'cond', 'uncond', 'both' (each half stored under its own branch) or None (every
                branch that runs). 'uncond'/'both' raise when guidance is off.
            offload: None (keep on the activation's device), 'cpu', or a directory path (one safetensors
                file per entry, written atomically; reopen with ``DiffusionCache.load(path)``).
            remove_batch_dim: store ``activation[0]`` (batch of one per branch only).
            **kwargs: the pipeline's own arguments (prompt, num_inference_steps, generator, ...).

        Returns:
            ``(images, DiffusionCache)`` (``cache.to_dict()`` if ``return_cache_object=False``).
        """
        mode = self._check_branch(cfg_branch, args, kwargs)
        names = self._filter_names(names_filter)
        wanted = set(CFG_BATCH_ORDER) if cfg_branch in (None, "both") else {cfg_branch}
        if mode == "none":
            wanted &= {"cond"}
        selector = TimestepSelector(timesteps)
        device = "cpu" if offload == "cpu" else None
        directory = offload if offload not in (None, "cpu") else None
        cache = DiffusionCache(resolve=self.canonical_hook_name, directory=directory, device=device)

        def store(name: str, t: Any, branch: str, act: torch.Tensor) -> None:
            if remove_batch_dim:
                if act.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim=True needs a batch of 1 per branch; {name} has {act.shape[0]}.")
                act = act[0]
            cache.add(name, t, branch, act)

        def make_hook(name: str) -> Callable:
            def save(act: torch.Tensor, hook: Any) -> None:
                state = current_denoising_state()
                if state is None or not selector(state.timestep):
                    return
                if state.branch == "both":
                    uncond_rows, cond_rows = cfg_row_split(act.shape[0])
                    if "uncond" in wanted:
                        store(name, state.timestep, "uncond", act[uncond_rows])
                    if "cond" in wanted:
                        store(name, state.timestep, "cond", act[cond_rows])
                elif state.branch in wanted:
                    store(name, state.timestep, state.branch, act)

            return save

        images = None
        with self.hooks(fwd_hooks=[(name, make_hook(name)) for name in names]):
            images = self._call(args, kwargs, [selector])
        cache.finalize()
        return images, (cache if return_cache_object else cache.to_dict())

    # -------------------------------------------------------------- interventions
    def run_with_hooks(  # type: ignore[override]
        self,
        *args: Any,
        fwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006
        bwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006
        at_timesteps: TimestepSpec = None,
        cfg_branch: str | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the pipeline with TransformerLens hooks applied only at the chosen timesteps and CFG branch.

        ``fwd_hooks`` are ``(name or predicate, fn(activation, hook))`` as in TransformerLens. With
        ``cfg_branch='cond'`` (or 'uncond') under batched guidance, ``fn`` sees only that half of the batch
        and ``current_branch()`` reports that branch; None or 'both' applies to every row. Hooks are removed
        afterwards, also when the run raises. Returns the pipeline's images.
        """
        self._check_branch(cfg_branch, args, kwargs)
        selector = TimestepSelector(at_timesteps)
        for name, _ in fwd_hooks:
            if isinstance(name, str):
                self._filter_names([name])
        wrapped = [(name, _scheduled(fn, selector, cfg_branch)) for name, fn in fwd_hooks]
        with self.hooks(wrapped, bwd_hooks, reset_hooks_end, clear_contexts):
            return self._call(args, kwargs, [selector])


def _scheduled(fn: Callable, selector: TimestepSelector, branch: str | None) -> Callable:
    """Wrap a TransformerLens hook so it fires only at selected timesteps, on the selected CFG rows."""

    def hook(act: torch.Tensor, hook: Any) -> Any:
        state = current_denoising_state()
        if state is None or not selector(state.timestep):
            return None
        if branch in (None, "both") or state.branch == branch:
            return fn(act, hook=hook)
        if state.branch != "both":
            return None  # this call runs the other branch only
        rows = branch_rows(branch, act.shape[0])
        part = act[rows]
        with branch_override(branch):
            result = fn(part, hook=hook)
        if result is None or result is part:
            return None  # in-place edits of `part` are already in `act`
        out = act.clone()
        out[rows] = result
        return out

    return hook
