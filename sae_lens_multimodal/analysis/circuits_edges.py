"""Edge attribution between the SAE nodes of two hooks (sparse feature circuits, Marks et al. 2024).

Nodes are an SAE's features at each position plus one error node per position (the SAE's error term kept,
the model's output unchanged). For an upstream node ``u`` (at hook A) and a downstream feature ``d`` (at
hook B, later in the model), the edge is the linear estimate of how much of ``d``'s effect on the metric
runs through ``u`` when ``u`` takes its corrupted value::

    edge(u -> d) = (dm/dd) * (dd/du) * (u' - u)        (gradients on the clean run, summed over the batch)

``dm/dd`` is ``W_dec g`` at B (as in node attribution), ``dd/du`` one backward pass per downstream feature
through the model between A and B. With ``freeze_attention=True`` (the published linearisation) the
attention patterns and LayerNorm scales of the blocks from A to B are held at their clean values for the
gradient (the forward values are unchanged). For each downstream feature the edges from every upstream
node sum, to first order, to that feature's node estimate (tested).

Either side may be an MLP transcoder (analysis/transcoder_sites.py): upstream, its features and error node
rewrite the MLP's output; downstream, its features are computed from the MLP's input, so ``dd/du`` runs
through the frozen LayerNorm into the transcoder's encoder (the MLP itself is not on the path), as in
transcoder circuits (Dunefsky et al. 2024; Ameisen et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from sae_lens_multimodal.analysis.attribution import (
    Inputs,
    Metric,
    batch_rows,
    call_model,
    check_call,
    check_model,
    sae_map,
    scalar_metric,
    to_device,
)
from sae_lens_multimodal.analysis.transcoder_sites import is_transcoder, read_hook, reconstruct

__all__ = ["EdgeAttribution", "edge_attribution"]


@dataclass
class EdgeAttribution:
    """Edges from every node at the upstream hook to the chosen features at the downstream hook."""

    upstream: str
    downstream: str
    #: the downstream nodes explained: (position index, feature index), highest |node estimate| first
    targets: list[tuple[int, ...]]
    #: [n_targets]: each target's node estimate (``(f' - f) * W_dec g``, summed over the batch)
    target_scores: torch.Tensor
    #: [n_targets, *positions, d_sae_upstream]: edge from each upstream feature at each position
    feature_edges: torch.Tensor
    #: [n_targets, *positions]: edge from the upstream error node at each position
    error_edges: torch.Tensor

    def totals(self) -> torch.Tensor:
        """[n_targets]: the sum of every edge into each target (to first order its node estimate)."""
        return self.feature_edges.flatten(1).sum(1) + self.error_edges.flatten(1).sum(1)


def edge_attribution(
    model: Any,
    clean: Inputs,
    corrupted: Inputs,
    metric: Metric,
    *,
    upstream: Any,
    downstream: Any,
    top_k: int = 10,
    targets: Optional[list[tuple[int, ...]]] = None,
    freeze_attention: bool = True,
    device: Union[str, torch.device] = "cpu",
    timestep: Any = None,
    cfg_branch: Optional[str] = None,
) -> EdgeAttribution:
    """Edges from the nodes of SAE ``upstream`` to the ``top_k`` features (by |node estimate|) of SAE
    ``downstream``, or to the given ``targets`` ((position..., feature) tuples). Other arguments as
    :func:`~sae_lens_multimodal.analysis.attribution.attribution_patching`."""
    device = check_model(model, device)
    check_call(model, clean, timestep, cfg_branch)
    if getattr(model, "_acts_to_saes", None):
        raise ValueError("The model has SAEs spliced in; call model.reset_saes() and pass them as upstream= / downstream=.")
    saes = sae_map(model, [upstream, downstream])
    if len(saes) != 2:
        raise ValueError("upstream and downstream rewrite the same hook; pass dictionaries at two hooks.")
    (a_name, sae_a), (b_name, sae_b) = list(saes.items())
    a_read, b_read = read_hook(model, sae_a), read_hook(model, sae_b)  # = the written hook for an SAE
    spec_a, spec_b = model.hook_spec(a_name), model.hook_spec(b_read)
    if spec_a.layer is not None and spec_b.layer is not None and spec_a.layer > spec_b.layer:
        raise ValueError(f"upstream {a_name!r} runs after downstream {b_read!r}; swap them.")
    if top_k < 1 and targets is None:
        raise ValueError(f"top_k must be >= 1; got {top_k}.")
    clean, corrupted = to_device(clean, device), to_device(corrupted, device)

    frozen = []
    if freeze_attention:
        lo = spec_a.layer if spec_a.layer is not None else -1
        hi = spec_b.layer if spec_b.layer is not None else 10**9
        for name, spec in model.hook_specs().items():
            if spec.part == spec_b.part and spec.layer is not None and lo <= spec.layer <= hi and (
                    name.endswith("attn.hook_pattern") or name.endswith(".hook_scale")):
                frozen.append(name)

    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        store[hook.name] = act.detach()

    watched = list(dict.fromkeys([a_read, a_name, b_read, b_name]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep) for n in watched]):
            call_model(model, corrupted, timestep)
        x_a2, r_a2, r_b2 = store[a_name], store[a_read], store[b_read]
        leaves: dict[str, torch.Tensor] = {}

        def capture_a(act: torch.Tensor, hook: Any) -> None:
            leaves["r_a"] = act

        def split(act: torch.Tensor, hook: Any) -> torch.Tensor:
            r = leaves.pop("r_a", act)  # a transcoder's input, captured earlier in this pass
            with torch.no_grad():
                f = sae_a.encode(r)
                err = act - reconstruct(sae_a, r, f).to(act.dtype)
            leaves["f"] = f.detach().requires_grad_(True)
            leaves["err"] = err.detach().requires_grad_(True)
            return reconstruct(sae_a, r, leaves["f"]).to(act.dtype) + leaves["err"]

        def record(key: str):
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                act = act.view_as(act)
                leaves[key] = act
                return act
            return fn

        def freeze(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return act.detach()

        hooks = ([(a_read, capture_a)] if is_transcoder(sae_a) else []) + [(a_name, split), (b_name, record("x_b"))]
        if is_transcoder(sae_b):
            hooks.append((b_read, record("r_b")))
        hooks += [(n, freeze) for n in frozen]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            value = scalar_metric(metric, call_model(model, clean, timestep))
            x_b = leaves["x_b"]
            r_b = leaves.get("r_b", x_b)
            (g_b,) = torch.autograd.grad(value, x_b, retain_graph=True)
            f_b = sae_b.encode(r_b)
            probe = f_b.detach().requires_grad_(True)
            (w_dec_g,) = torch.autograd.grad((sae_b.decode(probe).to(g_b.dtype) * g_b).sum(), probe)
            rows_b = batch_rows(cfg_branch, f_b.shape[0])
            with torch.no_grad():
                node = ((sae_b.encode(r_b2) - f_b.detach()) * w_dec_g)[rows_b].sum(0)  # [*positions, d_sae]
            if targets is None:
                order = node.flatten().abs().topk(min(top_k, node.numel())).indices
                targets = [tuple(int(j) for j in torch.unravel_index(i, node.shape)) for i in order]
            f_a, err_a = leaves["f"], leaves["err"]
            with torch.no_grad():
                f_a2 = sae_a.encode(r_a2)
                d_f = f_a2 - f_a
                d_err = (x_a2 - reconstruct(sae_a, r_a2, f_a2).to(x_a2.dtype)) - err_a
            rows_a = batch_rows(cfg_branch, f_a.shape[0])
            feature_edges, error_edges, scores = [], [], []
            for target in targets:
                index = (rows_b,) + tuple(target)
                objective = (f_b[index] * w_dec_g[index]).sum()
                gf, ge = torch.autograd.grad(objective, [f_a, err_a], retain_graph=True, allow_unused=True)
                gf = torch.zeros_like(f_a) if gf is None else gf
                ge = torch.zeros_like(err_a) if ge is None else ge
                feature_edges.append((gf * d_f)[rows_a].sum(0).detach())
                err_prod = (ge * d_err)[rows_a].sum(0).detach()
                error_edges.append(err_prod.reshape(*f_a.shape[1:-1], -1).sum(-1))
                scores.append(node[tuple(target)])
    finally:
        model.train(was_training)
    return EdgeAttribution(
        upstream=a_name, downstream=b_name, targets=list(targets), target_scores=torch.stack(scores).cpu(),
        feature_edges=torch.stack(feature_edges).cpu(), error_edges=torch.stack(error_edges).cpu(),
    )
