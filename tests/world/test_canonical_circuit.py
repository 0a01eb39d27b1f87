"""The canonical circuits of the shapes CLIP (world/circuits.py) and their ground-truth checks.

Shipped weights: shapes-clip and shapes-clip-layer-saes (SAEs after blocks 0-3). Measured (6 pairs, seed 0,
`python -m sae_lens_multimodal.world.circuits`), thresholds below with the margin stated next to each:

| contrast | nodes | faithfulness | object share at block 0 | CLS share at blocks 2, 3 | pure in the factor |
|---|---|---|---|---|---|
| colour (red -> blue) | 25 | 0.915 | 0.70 | 1.00, 1.00 | 12 of 24 features |
| shape (circle -> square) | 25 | 0.860 | 1.00 | 1.00, 1.00 | |
| position (left -> right) | 100 | 0.84 | | | |

Ablation (zero-shot over 162 captions on 300 fresh red objects on the left; means over every colour): the
colour circuit's colour-pure features take colour accuracy from 1.0 to 0.29 and leave shape (0.98) and
position (1.0); as many random features at the same places change nothing (1.0).
"""

from __future__ import annotations

import pytest

from sae_lens_multimodal.world import circuits as C

pytestmark = pytest.mark.shipped_weights


@pytest.fixture(scope="module")
def clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained("shapes-clip")


@pytest.fixture(scope="module")
def saes():
    return C.load_layer_saes()


@pytest.fixture(scope="module")
def colour(clip, saes):
    return C.canonical_circuit("color", clip=clip, saes=saes)


def test_layer_saes_are_one_per_block_and_reconstruct(saes):
    assert [s.cfg.metadata.hook_name for s in saes] == list(C.LAYER_HOOKS)
    for sae in saes:
        ev = sae.cfg.metadata.evaluation
        assert ev["explained_variance"] > 0.95 and ev["dead_fraction"] < 0.1  # measured 0.963-0.987, 3.7-6.5%


def test_pairs_differ_in_one_factor_only():
    for factor in C.FACTORS:
        pairs = C.contrast_pairs(factor, 6, **C.CANONICAL[factor])
        for a, b in zip(pairs.clean_factors, pairs.foil_factors):
            changed = [k for k in C.FACTORS + ("size", "texture", "text") if getattr(a, k) != getattr(b, k)]
            assert changed == [factor]
    with pytest.raises(ValueError, match="canonical circuits are for"):
        C.contrast_pairs("size")


def test_colour_circuit_is_faithful_small_and_where_the_patching_says(colour):
    c = colour.circuit
    assert c.clean_metric > 10 and c.corrupted_metric < -10  # measured 15.6 / -15.6
    assert len(c.nodes) <= 40  # measured 25 (margin 15)
    assert c.faithfulness >= 0.8  # measured 0.915
    assert {n.hook for n in c.nodes} == set(c.hooks) and len(c.hooks) == 4  # nodes at every block
    # every edge joins nodes of consecutive blocks
    block = {n.id: c.hooks.index(n.hook) for n in c.nodes}
    assert c.edges and all(block[e.target] == block[e.source] + 1 for e in c.edges)
    # the curve is 0 for the empty circuit and the chosen size is the first to reach the target
    assert c.curve[0][:2] == (0, pytest.approx(0.0, abs=1e-6))
    assert all(f < 0.8 for n, f, _ in c.curve if 0 < n < len(c.nodes))
    # ground truth (b): the object's patches at block 0, CLS by blocks 2-3 (the CLIP patching result)
    where = C.node_locations(c, colour.pairs.object_tokens)
    assert where["vision.blocks.0.hook_resid_post"]["object"] > 0.5  # measured 0.70
    assert where["vision.blocks.0.hook_resid_post"]["other"] == 0.0  # nothing off the object and CLS
    assert where["vision.blocks.3.hook_resid_post"]["cls"] > 0.9  # measured 1.00
    assert where["vision.blocks.2.hook_resid_post"]["cls"] > 0.9  # measured 1.00


def test_colour_circuit_features_are_pure_in_colour(clip, colour):
    truth_images, truth_factors = C.probe_set()  # the docs' 3000 fresh images (with 1500: 7 pure features)
    feats = colour.feature_nodes
    tops = C.top_images(C.node_activations(clip, colour.saes, feats, truth_images), 20)
    purity = C.feature_purity(tops, truth_factors)
    pure = [p["color"][0] for p in purity if p and p["color"][1] >= C.PURE]
    assert len(pure) >= 8  # measured 12 of 24 (3000 probe images)
    assert sum(v in ("red", "blue") for v in pure) >= len(pure) - 2  # the contrast's colours (measured 11 of 12)
    # the two largest late-layer nodes are pure in colour (measured: 100% blue, 100% blue)
    late = [p for n, p in zip(feats, purity) if n.hook.endswith(("2.hook_resid_post", "3.hook_resid_post"))][:2]
    assert all(p["color"][1] >= C.PURE for p in late)
    # a colour-pure feature is not pure in shape beyond chance: colour, not the object's identity
    assert sum(p["shape"][1] >= C.PURE for p in purity if p) < len(pure)


@pytest.mark.slow
def test_colour_ablation_moves_colour_and_not_shape_or_position(clip, colour):
    truth = C.ground_truth_checks(colour, clip)
    a = truth.ablation
    assert a["clean"] == {"color": 1.0, "shape": 1.0, "position": 1.0}
    assert a["pure"]["color"] < 0.6  # measured 0.29
    assert a["pure"]["shape"] > 0.9 and a["pure"]["position"] > 0.95  # measured 0.98, 1.0
    assert a["circuit"]["color"] < 0.6 and a["circuit"]["position"] > 0.95  # measured 0.33, 1.0
    assert min(a["random"].values()) > 0.95  # measured 1.0


@pytest.mark.slow
@pytest.mark.parametrize("factor,max_nodes", [("shape", 40), ("position", 150)])
def test_shape_and_position_circuits(clip, saes, factor, max_nodes):
    result = C.canonical_circuit(factor, clip=clip, saes=saes)
    c = result.circuit
    assert len(c.nodes) <= max_nodes  # measured 25 (shape), 100 (position)
    assert c.faithfulness >= 0.8  # measured 0.86, 0.84
    where = C.node_locations(c, result.pairs.object_tokens)
    assert where["vision.blocks.0.hook_resid_post"]["cls"] < 0.5  # early: on patches (measured 0.0 for shape)
    assert where["vision.blocks.3.hook_resid_post"]["cls"] > 0.9  # late: CLS (measured 1.0)
    truth = C.ground_truth_checks(result, clip)
    a = truth.ablation
    others = [k for k in C.FACTORS if k != factor]
    assert a["pure"][factor] < a["clean"][factor] - 0.4  # the factor moves (measured 1 -> 0.07, 1 -> 0.35)
    assert all(a["pure"][k] > a["clean"][k] - 0.2 for k in others)  # the others barely (measured >= 0.89)


@pytest.mark.slow
def test_transcoder_variant_colour_circuit(clip):
    from sae_lens import SAE

    tcs = [SAE.from_pretrained("shapes-clip-transcoders", f"blocks.{layer}.mlp", device="cpu") for layer in range(4)]
    tcs = [(t[0] if isinstance(t, tuple) else t).eval() for t in tcs]
    result = C.canonical_circuit("color", clip=clip, saes=tcs)
    c = result.circuit
    assert len(c.nodes) <= 80 and c.faithfulness >= 0.8  # measured 60 nodes, 0.817
    where = C.node_locations(c, result.pairs.object_tokens)
    blocks = sorted(where)  # the transcoders' nodes are keyed by the hook they write (hook_mlp_out)
    assert where[blocks[0]]["object"] > 0.6 and where[blocks[-1]]["cls"] > 0.9  # measured 0.85, 1.0
