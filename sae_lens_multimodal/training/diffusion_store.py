"""Diffusion activation store: prompts (+ seeds) -> denoiser activations along the sampling trajectory.

Every row is one spatial position (or image token) of one sample at one denoiser call, labelled with
the call's actual scheduler timestep and its CFG branch (0 = unconditional, 1 = conditional, -1 no
guidance information), as read from the running ``HookedDiffusionPipeline``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from sae_lens_multimodal.core.denoising import (
    UNKNOWN_BRANCH,
    broadcast_rows,
    check_cfg_branch,
    current_branch_codes,
    current_timestep,
)
from sae_lens_multimodal.training.cache import ActivationChunk, dtype_name, model_identity
from sae_lens_multimodal.training.sources import batch_ranges

__all__ = ["DiffusionActivationStore"]


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, torch.Tensor):
            return {"tensor": list(value.shape), "sha": hashlib.sha256(value.detach().cpu().float().numpy().tobytes()).hexdigest()[:12]}
        return repr(value)


def _call_default(pipeline: Any, name: str) -> Any:
    """The default of argument ``name`` of the wrapped pipeline's ``__call__`` (None when it has none)."""
    try:
        param = inspect.signature(pipeline.pipe.__call__).parameters.get(name)
    except (TypeError, ValueError, AttributeError):
        return None
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return _jsonable(param.default)


class DiffusionActivationStore:
    """Runs a ``HookedDiffusionPipeline`` on prompts and yields labelled activation rows at its hooks.

    Args:
        pipeline: a :class:`sae_lens_multimodal.diffusion.HookedDiffusionPipeline`.
        hook_names: denoiser hook names (aliases allowed), e.g. ``"up.1.1.hook_out"``.
        prompts: one item per trajectory: a prompt string, or a dict of pipeline arguments for that item
            (e.g. ``{"prompt_embeds": tensor}``; tensors are concatenated along dim 0 across a batch).
        seeds: one seed per item (default ``seed_offset + item index``); item ``i`` is reproducible alone.
        timesteps: which denoiser calls to record (None = all; a range, values or a predicate, in
            scheduler units; see ``TimestepSelector``).
        cfg_branch: ``"cond"``, ``"uncond"`` or None (every branch that runs).
        tokens_per_sample: keep this many random positions per sample and call (None = all).
        batch_size: items per pipeline call.
        pipeline_kwargs: further pipeline arguments (``num_inference_steps``, ``guidance_scale``, ...).
            Without ``guidance_scale`` the pipeline's own default is used, and recorded in the cache metadata.

    Cache metadata records each hook's canonical name (``up_blocks.0.attentions.1.hook_out``) as
    ``hook_name`` and the spelling given, when it was an alias (``up.0.1.hook_out``), as ``hook_alias``.
    """

    kind = "diffusion"
    default_items_per_shard = 16

    def __init__(
        self,
        pipeline: Any,
        hook_names: Union[str, Sequence[str]],
        prompts: Sequence[Union[str, dict[str, Any]]],
        *,
        seeds: Optional[Sequence[int]] = None,
        seed_offset: int = 0,
        timesteps: Any = None,
        cfg_branch: Optional[str] = None,
        tokens_per_sample: Optional[int] = None,
        batch_size: int = 1,
        pipeline_kwargs: Optional[dict[str, Any]] = None,
        dtype: Union[str, torch.dtype] = "float32",
        model_name: Optional[str] = None,
        progress: bool = True,
    ):
        self.pipeline = pipeline
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not names:
            raise ValueError("Give at least one hook name.")
        pipeline._filter_names(names)  # unknown names raise with close matches
        self.hook_names = names
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("Give at least one prompt.")
        if seeds is not None and len(seeds) != len(self.prompts):
            raise ValueError(f"Got {len(seeds)} seeds for {len(self.prompts)} prompts; give one seed per prompt.")
        self.seeds = list(seeds) if seeds is not None else [seed_offset + i for i in range(len(self.prompts))]
        self.timesteps = timesteps
        self.cfg_branch = check_cfg_branch(cfg_branch, allow_both=False)
        self.tokens_per_sample = tokens_per_sample
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        if "guidance_scale" not in self.pipeline_kwargs:  # record the value the pipeline will use
            default = _call_default(pipeline, "guidance_scale")
            if default is not None:
                self.pipeline_kwargs["guidance_scale"] = default
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.progress = progress
        denoiser = pipeline.denoiser
        name = model_name or getattr(getattr(pipeline.pipe, "config", None), "_name_or_path", None) or \
            getattr(denoiser.config, "_name_or_path", None) or type(denoiser).__name__
        self.identity = model_identity(denoiser, str(name) if name else None)
        self._d_in = {}
        for h in names:
            width = pipeline.hook_width(h)
            if width is None:
                raise ValueError(f"Hook {h!r} holds no feature vectors (attention scores/patterns) for an SAE.")
            self._d_in[h] = width

    # ------------------------------------------------------------------ facts
    def d_in(self, hook: str) -> int:
        return self._d_in[hook]

    @property
    def n_items(self) -> int:
        return len(self.prompts)

    def rows_per_item(self) -> None:
        return None  # depends on resolution, steps and guidance: known after the first run

    @property
    def scheduler(self) -> Any:
        return self.pipeline.pipe.scheduler

    @property
    def num_train_timesteps(self) -> Optional[int]:
        return getattr(self.scheduler.config, "num_train_timesteps", None)

    def describe(self, hook: str) -> dict[str, Any]:
        """Cache metadata for ``hook`` (see docs/activation-cache.md)."""
        items = json.dumps([[_jsonable(p), s] for p, s in zip(self.prompts, self.seeds)], sort_keys=True, default=repr)
        ts = self.timesteps
        canonical = self.pipeline.canonical_hook_name(hook)
        alias = {"hook_alias": hook} if canonical != hook else {}
        return {
            "kind": self.kind, "model": self.identity, "hook_name": canonical, **alias, "d_in": self.d_in(hook),
            "dtype": dtype_name(self.dtype),
            "token_policy": "all" if self.tokens_per_sample is None else f"random:{self.tokens_per_sample}",
            "source": {"kind": "prompts", "n_items": self.n_items,
                       "fingerprint": hashlib.sha256(items.encode()).hexdigest()[:16]},
            "diffusion": {
                "scheduler": type(self.scheduler).__name__,
                "num_train_timesteps": self.num_train_timesteps,
                "timesteps": None if ts is None else (repr(ts) if callable(ts) or isinstance(ts, range) else _jsonable(list(ts) if not isinstance(ts, (int, float)) else [ts])),
                "cfg_branch": self.cfg_branch,
                "pipeline_kwargs": {k: _jsonable(v) for k, v in sorted(self.pipeline_kwargs.items())},
            },
        }

    # ------------------------------------------------------------------ running
    def _call_kwargs(self, items: list[Any], seeds: list[int]) -> dict[str, Any]:
        kwargs = dict(self.pipeline_kwargs)
        if all(isinstance(p, str) for p in items):
            kwargs["prompt"] = items
        elif all(isinstance(p, dict) for p in items):
            for key in items[0]:
                values = [p[key] for p in items]
                if isinstance(values[0], torch.Tensor):
                    kwargs[key] = torch.cat(values)
                elif all(v == values[0] for v in values):
                    kwargs[key] = values[0]
                else:
                    raise ValueError(f"Items batched together disagree on {key!r}; use batch_size=1.")
        else:
            raise TypeError("prompts must all be strings or all be dicts of pipeline arguments.")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        kwargs["generator"] = gens[0] if len(gens) == 1 else gens
        return kwargs

    @torch.no_grad()
    def iter_chunks(self, start_item: int = 0, stop_item: Optional[int] = None,
                    align: Optional[int] = None) -> Iterator[tuple[int, int, dict[str, ActivationChunk]]]:
        """``(item_start, item_end, {hook: chunk})`` per pipeline call over trajectories
        ``[start_item, stop_item)`` (``stop_item`` None: to the last prompt), in item order; with ``align``
        (a cache's items per shard) no call crosses a shard boundary."""
        end = self.n_items if stop_item is None else min(self.n_items, stop_item)
        bar = tqdm(total=self.n_items, initial=start_item, unit="traj", desc="Caching diffusion activations",
                   disable=not self.progress)
        try:
            for start, stop in batch_ranges(start_item, end, self.batch_size, align):
                items = self.prompts[start:stop]
                n = len(items)
                parts: dict[str, list[ActivationChunk]] = {h: [] for h in self.hook_names}
                calls = [0]

                def capture_for(hook_name: str) -> Any:
                    def capture(act: torch.Tensor, hook: Any) -> None:
                        parts[hook_name].append(self._rows(act, start, n, calls[0]))
                        calls[0] += 1

                    return capture

                self.pipeline.run_with_hooks(
                    fwd_hooks=[(h, capture_for(h)) for h in self.hook_names], at_timesteps=self.timesteps,
                    cfg_branch=self.cfg_branch, **self._call_kwargs(items, self.seeds[start:start + n]),
                )
                out = {}
                for h in self.hook_names:
                    out[h] = ActivationChunk.cat(parts[h]) if parts[h] else ActivationChunk(
                        torch.zeros(0, self.d_in(h), dtype=self.dtype), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int8))
                    # rows in item order (stable), so shards can be cut by item
                    order = torch.sort(out[h].sample, stable=True).indices
                    out[h] = out[h].select(order)
                bar.update(n)
                yield start, start + n, out
        finally:
            bar.close()

    def _rows(self, act: torch.Tensor, start: int, n_items: int, call: int) -> ActivationChunk:
        """Rows of one hook call, labelled with the running denoiser call's timestep and CFG branch."""
        batch = act.shape[0]
        x = act.detach().reshape(batch, -1, act.shape[-1])  # (batch, positions, channels): channel-last
        positions = x.shape[1]
        if self.tokens_per_sample is not None and self.tokens_per_sample < positions:
            g = torch.Generator().manual_seed(hash((start, call)) % (2**31))
            idx = torch.stack([torch.randperm(positions, generator=g)[: self.tokens_per_sample] for _ in range(batch)])
            x = torch.gather(x, 1, idx.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))
            positions = self.tokens_per_sample
        rows = torch.Size([batch])
        t = current_timestep()
        t_rows = broadcast_rows(math.nan if t is None else t, rows, torch.device("cpu"), "timesteps")
        codes = current_branch_codes(rows)
        if codes is None:
            codes = torch.full(rows, UNKNOWN_BRANCH, dtype=torch.long)
        # Under batched guidance the batch is [uncond items..., cond items...].
        sample = start + torch.arange(batch) % n_items
        return ActivationChunk(
            x.reshape(-1, x.shape[-1]).to("cpu", self.dtype),
            sample.repeat_interleave(positions),
            t_rows.repeat_interleave(positions).to(torch.float64),
            codes.repeat_interleave(positions).to(torch.int8),
        )
