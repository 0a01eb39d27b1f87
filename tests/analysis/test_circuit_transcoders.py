"""MLP transcoders as circuit nodes: attribution, edges, faithfulness, mixed with SAEs (tiny fp64 ViT).

* Nodes: a transcoder's features and error node at the MLP output sum to that hook's per-position estimate,
  and where the model is linear downstream of the MLP output (block 1 of ``tail()``) they equal exact
  patching of each feature / error node; at block 0 (nonlinear downstream) they correlate with it.
* Edges into a transcoder (from an SAE upstream, every path crossing it) sum to first order to the target's
  node estimate; an edge out of a transcoder feature matches, to first order, the change of the downstream
  feature's objective when that one feature alone is patched (a forward pass, not our gradient code).
* A circuit mixing an SAE and transcoders: the full node set has faithfulness 1 and the empty one 0; with
  one transcoder, the empty circuit is the model with the MLP's output replaced by its mean (affine decoder).
"""

from __future__ import annotations

import pytest
import torch
from sae_lens import Transcoder
from sae_lens.saes.transcoder import TranscoderConfig

from sae_lens_multimodal.analysis.attribution import attribution_patching
from sae_lens_multimodal.analysis.circuits import (
    faithfulness,
    find_circuit,
    mean_activations,
    ranked_nodes,
)
from sae_lens_multimodal.analysis.circuits_edges import edge_attribution
from sae_lens_multimodal.analysis.circuits_exact import exact_patching
from sae_lens_multimodal.analysis.transcoder_sites import spliced
from tests.analysis.test_attribution import TOL, make_sae, no_hooks_left, rel_err, tail


def make_transcoder(layer: int, d_sae: int = 24, seed: int = 0) -> Transcoder:
    cfg = TranscoderConfig(d_in=32, d_out=32, d_sae=d_sae, apply_b_dec_to_input=False, dtype="float64")
    cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
    cfg.metadata.hook_name_out = f"blocks.{layer}.hook_mlp_out"
    tc = Transcoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.05))
    return tc.eval()


@pytest.fixture(scope="module")
def model():
    return tail()


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_nodes_match_exact_patching_where_downstream_is_linear(model):
    vit, x, x2, metric = model
    tc = make_transcoder(1)
    before = {k: v.clone() for k, v in tc.state_dict().items()}
    hook = "blocks.1.hook_mlp_out"
    est = attribution_patching(vit, x, x2, metric, saes=[tc], per="feature")
    assert est[hook].shape == (17, 24) and est.errors[hook].shape == (17,) and est.methods[hook] == "sae"
    by_pos = attribution_patching(vit, x, x2, metric, hooks=[hook])[hook]
    assert rel_err(est[hook].sum(-1) + est.errors[hook], by_pos) < TOL
    ref = exact_patching(vit, x, x2, metric, saes=[tc], per="feature")
    assert ref[hook].abs().max() > 1e-3 and (ref[hook] != 0).sum() > 17  # many features move
    assert rel_err(est[hook], ref[hook]) < TOL
    assert rel_err(est.errors[hook], ref.errors[hook]) < TOL
    assert no_hooks_left(vit)
    assert all(torch.equal(before[k], v) for k, v in tc.state_dict().items())


def test_nodes_correlate_with_exact_patching_upstream(model):
    """Block 0: block 1 (attention, LayerNorms, MLP) lies between the nodes and the metric."""
    vit, x, x2, metric = model
    tc = make_transcoder(0, seed=3)
    hook = "blocks.0.hook_mlp_out"
    est = attribution_patching(vit, x, x2, metric, saes=[tc], per="feature")
    ref = exact_patching(vit, x, x2, metric, saes=[tc], per="feature")
    moved = ref[hook] != 0
    assert moved.sum() > 17
    # measured 0.989 (features) and 0.899 (error nodes: a whole error vector moves at once, a larger step than
    # one feature's); seeds 0 and 1 gave 0.981 / 0.949 and 0.985 / 0.876
    assert corr(est[hook][moved], ref[hook][moved]) > 0.95
    assert corr(est.errors[hook], ref.errors[hook]) > 0.8


def test_edges_into_a_transcoder_sum_to_its_node_estimates(model):
    vit, x, _, metric = model
    up, down = make_sae(32, "blocks.0.hook_resid_post", seed=1).double(), make_transcoder(1, seed=2)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    gaps, targets = [], None
    for eps in (0.1, 0.01):
        edges = edge_attribution(vit, x, x + eps * direction, metric, upstream=up, downstream=down, top_k=5,
                                 targets=targets, freeze_attention=False)
        targets = edges.targets
        assert edges.downstream == "blocks.1.hook_mlp_out" and edges.feature_edges.shape == (5, 17, 24)
        node = attribution_patching(vit, x, x + eps * direction, metric, saes=[down], per="feature")
        assert torch.allclose(edges.target_scores, torch.stack([node[edges.downstream][t] for t in targets]))
        gaps.append(float((edges.totals() - edges.target_scores).abs().max() / edges.target_scores.abs().max()))
    assert gaps[1] < gaps[0] / 5 and gaps[1] < 0.05
    assert no_hooks_left(vit)


def test_edge_out_of_a_transcoder_feature_is_first_order_patching(model):
    vit, x, _, metric = model
    up, down = make_transcoder(0, seed=4), make_transcoder(1, seed=5)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=x.dtype)
    # dm/d(mlp_out 1) on the clean run (the model is linear after it, so this is every row's weight)
    _, cache = vit.run_with_cache(x)
    out1 = cache["blocks.1.hook_mlp_out"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(metric(vit.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, hook: out1)])), out1)

    def objective(target, patch=None):
        store = {}

        def put(act, hook):
            if patch is None:
                return act
            f = up.encode(store["r0"])
            f2 = f.clone()
            f2[(slice(None),) + patch[0]] = patch[1]
            return act + up.decode(f2) - up.decode(f)

        hooks = [("blocks.0.ln2.hook_normalized", lambda a, hook: store.__setitem__("r0", a)),
                 ("blocks.0.hook_mlp_out", put),
                 ("blocks.1.ln2.hook_normalized", lambda a, hook: store.__setitem__("r1", a))]
        pos, feat = target
        with torch.no_grad():
            vit.run_with_hooks(x, fwd_hooks=hooks)
            return float((down.encode(store["r1"])[:, pos, feat] * (g[:, pos] @ down.W_dec[feat])).sum())

    gaps = []
    for eps in (0.1, 0.01):
        x2 = x + eps * direction
        edges = edge_attribution(vit, x, x2, metric, upstream=up, downstream=down, top_k=1, freeze_attention=False)
        target = edges.targets[0]
        flat = edges.feature_edges[0].abs().flatten().argmax()
        pos, feat = (int(i) for i in torch.unravel_index(flat, edges.feature_edges[0].shape))
        f2 = up.encode(vit.run_with_cache(x2)[1]["blocks.0.ln2.hook_normalized"])[:, pos, feat]
        exact = objective(target, ((pos, feat), f2)) - objective(target)
        edge = float(edges.feature_edges[0][pos, feat])
        assert abs(edge) > 0
        gaps.append(abs(edge - exact) / abs(exact))
    assert gaps[1] < gaps[0] / 3 and gaps[1] < 0.05


@pytest.fixture(scope="module")
def mixed(model):
    vit, x, x2, metric = model
    return [make_transcoder(0, seed=6), make_sae(32, "blocks.0.hook_resid_post", seed=7).double(), make_transcoder(1, seed=8)]


def test_mixed_circuit_full_is_1_empty_is_0(model, mixed):
    vit, x, x2, metric = model
    with torch.no_grad(), spliced(vit, mixed):
        assert torch.allclose(vit(x), vit.run_with_hooks(x, fwd_hooks=[]), atol=1e-10)
    circuit = find_circuit(vit, x, x2, metric, saes=mixed, node_threshold=0.0, max_nodes=20, edge_threshold=1e-5)
    assert circuit.hooks == ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert {n.hook for n in circuit.nodes} <= set(circuit.hooks)
    assert circuit.edges  # SAE -> transcoder and transcoder -> SAE edges between consecutive hooks
    every = ranked_nodes(circuit.attribution, 10**6)
    assert len(every) == 3 * 17 * 25
    kw = dict(saes=mixed, reference=[x, x2])
    assert faithfulness(vit, every, x, metric, **kw) == pytest.approx(1.0, abs=1e-6)
    assert faithfulness(vit, [], x, metric, **kw) == pytest.approx(0.0, abs=1e-6)
    assert no_hooks_left(vit)


def test_empty_transcoder_circuit_is_the_mean_mlp_output(model):
    vit, x, x2, metric = model
    tc = make_transcoder(1, seed=9)
    hook = "blocks.1.hook_mlp_out"
    mean = torch.cat([vit.run_with_cache(x)[1][hook], vit.run_with_cache(x2)[1][hook]]).mean(0)
    means = mean_activations(vit, [tc], [x, x2])
    with torch.no_grad():
        full = float(metric(vit(x)))
        empty = float(metric(vit.run_with_hooks(x, fwd_hooks=[(hook, lambda a, hook: mean.expand_as(a))])))
    # keep one feature at one position: everything else at its mean; compare with a hand-made forward pass
    node = find_circuit(vit, x, x2, metric, saes=[tc], node_threshold=0.0, max_nodes=1, edges=False).nodes[0]
    kept = faithfulness(vit, [node], x, metric, saes=[tc], means=means)
    mean_f, mean_e = means[hook]

    def rewrite(a, hook):
        f = mean_f.expand(a.shape[0], *mean_f.shape).clone()
        f_clean = tc.encode(cache_r)
        if node.feature == "error":
            out = tc.decode(f) + mean_e
            out[:, node.position[0]] += (a - tc.decode(f_clean))[:, node.position[0]] - mean_e[node.position[0]]
            return out
        f[:, node.position[0], node.feature] = f_clean[:, node.position[0], node.feature]
        return tc.decode(f) + mean_e

    cache_r = vit.run_with_cache(x)[1]["blocks.1.ln2.hook_normalized"]
    with torch.no_grad():
        m = float(metric(vit.run_with_hooks(x, fwd_hooks=[(hook, rewrite)])))
    assert faithfulness(vit, [], x, metric, saes=[tc], means=means) == pytest.approx(0.0, abs=1e-6)
    assert kept == pytest.approx((m - empty) / (full - empty), abs=1e-6)
    assert abs(kept) > 1e-3


@pytest.mark.slow
@pytest.mark.shipped_weights
def test_shipped_transcoder_attribution_matches_exact_patching():
    """The shipped shapes CLIP and its block-1 transcoder (shapes-clip-transcoders), the shape contrast of
    tests/analysis/test_attribution_shapes.py (3 pairs). Measured: 2751 (position, feature) units move, Pearson
    r 0.9995 (features) and 0.9997 (error nodes), top-10 agreement 1.0 (colour: r 0.997 / 0.999, top-10 0.9;
    block 3: r >= 0.9998 for both contrasts)."""
    from sae_lens import SAE

    from sae_lens_multimodal.models.hooked_clip import HookedCLIP
    from sae_lens_multimodal.world import ShapesWorld
    from tests.analysis.test_attribution_shapes import N_PAIRS, contrast, top_k_agreement

    clip = HookedCLIP.from_pretrained("shapes-clip")
    tc = SAE.from_pretrained("shapes-clip-transcoders", "blocks.1.mlp", device="cpu")
    world = ShapesWorld(image_size=32, seed=3)
    bases = world.sample_factors(N_PAIRS, shape=["circle", "triangle"], color=["red", "green"],
                                 position=["left", "top left", "bottom"], size="large", texture="plain")
    clean, corrupted, metric, _, _ = contrast((world, bases), "shape")
    hook = "vision.blocks.1.hook_mlp_out"
    est = attribution_patching(clip, clean, corrupted, metric, saes=[tc], per="feature")
    ref = exact_patching(clip, clean, corrupted, metric, saes=[tc], per="feature")
    moved = ref[hook] != 0
    assert moved.sum() > 1000
    assert corr(est[hook][moved].double(), ref[hook][moved].double()) > 0.98
    assert corr(est.errors[hook].double(), ref.errors[hook].double()) > 0.98
    assert top_k_agreement(est[hook], ref[hook], 10) >= 0.8
    assert no_hooks_left(clip)
