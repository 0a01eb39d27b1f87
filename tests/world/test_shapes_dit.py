"""The shipped shapes-world diffusion transformer (shapes-dit): a real diffusers SD3 transformer (PixArt with
kind="pixart") in a pipeline with StableDiffusion3Pipeline's / PixArtAlphaPipeline's conventions, loadable by name offline, wrapped by HookedDiffusionPipeline unchanged,
its hooks listed by the model contract; caching, steering, patching, probes and ablation run on it as on the
UNet; and it draws what its prompts say (judged by the shapes CLIP)."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from transformers import CLIPTextModelWithProjection

from sae_lens_multimodal.analysis.ablation import ablate_components, block_components, head_components
from sae_lens_multimodal.analysis.diffusion_patching import diffusion_patching, unet_blocks
from sae_lens_multimodal.analysis.temporal import timestep_probes
from sae_lens_multimodal.diffusion import HookedDiffusionPipeline, HookedDiT
from sae_lens_multimodal.models.loading import load_model
from sae_lens_multimodal.models.registry import list_models, model_info
from sae_lens_multimodal.steering import DirectionSteer, steer
from sae_lens_multimodal.world import class_factor_combinations
from sae_lens_multimodal.world.causal import shapes_prompts
from sae_lens_multimodal.world.diffusion import load_shapes_pipeline
from sae_lens_multimodal.world.dit import DIT_KINDS, SHAPES_DIT_DIR, ShapesDiTPipeline, load_shapes_dit_pipeline
from sae_lens_multimodal.world.eval_diffusion import evaluate_pipeline
from sae_lens_multimodal.world.shapes import POSITIONS
from sae_lens_multimodal.world.eval_diffusion import TARGETS, DiffusionEval
from sae_lens_multimodal.world.training.train_diffusion import evaluate_and_save
from sae_lens_multimodal.world.training.train_dit import DIT_TARGETS, DiTTrainConfig, train_dit

PROMPTS = ["a red circle on the left", "a blue triangle at the top"]


@pytest.fixture(scope="module")
def pipe():
    if not (SHAPES_DIT_DIR / "model_index.json").is_file():
        pytest.skip(f"shapes-dit weights are not shipped ({SHAPES_DIT_DIR} is missing)")
    return load_shapes_dit_pipeline()


@pytest.fixture(scope="module")
def hooked(pipe):
    return HookedDiffusionPipeline(pipe)


def _run(pipe, seed, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "pt", **kwargs}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_loads_by_name_offline_as_real_diffusers_components(pipe):
    assert "shapes-dit" in list_models(kind="diffusion")
    assert model_info("shapes-dit").source == str(SHAPES_DIT_DIR)
    by_name = ShapesDiTPipeline.from_pretrained("shapes-dit", local_files_only=True)
    assert isinstance(by_name.transformer, tuple(DIT_KINDS.values()))
    assert isinstance(by_name.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(by_name.scheduler, DPMSolverMultistepScheduler)
    # the caption projection maps the text tower's width to the transformer's
    text_width = by_name.transformer.config.get("caption_channels") or by_name.transformer.config.joint_attention_dim
    assert text_width == by_name.text_encoder.config.hidden_size
    for a, b in zip(by_name.transformer.state_dict().values(), pipe.transformer.state_dict().values()):
        assert torch.equal(a, b)
    # the same frozen text tower as shapes-diffusion's
    unet_pipe = load_shapes_pipeline()
    for a, b in zip(unet_pipe.text_encoder.state_dict().values(), pipe.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    files = [p for p in SHAPES_DIT_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 12_000_000
    index = json.loads((SHAPES_DIT_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "ShapesDiTPipeline"
    assert index["transformer"] == ["diffusers", type(pipe.transformer).__name__]
    record = json.loads((SHAPES_DIT_DIR / "training.json").read_text())
    assert record["retrain"].startswith("python -m sae_lens_multimodal.world.training.train_dit")
    # the plain retrain command reproduces the shipped run: its recorded config is DiTTrainConfig's defaults
    assert record["config"] == json.loads(json.dumps(asdict(DiTTrainConfig())))
    loaded = load_model("shapes-dit")
    assert isinstance(loaded, HookedDiffusionPipeline) and isinstance(loaded.pipe, ShapesDiTPipeline)
    assert isinstance(HookedDiT.from_pretrained("shapes-dit"), HookedDiT)


def test_same_seed_same_images_and_negative_then_positive_batching(pipe):
    a, b, c = (_run(pipe, s).images for s in (0, 0, 1))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.allclose(a, c)
    seen = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs["encoder_hidden_states"].clone(), out[0].clone())),
        with_kwargs=True)
    try:
        _run(pipe, 0, num_inference_steps=1, guidance_scale=3.0)
        _run(pipe, 0, num_inference_steps=1, guidance_scale=1.0)
    finally:
        handle.remove()
    (cfg_embeds, cfg_out), (cond_embeds, cond_out) = seen
    assert cfg_out.shape[0] == 4 and cond_out.shape[0] == 2
    neg_embeds, neg_mask, _ = pipe.encode_prompt(["", ""])
    assert torch.equal(cfg_embeds[2:], cond_embeds) and torch.equal(cfg_embeds[:2], neg_embeds)
    assert neg_mask.sum(1).tolist() == [2, 2]  # "" is start + end of text; the rest is padding
    assert torch.allclose(cfg_out[2:], cond_out, atol=1e-5)
    # precomputed embeddings (prompt_embeds + prompt_attention_mask + pooled_prompt_embeds) give the same images
    embeds, mask, pooled = pipe.encode_prompt(PROMPTS)
    again = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, pooled_prompt_embeds=pooled, num_inference_steps=4,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(again, a)
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        pipe(prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        pipe(PROMPTS, prompt_embeds=embeds, prompt_attention_mask=mask, pooled_prompt_embeds=pooled, num_inference_steps=1)
    with pytest.raises(FileNotFoundError, match="train_dit"):
        load_shapes_dit_pipeline(SHAPES_DIT_DIR / "missing")


def test_hooks_listed_by_the_model_contract_and_cached(pipe, hooked):
    cfg = pipe.transformer.config
    width, grid = cfg.num_attention_heads * cfg.attention_head_dim, cfg.sample_size // cfg.patch_size
    # PixArt: self-attention over patches (attn1), cross-attention to the text (attn2); SD3: one joint attention
    attns = ("attn",) if pipe.joint else ("attn1", "attn2")
    cross = attns[-1]
    specs = hooked.hook_specs()
    assert set(specs) == set(hooked.hook_dict)
    assert unet_blocks(hooked) == [f"transformer_blocks.{i}" for i in range(cfg.num_layers)]
    for i in range(cfg.num_layers):
        for name in ("hook_in", "hook_out", "hook_update"):
            spec = hooked.hook_spec(f"transformer_blocks.{i}.{name}")
            assert (spec.layout, spec.width) == ("tokens", width)
            assert spec.grid == (grid, grid)
        for attn in attns:
            spec = hooked.hook_spec(f"transformer_blocks.{i}.{attn}.hook_z")
            assert (spec.layout, spec.n_heads) == ("heads", cfg.num_attention_heads)
    plain = _run(pipe, 3, guidance_scale=3.0).images
    names = ["transformer_blocks.0.hook_out", f"transformer_blocks.2.{cross}.hook_pattern", f"transformer_blocks.1.{attns[0]}.hook_z"]
    images, cache = hooked.run_with_cache(PROMPTS, num_inference_steps=4, output_type="pt", guidance_scale=3.0,
                                          generator=torch.Generator().manual_seed(3), names_filter=names)
    # hooks observe without changing anything (to float rounding: the hooked joint attention computes its
    # pattern explicitly instead of one fused kernel; measured max difference ~5e-7)
    assert torch.allclose(images, plain, atol=1e-4)
    assert cache.timesteps == [int(t) for t in pipe.scheduler.timesteps] and set(cache.branches) == {"cond", "uncond"}
    t0 = cache.timesteps[0]
    assert cache[names[0], t0, "cond"].shape == (2, grid * grid, width)
    pattern = cache[names[1], t0, "uncond"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    if not pipe.joint:
        assert pattern.shape == (2, cfg.num_attention_heads, grid * grid, pipe.context_length)
        # the cross-attention of the unconditional "" rows puts no weight on padding (PixArt's mask)
        assert pattern[..., 2:].abs().max() < 1e-6
        assert cache[names[2], t0, "cond"].shape == (2, grid * grid, cfg.num_attention_heads, cfg.attention_head_dim)


def test_steering_runs_unchanged(pipe, hooked):
    hook = "transformer_blocks.3.hook_out"
    direction = torch.randn(hooked.hook_spec(hook).width, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=4, output_type="pt", guidance_scale=2.0)
    plain = hooked(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    with steer(hooked, DirectionSteer(hook, direction, "add", 0.0)):
        same = hooked(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(same, plain)
    with steer(hooked, DirectionSteer(hook, direction, "add", 4.0, cfg_branch="cond")):
        steered = hooked(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (steered - plain).abs().mean() > 0.01
    assert torch.equal(hooked(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs), plain)  # removed


def test_patching_the_last_block_at_every_step_reproduces_the_source(hooked):
    """The last block's output at every step is what the final layer reads; PixArt's final layer sees only the
    timestep besides it, so patching it must give the source's images exactly (pixel recovery 1), while SD3's
    final adaLN also reads the (target's) pooled prompt, so recovery is high but below 1 (measured 0.950 on the
    shipped 15000-step weights; 0.877 on the earlier 2400-step ones).
    A middle block patched only at the last step recovers less."""
    source = [{"color": "red", "shape": "circle", "position": "left"}]
    target = [{"color": "blue", "shape": "square", "position": "right"}]
    last = unet_blocks(hooked)[-1]
    result = diffusion_patching(hooked, source, target, blocks=[last, "transformer_blocks.1"], include_all_blocks=False,
                                timestep_mode="from", factor="color", num_inference_steps=4, progress=False)
    recovery = result["pixel_recovery"]
    assert recovery.shape == (2, 4)
    assert recovery[0, 0] > (0.8 if hooked.pipe.joint else 0.999)
    assert recovery[1, -1] < recovery[0, 0] - 0.2


def test_probes_and_ablation_run_unchanged(hooked):
    probes = timestep_probes(hooked, "transformer_blocks.5.hook_out", n_train=18, n_test=18, num_inference_steps=3,
                             lbfgs_steps=20, progress=False)
    assert probes.accuracy.shape == (3, 3) and probes.pooling == "auto"
    assert ((probes.accuracy >= 0) & (probes.accuracy <= 1)).all()
    attn = "transformer_blocks.0.attn" if hooked.pipe.joint else "transformer_blocks.0.attn2"
    comps = head_components(hooked, [attn], heads=[0]) + block_components(hooked, ["transformer_blocks.5"])
    assert [c.name for c in comps] == [f"{attn} head 0", "transformer_blocks.5 (skip)"]
    result = ablate_components(hooked, shapes_prompts(6), comps, num_inference_steps=3, progress=False)
    assert result.accuracy.shape == (2, 3) and (result.pixel_mse > 0).all()


def test_training_is_reproducible_by_seed():
    cfg = dict(steps=3, batch_size=4, warmup_steps=1, width=16, depth=1, heads=2, log_every=1, ema_decay=0.5)
    a, ra = train_dit(DiTTrainConfig(seed=0, **cfg), progress=False)
    b, _ = train_dit(DiTTrainConfig(seed=0, **cfg), progress=False)
    c, _ = train_dit(DiTTrainConfig(seed=1, **cfg), progress=False)
    sa, sb, sc = (p.transformer.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [s for s, _ in ra.loss_curve] == [1, 2, 3] and all(np.isfinite(v) for _, v in ra.loss_curve)
    assert ra.config["patch_size"] == DiTTrainConfig().patch_size


def test_the_dit_is_judged_against_its_own_targets(tmp_path, monkeypatch):
    # issue 19 asks more of shapes-dit (shape >= 80%, position >= 90%) than the UNet's targets do
    assert DIT_TARGETS == {"color": 0.90, "shape": 0.80, "position": 0.90} and DIT_TARGETS != TARGETS
    judged = DiffusionEval(factor_accuracy={"color": 1.0, "shape": 0.75, "position": 0.85}, all_factors_accuracy=0.7,
                           value_accuracy={}, reference_accuracy={}, n_images=1, n_prompts=1, images_per_prompt=1,
                           num_inference_steps=1, guidance_scale=2.0, scheduler="s", seed=0, seconds=0.0)
    monkeypatch.setattr("sae_lens_multimodal.world.eval_diffusion.evaluate_pipeline", lambda *a, **k: judged)
    pipe, result = train_dit(DiTTrainConfig(steps=1, batch_size=2, width=16, depth=1, heads=2), progress=False)
    evaluate_and_save(pipe, asdict(result), tmp_path / "dit", images_per_prompt=1, retrain="r", progress=False,
                      targets=DIT_TARGETS)
    record = json.loads((tmp_path / "dit" / "training.json").read_text())
    assert record["evaluation"]["targets"] == DIT_TARGETS
    # 75% shape and 85% position would pass the UNet's targets, not the DiT's
    assert not judged.meets_targets()["shape"] and not judged.meets_targets()["position"]


# On this sample (54 prompts x 1 image, 10 DPM-Solver++ steps, guidance 2, seed 0) the shipped shapes-dit
# (15000 training steps) measured colour 100%, shape 100%, position 100%; on the full evaluation (162 prompts
# x 2, 20 steps; training.json) colour 100%, shape 99.1%, position 100%. The targets (colour and
# position >= 90%, shape >= 80%) are met. (The earlier 2400-step weights measured shape 40.7% here.)
# Thresholds: colour / position 8 points below the measured 100% (above the 90% target); shape 15 points
# below (8 of 54 images), above the 80% target.
SAMPLE_THRESHOLDS = {"color": 0.92, "shape": 0.85, "position": 0.92}


@pytest.mark.shipped_weights
def test_generated_images_show_the_prompted_factors(pipe):
    combos = [c for i, c in enumerate(class_factor_combinations()) if (i % 9 + i // 9) % 3 == 0]
    assert {c["position"] for c in combos} == set(POSITIONS) and len(combos) == 54
    result = evaluate_pipeline(pipe, prompts=combos, images_per_prompt=1, num_inference_steps=10,
                               guidance_scale=2.0, seed=0, progress=False)
    for factor, threshold in SAMPLE_THRESHOLDS.items():
        assert result.factor_accuracy[factor] >= threshold, str(result)
