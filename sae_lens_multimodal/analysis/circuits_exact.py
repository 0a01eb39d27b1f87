"""Exact activation patching on the same units as :func:`~sae_lens_multimodal.analysis.attribution.attribution_patching`.

The reference attribution patching estimates: for each unit of each hook (a position, a head, a head at a
position, an SAE feature at a position or the SAE's error at a position, the whole hook) the clean input is
rerun with that unit set to its value on the corrupted input, and ``metric(patched) - metric(clean)`` is
recorded. One forward pass per unit (units where the two runs agree exactly are skipped: their effect is 0).
SAE features are patched with the error term kept: ``x + decode(f with f_i := f'_i) - decode(f)``; a
transcoder's the same at the MLP output hook it writes, ``f`` and ``f'`` computed from the MLP's clean and
corrupted inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from sae_lens_multimodal.analysis.attribution import (
    _AXES,
    PER_MODES,
    AttributionResult,
    Inputs,
    Metric,
    _indices,
    batch_rows,
    call_model,
    check_call,
    check_model,
    recording,
    resolve_hooks,
    sae_map,
    scalar_metric,
    to_device,
    unit_axes,
)
from sae_lens_multimodal.analysis.transcoder_sites import is_transcoder, read_hook, reconstruct

__all__ = ["exact_patching"]


@torch.no_grad()
def exact_patching(
    model: Any,
    clean: Inputs,
    corrupted: Inputs,
    metric: Metric,
    *,
    hooks: Union[str, Sequence[str]] = (),
    per: str = "position",
    saes: Any = None,
    device: Union[str, torch.device] = "cpu",
    timestep: Any = None,
    cfg_branch: Optional[str] = None,
    progress: bool = False,
) -> AttributionResult:
    """``metric(clean with one unit := its corrupted value) - metric(clean)`` for every unit of every hook;
    arguments as :func:`~sae_lens_multimodal.analysis.attribution.attribution_patching` (one forward pass per
    unit, so keep the grid small)."""
    if per not in PER_MODES:
        raise ValueError(f"per must be one of {PER_MODES}; got {per!r}.")
    device = check_model(model, device)
    check_call(model, clean, timestep, cfg_branch)
    sae_by_hook = sae_map(model, saes)
    if sae_by_hook and per != "feature":
        raise ValueError(f"SAEs give feature units: pass per='feature' (got per={per!r}), or leave saes out.")
    specs = resolve_hooks(model, hooks, per, sae_by_hook)
    clean, corrupted = to_device(clean, device), to_device(corrupted, device)
    reads = {h: read_hook(model, t) for h, t in sae_by_hook.items() if is_transcoder(t)}  # transcoder inputs
    names = list(dict.fromkeys([s.name for s in specs] + list(reads.values())))
    was_training = model.training
    model.eval()
    try:
        corrupt_acts: dict[str, torch.Tensor] = {}
        with recording(model, names, corrupt_acts, leaf=False):
            corrupted_value = float(scalar_metric(metric, call_model(model, corrupted, timestep)))
        clean_acts: dict[str, torch.Tensor] = {}
        with recording(model, names, clean_acts, leaf=False):
            base = float(scalar_metric(metric, call_model(model, clean, timestep)))
        scores, errors, methods = {}, {}, {}
        for spec in specs:
            a, a2 = clean_acts[spec.name], corrupt_acts[spec.name]
            rows = batch_rows(cfg_branch, a.shape[0]) if spec.layout != "flat_tokens" else slice(None)
            axes = _AXES[spec.layout]
            if spec.name in sae_by_hook:
                read = reads.get(spec.name)
                x_read = None if read is None else (clean_acts[read], corrupt_acts[read])
                scores[spec.name], errors[spec.name] = _sae_exact(
                    model, spec, sae_by_hook[spec.name], clean, metric, timestep, a, a2, rows, base, progress, x_read)
                methods[spec.name] = "exact"
                continue
            keep = unit_axes(spec, per)
            shape = tuple(a.shape[axes.index(ax)] for ax in keep)
            out = torch.zeros(shape)
            for unit in tqdm(list(_indices(torch.Size(shape))), desc=spec.name, disable=not progress):
                index = tuple(rows if ax == "b" else unit[keep.index(ax)] if ax in keep else slice(None) for ax in axes)
                if torch.equal(a[index], a2[index]):
                    continue

                def put(act: torch.Tensor, hook: Any, index: tuple = index) -> torch.Tensor:
                    act = act.clone()
                    act[index] = a2[index].to(act.dtype)
                    return act

                with model.hooks(fwd_hooks=[(spec.name, put)]):
                    out[unit] = float(scalar_metric(metric, call_model(model, clean, timestep))) - base
            scores[spec.name] = out
            methods[spec.name] = "exact"
    finally:
        model.train(was_training)
    return AttributionResult(scores=scores, per=per, errors=errors, methods=methods, clean_metric=base,
                             corrupted_metric=corrupted_value)


def _sae_exact(model: Any, spec: Any, sae: Any, clean: Inputs, metric: Metric, timestep: Any, x: torch.Tensor,
               x2: torch.Tensor, rows: slice, base: float, progress: bool,
               x_read: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (position, feature) and each position's error node patched alone, the rest of the SAE
    decomposition (and its error term) kept. A transcoder's (clean, corrupted) inputs are ``x_read``; the
    patch goes into the hook it writes (its input, upstream, is the clean run's in every patched run)."""
    r, r2 = (x, x2) if x_read is None else x_read
    f2 = sae.encode(r2)
    err2 = x2 - reconstruct(sae, r2, f2).to(x2.dtype)
    f = sae.encode(r)
    recon = sae.decode(f).to(x.dtype)
    err = x - reconstruct(sae, r, f).to(x.dtype)
    lead = f.shape[:-1]  # batch and position axes
    flat_tokens = spec.layout == "flat_tokens"
    pos_shape = lead if flat_tokens else lead[1:]
    features = torch.zeros(*pos_shape, f.shape[-1])
    errors = torch.zeros(pos_shape)

    def run(patched: torch.Tensor) -> float:
        def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return patched.to(act.dtype)

        with model.hooks(fwd_hooks=[(spec.name, put)]):
            return float(scalar_metric(metric, call_model(model, clean, timestep))) - base

    def at(pos: tuple) -> tuple:
        return pos if flat_tokens else (rows,) + pos

    for pos in tqdm(list(_indices(torch.Size(pos_shape))), desc=spec.name, disable=not progress):
        idx = at(pos)
        if not torch.equal(err[idx], err2[idx]):
            patched = x.clone()
            patched[idx] = x[idx] + (err2[idx] - err[idx])
            errors[pos] = run(patched)
        changed = (f[idx] != f2[idx]).reshape(-1, f.shape[-1]).any(0).nonzero().flatten().tolist()
        for i in changed:
            f_mod = f.clone()
            f_mod[idx + (i,)] = f2[idx + (i,)]
            features[pos + (i,)] = run(x + sae.decode(f_mod).to(x.dtype) - recon)
    return features, errors
