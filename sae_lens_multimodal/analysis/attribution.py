"""Attribution patching (AtP): the linear estimate of activation patching for every unit of a hook at once.

For a metric ``m`` of the model's output, a clean input and a corrupted input, the effect of replacing one
unit's clean activation ``a`` (a position, a head, an SAE feature...) by its corrupted value ``a'`` **in the
clean run** is estimated to first order::

    m(clean with a := a') - m(clean)  ~=  (a' - a) . dm/da |clean

summed over the unit's elements (and over the batch: every pair is patched at once). One forward and
backward pass on the clean input and one forward pass on the corrupted input give the estimate for every
unit of every asked hook. This is the direction of AtP (Nanda; Kramar et al. 2024): the clean run is
"noised" one unit at a time; for the reverse (the corrupted run "denoised" with a clean unit) swap the two
inputs.

* ``per``: ``"position"`` (one token; a feature map's pixel; a pattern's query row), ``"head"`` (one head
  at every position), ``"head_position"`` (one head at one position), ``"feature"`` (one SAE feature at one
  position where ``saes`` has an SAE for the hook, else one dimension at one position) or ``"hook"`` (the
  whole hook).
* SAE features (``saes``): the hook's activation is written ``x = decode(encode(x)) + error`` (the error term
  kept, the model unchanged, the SAE not modified); a feature's estimate is ``(f' - f) * (W_dec g)`` and the
  error node's ``(error' - error) . g`` at each position, with ``g = dm/dx`` (the gradient of the unspliced
  model, which equals the spliced one's when the error term passes gradients, as in Marks et al. 2024).
  Features and error together sum to the position's estimate (exactly for an affine decoder).
* MLP transcoders (SAELens ``Transcoder`` / ``SkipTranscoder``, in ``saes`` too): the MLP's output is written
  ``mlp_out = decode(encode(mlp_in)) + error`` (analysis/transcoder_sites.py); the nodes sit at the output
  hook (``cfg.metadata.hook_name_out``), features computed from the input hook's clean / corrupted values,
  with the same estimates (``g = dm/d mlp_out``).
* Attention saturation (AtP*'s QK fix, Kramar et al. 2024): for queries and keys (``attn.hook_q`` /
  ``hook_k``, or ``hook_rot_q`` / ``hook_rot_k`` in rotary models) the linear estimate through the softmax is
  poor where the pattern saturates. With ``attention_fix=True`` their estimate recomputes the attention
  pattern exactly with the patched query / key (the other's clean value kept) and takes the linear estimate
  only from the pattern on: ``sum((softmax(S + dS) - P) * dm/dP)``.

Works for any hooked model of this package: a HookedViT, a HookedCLIP (either tower: name its hooks
``vision.*`` / ``text.*`` or pass ``clip.part("vision")``), a HookedVLM, and one call of a hooked diffusion
denoiser (HookedUNet / HookedDiT) at a chosen ``timestep`` and CFG branch. Gradients run in fp32 on the
given device; only the asked hooks are kept. Every hook is removed when the call returns or raises.

>>> result = attribution_patching(clip.part("vision"), clean_x, corrupt_x, metric,
...                               hooks=[f"blocks.{i}.hook_resid_pre" for i in range(4)])
>>> result["blocks.2.hook_resid_pre"]          # [n_tokens]: estimated metric change per token
>>> result.top(5)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch

from sae_lens_multimodal.analysis.transcoder_sites import dictionary_map, is_transcoder, read_hook, reconstruct
from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.core.denoising import branch_rows, check_cfg_branch

__all__ = [
    "PER_MODES",
    "AttributionResult",
    "attribution_patching",
    "logit_difference",
    "unit_axes",
]

#: What one unit of a hook is (see the module docstring).
PER_MODES = ("position", "head", "head_position", "feature", "hook")

#: einsum subscripts of each layout's axes: b batch, p position (q query / x, y pixel rows and columns),
#: h head, f feature (k key position in a pattern).
_AXES = {
    "tokens": "bpf", "heads": "bphf", "pattern": "bhqk", "scale": "bpf", "pooled": "bf",
    "pooled_scale": "bf", "spatial": "bxyf", "flat_tokens": "pf",
}
#: layout -> per -> the axes a unit keeps (in the order of the result's dimensions).
_KEEP = {
    "tokens": {"position": "p", "feature": "pf", "hook": ""},
    "heads": {"position": "p", "head": "h", "head_position": "ph", "feature": "phf", "hook": ""},
    "pattern": {"position": "q", "head": "h", "head_position": "qh", "feature": "hqk", "hook": ""},
    "scale": {"position": "p", "feature": "p", "hook": ""},
    "pooled": {"feature": "f", "hook": ""},
    "pooled_scale": {"hook": ""},
    "spatial": {"position": "xy", "feature": "xyf", "hook": ""},
    "flat_tokens": {"position": "p", "feature": "pf", "hook": ""},
}
_QK_HOOKS = {"hook_q": "hook_k", "hook_k": "hook_q", "hook_rot_q": "hook_rot_k", "hook_rot_k": "hook_rot_q"}

Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]
Metric = Callable[[Any], torch.Tensor]


def unit_axes(spec: HookSpec, per: str) -> str:
    """The axes (subscripts of the layout's ``_AXES``) one unit of hook ``spec`` keeps under ``per``."""
    if per not in PER_MODES:
        raise ValueError(f"per must be one of {PER_MODES}; got {per!r}.")
    keep = _KEEP[spec.layout]
    if per not in keep:
        raise ValueError(
            f"Hook {spec.name!r} (layout {spec.layout!r}) has no {per!r} units; use one of {tuple(keep)}."
        )
    return keep[per]


# ----------------------------------------------------------------------------------------------- results
@dataclass
class AttributionResult:
    """Estimated metric change per unit when the clean run's activation is replaced by the corrupted one."""

    #: hook -> estimates, one entry per unit (shape: the kept axes, e.g. [n_tokens] for per="position")
    scores: dict[str, torch.Tensor]
    per: str
    #: hook -> SAE error-node estimates per position (hooks with an SAE, per="feature")
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: hook -> "linear", "qk-fix" (AtP*'s recomputed softmax) or "sae" (features + error node)
    methods: dict[str, str] = field(default_factory=dict)
    clean_metric: float = float("nan")
    corrupted_metric: float = float("nan")
    direction: str = "clean run, one unit replaced by its corrupted value"

    def __getitem__(self, hook: str) -> torch.Tensor:
        if hook not in self.scores:
            raise KeyError(f"No attribution for hook {hook!r}; computed: {list(self.scores)}.")
        return self.scores[hook]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    @property
    def total_change(self) -> float:
        """corrupted_metric - clean_metric: what patching everything would change."""
        return self.corrupted_metric - self.clean_metric

    def top(self, k: int = 10, *, by_abs: bool = True) -> list[tuple[str, tuple[int, ...], float]]:
        """The ``k`` units with the largest estimates (by absolute value), as (hook, unit index, estimate);
        SAE error nodes appear as hook ``"<hook>:error"``."""
        items: list[tuple[str, tuple[int, ...], float]] = []
        tables = list(self.scores.items()) + [(f"{h}:error", e) for h, e in self.errors.items()]
        for hook, t in tables:
            flat = t.flatten()
            n = min(k, flat.numel())
            vals, idx = (flat.abs() if by_abs else flat).topk(n)
            for i in idx.tolist():
                unit = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape)) if t.dim() else ()
                items.append((hook, unit, float(flat[i])))
        items.sort(key=lambda r: -abs(r[2]) if by_abs else -r[2])
        return items[:k]

    def to_records(self) -> list[dict[str, Any]]:
        """One record per unit: hook, unit index, estimate, method."""
        out = []
        for hook, t in list(self.scores.items()) + [(f"{h}:error", e) for h, e in self.errors.items()]:
            base = hook.split(":")[0]
            for unit, v in zip(_indices(t.shape), t.flatten().tolist()):
                out.append({"hook": hook, "unit": unit, "estimate": v, "method": self.methods.get(base, "linear")})
        return out


def _indices(shape: torch.Size) -> Iterable[tuple[int, ...]]:
    if not len(shape):
        return [()]
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    return zip(*[g.flatten().tolist() for g in grids])


# ------------------------------------------------------------------------------------- shared machinery
def is_denoiser(model: Any) -> bool:
    parts = getattr(model, "parts", None)
    return callable(parts) and "denoiser" in parts()


def check_model(model: Any, device: Union[str, torch.device]) -> torch.device:
    """The device to run on; the model's floating parameters must be fp32 (or fp64) and on it: gradients of
    half-precision models are too coarse for differences of activations."""
    device = torch.device(device)
    for p in model.parameters():
        if p.is_floating_point():
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"Attribution runs in fp32; the model has {p.dtype} parameters. Call model.float() first.")
            if p.device.type != device.type:
                raise ValueError(f"The model is on {p.device} but device={device}; call model.to({str(device)!r}) first.")
            break
    return device


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def call_model(model: Any, inputs: Inputs, timestep: Any = None) -> Any:
    """Run ``model`` on one input: a tensor (the first argument), a tuple (the positional arguments) or a
    dict (keyword arguments); a denoiser also gets ``timestep``."""
    kwargs: dict[str, Any] = {}
    if timestep is not None:
        kwargs["timestep"] = timestep
    if isinstance(inputs, Mapping):
        return model(**{**inputs, **kwargs})
    if isinstance(inputs, (list, tuple)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def check_call(model: Any, clean: Inputs, timestep: Any, cfg_branch: Optional[str]) -> None:
    denoiser = is_denoiser(model)
    if not denoiser and (timestep is not None or cfg_branch is not None):
        raise ValueError(
            "timestep and cfg_branch are for one call of a hooked diffusion denoiser (HookedUNet / HookedDiT); "
            f"{type(model).__name__} takes neither."
        )
    if denoiser:
        given = isinstance(clean, Mapping) and "timestep" in clean
        if timestep is None and not given:
            raise ValueError("A denoiser call needs a timestep: pass timestep=<scheduler timestep>.")
        if timestep is not None and given:
            raise ValueError("The timestep is given twice (timestep= and in the inputs); pass it once.")
    if cfg_branch is not None:
        check_cfg_branch(cfg_branch, name="cfg_branch")


def batch_rows(cfg_branch: Optional[str], batch: int) -> slice:
    """Rows of the batch that are patched: all, or one CFG branch of a batched-CFG call."""
    if cfg_branch in (None, "both"):
        return slice(None)
    return branch_rows(cfg_branch, batch)  # type: ignore[arg-type]


def scalar_metric(metric: Metric, output: Any) -> torch.Tensor:
    value = metric(output)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(
            "The metric must return a scalar tensor (e.g. the mean logit difference over the batch); got "
            f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else ' of shape ' + str(tuple(value.shape))}."
        )
    return value.reshape(())


def resolve_hooks(model: Any, hooks: Union[str, Sequence[str]], per: str, saes: Mapping[str, Any]) -> list[HookSpec]:
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    specs: list[HookSpec] = []
    for name in names + list(saes):  # the SAEs' hooks join the asked ones (an alias counts once)
        spec = model.hook_spec(name)
        if spec.name in {s.name for s in specs}:
            continue
        if not (per == "feature" and spec.name in saes):
            unit_axes(spec, per)
        specs.append(spec)
    if not specs:
        raise ValueError("Name at least one hook to attribute (hooks=[...]).")
    return specs


def sae_map(model: Any, saes: Any) -> dict[str, Any]:
    """SAEs by the full hook name they rewrite (located through the model contract); a transcoder by the MLP
    output hook it writes (analysis/transcoder_sites.py)."""
    return dictionary_map(model, saes)


@contextmanager
def recording(model: Any, names: Sequence[str], store: dict[str, torch.Tensor], leaf: bool) -> Iterator[None]:
    """Forward hooks that keep each named hook's activation (as a tensor in the autograd graph when
    ``leaf``: a hook whose input needs no gradient is made a leaf that does). Removed on exit, also on error."""

    def make(name: str) -> Callable:
        def keep(act: torch.Tensor, hook: Any) -> Optional[torch.Tensor]:
            if name in store:
                raise RuntimeError(
                    f"Hook {name!r} ran twice in one forward pass; attribution patching takes one call per input "
                    "(for a diffusion model: one denoiser call, not a pipeline run)."
                )
            if not leaf:
                store[name] = act.detach()
                return None
            # Return a new tensor, so that what flows on is the very tensor kept here: some hook sites (the
            # diffusion blocks' channel-last views) carry on with their own tensor when a hook returns its input.
            act = act.detach().requires_grad_(True) if not act.requires_grad else act.view_as(act)
            store[name] = act
            return act

        return keep

    with model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        yield


# ------------------------------------------------------------------------------------------ AtP*'s fix
def _attention_parts(model: Any, spec: HookSpec) -> Optional[tuple[str, str, str, str, float]]:
    """(query hook, key hook, scores hook, pattern hook, scale) for an attention q/k hook, or None."""
    parent, _, local = spec.name.rpartition(".")
    if local not in _QK_HOOKS or spec.layout != "heads":
        return None
    names = {k: f"{parent}.{k}" for k in ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern")}
    if names["hook_attn_scores"] not in model.hook_dict or names["hook_pattern"] not in model.hook_dict:
        return None
    if local in ("hook_q", "hook_k") and names["hook_rot_q"] in model.hook_dict:
        return None  # rotary: the scores read hook_rot_q / hook_rot_k, not these
    module = model.mod_dict.get(parent)
    scale = getattr(module, "scale", None)
    scale = getattr(module, "scaling", None) if not isinstance(scale, (int, float)) else scale
    if not isinstance(scale, (int, float)):
        return None
    q, k = ("hook_rot_q", "hook_rot_k") if local.startswith("hook_rot") else ("hook_q", "hook_k")
    return names[q], names[k], names["hook_attn_scores"], names["hook_pattern"], float(scale)


def _qk_fix(is_query: bool, q: torch.Tensor, k: torch.Tensor, dq_or_dk: torch.Tensor, scores: torch.Tensor,
            pattern: torch.Tensor, grad: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AtP*'s estimate for queries or keys: ([b, pos, heads] one node at a time, [b, heads] all positions).

    q [b, q, H, d], k [b, k, Hkv, d]; scores / pattern / grad [b, H, q, k] (clean); ``dq_or_dk`` the
    corrupted-minus-clean query or key."""
    n_rep = q.shape[2] // k.shape[2]
    expand = (lambda t: t.repeat_interleave(n_rep, dim=2)) if n_rep > 1 else (lambda t: t)
    k_full = expand(k)
    if is_query:
        d_scores = scale * torch.einsum("bihd,bjhd->bhij", dq_or_dk, k_full)
        contrib = (torch.softmax(scores + d_scores, dim=-1) - pattern) * grad  # rows are independent
        node = contrib.sum(-1).permute(0, 2, 1)  # [b, q, H]
        return node, node.sum(1)
    delta = scale * torch.einsum("bihd,bjhd->bhij", q, expand(dq_or_dk))  # logit shift of column j, row i
    # One key j patched: row i's logit j shifts by delta; Z = 1 - P_ij + P_ij e^delta renormalises the rest.
    log_p = pattern.clamp_min(0).log()
    log_z = torch.logaddexp(torch.log1p(-pattern.clamp(max=1.0)), log_p + delta)
    inv_z = torch.exp(-log_z)
    new_pj = torch.exp(log_p + delta - log_z)
    pg = pattern * grad
    contrib = (inv_z - 1) * (pg.sum(-1, keepdim=True) - pg) + (new_pj - pattern) * grad
    contrib = torch.nan_to_num(contrib)
    node = contrib.sum(2).permute(0, 2, 1)  # [b, k, H]
    every = ((torch.softmax(scores + delta, dim=-1) - pattern) * grad).sum((-1, -2))  # all keys at once: [b, H]
    if n_rep > 1:
        b, n, h = node.shape
        node = node.reshape(b, n, h // n_rep, n_rep).sum(-1)
        every = every.reshape(b, h // n_rep, n_rep).sum(-1)
    return node, every


def _check_scale(q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor, scale: float) -> bool:
    """Whether the scores are ``scale * q.k`` (plus a mask) on their finite entries: the layout the fix assumes."""
    n_rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(n_rep, dim=2) if n_rep > 1 else k
    qk = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    finite = torch.isfinite(scores) & (scores > -1e4)
    if not bool(finite.any()):
        return False
    err = (scores - qk)[finite].abs().max()
    return bool(err <= 1e-3 * (1 + scores[finite].abs().max()))


# ------------------------------------------------------------------------------------------- the method
def attribution_patching(
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
    attention_fix: bool = True,
) -> AttributionResult:
    """Estimate, for every unit of every hook in ``hooks``, the metric change of patching that unit of the
    clean run with its corrupted value (module docstring): one forward + backward pass on ``clean``, one
    forward pass on ``corrupted``.

    Args:
        model: a hooked model of this package (HookedViT, HookedCLIP, HookedVLM, HookedUNet / HookedDiT).
        clean / corrupted: the model's input for each run, of the same shape: a tensor (first argument),
            a tuple of positional arguments or a dict of keyword arguments (e.g. a VLM's
            ``{"input_ids": ..., "pixel_values": ...}``, a denoiser's ``{"sample": ...,
            "encoder_hidden_states": ...}``). Batch rows are input pairs; all rows are patched together.
        metric: the model's output -> a scalar tensor (differentiable), e.g. a logit difference.
        hooks: hook names (``model.hook_spec`` names or aliases).
        per: the unit: ``"position"``, ``"head"``, ``"head_position"``, ``"feature"`` or ``"hook"``.
        saes: SAELens SAEs and transcoders (a list, or a dict) at some of the hooks: with ``per="feature"``
            their features and error nodes are the units (the hooks they rewrite are added to ``hooks``).
        device: where to run; the model (fp32) must already be there.
        timestep: for a denoiser: the timestep of the call (scheduler units).
        cfg_branch: for a denoiser call on a batched-CFG batch (unconditional rows first): patch only
            ``"cond"`` or ``"uncond"`` rows (default / ``"both"``: every row).
        attention_fix: AtP*'s QK fix for query / key hooks (falls back to the linear estimate, with a
            warning, where the attention's scores are not ``scale * q.k + mask``).
    """
    if per not in PER_MODES:
        raise ValueError(f"per must be one of {PER_MODES}; got {per!r}.")
    device = check_model(model, device)
    check_call(model, clean, timestep, cfg_branch)
    if getattr(model, "_acts_to_saes", None):
        # SAELens splices with an error term computed without gradient, which would cut the gradient paths
        raise ValueError(
            f"The model has SAEs spliced in at {sorted(model._acts_to_saes)}; call model.reset_saes() and pass "
            "them as saes=[...] (their error terms are then kept and gradients pass through them)."
        )
    sae_by_hook = sae_map(model, saes)
    if sae_by_hook and per != "feature":
        raise ValueError(f"SAEs give feature units: pass per='feature' (got per={per!r}), or leave saes out.")
    specs = resolve_hooks(model, hooks, per, sae_by_hook)
    clean, corrupted = to_device(clean, device), to_device(corrupted, device)

    fixes = {}
    if attention_fix and per != "feature":
        for spec in specs:
            parts = _attention_parts(model, spec)
            if parts is not None:
                fixes[spec.name] = parts
            elif spec.name.rpartition(".")[2] in _QK_HOOKS:
                warnings.warn(f"No QK fix for {spec.name!r} (no scores/pattern hooks, rotary applied later, or "
                              "no attention scale found): its estimate is linear.", stacklevel=2)
    reads = {h: read_hook(model, t) for h, t in sae_by_hook.items() if is_transcoder(t)}  # transcoder inputs
    extra = sorted(({n for parts in fixes.values() for n in parts[:4]} | set(reads.values())) - {s.name for s in specs})
    names = [s.name for s in specs] + extra
    corrupt_names = [s.name for s in specs] + sorted(set(reads.values()) - {s.name for s in specs})

    was_training = model.training
    model.eval()
    clean_acts: dict[str, torch.Tensor] = {}
    corrupt_acts: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad(), recording(model, corrupt_names, corrupt_acts, leaf=False):
            corrupted_value = float(scalar_metric(metric, call_model(model, corrupted, timestep)))
        with torch.enable_grad(), recording(model, names, clean_acts, leaf=True):
            value = scalar_metric(metric, call_model(model, clean, timestep))
        missing = [n for n in names if n not in clean_acts] + [n for n in corrupt_names if n not in corrupt_acts]
        if missing:
            raise RuntimeError(f"Hooks {missing} did not run in the forward pass; name hooks this call reaches.")
        wanted = [n for n in names if n not in extra or n.endswith("hook_pattern")]
        wanted = [n for n in wanted if clean_acts[n].requires_grad]
        grads = dict(zip(wanted, torch.autograd.grad(value, [clean_acts[n] for n in wanted], allow_unused=True)))
    finally:
        model.train(was_training)

    scores, errors, methods = {}, {}, {}
    for spec in specs:
        a, a2 = clean_acts[spec.name].detach(), corrupt_acts[spec.name]
        if a.shape != a2.shape:
            raise ValueError(f"Hook {spec.name!r} has shape {tuple(a.shape)} on clean and {tuple(a2.shape)} on corrupted "
                             "inputs; pass inputs of the same shape.")
        g = grads.get(spec.name)
        g = torch.zeros_like(a) if g is None else g.detach()
        rows = batch_rows(cfg_branch, a.shape[0]) if spec.layout != "flat_tokens" else slice(None)
        if spec.name in sae_by_hook:
            read = reads.get(spec.name)
            x_read = None if read is None else (clean_acts[read].detach(), corrupt_acts[read])
            scores[spec.name], errors[spec.name] = _sae_units(sae_by_hook[spec.name], spec, a, a2, g, rows, x_read)
            methods[spec.name] = "sae"
        elif spec.name in fixes:
            scores[spec.name] = _fixed_units(spec, fixes[spec.name], clean_acts, grads, a2 - a, per, rows)
            methods[spec.name] = "qk-fix"
        else:
            axes = _AXES[spec.layout]
            scores[spec.name] = torch.einsum(f"{axes}->{unit_axes(spec, per)}", ((a2 - a) * g)[rows]).cpu()
            methods[spec.name] = "linear"
    return AttributionResult(scores=scores, per=per, errors=errors, methods=methods,
                             clean_metric=float(value.detach()), corrupted_metric=corrupted_value)


def _fixed_units(spec: HookSpec, parts: tuple, acts: dict, grads: dict, delta: torch.Tensor, per: str,
                 rows: slice) -> torch.Tensor:
    q_name, k_name, s_name, p_name, scale = parts
    q, k = acts[q_name].detach(), acts[k_name].detach()
    scores, pattern = acts[s_name].detach(), acts[p_name].detach()
    grad = grads.get(p_name)
    grad = torch.zeros_like(pattern) if grad is None else grad.detach()
    if not _check_scale(q, k, scores, scale):
        warnings.warn(f"The scores next to {spec.name!r} are not scale * q.k + mask; its estimate is linear.", stacklevel=3)
        g = grads.get(spec.name)
        g = torch.zeros_like(delta) if g is None else g
        return torch.einsum(f"bphf->{unit_axes(spec, per)}", (delta * g)[rows]).cpu()
    node, every = _qk_fix(spec.name == q_name, q, k, delta, scores, pattern, grad, scale)
    node, every = node[rows].sum(0), every[rows].sum(0)  # [pos, heads], [heads]
    out = {"position": node.sum(1), "head": every, "head_position": node, "hook": every.sum()}[per]
    return out.cpu()


def _sae_units(sae: Any, spec: HookSpec, x: torch.Tensor, x2: torch.Tensor, g: torch.Tensor, rows: slice,
               x_read: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature and error-node estimates at one hook: ([positions..., d_sae], [positions...]). For a
    transcoder ``x_read`` holds its (clean, corrupted) inputs; ``x``, ``x2`` and ``g`` are at the hook it writes."""
    r, r2 = (x, x2) if x_read is None else x_read
    with torch.no_grad():
        f2 = sae.encode(r2)
        err2 = x2 - reconstruct(sae, r2, f2).to(x2.dtype)
        f = sae.encode(r)  # last: an SAE that normalises per input decodes with the clean input's scale
    with torch.enable_grad():
        f_leaf = f.detach().requires_grad_(True)
        recon = sae.decode(f_leaf)
        (w_dec_g,) = torch.autograd.grad((recon.to(g.dtype) * g).sum(), f_leaf)
    with torch.no_grad():
        err = x - reconstruct(sae, r, f).to(x.dtype)
    axes = _AXES[spec.layout]
    lead = axes[: 2 if spec.layout in ("tokens", "heads", "scale") else 3 if spec.layout == "spatial" else 1]
    feat_in = lead + "s"
    keep = lead.replace("b", "")
    if spec.layout == "flat_tokens":
        feat_in, keep = "ps", "p"
    features = torch.einsum(f"{feat_in}->{keep}s", ((f2 - f) * w_dec_g)[rows])
    error = torch.einsum(f"{axes}->{keep}", ((err2 - err) * g)[rows])
    return features.cpu(), error.cpu()


def logit_difference(index_true: Union[int, torch.Tensor], index_foil: Union[int, torch.Tensor]) -> Metric:
    """A metric for [batch, n_classes] logits (e.g. HookedCLIP's image-text logits): the mean over the batch
    of logit[true] - logit[foil] (one index, or one per row)."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        t = torch.as_tensor(index_true, device=logits.device).expand(logits.shape[0])
        f = torch.as_tensor(index_foil, device=logits.device).expand(logits.shape[0])
        return (logits[rows, t] - logits[rows, f]).mean()

    return metric

