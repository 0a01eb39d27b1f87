"""The steering API on the shapes-world CLIP (vision tower) and the shapes-world diffusion pipeline.

Expected edits are computed independently from the recorded clean activation: for a TopK SAE (linear
decoder) ``decode(f') - decode(f) = (a' - a) * W_dec[f]``; for a direction, the coordinate is
``x . d / |d|^2``.
"""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal.steering import DirectionSteer, FeatureSteer, steer, steering_hooks

HOOK = "vision.blocks.2.hook_resid_post"


def recorded(model, images, steers):
    """(pre, post) activations at HOOK around the steering hooks, via run_with_hooks."""
    store = {}

    def pre(a, hook):
        store["pre"] = a.clone()

    def post(a, hook):
        store["post"] = a.clone()

    model.run_with_hooks(images, return_type="embeddings", fwd_hooks=[(HOOK, pre)] + steering_hooks(model, steers) + [(HOOK, post)])
    return store["pre"], store["post"]


def expected_feature_delta(sae, pre, feature, new_fn, mask):
    a = sae.encode(pre)[..., feature]
    change = (new_fn(a) - a) * mask
    return change[..., None] * sae.W_dec[feature]


@pytest.mark.parametrize(
    "mode,value,new_fn",
    [
        ("clamp", 7.0, lambda a: torch.full_like(a, 7.0)),
        ("add", 3.0, lambda a: a + 3.0),
        ("scale", 2.5, lambda a: a * 2.5),
        ("ablate", None, lambda a: torch.zeros_like(a)),
    ],
)
def test_feature_modes_add_only_the_decoder_change(clip, vision_sae, images, mode, value, new_fn):
    with torch.no_grad():
        a = vision_sae.encode(clip.vision.run_with_cache(images, names_filter="blocks.2.hook_resid_post")[1]["blocks.2.hook_resid_post"])
    feature = int(a.amax((0, 1)).argmax())  # an active feature, so scale/ablate change something
    pre, post = recorded(clip, images, [FeatureSteer(vision_sae, feature, mode, value)])
    want = expected_feature_delta(vision_sae, pre, feature, new_fn, torch.ones(pre.shape[:2]))
    assert want.abs().max() > 0.1
    assert (post - pre - want).abs().max() < 1e-4


def test_no_edit_is_bit_identical(clip, vision_sae, images):
    clean = clip.encode_image(images)
    for s in (FeatureSteer(vision_sae, 5, "add", 0.0), FeatureSteer(vision_sae, [1, 2], "scale", 1.0),
              DirectionSteer(HOOK, torch.randn(64), "add", 0.0)):
        with steer(clip, s):
            assert torch.equal(clip.encode_image(images), clean)


def test_positions_cls_patches_indices_and_masks(clip, vision_sae, images):
    d = torch.randn(64)

    def changed(positions):
        pre, post = recorded(clip, images, [DirectionSteer(HOOK, d, "add", 2.0, positions=positions)])
        diff = post - pre
        assert torch.allclose(diff[(diff.abs().sum(-1) > 0)], (2.0 * d).expand_as(diff[(diff.abs().sum(-1) > 0)]), atol=1e-5)
        return (diff.abs().sum(-1) > 0).all(0).nonzero()[:, 0].tolist()

    assert changed("cls") == [0]
    assert changed("patches") == list(range(1, 65))
    assert changed([0, 5, 64]) == [0, 5, 64]
    grid = torch.zeros(8, 8, dtype=torch.bool)
    grid[2, 3] = grid[7, 7] = True
    assert changed(grid) == [1 + 2 * 8 + 3, 1 + 63]
    pixels = torch.zeros(32, 32, dtype=torch.bool)
    pixels[:16, :16] = True  # the top-left quadrant of the image: patches rows 0-3, cols 0-3
    assert changed(pixels) == [1 + r * 8 + c for r in range(4) for c in range(4)]
    feat_pre, feat_post = recorded(clip, images, [FeatureSteer(vision_sae, 9, "clamp", 5.0, positions="cls")])
    assert torch.equal(feat_pre[:, 1:], feat_post[:, 1:]) and not torch.equal(feat_pre[:, 0], feat_post[:, 0])


def test_direction_modes(clip, images):
    d = torch.randn(64)
    unit = d / d.norm()
    coord = lambda x: (x @ d) / (d @ d)  # noqa: E731
    pre, post = recorded(clip, images, [DirectionSteer(HOOK, d, "clamp", 1.5)])
    assert torch.allclose(coord(post), torch.full_like(coord(post), 1.5), atol=1e-4)
    assert torch.allclose(post - (post @ unit)[..., None] * unit, pre - (pre @ unit)[..., None] * unit, atol=1e-4)
    pre, post = recorded(clip, images, [DirectionSteer(HOOK, d, "ablate")])
    assert (post @ unit).abs().max() < 1e-4
    pre, post = recorded(clip, images, [DirectionSteer(HOOK, d, "scale", -1.0)])
    assert torch.allclose(coord(post), -coord(pre), atol=1e-4)


def test_composable_same_and_different_hooks(clip, vision_sae, images):
    s1 = FeatureSteer(vision_sae, 3, "clamp", 6.0)
    # bare vision-tower names: on a HookedCLIP they mean the vision tower, as for SAEs
    s2 = DirectionSteer("blocks.2.hook_resid_post", torch.randn(64), "add", 1.0, positions="patches")
    s3 = DirectionSteer("blocks.0.hook_resid_post", torch.randn(64), "add", 2.0)
    clean = clip.encode_image(images)
    with steer(clip, s1, s2, s3):
        together = clip.encode_image(images)
    with steer(clip, s1), steer(clip, s2), steer(clip, s3):
        nested = clip.encode_image(images)
    listed = clip.vision.run_with_hooks(images, fwd_hooks=steering_hooks(clip.vision, [s1, s2, s3]))
    assert torch.equal(together, nested)
    assert (together - listed).abs().max() < 1e-6  # the same steers on the bare vision tower (bare hook names)
    for one in (s1, s2, s3):
        with steer(clip, one):
            single = clip.encode_image(images)
        assert (single - clean).abs().max() > 1e-3 and (single - together).abs().max() > 1e-3


def test_hooks_removed_also_when_a_hook_raises(clip, vision_sae, images):
    clean = clip.encode_image(images)

    def boom(a, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with steer(clip, FeatureSteer(vision_sae, 3, "clamp", 6.0), DirectionSteer(HOOK, torch.randn(64), "add", 1.0)):
            clip.run_with_hooks(images, return_type="embeddings", fwd_hooks=[("vision.blocks.3.hook_resid_post", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        clip.run_with_hooks(images, return_type="embeddings",
                            fwd_hooks=steering_hooks(clip, [FeatureSteer(vision_sae, 3, "ablate")]) + [(HOOK, boom)])
    assert all(not hp._forward_hooks for hp in clip.hook_dict.values())
    assert not vision_sae.hook_sae_acts_post._forward_hooks
    assert torch.equal(clip.encode_image(images), clean)


def test_spliced_sae_in_any_order(clip, vision_sae, images):
    s = FeatureSteer(vision_sae, 3, "clamp", 6.0, positions="patches")
    with steer(clip, s):
        ref = clip.encode_image(images)
    with steer(clip, s):  # SAE spliced after the steer began: its latents are edited in the splice
        after, _ = clip.run_with_saes(images, saes=[vision_sae], use_error_term=True, return_type="embeddings")
    with clip.saes([vision_sae], use_error_term=True):
        with steer(clip, s):
            inside = clip.encode_image(images)
        listed = clip.run_with_hooks(images, return_type="embeddings", fwd_hooks=steering_hooks(clip, [s]))[0]
    vision_sae.use_error_term = True  # run_with_hooks_with_saes takes the SAE's own setting
    try:
        with_saes = clip.run_with_hooks_with_saes(images, saes=[vision_sae], return_type="embeddings",
                                                  fwd_hooks=steering_hooks(clip, [s]))[0]
    finally:
        vision_sae.use_error_term = False
    for out in (after, inside, listed, with_saes):
        assert (out - ref).abs().max() < 1e-4
    assert (ref - clip.encode_image(images)).abs().max() > 1e-3
    assert not clip.acts_to_saes and not vision_sae.hook_sae_acts_post._forward_hooks


def test_errors_are_clear(clip, vision_sae):
    with pytest.raises(KeyError, match="Did you mean.*vision.blocks.2.hook_resid_post"):
        steering_hooks(clip, [DirectionSteer("vision.blocks.2.hook_resid_pots", torch.randn(64), "add", 1.0)])
    with pytest.raises(IndexError, match=f"d_sae={vision_sae.cfg.d_sae}"):
        FeatureSteer(vision_sae, vision_sae.cfg.d_sae, "clamp", 1.0)
    with pytest.raises(ValueError, match=r"shape \(63,\).*64"):
        steering_hooks(clip, [DirectionSteer(HOOK, torch.randn(63), "add", 1.0)])
    with pytest.raises(ValueError, match="only applies to diffusion models"):
        steering_hooks(clip, [FeatureSteer(vision_sae, 1, "clamp", 1.0, timesteps=range(0, 500))])
    with pytest.raises(ValueError, match="only applies to diffusion models"):
        steering_hooks(clip, [DirectionSteer(HOOK, torch.randn(64), "add", 1.0, cfg_branch="cond")])
    with pytest.raises(ValueError, match="mode must be one of"):
        FeatureSteer(vision_sae, 1, "boost", 1.0)
    with pytest.raises(ValueError, match="needs value="):
        FeatureSteer(vision_sae, 1, "clamp")
    with pytest.raises(ValueError, match="does not match hook"):
        steering_hooks(clip, [FeatureSteer(vision_sae, 1, "clamp", 1.0, hook_name="vision.blocks.2.mlp.hook_post")])
    with pytest.raises(ValueError, match="needs a vision-transformer hook"):
        steering_hooks(clip, [DirectionSteer("text.blocks.0.hook_resid_post", torch.randn(64), "add", 1.0, positions="cls")])


# ---------------------------------------------------------------------------------------------- diffusion
DIFF_HOOK = "up_blocks.0.attentions.1.hook_out"


@pytest.fixture(scope="module")
def pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    return HookedDiffusionPipeline(load_shapes_pipeline())


def run_pipe(pipe, fwd_hooks=(), **kw):
    return pipe.run_with_hooks(["a red circle on the left", "a blue square at the top"], fwd_hooks=list(fwd_hooks),
                               num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0), **kw)


def test_diffusion_timestep_range_and_branch(pipe):
    from sae_lens_multimodal.diffusion import current_denoising_state

    d = torch.randn(64)
    s = DirectionSteer(DIFF_HOOK, d, "add", 3.0, timesteps=range(0, 500), cfg_branch="cond")
    calls = []

    def pre(a, hook):
        calls.append([current_denoising_state().timestep, a.clone()])

    def post(a, hook):
        calls[-1].append(a.clone())

    clean = run_pipe(pipe)
    steered = run_pipe(pipe, [(DIFF_HOOK, pre)] + steering_hooks(pipe, [s]) + [(DIFF_HOOK, post)])
    assert len(calls) == 4 and (steered - clean).abs().max() > 1e-3
    for t, a, b in calls:
        assert a.shape == (4, 8, 8, 64)  # [uncond x2, cond x2], channel-last 8x8
        diff = b - a
        if t < 500:
            assert diff[:2].abs().max() == 0  # the unconditional half is untouched
            assert torch.allclose(diff[2:], (3.0 * d).expand_as(diff[2:]), atol=1e-5)
        else:
            assert diff.abs().max() == 0
    assert all(not hp._forward_hooks for hp in pipe.hook_dict.values())


def test_diffusion_feature_steer_spatial_mask_and_noop(pipe):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=8, metadata=SAEMetadata(hook_name="up.0.1.hook_out")))
    clean = run_pipe(pipe)
    with steer(pipe, FeatureSteer(sae, 4, "add", 0.0)):
        assert torch.equal(run_pipe(pipe), clean)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:, :16] = True  # left half of the image -> left half of the 8x8 feature map
    store = []
    hooks = [(DIFF_HOOK, lambda a, hook: store.append(a.clone()))] + steering_hooks(
        pipe, [FeatureSteer(sae, 4, "clamp", 5.0, positions=mask, timesteps=[pipe_first_timestep(pipe)])]
    ) + [(DIFF_HOOK, lambda a, hook: store.append(a.clone()))]
    run_pipe(pipe, hooks)
    diff = (store[1] - store[0]).abs().sum(-1)  # first call: the steered timestep
    assert diff[:, :, :4].min() > 0 and diff[:, :, 4:].max() == 0
    assert torch.equal(store[3], store[2])  # later timesteps untouched
    with pytest.raises(ValueError, match="not in this run's schedule"):
        with steer(pipe, FeatureSteer(sae, 4, "clamp", 5.0, timesteps=[3])):
            run_pipe(pipe)
    with pytest.raises(ValueError, match="vision-transformer hook"):
        steering_hooks(pipe, [FeatureSteer(sae, 4, "clamp", 5.0, positions="cls")])
    with pytest.raises(KeyError, match="Did you mean"):
        steering_hooks(pipe, [FeatureSteer(sae, 4, "clamp", 5.0, hook_name="up_blocks.0.attentions.1.hook_outt")])


def pipe_first_timestep(pipe) -> int:
    sched = pipe.pipe.scheduler
    sched.set_timesteps(4)
    return int(sched.timesteps[0])


def test_diffusion_branch_needs_a_pipeline_run(pipe):
    from sae_lens_multimodal.diffusion import HookedUNet

    unet = HookedUNet(pipe.denoiser)
    s = DirectionSteer(DIFF_HOOK, torch.randn(64), "add", 1.0, cfg_branch="cond")
    x = torch.randn(1, 3, 32, 32)
    text = torch.randn(1, 16, 64)
    with pytest.raises(RuntimeError, match="needs a HookedDiffusionPipeline run"):
        unet.run_with_hooks(x, 10, encoder_hidden_states=text, fwd_hooks=steering_hooks(unet, [s]))
    assert all(not hp._forward_hooks for hp in unet.hook_dict.values())


def test_diffusion_bundled_timestep_sae(pipe):
    """The shipped timestep-bucketed SAE (its encode/decode depend on the current timestep): a no-op edit
    leaves the images bit-identical; a steer inside ``timesteps`` changes only those calls; steering its
    latents inside run_with_saes (error term kept) equals steering without splicing."""
    import sae_lens_multimodal  # noqa: F401
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained("shapes-diffusion-saes", "up_blocks.0.attentions.1.hook_out")
    except Exception:
        pytest.skip("shapes-diffusion-saes is not shipped in this checkout")
    clean = run_pipe(pipe)
    with steer(pipe, FeatureSteer(sae, [0, 1], "scale", 1.0)):
        assert torch.equal(run_pipe(pipe), clean)
    s = FeatureSteer(sae, 7, "clamp", 20.0, timesteps=range(500, 1000), cfg_branch="cond")
    store = []
    rec = lambda a, hook: store.append(a.clone())  # noqa: E731
    run_pipe(pipe, [(DIFF_HOOK, rec)] + steering_hooks(pipe, [s]) + [(DIFF_HOOK, rec)])
    sched = [int(t) for t in pipe.pipe.scheduler.timesteps]
    for i, t in enumerate(sched):
        pre, post = store[2 * i], store[2 * i + 1]
        assert torch.equal(pre[:2], post[:2])  # unconditional rows never change
        assert (not torch.equal(pre[2:], post[2:])) == (500 <= t < 1000)
    with steer(pipe, s):
        steered = run_pipe(pipe)
    sae.use_error_term = True
    try:
        with steer(pipe, s):
            spliced = pipe.run_with_saes(["a red circle on the left", "a blue square at the top"], saes=[sae],
                                         num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0))
    finally:
        sae.use_error_term = False
    assert (steered - clean).abs().max() > 1e-3
    assert (spliced - steered).abs().max() < 1e-4


def test_docs_example_runs():
    """The first example of docs/steering.md runs as written and steers."""
    from pathlib import Path

    import sae_lens_multimodal  # noqa: F401  (registers the bundled releases)
    from tests.steering._sae import bundled_sae

    if bundled_sae() is None:
        pytest.skip("the example loads shapes-clip-saes, not shipped in this checkout")
    text = (Path(__file__).resolve().parents[2] / "docs" / "steering.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(code, "docs/steering.md", "exec"), ns)
    assert ns["clean"].shape == ns["steered"].shape == ns["logits"].shape == (4, 2)
    assert (ns["clean"] - ns["steered"]).abs().max() > 1e-3


def test_warns_when_a_foreign_splice_bypasses_a_steer(clip, vision_sae, quick_sae, images):
    """A direction steer entered before another SAE is spliced at its hook cannot run while that SAE is in
    place: say so instead of failing silently. The steer's own SAE spliced later is steered (no warning)."""
    import warnings

    s = DirectionSteer("blocks.2.hook_resid_post", torch.randn(64), "add", 1.0)
    with pytest.warns(RuntimeWarning, match="bypassed while an SAE was spliced"):
        with steer(clip, s):
            clip.run_with_saes(images, saes=[quick_sae], return_type="embeddings")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with steer(clip, FeatureSteer(vision_sae, 3, "clamp", 5.0)):
            clip.run_with_saes(images, saes=[vision_sae], return_type="embeddings")
        with steer(clip, s):
            clip.encode_image(images)


def test_direction_over_all_heads_of_a_per_head_hook(clip, images):
    """hook_z is [batch, pos, head, d_head]: a direction of width n_heads * d_head edits the flattened heads."""
    d = torch.randn(64)
    store = {}
    hooks = [("vision.blocks.1.attn.hook_z", lambda a, hook: store.__setitem__("pre", a.clone()))]
    hooks += steering_hooks(clip, [DirectionSteer("blocks.1.attn.hook_z", d, "add", 1.0, positions="cls")])
    hooks += [("vision.blocks.1.attn.hook_z", lambda a, hook: store.__setitem__("post", a.clone()))]
    clip.run_with_hooks(images, return_type="embeddings", fwd_hooks=hooks)
    diff = store["post"] - store["pre"]
    assert diff.shape[2:] == (4, 16)
    assert torch.allclose(diff[:, 0], d.reshape(4, 16).expand_as(diff[:, 0]), atol=1e-6)
    assert diff[:, 1:].abs().max() == 0
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        steering_hooks(clip, [DirectionSteer("blocks.1.attn.hook_z", torch.randn(32), "add", 1.0)])


def test_vlm_vision_tower_and_language_model():
    """The same API on a HookedVLM (tiny random LLaVA): a vision SAE with a bare tower hook name and
    positions='patches', and a language-model direction at one token; no-op edits are bit-identical."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from sae_lens_multimodal.models.vlm import HookedVLM
    from sae_lens_multimodal.testing import tiny_random_llava

    model = HookedVLM.from_pretrained(tiny_random_llava("llava", "llama", seed=1))
    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1] + [255] * 16 + [5, 6]])  # 16 image-feature tokens (id 255)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=32, k=4, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
    clean = model(ids, px)
    with steer(model, FeatureSteer(sae, 1, "add", 0.0, positions="patches")):
        assert torch.equal(model(ids, px), clean)
    d = torch.randn(model.hook_width("lm.blocks.0.hook_resid_post"))
    vision_steer = FeatureSteer(sae, 1, "clamp", 5.0, positions="patches")
    lm_steer = DirectionSteer("lm.blocks.0.hook_resid_post", d, "add", 1.0, positions=[18])
    store = {}

    def run(steers, key):
        hooks = steering_hooks(model, steers) + [("lm.blocks.0.hook_resid_post", lambda a, hook: store.__setitem__(key, a.clone()))]
        with torch.no_grad():
            return model.run_with_hooks(ids, px, fwd_hooks=hooks)

    vision_only = run([vision_steer], "vision")
    both = run([vision_steer, lm_steer], "both")
    assert (vision_only - clean).abs().max() > 1e-3 and (both - vision_only).abs().max() > 1e-3
    lm_diff = store["both"] - store["vision"]  # the direction lands on token 18 only
    assert lm_diff[0, :18].abs().max() == 0 and (lm_diff[0, 18] - d).abs().max() < 1e-5
