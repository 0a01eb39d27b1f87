"""Sparse feature circuits: find_circuit, mean-ablation faithfulness / completeness, JSON, HTML, the CLI.

* By construction: the full node set has faithfulness 1 and completeness 0, the empty set faithfulness 0
  and completeness 1. Independently of our ablation code: with one SAE, the empty circuit's metric is the
  model's with that hook's activation replaced by its mean over the reference batch (the decoder is affine).
* Edges: every edge joins kept nodes of consecutive SAE hooks and carries edge_attribution's value.
* On the shipped shapes CLIP with its bundled SAE (shapes-clip-saes, vision blocks.2.hook_resid_post): the
  colour circuit at node threshold 0.5. Measured (3 pairs, seed 3): 7 nodes (6 features and the error node,
  all at CLS), faithfulness 0.885, completeness 0.554; the asserted bounds leave a margin of about 0.08.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.analysis.attribution import attribution_patching
from sae_lens_multimodal.analysis.circuits import (
    CircuitNode,
    completeness,
    faithfulness,
    faithfulness_curve,
    find_circuit,
    load_circuit,
    mean_activations,
    ranked_nodes,
)
from sae_lens_multimodal.analysis.circuits_edges import edge_attribution
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.world import ShapesWorld
from tests.analysis.test_attribution import make_sae, no_hooks_left, tail
from tests.analysis.test_attribution_shapes import contrast
from tests.reports.conftest import browser  # noqa: F401  (the headless Chromium fixture)

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def tiny():
    vit, x, x2, metric = tail()  # fp64
    saes = [make_sae(32, h, seed=i).double() for i, h in enumerate(HOOKS)]
    return vit, x, x2, metric, saes


@pytest.fixture(scope="module")
def shapes():
    clip = HookedCLIP.from_pretrained("shapes-clip")
    sae = SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post", device="cpu")
    sae = sae[0] if isinstance(sae, tuple) else sae
    world = ShapesWorld(image_size=32, seed=3)
    bases = world.sample_factors(3, shape=["circle", "triangle"], color=["red", "green"],
                                 position=["left", "top left", "bottom"], size="large", texture="plain")
    clean, corrupted, metric, _, _ = contrast((world, bases), "color")
    return clip, sae.eval(), clean, corrupted, metric


def test_full_circuit_is_1_and_empty_is_0(tiny):
    vit, x, x2, metric, saes = tiny
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in saes]
    circuit = find_circuit(vit, x, x2, metric, saes=saes, node_threshold=0.0, edges=False)
    every = ranked_nodes(circuit.attribution, 10**6)
    assert len(every) == 2 * 17 * (24 + 1)  # 2 hooks x 17 positions x (24 features + the error node)
    kw = dict(saes=saes, reference=[x, x2])
    assert faithfulness(vit, every, x, metric, **kw) == pytest.approx(1.0, abs=1e-5)
    assert faithfulness(vit, [], x, metric, **kw) == pytest.approx(0.0, abs=1e-5)
    assert completeness(vit, every, x, metric, **kw) == pytest.approx(0.0, abs=1e-5)
    assert completeness(vit, [], x, metric, **kw) == pytest.approx(1.0, abs=1e-5)
    assert no_hooks_left(vit)
    assert all(torch.equal(b[k], v) for b, s in zip(before, saes) for k, v in s.state_dict().items())


def test_empty_circuit_is_the_mean_activation(tiny):
    """One SAE: ablating every node gives decode(mean f) + mean error = the mean activation."""
    vit, x, x2, metric, saes = tiny
    hook = HOOKS[1]
    mean = torch.cat([vit.run_with_cache(x)[1][hook], vit.run_with_cache(x2)[1][hook]]).mean(0)
    with torch.no_grad():
        full = float(metric(vit(x)))
        empty = float(metric(vit.run_with_hooks(x, fwd_hooks=[(hook, lambda a, hook: mean.expand_as(a))])))
    means = mean_activations(vit, [saes[1]], [x, x2])
    assert faithfulness(vit, [], x, metric, saes=[saes[1]], means=means) == pytest.approx(0.0, abs=1e-6)
    # one error node kept: the mean activation everywhere, except that position's mean error is swapped for
    # its own error term; normalised by the model's own full and mean-activation metrics
    kept = faithfulness(vit, [CircuitNode(hook, "error", (3,), 0.0)], x, metric, saes=[saes[1]], means=means)
    e0 = means[hook][1]
    sae = saes[1]

    def one_error_kept(a, hook):
        err = a - sae.decode(sae.encode(a))
        out = mean.expand_as(a).clone()
        out[:, 3] = out[:, 3] - e0[3] + err[:, 3]
        return out

    with torch.no_grad():
        m = float(metric(vit.run_with_hooks(x, fwd_hooks=[(hook, one_error_kept)])))
    assert kept == pytest.approx((m - empty) / (full - empty), abs=1e-4)


def test_edges_join_kept_nodes_of_consecutive_hooks(tiny):
    vit, x, x2, metric, saes = tiny
    circuit = find_circuit(vit, x, x2, metric, saes=saes, node_threshold=0.0, max_nodes=12, edge_threshold=1e-4)
    assert no_hooks_left(vit)
    ids = {n.id: n for n in circuit.nodes}
    assert len(circuit.nodes) == 12 and circuit.edges
    assert [abs(n.attribution) for n in circuit.nodes] == sorted((abs(n.attribution) for n in circuit.nodes), reverse=True)
    targets = [n for n in circuit.nodes if n.hook == "blocks.1.hook_resid_post" and n.feature != "error"]
    ea = edge_attribution(vit, x, x2, metric, upstream=saes[0], downstream=saes[1],
                          targets=[n.position + (n.feature,) for n in targets])
    for e in circuit.edges:
        up, down = ids[e.source], ids[e.target]
        assert (up.hook, down.hook) == tuple(HOOKS) and down.feature != "error"
        i = targets.index(down)
        want = ea.error_edges[i][up.position] if up.feature == "error" else ea.feature_edges[i][up.position + (up.feature,)]
        assert e.attribution == pytest.approx(float(want), rel=1e-5, abs=1e-7)
        assert abs(e.attribution) >= 1e-4
    # node attributions are attribution_patching's
    ref = attribution_patching(vit, x, x2, metric, per="feature", saes=saes)
    n = circuit.nodes[0]
    table = ref.errors[n.hook] if n.feature == "error" else ref.scores[n.hook]
    index = n.position if n.feature == "error" else n.position + (n.feature,)
    assert n.attribution == pytest.approx(float(table[index]))


@pytest.mark.shipped_weights
def test_shapes_colour_circuit_is_faithful_and_small(shapes, tmp_path):
    clip, sae, clean, corrupted, metric = shapes
    circuit = find_circuit(clip, clean, corrupted, metric, saes=[sae], node_threshold=0.5, measure=True)
    assert no_hooks_left(clip)
    assert circuit.clean_metric > 3 and circuit.corrupted_metric < -3
    assert len(circuit.nodes) <= 10  # measured 7
    assert circuit.faithfulness >= 0.8  # measured 0.885
    assert circuit.completeness < circuit.faithfulness - 0.2  # measured 0.554
    # ground truth from the patching result: at block 2 the colour has been gathered on CLS
    assert all(n.position == (0,) for n in circuit.nodes[:5])
    curve = faithfulness_curve(clip, circuit, clean, metric, saes=[sae], reference=[clean, corrupted], sizes=[0, 1, 5, 10])
    assert curve[0][:2] == (0, pytest.approx(0.0, abs=1e-6)) and curve[0][2] == pytest.approx(1.0, abs=1e-6)
    assert curve[1][1] > 0.3 and curve[2][1] > 0.8  # measured 0.46, 0.91

    # JSON round trip
    path = circuit.to_json(tmp_path / "c.json")
    back = load_circuit(path)
    assert back == circuit and json.loads(path.read_text())["nodes"][0]["id"] == circuit.nodes[0].id
    with pytest.raises(ValueError, match="recompute"):
        faithfulness_curve(clip, back, clean, metric, saes=[sae], reference=[clean])
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="Not a circuit file"):
        load_circuit(tmp_path / "bad.json")


def test_html_graph_in_chromium(tiny, tmp_path, browser):  # noqa: F811
    vit, x, x2, metric, saes = tiny
    circuit = find_circuit(vit, x, x2, metric, saes=saes, node_threshold=0.0, max_nodes=8, edge_threshold=1e-4)
    feature = next(n for n in circuit.nodes if n.feature != "error")
    labels = {feature.hook: {feature.feature: "a </script> label"}}
    page = circuit.to_html(tmp_path / "c.html", labels=labels,
                           dashboards=lambda hook, f: f"dash/{hook}/{f}.html")
    text = page.read_text()
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from a network
    check = browser.check(page, sections=["circuit-graph", "summary"] + [f"node-{i}" for i in range(8)] + ["edge-0"],
                          screenshot=tmp_path / "c.png")
    assert check.ok, check.problems
    assert f"dash/{feature.hook}/{feature.feature}.html" in check.links
    n_links = sum(1 for n in circuit.nodes if n.feature != "error")
    assert len([link for link in check.links if link and link.startswith("dash/")]) == n_links


def test_html_graph_shows_top_images_in_chromium(tiny, tmp_path, browser):  # noqa: F811
    import numpy as np

    from sae_lens_multimodal.analysis.circuit_html import image_uri

    vit, x, x2, metric, saes = tiny
    circuit = find_circuit(vit, x, x2, metric, saes=saes, node_threshold=0.0, max_nodes=6, edge_threshold=1e-4)
    features = [n for n in circuit.nodes if n.feature != "error"]
    rng = np.random.default_rng(0)
    thumbs = {n.id: [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)] for n in features}
    by_feature = {features[0].hook: {features[0].feature: [rng.integers(0, 256, (8, 8), dtype=np.uint8)]}}
    page = circuit.to_html(tmp_path / "c.html", images=thumbs, labels=lambda h, f: f"feature {f}",
                           dashboards=lambda h, f: f"dash/{f}.html")
    text = page.read_text()
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained: images inline
    assert text.count("data:image/png;base64,") == 3 * len(features)
    check = browser.check(page, sections=["circuit-graph", "node-table"] + [f"node-row-{i}" for i in range(6)],
                          screenshot=tmp_path / "c.png")
    assert check.ok, check.problems
    assert check.n_images == 3 * len(features) and not check.broken_images  # the table's <img>, all decoded
    # the graph's nodes carry their thumbnails too (SVG <image>), and their dashboard links
    assert len([link for link in check.links if link and link.startswith("dash/")]) == 2 * len(features)
    # {hook: {feature: images}} and a grey uint8 [H, W] image work as well; bad images are refused clearly
    assert circuit.to_html(tmp_path / "d.html", images=by_feature).read_text().count("data:image/png") == 1
    with pytest.raises(ValueError, match="data: URI"):
        circuit.to_html(tmp_path / "e.html", images={features[0].id: ["pic.png"]})
    with pytest.raises(ValueError, match="uint8"):
        image_uri(np.zeros((4, 4, 3)))


def test_cli_writes_json_and_html(tmp_path, capsys):
    from sae_lens_multimodal.cli import main

    out = tmp_path / "circ"
    rc = main(["circuit", "--model", "shapes-clip", "--release", "shapes-clip-saes", "--sae-id",
               "blocks.2.hook_resid_post", "--shapes-contrast", "colour", "--out", str(out)])
    assert rc == 0
    circuit = load_circuit(out / "circuit.json")
    assert circuit.nodes and circuit.faithfulness is not None and len(circuit.curve) > 1
    assert (out / "circuit.html").read_text().startswith("<!DOCTYPE html>")
    n_features = sum(1 for n in circuit.nodes if n.feature != "error")
    assert 0 < (out / "circuit.html").read_text().count("data:image/png;base64,") <= 4 * n_features  # --top-images 4
    assert "faithfulness" in capsys.readouterr().out
    rc = main(["circuit", "--model", "shapes-clip", "--release", "shapes-clip-saes", "--sae-id",
               "blocks.2.hook_resid_post", "--out", str(out)])
    assert rc == 2 and "--shapes-contrast" in capsys.readouterr().err
