"""The diffusion colour circuit (issue 17 part 3): attribution patching through the whole sampler with SAE
feature x timestep nodes, checked against exact patching, and the shapes-diffusion colour circuit checked
against ground truth (colour probe, the shapes CLIP's judgement, purity, steering)."""

import numpy as np
import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.analysis.diffusion_attribution import (
    corrupted_features,
    differentiable_sampling,
    feature_patched_run,
    node_keep_masks,
    sampler_attribution,
)
from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
from sae_lens_multimodal.world.diffusion import SHAPES_DIFFUSION_DIR, load_shapes_pipeline
from sae_lens_multimodal.world.diffusion_circuit import (
    DIFFUSION_CIRCUIT_HOOK,
    DIFFUSION_CIRCUIT_RELEASE,
    colour_pairs,
    colour_probe,
    colour_probe_per_image,
    diffusion_colour_circuit,
)
from sae_lens_multimodal.world.shapes import COLORS, caption

KW = dict(num_inference_steps=4, guidance_scale=2.0, output_type="pt")


@pytest.fixture(scope="module")
def hooked():
    if not (SHAPES_DIFFUSION_DIR / "model_index.json").is_file():
        pytest.skip(f"shapes-diffusion weights are not shipped ({SHAPES_DIFFUSION_DIR} is missing)")
    return HookedDiffusionPipeline(load_shapes_pipeline())


@pytest.fixture(scope="module")
def sae(hooked):
    return SAE.from_pretrained(DIFFUSION_CIRCUIT_RELEASE, DIFFUSION_CIRCUIT_HOOK)


@pytest.fixture(scope="module")
def prompts():
    pairs = colour_pairs(2)
    return ([caption(c) for c, _ in pairs], [caption(x) for _, x in pairs],
            colour_probe([c["color"] for c, _ in pairs], [x["color"] for _, x in pairs]))


# ------------------------------------------------------------------------------------------ the probe
def _solid(colour: str, background: bool = True) -> torch.Tensor:
    img = torch.zeros(3, 8, 8)
    rgb = torch.tensor(COLORS[colour], dtype=torch.float32) / 255
    img[:, 2:6, 2:6] = rgb[:, None, None]  # a square on the black background
    if not background:
        img[:] = rgb[:, None, None]
    return img


def test_colour_probe_reads_the_object_colour_on_the_line_from_foil_to_true():
    images = torch.stack([_solid("red"), _solid("blue"), _solid("green", background=False)])
    probe = colour_probe_per_image(images, ["red", "red", "green"], ["blue", "blue", "yellow"])
    # the background (black) carries no weight: a red square reads +0.5, a blue one -0.5
    assert probe[0] == pytest.approx(0.5, abs=1e-3)
    assert probe[1] == pytest.approx(-0.5, abs=1e-3)
    assert probe[2] == pytest.approx(0.5, abs=1e-3)
    mixed = 0.5 * (_solid("red") + _solid("blue"))
    assert float(colour_probe_per_image(mixed[None], ["red"], ["blue"])) == pytest.approx(0.0, abs=1e-3)


def test_colour_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="output_type='pt'"):
        colour_probe_per_image(torch.zeros(2, 8, 8, 3), ["red", "red"], ["blue", "blue"])
    with pytest.raises(ValueError, match="One true and one foil colour per image"):
        colour_probe_per_image(torch.zeros(2, 3, 8, 8), ["red"], ["blue", "blue"])


def test_colour_pairs_differ_in_colour_only():
    pairs = colour_pairs(30)
    assert len({(c["color"], x["color"]) for c, x in pairs}) == 30  # every ordered pair once
    for c, x in pairs:
        assert c["color"] != x["color"] and c["shape"] == x["shape"] and c["position"] == x["position"]
    assert len({c["color"] for c, _ in pairs[:6]}) >= 4  # the first few already mix colours
    with pytest.raises(ValueError, match="n_pairs"):
        colour_pairs(0)


# --------------------------------------------------------------------------------- generic machinery
def test_differentiable_sampling_gives_the_same_images_with_gradients(hooked, prompts):
    clean, _, metric = prompts
    cls = type(hooked.pipe)
    plain = hooked(clean, generator=torch.Generator().manual_seed(0), **KW)
    with differentiable_sampling(hooked):
        graded = hooked(clean, generator=torch.Generator().manual_seed(0), **KW)
    assert type(hooked.pipe) is cls  # restored
    assert graded.requires_grad and not plain.requires_grad
    assert torch.allclose(graded.detach(), plain, atol=1e-5)
    assert metric(graded).requires_grad


def test_feature_patched_run_is_the_identity_when_nothing_is_replaced(hooked, sae, prompts):
    clean, corrupt, _ = prompts
    plain = hooked(clean, generator=torch.Generator().manual_seed(0), **KW)
    _, own = corrupted_features(hooked, sae, clean, seed=0, **KW)  # the clean run's own features
    _, ref = corrupted_features(hooked, sae, corrupt, seed=0, **KW)
    steps = list(ref)
    keep_all = node_keep_masks({}, sae.cfg.d_sae, complement=True, steps=steps)
    assert torch.allclose(feature_patched_run(hooked, sae, clean, ref, keep_all, seed=0, **KW), plain, atol=1e-4)
    keep_none = node_keep_masks({}, sae.cfg.d_sae, steps=steps)
    assert torch.allclose(feature_patched_run(hooked, sae, clean, own, keep_none, seed=0, **KW), plain, atol=1e-4)
    # replacing every feature by the corrupted run's changes the images (the hook matters)
    patched = feature_patched_run(hooked, sae, clean, ref, keep_none, seed=0, **KW)
    assert (patched - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="No reference features"):
        feature_patched_run(hooked, sae, clean, {}, keep_none, seed=0, **KW)


@pytest.mark.shipped_weights
def test_sampler_attribution_matches_exact_patching_on_its_top_nodes(hooked, sae, prompts):
    clean, corrupt, metric = prompts
    result = sampler_attribution(hooked, sae, clean, corrupt, metric, seed=0, **KW)
    assert result.scores.shape == (4, sae.cfg.d_sae) and result.errors.shape == (4,)
    assert len(result.timesteps) == 4 and result.cfg_branch == "cond"
    # the probe tells the two colours apart (measured: clean 0.475, corrupted -0.235)
    assert result.clean_metric > 0.2 and result.corrupted_metric < 0
    _, ref = corrupted_features(hooked, sae, corrupt, seed=0, **KW)
    base = float(metric(feature_patched_run(hooked, sae, clean, ref, {}, seed=0, **KW)))
    assert base == pytest.approx(result.clean_metric, abs=1e-4)
    estimates, exact = [], []
    for t, f, est in result.top(4):
        keep = node_keep_masks({t: [f]}, sae.cfg.d_sae, complement=True)
        exact.append(float(metric(feature_patched_run(hooked, sae, clean, ref, keep, seed=0, **KW))) - base)
        estimates.append(est)
    # Measured (4 steps, 2 pairs): every top-4 sign agrees, estimate / exact = 0.80, 0.97, 0.92, 0.91 (top 8:
    # 0.80-0.99); the check asks for the signs and a factor of 2.
    assert all(np.sign(e) == np.sign(x) for e, x in zip(estimates, exact))
    assert all(0.5 < e / x < 2.0 for e, x in zip(estimates, exact))


def test_sampler_attribution_rejects_a_metric_without_gradient(hooked, sae, prompts):
    clean, corrupt, _ = prompts
    with pytest.raises(ValueError, match="scalar tensor that depends"):
        sampler_attribution(hooked, sae, clean, corrupt, lambda images: torch.tensor(0.0), seed=0, **KW)
    with pytest.raises(ValueError, match="cfg_branch"):
        sampler_attribution(hooked, sae, clean, corrupt, lambda x: x.mean(), cfg_branch="both", **KW)


# ----------------------------------------------------------------------------------- the shapes study
@pytest.mark.slow
@pytest.mark.shipped_weights
def test_diffusion_colour_circuit_against_ground_truth(hooked, sae, tmp_path):
    circuit = diffusion_colour_circuit(hooked, sae, n_pairs=12, n_validate=8, n_random_validate=4,
                                       sizes=(5, 20, 40, 80, 120), n_features_checked=4, n_steered=1)
    # Measured (12 pairs, 10 steps, ~60 s): r = 0.995, signs 12/12; asked: 0.8, 80%.
    assert circuit.correlation >= 0.8 and circuit.sign_agreement >= 0.8
    # Measured: faithfulness 0.10, 0.64, 0.75, 0.83, 0.88 at 5, 20, 40, 80, 120 nodes; the circuit is 80 nodes.
    assert circuit.faithfulness >= 0.8 and circuit.size <= 120
    assert circuit.curve[0][1] < circuit.curve[-1][1]
    m = circuit.metrics
    # Measured: clean 0.391 > circuit only 0.364 > every feature patched 0.234 > corrupted -0.356; ablated 0.318.
    assert m["clean"] > m["circuit_only"] > m["all_features_patched"] > m["corrupted"]
    assert m["all_features_patched"] < m["circuit_ablated"] < m["clean"]
    # CLIP: the prompt's colour on 100% of clean images, 83% with the circuit ablated, 0% of corrupted ones.
    clip = circuit.clip_clean_colour
    assert clip["corrupted"] < clip["circuit_ablated"] < clip["clean"]
    # Ground truth: the top generations of the 4 strongest circuit features share a colour well above chance (1/6):
    # measured mean purity 0.50 (random features of the same buckets and windows: 0.67, so not above them).
    assert np.mean([p["purity"] for p in circuit.purity.values()]) >= 1 / 3
    # Steering the purest circuit feature (b1:32, purple, t = 500-300) recolours 40% of other-colour images, its
    # random partner 0%; asked: 20 points more than the partner.
    (name,) = [k for k in circuit.steering if not k.startswith("random") and " " not in k]
    steered, partner = circuit.steering[name], circuit.steering[f"random for {name}"]
    assert steered["after"] >= partner["after"] + 0.2
    path = circuit.plot(tmp_path / "circuit.png")
    assert path.stat().st_size > 10_000
    assert set(circuit.to_dict()) >= {"nodes", "faithfulness", "validation", "purity", "steering", "size"}
