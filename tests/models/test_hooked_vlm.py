"""HookedVLM against transformers' own LLaVA / LLaVA-NeXT.

The models are transformers' ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` at
toy size with the real block structure (``tiny_random_llava``: CLIP QuickGELU vision tower, GELU projector,
Llama / Mistral / Qwen2 language model), random weights, constants randomised. Every comparison is with
transformers' own tensors: the vision tower's hidden states, the outputs of each decoder layer's attention,
MLP and layer (recorded with torch hooks on the original modules), ``image_hidden_states``, the logits,
attention weights (``output_attentions``) and ``generate``'s tokens. Interventions (SAEs, hooks) are
compared with the same intervention applied to the original modules with torch hooks.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_multimodal.models.hooked_vit import HookedViT
from sae_lens_multimodal.models.vlm import HookedVLM, VLMActivationCache, VLMLanguageModel
from sae_lens_multimodal.testing import tiny_random_llava

TOL = 1e-4
IMG = 255  # tiny_random_llava's image token


# ----------------------------------------------------------------------------------------------- helpers
def prompt(n_image_tokens: int = 16, before=(1, 5, 6), after=(7, 8, 9, 10)) -> torch.Tensor:
    return torch.tensor([list(before) + [IMG] * n_image_tokens + list(after)])


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded by two tokens (pad id 0)."""
    a = [1, 5, 6] + [IMG] * 16 + [7, 8, 9, 10]
    b = [0, 0, 1, 11] + [IMG] * 16 + [12, 13, 14]
    ids = torch.tensor([a, b])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def make_sae(d_in: int, hook_name: str, seed: int, d_sae: int = 48, **meta) -> StandardSAE:
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    for k, v in meta.items():
        setattr(cfg.metadata, k, v)
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.1))
    return sae.eval()


def vision_layers(hf) -> list:
    return list(hf.model.vision_tower.encoder.layers)


def lm_layers(hf) -> list:
    return list(hf.model.language_model.layers)


@contextmanager
def torch_hooks(pairs):
    """Forward hooks on original modules: pairs of (module, fn(output) -> new output or None)."""
    handles = []

    def wrap(fn):
        def hook(_m, _inp, out):
            if isinstance(out, tuple):
                new = fn(out[0])
                return None if new is None else (new,) + tuple(out[1:])
            return fn(out)
        return hook

    try:
        for module, fn in pairs:
            # prepend: run before transformers' own output-capturing hooks, so hidden_states see the change
            handles.append(module.register_forward_hook(wrap(fn), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def record_hf(hf, ids, px, **kw) -> dict[str, torch.Tensor]:
    """transformers' own intermediates: every decoder layer's attention / MLP / layer output, logits."""
    rec: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(out):
            rec[name] = out.detach().clone()
        return fn

    pairs = []
    for i, layer in enumerate(lm_layers(hf)):
        pairs += [(layer.self_attn, keep(f"{i}.attn_out")), (layer.mlp, keep(f"{i}.mlp_out")),
                  (layer, keep(f"{i}.resid_post"))]
    with torch_hooks(pairs), torch.no_grad():
        out = hf(input_ids=ids, pixel_values=px, output_hidden_states=True, **kw)
    rec["logits"] = out.logits
    feats = out.image_hidden_states
    # transformers <= 5.23 returns one tensor, 5.24 a list of per-image tensors: compare them as rows.
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    rec["image_hidden_states"] = feats.reshape(-1, feats.shape[-1])
    for i, h in enumerate(out.hidden_states[:-1]):
        rec[f"{i}.resid_pre"] = h
    return rec


@pytest.fixture(scope="module")
def llava():
    hf = tiny_random_llava("llava", "llama", seed=1)
    return hf, HookedVLM.from_pretrained(hf)


def images(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def check_equivalence(hf, model, ids, px, mask=None, extra=None):
    extra = extra or {}
    kw = {"attention_mask": mask} if mask is not None else {}
    ref = record_hf(hf, ids, px, **kw, **extra)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, px, **kw, **extra)
    real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    assert (logits - ref["logits"])[real].abs().max() <= TOL
    for i in range(model.lm.cfg.n_layers):
        for what in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            ours = cache[f"lm.blocks.{i}.hook_{what}"]
            err = (ours - ref[f"{i}.{what}"])[real].abs().max()
            assert err <= TOL, (i, what, float(err))
        mid = cache[f"lm.blocks.{i}.hook_resid_pre"] + cache[f"lm.blocks.{i}.hook_attn_out"]
        assert (cache[f"lm.blocks.{i}.hook_resid_mid"] - mid).abs().max() <= TOL
    ours = cache["hook_image_features"]
    assert (ours.reshape(-1, ours.shape[-1]) - ref["image_hidden_states"]).abs().max() <= TOL
    return cache


# ----------------------------------------------------------------------------------------------- equivalence
def test_forward_matches_transformers_at_every_residual_output(llava):
    hf, model = llava
    ids, px = prompt(), images()
    cache = check_equivalence(hf, model, ids, px)
    # Vision tower: transformers' hidden_states[k] is the residual stream after k blocks.
    with torch.no_grad():
        hidden = hf.model.vision_tower(px, output_hidden_states=True).hidden_states
    assert (cache["vision.blocks.0.hook_resid_pre"] - hidden[0]).abs().max() <= TOL
    for k in (1, 2):
        assert (cache[f"vision.blocks.{k - 1}.hook_resid_post"] - hidden[k]).abs().max() <= TOL
    # vision_feature_layer=-2 of 3 blocks: block 2 does not run, the projector reads blocks.1 without CLS.
    assert model.cfg.vision_layers_run == 2
    assert not any(k.startswith("vision.blocks.2.") for k in cache.keys())
    assert torch.equal(cache["projector.hook_in"], cache["vision.blocks.1.hook_resid_post"][:, 1:])
    assert isinstance(cache, VLMActivationCache)
    assert cache.vision["blocks.1.hook_resid_post"] is cache["vision.blocks.1.hook_resid_post"]


def test_left_padded_batch_matches_transformers(llava):
    hf, model = llava
    ids, mask = padded_batch()
    check_equivalence(hf, model, ids, images(2), mask)


@pytest.mark.parametrize(
    "vision,text,layer,strategy,impl",
    [
        ("clip", "qwen2", [-3, -1], "full", "eager"),  # biased q/k/v, GQA, concatenated layers, CLS kept
        # hidden_states[0] (written -4: transformers treats a literal 0 as "no hidden states"): ln_pre output.
        ("clip", "mistral", -4, "default", "sdpa"),
        ("siglip", "llama", -1, "full", "sdpa"),  # SigLIP tower (no CLS), last block, before post_layernorm
    ],
)
def test_other_towers_backbones_and_feature_layers_match_transformers(vision, text, layer, strategy, impl):
    hf = tiny_random_llava("llava", text, vision_model=vision, seed=2, vision_feature_layer=layer,
                           vision_feature_select_strategy=strategy, attn_implementation=impl)
    model = HookedVLM.from_pretrained(hf)
    n_tokens = 17 if strategy == "full" and vision == "clip" else 16
    check_equivalence(hf, model, prompt(n_tokens), images())


def test_mistral_sliding_window_matches_transformers():
    hf = tiny_random_llava("llava", "mistral", seed=5)
    hf.model.language_model.config.sliding_window = 6  # shorter than the prompt, so the window matters
    model = HookedVLM.from_pretrained(hf)
    assert model.lm.layer_types == ["sliding_attention"] * 2
    ids, px = prompt(), images()
    check_equivalence(hf, model, ids, px)
    _, cache = model.run_with_cache(ids, px, names_filter="lm.blocks.1.attn.hook_pattern")
    assert cache["lm.blocks.1.attn.hook_pattern"][0, :, -1].nonzero()[:, 1].unique().tolist() == list(range(17, 23))
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, px, max_new_tokens=6), expected)


def test_llava_next_matches_transformers_forward_and_generate():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    hf = tiny_random_llava("llava_next", "mistral", seed=3)
    model = HookedVLM.from_pretrained(hf)
    sizes = torch.tensor([[40, 70]])
    n_crops = image_size_to_num_patches(image_size=sizes[0], grid_pinpoints=hf.config.image_grid_pinpoints, patch_size=32)
    px = torch.randn(1, n_crops, 3, 32, 32)
    with torch.no_grad():
        n_tokens = sum(f.shape[0] for f in hf.model.get_image_features(px, sizes).pooler_output)
    ids = prompt(n_tokens)
    check_equivalence(hf, model, ids, px, extra={"image_sizes": sizes})
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=px, image_sizes=sizes, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, px, image_sizes=sizes, max_new_tokens=6), expected)


def test_attention_patterns_match_transformers_eager():
    hf = tiny_random_llava("llava", "qwen2", seed=4, attn_implementation="eager")
    model = HookedVLM.from_pretrained(hf)
    ids, px = prompt(), images()
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=px, output_attentions=True)
        logits, cache = model.run_with_cache(ids, px, names_filter=lambda n: n.endswith("hook_pattern"))
    assert (logits - out.logits).abs().max() <= TOL
    for i, att in enumerate(out.attentions):
        assert (cache[f"lm.blocks.{i}.attn.hook_pattern"] - att).abs().max() <= TOL


def test_observed_patterns_under_sdpa_keep_the_output(llava):
    hf, model = llava
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images(2), attention_mask=mask).logits
        logits, cache = model.run_with_cache(ids, images(2), attention_mask=mask,
                                             names_filter=lambda n: n.startswith("lm.") and "pattern" in n)
    real = mask.bool()
    assert (logits - ref)[real].abs().max() <= TOL
    pattern = cache["lm.blocks.1.attn.hook_pattern"]  # [b, h, q, k]
    assert pattern.shape == (2, 4, ids.shape[1], ids.shape[1])
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert pattern[1, :, 5:, :2].abs().max() == 0  # padding keys get no attention
    assert pattern[0].triu(1).abs().max() == 0  # causal


def test_generate_matches_transformers_greedy(llava):
    hf, model = llava
    ids, mask = padded_batch()
    px = images(2)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=8, do_sample=False)
    tokens = model.generate(ids, px, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(tokens, expected)
    # Stopping: one row emits EOS early and is padded while the other continues, as in transformers.
    eos = int(expected[0, ids.shape[1] + 2])
    with torch.no_grad():
        stopped = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] < expected.shape[1]  # generation ended early
    assert torch.equal(model.generate(ids, px, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0),
                       stopped)
    one = prompt()
    with torch.no_grad():
        expected = hf.generate(input_ids=one, pixel_values=images(), max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(one, images(), max_new_tokens=8), expected)


def test_generate_with_cache_equals_a_forward_on_the_generated_sequence(llava):
    hf, model = llava
    ids, px = prompt(), images()
    tokens, cache = model.generate_with_cache(ids, px, max_new_tokens=5)
    seq = tokens[:, :-1]  # the last token is never fed back
    with torch.no_grad():
        logits, full = model.run_with_cache(seq, px)
        ref = hf(input_ids=seq, pixel_values=px, output_hidden_states=True)
    assert (cache["lm.hook_logits"] - ref.logits).abs().max() <= TOL
    for name in ("lm.blocks.1.hook_resid_post", "lm.blocks.0.attn.hook_pattern", "lm.blocks.1.attn.hook_k",
                 "lm.blocks.0.mlp.hook_post", "vision.blocks.1.hook_resid_post", "projector.hook_out"):
        assert cache[name].shape == full[name].shape, name
        assert (cache[name] - full[name]).abs().max() <= TOL, name
    assert (cache["lm.blocks.1.hook_resid_pre"] - ref.hidden_states[1]).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------- hooks and SAEs
def sae_hf_hooks(hf, vision_sae=None, lm_sae=None, lm_add=None):
    pairs = []
    if vision_sae is not None:
        pairs.append((vision_layers(hf)[1], lambda out: vision_sae(out)))
    if lm_sae is not None:
        pairs.append((lm_layers(hf)[0], lambda out: lm_sae(out)))
    if lm_add is not None:
        pairs.append((lm_layers(hf)[1], lambda out: out + lm_add))
    return torch_hooks(pairs)


def test_saes_in_both_parts_in_one_forward_and_in_generate(llava):
    hf, model = llava
    vision_sae = make_sae(32, "blocks.1.hook_resid_post", seed=5)  # a bare HookedViT name: the CLIP tower
    lm_sae = make_sae(64, "lm.blocks.0.hook_resid_post", seed=6)
    ids, px = prompt(), images()
    with sae_hf_hooks(hf, vision_sae, lm_sae), torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        ref_tokens = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
    plain = model(ids, px)
    assert (plain - ref).abs().max() > 1e-2  # the SAEs change the output
    logits = model.run_with_saes(ids, px, saes=[vision_sae, lm_sae])
    assert (logits - ref).abs().max() <= TOL
    with model.saes(saes=[vision_sae, lm_sae]):
        assert model.sae_hook_location(vision_sae) == "vision.blocks.1.hook_resid_post"
        tokens = model.generate(ids, px, max_new_tokens=6)
    assert torch.equal(tokens, ref_tokens)
    assert not model.acts_to_saes and torch.equal(model(ids, px), plain)  # restored
    _, cache = model.run_with_cache_with_saes(ids, px, saes=[vision_sae])
    with torch.no_grad():
        hidden = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[2]
        expected = vision_sae.encode(hidden)
    assert (cache["vision.blocks.1.hook_resid_post.hook_sae_acts_post"] - expected).abs().max() <= TOL


def test_vision_sae_from_a_standalone_hooked_vit_splices_unchanged(llava):
    hf, model = llava
    sae = make_sae(32, "blocks.1.hook_resid_post", seed=7, model_class_name="HookedViT")
    vit = HookedViT.from_pretrained(hf.model.vision_tower)
    px = images(1, seed=3)
    _, vit_cache = vit.run_with_cache_with_saes(px, saes=[sae])
    _, vlm_cache = model.run_with_cache_with_saes(prompt(), px, saes=[sae])
    name = "blocks.1.hook_resid_post.hook_sae_acts_post"
    assert (vit_cache[name] - vlm_cache["vision." + name]).abs().max() <= TOL


def test_bare_sae_names_resolve_by_metadata_and_width(llava):
    _, model = llava
    assert model.sae_hook_location(make_sae(32, "blocks.0.hook_resid_post", 0)) == "vision.blocks.0.hook_resid_post"
    assert model.sae_hook_location(make_sae(64, "blocks.0.hook_resid_post", 0)) == "lm.blocks.0.hook_resid_post"
    lm_named = make_sae(32, "blocks.0.hook_resid_post", 0, model_class_name="HookedTransformer")
    assert model.sae_hook_location(lm_named) == "lm.blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="d_in=32 does not match hook 'lm.blocks.0.hook_resid_post'"):
        model.add_sae(lm_named)
    with pytest.raises(KeyError, match="Did you mean"):
        model.add_sae(make_sae(64, "lm.blocks.0.hook_resid_pots", 0))
    assert not model.acts_to_saes


def test_run_with_hooks_in_one_forward_and_in_generate(llava):
    hf, model = llava
    ids, px = prompt(), images()
    vec = torch.randn(64, generator=torch.Generator().manual_seed(8))
    hooks = [("lm.blocks.1.hook_resid_post", lambda x, hook: x + vec)]
    with sae_hf_hooks(hf, lm_add=vec), torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits
        ref_tokens = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
    assert (model.run_with_hooks(ids, px, fwd_hooks=hooks) - ref).abs().max() <= TOL
    seen: list[int] = []
    counting = [("vision.blocks.0.hook_resid_post", lambda x, hook: seen.append(-1)),
                ("lm.blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]))]
    with model.hooks(fwd_hooks=hooks + counting):
        tokens = model.generate(ids, px, max_new_tokens=6)
    assert torch.equal(tokens, ref_tokens)
    assert seen == [-1, ids.shape[1]] + [1] * 5  # the image runs once; then one position per step
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_hooks_removed_when_a_hook_raises(llava):
    hf, model = llava
    ids, px = prompt(), images()

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(ids, px, fwd_hooks=[("vision.blocks.1.hook_resid_post", boom)])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    with pytest.raises(RuntimeError, match="boom"):  # raised mid-generation, with caching hooks attached
        with model.hooks(fwd_hooks=[("lm.blocks.0.hook_resid_post", boom)]):
            model.generate_with_cache(ids, px, names_filter=["lm.blocks.0.attn.hook_pattern"], max_new_tokens=2)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    with torch.no_grad():
        assert (model(ids, px) - hf(input_ids=ids, pixel_values=px).logits).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------- image tokens
def test_image_token_positions_are_exposed(llava):
    _, model = llava
    ids, mask = padded_batch()
    pos = model.image_token_positions(ids)
    assert pos.shape == (2, 16)
    assert pos[0].tolist() == list(range(3, 19)) and pos[1].tolist() == list(range(4, 20))
    model(ids, images(2), attention_mask=mask)
    assert torch.equal(model.last_image_token_mask, ids == IMG)
    assert torch.equal(model.text_token_mask(ids, mask), (ids != IMG) & mask.bool())
    uneven = torch.tensor([[IMG, 1, 2], [IMG, IMG, 2]])
    with pytest.raises(ValueError, match="image_token_mask"):
        model.image_token_positions(uneven)
    # The mapping to the vision tower: LM image token k <- vision position k + offset (CLS dropped).
    assert model.cfg.vision_token_offset == 1


def test_bad_inputs_raise_clear_errors(llava, tmp_path):
    hf, model = llava
    with pytest.raises(ValueError, match="holds 15 image tokens .* give 16"):
        model(prompt(15), images())
    with pytest.raises(TypeError, match="processor"):
        model("USER: <image> What is this?", images())
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        model(prompt(), images()[0])
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        HookedVLM.from_pretrained(hf.model.vision_tower)
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(TypeError, match="GPT2Model"):
        VLMLanguageModel(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)), torch.nn.Linear(8, 10))
    hf.model.vision_tower.save_pretrained(tmp_path / "clip")
    with pytest.raises(TypeError, match="model_type 'clip_vision_model'"):
        HookedVLM.from_pretrained(str(tmp_path / "clip"))


def test_load_by_directory_offline(llava, tmp_path):
    hf, _ = llava
    hf.save_pretrained(tmp_path / "tiny-llava")
    model = HookedVLM.from_pretrained(str(tmp_path / "tiny-llava"))
    assert model.processor is None  # none saved there
    ids, px = prompt(), images()
    with torch.no_grad():
        assert (model(ids, px) - hf(input_ids=ids, pixel_values=px).logits).abs().max() <= TOL


def test_lm_cache_works_with_transformer_lens_helpers(llava):
    _, model = llava
    _, cache = model.run_with_cache(prompt(), images())
    lm = cache.lm
    stack = lm.accumulated_resid(apply_ln=True)  # the final layer recomputes model.lm.ln_final (logit lens)
    assert stack.shape[0] == model.lm.cfg.n_layers + 1
    assert (stack[-1] - lm["ln_final.hook_normalized"]).abs().max() <= TOL
    # The cached-scale path divides by ln_final.hook_scale: TransformerLens's RMS scale, weight not applied.
    last = lm[f"blocks.{model.lm.cfg.n_layers - 1}.hook_resid_post"]
    scaled = lm.apply_ln_to_stack(last[None], layer=model.lm.cfg.n_layers)[0]
    assert (scaled * model.lm.ln_final.w - lm["ln_final.hook_normalized"]).abs().max() <= TOL


@pytest.mark.slow
def test_llava_1_5_real_vision_tower_and_llama_width_match_transformers():
    """LLaVA 1.5's configuration (transformers' LlavaConfig defaults: CLIP ViT-L/14 at 336 px, 24 blocks,
    feature layer -2, 576 image tokens; Llama-7B width) with the language model cut to 2 of its 32 blocks
    (memory). Random weights."""
    import transformers

    config = transformers.LlavaConfig()
    config.text_config.num_hidden_layers = 2
    config.text_config.vocab_size = 32064  # llava-hf/llava-1.5-7b-hf: the image token 32000 is in the vocabulary
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    model = HookedVLM.from_pretrained(hf)
    assert model.cfg.vision_layers_run == 23 and model.cfg.image_seq_length == 576
    ids = torch.tensor([[1, 3148, 1001, 29901] + [config.image_token_id] * 576 + [13, 5618, 338, 445, 29973]])
    px = torch.randn(1, 3, 336, 336)
    check_equivalence(hf, model, ids, px)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, px, max_new_tokens=3), expected)
