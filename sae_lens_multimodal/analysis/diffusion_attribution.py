"""Attribution patching through a whole diffusion sampling loop, with SAE feature x timestep nodes.

:func:`~sae_lens_multimodal.analysis.attribution.attribution_patching` attributes one denoiser call. Here the
metric is computed on the pipeline's **final** output (e.g. a classifier's judgement of the generated image),
and a node is one SAE feature at one denoising step (summed over the feature map's positions), plus one SAE
error node per step. For a clean and a corrupted prompt sampled from the same initial noise::

    m(clean with feature i at step t := its corrupted value) - m(clean)
        ~= sum_positions (f'_{t,i} - f_{t,i}) * (W_dec[i] . dm/dx_t)

where ``x_t`` is the hook's activation at step ``t`` of the clean run and ``dm/dx_t`` the gradient of the
final metric through every later step of the sampler (one backward pass gives it for every step). The
corrupted activations come from the corrupted run at the same step. Error nodes: ``(e'_t - e_t) . dm/dx_t``.

* :func:`differentiable_sampling` runs a diffusers pipeline's own ``__call__`` with gradients (diffusers
  decorates it with ``torch.no_grad``): the images equal the usual ones for the same seed.
* :func:`sampler_attribution` returns a :class:`SamplerAttribution` (``[n_steps, d_sae]`` estimates).
* :func:`feature_patched_run` is the exact counterpart: at chosen steps, every feature outside a "keep" mask is
  replaced by a reference value (the corrupted run's, or a mean), the SAE error term kept, the rest of the
  model untouched. Patching one node, ablating a circuit and measuring faithfulness are all this call.

The SAE is any SAELens SAE at one hook of the denoiser, including the package's timestep-bucketed and
timestep-conditioned SAEs (each step is encoded inside ``timestep_context(t, cfg_branch)``). Only the rows of
``cfg_branch`` (default ``"cond"``, the branch the bundled SAEs are trained on) are attributed and patched.

>>> result = sampler_attribution(hooked, sae, clean_prompts, corrupted_prompts, metric, seed=0,
...                              num_inference_steps=10, guidance_scale=2.0, output_type="pt")
>>> result.scores            # [n_steps, d_sae]; result.timesteps lists the steps' scheduler timesteps
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from sae_lens_multimodal.core.denoising import branch_rows, check_cfg_branch, current_denoising_state, timestep_context

__all__ = [
    "SamplerAttribution",
    "branch_activations",
    "corrupted_features",
    "differentiable_sampling",
    "feature_patched_run",
    "node_keep_masks",
    "sampler_attribution",
]

ImageMetric = Callable[[Any], torch.Tensor]


@dataclass
class SamplerAttribution:
    """Estimated final-metric change of patching one SAE feature at one denoising step from the corrupted run."""

    #: [n_steps, d_sae] feature x step estimates (summed over positions and batch rows unless kept)
    scores: torch.Tensor
    #: [n_steps] error-node estimates (``[n_steps, batch]`` with ``per_row``)
    errors: torch.Tensor
    #: scheduler timestep of each step (row of ``scores``), in denoising order
    timesteps: list[Any]
    clean_metric: float
    corrupted_metric: float
    hook: str
    cfg_branch: str

    @property
    def total_change(self) -> float:
        return self.corrupted_metric - self.clean_metric

    @property
    def node_scores(self) -> torch.Tensor:
        """[n_steps, d_sae]: the estimates summed over batch rows and positions where they were kept."""
        return self.scores.reshape(self.scores.shape[0], -1, self.scores.shape[-1]).sum(1)

    def top(self, k: int = 10) -> list[tuple[Any, int, float]]:
        """The ``k`` feature nodes with the largest |estimate|: (timestep, feature, estimate)."""
        flat = self.node_scores.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices.tolist()
        d = self.scores.shape[-1]
        return [(self.timesteps[i // d], i % d, float(flat[i])) for i in idx]

    def nodes_above(self, threshold: float) -> dict[Any, list[int]]:
        """Timestep -> features whose |estimate| >= ``threshold`` (steps without any left out)."""
        out: dict[Any, list[int]] = {}
        for s, t in enumerate(self.timesteps):
            feats = (self.node_scores[s].abs() >= threshold).nonzero().flatten().tolist()
            if feats:
                out[t] = feats
        return out


@contextmanager
def differentiable_sampling(hooked: Any) -> Iterator[Any]:
    """Inside the block, calling ``hooked`` (a HookedDiffusionPipeline) runs its pipeline with gradients.

    diffusers pipelines wrap ``__call__`` in ``torch.no_grad``; the undecorated function (``__wrapped__``) is
    the same code, so the sampler, the scheduler's state and the images are unchanged, only differentiable.
    The pipeline's class is restored on exit, also on errors."""
    pipe = hooked.pipe
    cls = type(pipe)
    inner = getattr(cls.__call__, "__wrapped__", None)
    if inner is None:
        raise TypeError(f"{cls.__name__}.__call__ is not a torch.no_grad-decorated function; it cannot be unwrapped "
                        "to run with gradients.")

    @functools.wraps(inner)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return inner(self, *args, **kwargs)

    # Same name and signature, so the hooked pipeline's CFG-layout and argument checks see the original class.
    grad_cls = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__})
    pipe.__class__ = grad_cls
    try:
        with torch.enable_grad():
            yield hooked
    finally:
        pipe.__class__ = cls


def _hook_name(hooked: Any, sae: Any, hook: Optional[str]) -> str:
    if hook is not None:
        return hooked.locate(hook).name
    return hooked.locate(sae).name


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _encode(sae: Any, x: torch.Tensor, t: Any, branch: str) -> torch.Tensor:
    with timestep_context(t, branch):
        return sae.encode(x)


def _decode(sae: Any, f: torch.Tensor, t: Any, branch: str) -> torch.Tensor:
    with timestep_context(t, branch):
        return sae.decode(f)


def _branch_part(act: torch.Tensor, branch: str) -> tuple[torch.Tensor, slice]:
    """The rows of ``branch`` in the running denoiser call's batch (all rows when the call runs that branch
    only, none when it runs the other one)."""
    state = current_denoising_state()
    if state is None or state.branch in (None, branch):
        return act, slice(None)
    if state.branch != "both":
        return act[:0], slice(0, 0)
    rows = branch_rows(branch, act.shape[0])  # type: ignore[arg-type]
    return act[rows], rows


@torch.no_grad()
def branch_activations(hooked: Any, name: str, prompt: Any, *, seed: int = 0, cfg_branch: str = "cond",
                       **pipe_kwargs: Any) -> tuple[Any, dict[Any, torch.Tensor]]:
    """Run the pipeline on ``prompt`` (seeded) and return (its output, timestep -> the hook's activation on
    ``cfg_branch``'s rows)."""
    acts: dict[Any, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        part, _ = _branch_part(act, cfg_branch)
        if part.shape[0]:
            acts[current_denoising_state().timestep] = part.detach().clone()  # type: ignore[union-attr]

    output = hooked.run_with_hooks(prompt, fwd_hooks=[(name, keep)], generator=_generator(seed), **pipe_kwargs)
    return output, acts


@torch.no_grad()
def corrupted_features(hooked: Any, sae: Any, prompt: Any, *, seed: int = 0, hook: Optional[str] = None,
                       cfg_branch: str = "cond", **pipe_kwargs: Any) -> tuple[Any, dict[Any, torch.Tensor]]:
    """Run the pipeline on ``prompt`` (seeded) and return (its output, timestep -> the SAE's features of
    ``cfg_branch``'s rows at the hook, [batch, *positions, d_sae]): the reference of :func:`feature_patched_run`."""
    check_cfg_branch(cfg_branch, allow_both=False, allow_none=False)
    output, acts = branch_activations(hooked, _hook_name(hooked, sae, hook), prompt, seed=seed, cfg_branch=cfg_branch,
                                      **pipe_kwargs)
    return output, {t: _encode(sae, x, t, cfg_branch).detach() for t, x in acts.items()}


def sampler_attribution(hooked: Any, sae: Any, clean_prompt: Any, corrupted_prompt: Any, metric: ImageMetric, *,
                        seed: int = 0, hook: Optional[str] = None, cfg_branch: str = "cond",
                        per_position: bool = False, per_row: bool = False, **pipe_kwargs: Any) -> SamplerAttribution:
    """Attribution patching of every SAE feature x denoising step to ``metric`` of the final output: two
    sampling runs without gradients (the corrupted one, for its activations) and one with (the clean one).

    Args:
        hooked: a HookedDiffusionPipeline (fp32).
        sae: an SAELens SAE at one of the denoiser's hooks (``hook`` if it is not the SAE's own).
        clean_prompt / corrupted_prompt: the pipeline's prompts (a string or a list, same length).
        metric: the pipeline's output (with ``pipe_kwargs``' ``output_type``) -> a scalar tensor,
            differentiable (e.g. a classifier's logit difference on the generated images).
        seed: both runs draw their initial noise from a generator with this seed.
        cfg_branch: the CFG branch whose rows are attributed (``"cond"`` or ``"uncond"``).
        per_position: keep the positions (``scores`` [n_steps, *positions, d_sae]) instead of summing them.
        per_row: keep the batch rows (prompt pairs) too: ``scores`` [n_steps, batch, (*positions,) d_sae] and
            ``errors`` [n_steps, batch].
        pipe_kwargs: the pipeline's other arguments (num_inference_steps, guidance_scale, output_type, ...).
    """
    check_cfg_branch(cfg_branch, allow_both=False, allow_none=False)
    name = _hook_name(hooked, sae, hook)
    corrupt_out, corrupt_x = branch_activations(hooked, name, corrupted_prompt, seed=seed, cfg_branch=cfg_branch,
                                                **pipe_kwargs)
    with torch.no_grad():
        corrupted_metric = float(metric(corrupt_out))

    recorded: dict[Any, tuple[torch.Tensor, slice]] = {}

    def record(act: torch.Tensor, hook: Any) -> Optional[torch.Tensor]:
        t = current_denoising_state().timestep  # type: ignore[union-attr]
        if t in recorded:
            raise RuntimeError(f"Hook {name!r} ran twice at timestep {t} in one sampling run; sampler attribution "
                               "needs one denoiser call per step with both CFG branches batched.")
        # A new tensor in the graph, so the gradient at this step is the gradient of what flows on.
        out = act.view_as(act) if act.requires_grad else act.detach().requires_grad_(True)
        part, rows = _branch_part(out, cfg_branch)
        if part.shape[0]:
            recorded[t] = (out, rows)
        return out

    with differentiable_sampling(hooked):
        output = hooked.run_with_hooks(clean_prompt, fwd_hooks=[(name, record)], generator=_generator(seed),
                                       **pipe_kwargs)
        value = metric(output)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            raise ValueError("metric must return a scalar tensor that depends on the pipeline's output (use "
                             "output_type='pt' or 'latent', and no detach / numpy in the metric).")
        order = list(recorded)
        grads = torch.autograd.grad(value.reshape(()), [recorded[t][0] for t in order], allow_unused=True)
    missing = [t for t in order if t not in corrupt_x]
    if missing:
        raise RuntimeError(f"Steps {missing} ran in the clean run but not in the corrupted one; the two runs must "
                           "share the schedule (same num_inference_steps and scheduler).")

    scores, errors = [], []
    for t, g in zip(order, grads):
        full, rows = recorded[t]
        x = full.detach()[rows]
        g_b = torch.zeros_like(x) if g is None else g.detach()[rows]
        x2 = corrupt_x[t]
        if x2.shape != x.shape:
            raise ValueError(f"The clean and corrupted activations differ in shape at timestep {t} "
                             f"({tuple(x.shape)} vs {tuple(x2.shape)}); pass prompts of the same batch size.")
        f, f2 = _encode(sae, x, t, cfg_branch).detach(), _encode(sae, x2, t, cfg_branch).detach()
        with torch.enable_grad():
            f_leaf = f.clone().requires_grad_(True)
            recon = _decode(sae, f_leaf, t, cfg_branch)
            (w_dec_g,) = torch.autograd.grad((recon * g_b).sum(), f_leaf)
        err = x - recon.detach()
        err2 = x2 - _decode(sae, f2, t, cfg_branch)
        node = (f2 - f) * w_dec_g  # [batch, *positions, d_sae]
        if not per_position:
            node = node.reshape(node.shape[0], -1, node.shape[-1]).sum(1)
        scores.append(node if per_row else node.sum(0))
        error = ((err2 - err) * g_b).reshape(x.shape[0], -1).sum(1)
        errors.append(error if per_row else error.sum())
    return SamplerAttribution(scores=torch.stack(scores), errors=torch.stack(errors), timesteps=order,
                              clean_metric=float(value.detach()), corrupted_metric=corrupted_metric, hook=name,
                              cfg_branch=cfg_branch)


def feature_patched_run(hooked: Any, sae: Any, prompt: Any, reference: Mapping[Any, torch.Tensor],
                        keep: Mapping[Any, torch.Tensor], *, seed: int = 0, hook: Optional[str] = None,
                        cfg_branch: str = "cond", **pipe_kwargs: Any) -> Any:
    """Run the pipeline on ``prompt`` with, at each step ``t`` in ``keep``, every SAE feature where
    ``keep[t]`` is False replaced by ``reference[t]`` (e.g. the corrupted run's features, from
    :func:`corrupted_features`, or a mean broadcastable to them); the SAE error term and every other step kept.

    ``keep[t]``: a bool tensor broadcastable to the features ``[batch, *positions, d_sae]`` (usually ``[d_sae]``:
    a feature at every position). The edit is ``x + decode(f_patched) - decode(f)``, so the model's output is
    unchanged when nothing is replaced. Returns the pipeline's output."""
    check_cfg_branch(cfg_branch, allow_both=False, allow_none=False)
    name = _hook_name(hooked, sae, hook)
    missing = [t for t in keep if t not in reference]
    if missing:
        raise ValueError(f"No reference features for timesteps {missing}; reference has {list(reference)}.")

    if not keep:  # nothing patched: the plain run
        with torch.no_grad():
            return hooked(prompt, generator=_generator(seed), **pipe_kwargs)

    def patch(act: torch.Tensor, hook: Any) -> Optional[torch.Tensor]:
        t = current_denoising_state().timestep  # type: ignore[union-attr]
        mask = keep.get(t)
        if mask is None:
            return None
        f = _encode(sae, act, t, cfg_branch)
        ref = reference[t].to(f.dtype)
        patched = torch.where(mask.to(f.device).bool(), f, ref.expand_as(f))
        delta = _decode(sae, patched, t, cfg_branch) - _decode(sae, f, t, cfg_branch)
        return act + delta.to(act.dtype)

    with torch.no_grad():
        return hooked.run_with_hooks(prompt, fwd_hooks=[(name, patch)], at_timesteps=list(keep), cfg_branch=cfg_branch,
                                     generator=_generator(seed), **pipe_kwargs)


def node_keep_masks(nodes: Mapping[Any, Sequence[int]], d_sae: int, *, complement: bool = False,
                    steps: Optional[Sequence[Any]] = None) -> dict[Any, torch.Tensor]:
    """Keep masks for :func:`feature_patched_run`: at each step of ``steps`` (default: the steps of ``nodes``),
    keep exactly the features ``nodes[t]`` (``complement=True``: keep every feature except them)."""
    out = {}
    for t in (list(nodes) if steps is None else list(steps)):
        mask = torch.zeros(d_sae, dtype=torch.bool)
        mask[list(nodes.get(t, []))] = True
        out[t] = ~mask if complement else mask
    return out
