"""Sparse feature circuits (Marks et al. 2024): nodes, edges, faithfulness and completeness.

:func:`find_circuit` splices SAEs at several hooks (their error terms kept, the model's output unchanged, the
SAEs not modified), ranks every node -- an SAE feature at one position, or the SAE's error node at one position
-- by its attribution-patching estimate (:func:`~sae_lens_multimodal.analysis.attribution.attribution_patching`),
keeps the nodes with ``|attribution| >= node_threshold`` and, between the kept nodes of consecutive spliced
hooks, the edges with ``|attribution| >= edge_threshold``
(:func:`~sae_lens_multimodal.analysis.circuits_edges.edge_attribution`, attention patterns and LayerNorm scales
frozen).

:func:`faithfulness` measures a circuit by **mean ablation**: one forward pass on the clean input in which, at
every SAE hook, every node outside the circuit is replaced by its mean over a reference batch (a feature by its
mean activation at that position, an error node by the mean error vector there); the circuit's nodes keep their
values. Normalised as ``(m(C) - m(empty)) / (m(full) - m(empty))``: 1 for the full node set, 0 for the empty
one, by construction. :func:`completeness` is the same measure for the complement (every node except the
circuit's; near 0 when the circuit holds all that matters). :func:`faithfulness_curve` gives both against
circuit size, nodes taken in order of |attribution|.

MLP transcoders (SAELens ``Transcoder`` / ``SkipTranscoder``) mix freely with SAEs in ``saes``: a transcoder's
nodes are its features and error node at the MLP output hook it writes (its features computed from the MLP's
input, analysis/transcoder_sites.py), and they are found, joined by edges and mean-ablated like an SAE's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from sae_lens_multimodal.analysis.attribution import (
    AttributionResult,
    Inputs,
    Metric,
    attribution_patching,
    call_model,
    check_model,
    sae_map,
    scalar_metric,
    to_device,
)
from sae_lens_multimodal.analysis.circuits_edges import edge_attribution
from sae_lens_multimodal.analysis.transcoder_sites import decomposition_hooks, reconstruct
from sae_lens_multimodal.core.atomic import atomic_write_text

__all__ = [
    "Circuit",
    "CircuitEdge",
    "CircuitNode",
    "completeness",
    "faithfulness",
    "faithfulness_curve",
    "find_circuit",
    "load_circuit",
]

ERROR = "error"
FORMAT = "sae-lens-mm-circuit/1"


@dataclass(frozen=True)
class CircuitNode:
    """One node: an SAE feature (an int) or the error node (``"error"``) of the SAE at ``hook``, at one position."""

    hook: str
    feature: Union[int, str]
    position: tuple[int, ...]
    attribution: float

    @property
    def id(self) -> str:
        return f"{self.hook}/{self.feature}/{','.join(map(str, self.position))}"


@dataclass(frozen=True)
class CircuitEdge:
    """The linear estimate of how much of ``target``'s effect runs through ``source`` (node ids)."""

    source: str
    target: str
    attribution: float


@dataclass
class Circuit:
    """The nodes and edges above the thresholds, with the run's metric values (JSON: :meth:`to_json`)."""

    hooks: list[str]
    nodes: list[CircuitNode]
    edges: list[CircuitEdge]
    node_threshold: float
    edge_threshold: float
    clean_metric: float
    corrupted_metric: float
    #: filled by find_circuit(..., measure=True) or by the caller: faithfulness / completeness of the nodes
    faithfulness: Optional[float] = None
    completeness: Optional[float] = None
    #: [(n_nodes, faithfulness, completeness)] from faithfulness_curve
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    #: the node attribution of every node (not saved): ranks nodes for faithfulness_curve
    attribution: Optional[AttributionResult] = field(default=None, repr=False, compare=False)

    def node(self, node_id: str) -> CircuitNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"No node {node_id!r} in the circuit ({len(self.nodes)} nodes).")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "hooks": list(self.hooks),
            "nodes": [dict(asdict(n), position=list(n.position), id=n.id) for n in self.nodes],
            "edges": [asdict(e) for e in self.edges],
            "node_threshold": self.node_threshold, "edge_threshold": self.edge_threshold,
            "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric,
            "faithfulness": self.faithfulness, "completeness": self.completeness,
            "curve": [list(row) for row in self.curve],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Circuit":
        if data.get("format") != FORMAT:
            raise ValueError(f"Not a circuit file (format {data.get('format')!r}, expected {FORMAT!r}); write one "
                             "with Circuit.to_json.")
        nodes = [CircuitNode(n["hook"], n["feature"], tuple(n["position"]), float(n["attribution"]))
                 for n in data["nodes"]]
        edges = [CircuitEdge(e["source"], e["target"], float(e["attribution"])) for e in data["edges"]]
        return cls(hooks=list(data["hooks"]), nodes=nodes, edges=edges,
                   node_threshold=data["node_threshold"], edge_threshold=data["edge_threshold"],
                   clean_metric=data["clean_metric"], corrupted_metric=data["corrupted_metric"],
                   faithfulness=data.get("faithfulness"), completeness=data.get("completeness"),
                   curve=[tuple(row) for row in data.get("curve", [])])  # type: ignore[misc]

    def to_json(self, path: Union[str, Path]) -> Path:
        """Write the circuit as JSON (atomically); read it back with :func:`load_circuit`."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    def to_html(self, path: Union[str, Path], **kwargs: Any) -> Path:
        """A self-contained interactive graph (see :func:`~sae_lens_multimodal.analysis.circuit_html.write_circuit_html`)."""
        from sae_lens_multimodal.analysis.circuit_html import write_circuit_html

        return write_circuit_html(self, path, **kwargs)


def load_circuit(path: Union[str, Path]) -> Circuit:
    """Read a circuit written by :meth:`Circuit.to_json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No circuit file at {path}; write one with Circuit.to_json or sae-lens-mm circuit.")
    return Circuit.from_dict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------ finding
def _ordered_saes(model: Any, saes: Any) -> dict[str, Any]:
    """SAEs and transcoders by the hook they rewrite, in the order the hooks run (by layer; the contract's
    listing order breaks ties)."""
    by_hook = sae_map(model, saes)
    if not by_hook:
        raise ValueError("Pass at least one SAE: saes={hook: sae, ...} (or a list of SAEs).")
    listing = list(model.hook_specs())
    rank = {name: i for i, name in enumerate(listing)}
    return dict(sorted(by_hook.items(), key=lambda kv: rank.get(kv[0], len(listing))))


def _nodes_above(result: AttributionResult, hook: str, threshold: float) -> list[CircuitNode]:
    out = []
    feats, errs = result.scores[hook], result.errors[hook]
    for idx in (feats.abs() >= threshold).nonzero().tolist():
        out.append(CircuitNode(hook, int(idx[-1]), tuple(idx[:-1]), float(feats[tuple(idx)])))
    for idx in (errs.abs() >= threshold).nonzero().tolist():
        out.append(CircuitNode(hook, ERROR, tuple(idx), float(errs[tuple(idx)])))
    return out


def find_circuit(
    model: Any,
    clean: Inputs,
    corrupted: Inputs,
    metric: Metric,
    *,
    saes: Any,
    node_threshold: float = 0.1,
    edge_threshold: float = 0.01,
    max_nodes: Optional[int] = None,
    edges: bool = True,
    measure: bool = False,
    reference: Optional[Sequence[Inputs]] = None,
    device: Union[str, torch.device] = "cpu",
    timestep: Any = None,
    cfg_branch: Optional[str] = None,
) -> Circuit:
    """The sparse feature circuit of ``metric`` for the clean -> corrupted contrast.

    Args:
        model / clean / corrupted / metric / device / timestep / cfg_branch: as
            :func:`~sae_lens_multimodal.analysis.attribution.attribution_patching`.
        saes: SAELens SAEs and MLP transcoders, ``{hook: sae}`` or a list (each located by its metadata hook
            names; a transcoder's nodes sit at the MLP output hook it writes), mixed freely.
        node_threshold: keep nodes (features and error nodes, per position) with ``|attribution| >=`` this.
        edge_threshold: keep edges between kept nodes of consecutive SAE hooks with ``|attribution| >=`` this.
        max_nodes: at most this many nodes (the largest |attribution| first), after the threshold.
        edges: compute edges (one backward pass per kept downstream feature node).
        measure: also measure ``faithfulness`` and ``completeness`` (mean ablation over ``reference``).
        reference: inputs whose mean activations replace ablated nodes (default: clean and corrupted).
    """
    if not node_threshold >= 0 or not edge_threshold >= 0:
        raise ValueError(f"Thresholds must be >= 0; got node_threshold={node_threshold}, edge_threshold={edge_threshold}.")
    if max_nodes is not None and max_nodes < 0:
        raise ValueError(f"max_nodes must be >= 0 (or None for no limit); got {max_nodes}.")
    by_hook = _ordered_saes(model, saes)
    result = attribution_patching(model, clean, corrupted, metric, per="feature", saes=list(by_hook.values()),
                                  device=device, timestep=timestep, cfg_branch=cfg_branch)
    nodes = [n for hook in by_hook for n in _nodes_above(result, hook, node_threshold)]
    nodes.sort(key=lambda n: -abs(n.attribution))
    if max_nodes is not None:
        nodes = nodes[:max_nodes]
    hooks = list(by_hook)
    found: list[CircuitEdge] = []
    if edges:
        for up, down in zip(hooks, hooks[1:]):
            ups = [n for n in nodes if n.hook == up]
            targets = [n for n in nodes if n.hook == down and n.feature != ERROR]  # edges into features only
            if not ups or not targets:
                continue
            ea = edge_attribution(model, clean, corrupted, metric, upstream=by_hook[up], downstream=by_hook[down],
                                  targets=[n.position + (n.feature,) for n in targets], device=device,
                                  timestep=timestep, cfg_branch=cfg_branch)
            for i, target in enumerate(targets):
                for u in ups:
                    value = float(ea.error_edges[i][u.position] if u.feature == ERROR
                                  else ea.feature_edges[i][u.position + (u.feature,)])
                    if abs(value) >= edge_threshold:
                        found.append(CircuitEdge(u.id, target.id, value))
    circuit = Circuit(hooks=hooks, nodes=nodes, edges=found, node_threshold=node_threshold,
                      edge_threshold=edge_threshold, clean_metric=result.clean_metric,
                      corrupted_metric=result.corrupted_metric, attribution=result)
    if measure:
        refs = [clean, corrupted] if reference is None else list(reference)
        means = mean_activations(model, by_hook, refs, device=device, timestep=timestep)
        circuit.faithfulness = faithfulness(model, circuit, clean, metric, saes=by_hook, means=means,
                                            device=device, timestep=timestep)
        circuit.completeness = completeness(model, circuit, clean, metric, saes=by_hook, means=means,
                                            device=device, timestep=timestep)
    return circuit


# ------------------------------------------------------------------------------------------ ablation
def mean_activations(model: Any, saes: Any, reference: Sequence[Inputs], *, device: Union[str, torch.device] = "cpu",
                     timestep: Any = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """hook -> (mean feature activations [*positions, d_sae], mean error [*positions, ...]) over the rows of
    every input in ``reference`` (each input weighted by its number of rows)."""
    device = check_model(model, device)
    by_hook = _ordered_saes(model, saes)
    if not reference:
        raise ValueError("Pass at least one reference input for the mean ablation.")
    sums: dict[str, list[Any]] = {h: [0.0, 0.0, 0] for h in by_hook}

    def keep(hook_name: str, sae: Any, x_read: torch.Tensor, act: torch.Tensor) -> None:
        f = sae.encode(x_read)
        err = act - reconstruct(sae, x_read, f).to(act.dtype)
        s = sums[hook_name]
        s[0], s[1], s[2] = s[0] + f.sum(0), s[1] + err.sum(0), s[2] + act.shape[0]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=decomposition_hooks(model, by_hook, keep)):
            for inputs in reference:
                call_model(model, to_device(inputs, device), timestep)
    finally:
        model.train(was_training)
    missing = [h for h, s in sums.items() if s[2] == 0]
    if missing:
        raise RuntimeError(f"Hooks {missing} did not run on the reference inputs; pass inputs that reach them.")
    return {h: (s[0] / s[2], s[1] / s[2]) for h, s in sums.items()}


def _keep_masks(circuit_nodes: Sequence[CircuitNode], means: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                complement: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    masks = {h: (torch.zeros(m[0].shape, dtype=torch.bool, device=m[0].device),
                 torch.zeros(m[0].shape[:-1], dtype=torch.bool, device=m[0].device)) for h, m in means.items()}
    for n in circuit_nodes:
        if n.hook not in masks:
            raise KeyError(f"Node {n.id!r} is at hook {n.hook!r}, which has no SAE here; pass its SAE in saes=.")
        keep_f, keep_e = masks[n.hook]
        if n.feature == ERROR:
            keep_e[n.position] = True
        else:
            keep_f[n.position + (int(n.feature),)] = True
    if complement:
        masks = {h: (~f, ~e) for h, (f, e) in masks.items()}
    return masks


@contextmanager
def _ablated(model: Any, saes: Mapping[str, Any], means: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
             masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Hooks that mean-ablate every node outside ``masks`` (removed on exit, also on error)."""

    def ablate(hook_name: str, sae: Any, x_read: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        mean_f, mean_e = means[hook_name]
        keep_f, keep_e = masks[hook_name]
        f = sae.encode(x_read)
        err = act - reconstruct(sae, x_read, f).to(act.dtype)
        f = torch.where(keep_f, f, mean_f)
        ke = keep_e.reshape(keep_e.shape + (1,) * (err.dim() - 1 - keep_e.dim()))
        err = torch.where(ke, err, mean_e)
        return reconstruct(sae, x_read, f).to(act.dtype) + err

    with model.hooks(fwd_hooks=decomposition_hooks(model, saes, ablate)):
        yield


def _metric_with(model: Any, saes: Mapping[str, Any], means: Any, masks: Any, clean: Inputs, metric: Metric,
                 timestep: Any) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _ablated(model, saes, means, masks):
            return float(scalar_metric(metric, call_model(model, clean, timestep)))
    finally:
        model.train(was_training)


def _measure(model: Any, nodes: Sequence[CircuitNode], clean: Inputs, metric: Metric, *, saes: Any,
             means: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]], reference: Optional[Sequence[Inputs]],
             device: Any, timestep: Any, complements: Sequence[bool]) -> list[float]:
    device = check_model(model, device)
    by_hook = _ordered_saes(model, saes)
    if means is None:
        if reference is None:
            raise ValueError("Pass reference=[inputs, ...] (e.g. [clean, corrupted]) or precomputed means=.")
        means = mean_activations(model, by_hook, reference, device=device, timestep=timestep)
    clean = to_device(clean, device)
    full = _metric_with(model, by_hook, means, _keep_masks([], means, True), clean, metric, timestep)
    empty = _metric_with(model, by_hook, means, _keep_masks([], means, False), clean, metric, timestep)
    if abs(full - empty) < 1e-8:
        raise ValueError(f"The metric is the same with every node kept ({full:.4g}) and every node mean-ablated "
                         f"({empty:.4g}): faithfulness is undefined; use a reference batch that differs from clean.")
    out = []
    for complement in complements:
        m = _metric_with(model, by_hook, means, _keep_masks(nodes, means, complement), clean, metric, timestep)
        out.append((m - empty) / (full - empty))
    return out


def _nodes_of(circuit: Union[Circuit, Sequence[CircuitNode]]) -> list[CircuitNode]:
    return list(circuit.nodes if isinstance(circuit, Circuit) else circuit)


def faithfulness(model: Any, circuit: Union[Circuit, Sequence[CircuitNode]], clean: Inputs, metric: Metric, *,
                 saes: Any, reference: Optional[Sequence[Inputs]] = None, means: Any = None,
                 device: Union[str, torch.device] = "cpu", timestep: Any = None) -> float:
    """``(m(C) - m(empty)) / (m(full) - m(empty))`` on ``clean``: every node outside the circuit mean-ablated
    (means over ``reference``, or given as ``means`` from :func:`mean_activations`)."""
    return _measure(model, _nodes_of(circuit), clean, metric, saes=saes, means=means, reference=reference,
                    device=device, timestep=timestep, complements=[False])[0]


def completeness(model: Any, circuit: Union[Circuit, Sequence[CircuitNode]], clean: Inputs, metric: Metric, *,
                 saes: Any, reference: Optional[Sequence[Inputs]] = None, means: Any = None,
                 device: Union[str, torch.device] = "cpu", timestep: Any = None) -> float:
    """The faithfulness of the complement: every circuit node mean-ablated, the rest kept (near 0 when the
    circuit holds everything the metric needs)."""
    return _measure(model, _nodes_of(circuit), clean, metric, saes=saes, means=means, reference=reference,
                    device=device, timestep=timestep, complements=[True])[0]


def ranked_nodes(result: AttributionResult, n: int) -> list[CircuitNode]:
    """The ``n`` nodes (features and error nodes, every SAE hook) with the largest |attribution|."""
    nodes: list[CircuitNode] = []
    for hook in result.errors:
        feats, errs = result.scores[hook], result.errors[hook]
        flat = feats.flatten().abs()
        for i in flat.topk(min(n, flat.numel())).indices.tolist():
            idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), feats.shape))
            nodes.append(CircuitNode(hook, idx[-1], idx[:-1], float(feats[idx])))
        flat = errs.flatten().abs()
        for i in flat.topk(min(n, flat.numel())).indices.tolist():
            idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), errs.shape))
            nodes.append(CircuitNode(hook, ERROR, idx, float(errs[idx])))
    nodes.sort(key=lambda node: -abs(node.attribution))
    return nodes[:n]


def faithfulness_curve(model: Any, circuit: Circuit, clean: Inputs, metric: Metric, *, saes: Any,
                       sizes: Sequence[int] = (0, 1, 2, 5, 10, 20, 50, 100), reference: Optional[Sequence[Inputs]] = None,
                       means: Any = None, device: Union[str, torch.device] = "cpu",
                       timestep: Any = None) -> list[tuple[int, float, float]]:
    """(n_nodes, faithfulness, completeness) for the ``n`` nodes of largest |attribution| (of every node, not
    only the circuit's), for each ``n`` in ``sizes``. Also stored in ``circuit.curve``."""
    if circuit.attribution is None:
        raise ValueError("This circuit has no node attribution (loaded from JSON?); recompute it with find_circuit.")
    if any(n < 0 for n in sizes):
        raise ValueError(f"Circuit sizes must be >= 0; got {list(sizes)}.")
    device = check_model(model, device)
    if means is None:
        if reference is None:
            raise ValueError("Pass reference=[inputs, ...] (e.g. [clean, corrupted]) or precomputed means=.")
        means = mean_activations(model, saes, reference, device=device, timestep=timestep)
    ranking = ranked_nodes(circuit.attribution, max(sizes, default=0))
    curve = []
    for n in sizes:
        f, c = _measure(model, ranking[:n], clean, metric, saes=saes, means=means, reference=None,
                        device=device, timestep=timestep, complements=[False, True])
        curve.append((len(ranking[:n]), f, c))
    circuit.curve = curve
    return curve
