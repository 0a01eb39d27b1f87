"""HookedCLIP: exact equivalence of both towers and the logits against the original libraries, hook naming,
and SAE splicing into either tower.

Equivalence models are built by their own libraries at real configurations (open_clip ViT-B-32 / ViT-B-16
and its QuickGELU variant, transformers ``CLIPConfig()`` and ``SiglipConfig()`` defaults) with random
weights. Parameters the libraries initialise to constants (LayerNorm weights and biases, attention / MLP
biases, logit bias) are randomised first, so a conversion that dropped them could not pass. Every
residual output of both towers is compared with the original's own intermediates.
"""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from sae_lens_multimodal.models.hooked_clip import CLIPActivationCache, HookedCLIP  # noqa: E402
from sae_lens_multimodal.models.hooked_text import HookedText  # noqa: E402

TOL = 1e-4


# ----------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def randomise_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter that its library initialises to a constant (LayerNorm w/b, biases, logit
    bias) random values, and perturb the logit scale."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.numel() == 1 or bool((p == p.flatten()[0]).all()):
            is_scale = name.endswith("weight") and ("norm" in name or "ln" in name)
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if is_scale else 0.1 * noise + (p if p.numel() == 1 else 0))
    return model.eval()


def record_outputs(modules: list[nn.Module], run, batch_first: bool = True):
    """Run ``run()`` recording each module's output (hooks always removed)."""
    outs: dict[int, torch.Tensor] = {}

    def record(i: int):
        def hook(_m, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            outs[i] = (out if batch_first else out.transpose(0, 1)).detach().clone()

        return hook

    handles = [m.register_forward_hook(record(i)) for i, m in enumerate(modules)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, [outs[i] for i in range(len(modules))]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_open_clip(seed: int = 0) -> nn.Module:
    """A small open_clip CLIP (both towers, 2-4 layers) for API tests that need many forward passes."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=8, image_size=32),
            text_cfg=CLIPTextCfg(context_length=12, vocab_size=100, width=48, heads=4, layers=2),
        )
    return randomise_constants(model, seed)


def text_ids(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """CLIP-style token ids: start, words, end-of-text (the largest id), then zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(1, length - 2, (1,), generator=g))
        ids[i, 0] = vocab - 2
        ids[i, 1 : k + 1] = torch.randint(1, vocab - 2, (k,), generator=g)
        ids[i, k + 1] = vocab - 1
    return ids


# ----------------------------------------------------------------------------------------------- open_clip
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu"])
def test_open_clip_equivalence(arch):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = randomise_constants(open_clip.create_model(arch, pretrained=None))
    model = HookedCLIP.from_pretrained(src)
    tok = open_clip.get_tokenizer(arch)
    texts = ["a photo of a red circle", "a dog", "an astronaut riding a horse on the moon"]
    ids = tok(texts)
    x = images(2, 224)
    with torch.no_grad():
        ref_logits, _ = src.get_logits(x, ids)
        ref_img, vis_blocks = record_outputs(list(src.visual.transformer.resblocks), lambda: src.encode_image(x))
        ref_txt, txt_blocks = record_outputs(list(src.transformer.resblocks), lambda: src.encode_text(ids))
        logits, cache = model.run_with_cache(x, texts)  # strings through open_clip's own tokenizer
    assert isinstance(cache, CLIPActivationCache)
    assert model.text.cfg.act_fn == ("quick_gelu" if "quickgelu" in arch else "gelu")
    assert max_err(cache["vision.hook_out"], ref_img) <= TOL
    assert max_err(cache["text.hook_out"], ref_txt) <= TOL
    assert max_err(logits, ref_logits) <= TOL
    for i, ref in enumerate(vis_blocks):
        assert max_err(cache[f"vision.blocks.{i}.hook_resid_post"], ref) <= TOL, f"vision block {i}"
    for i, ref in enumerate(txt_blocks):
        assert max_err(cache[f"text.blocks.{i}.hook_resid_post"], ref) <= TOL, f"text block {i}"
    assert torch.equal(model.text.to_tokens(texts)[0], ids)
    # The model's own softmax over texts, with the scale kept.
    torch.testing.assert_close(model.logits_to_probs(logits), ref_logits.softmax(-1), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- transformers
def test_hf_clip_equivalence_with_padding_mask():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = randomise_constants(transformers.CLIPModel(transformers.CLIPConfig()))
    model = HookedCLIP.from_pretrained(src)
    tc = src.config.text_config
    assert model.text.cfg.pool_type == "eos" and model.text.cfg.eos_token_id == tc.eos_token_id
    # Right-padded batch of different lengths with the attention mask, as the CLIP tokenizer gives it.
    ids = torch.full((3, 9), tc.pad_token_id, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate([9, 5, 3]):
        ids[i, 0] = tc.bos_token_id
        ids[i, 1 : n - 1] = torch.randint(300, 40000, (n - 2,), generator=g)
        ids[i, n - 1] = tc.eos_token_id
        mask[i, :n] = 1
    x = images(2, 224)
    with torch.no_grad():
        out = src(input_ids=ids, pixel_values=x, attention_mask=mask, output_hidden_states=True)
        logits, cache = model.run_with_cache(x, ids, attention_mask=mask)
    assert max_err(logits, out.logits_per_image) <= TOL
    assert max_err(cache["vision.hook_out"], src.get_image_features(pixel_values=x).pooler_output) <= TOL
    ref_txt = src.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert max_err(cache["text.hook_out"], ref_txt) <= TOL
    vis_h = out.vision_model_output.hidden_states
    txt_h = out.text_model_output.hidden_states
    for i in range(tc.num_hidden_layers):
        assert max_err(cache[f"vision.blocks.{i}.hook_resid_post"], vis_h[i + 1]) <= TOL, f"vision block {i}"
        # Padding positions included: both models apply the same causal + padding mask there.
        assert max_err(cache[f"text.blocks.{i}.hook_resid_post"], txt_h[i + 1]) <= TOL, f"text block {i}"


def test_hf_clip_text_legacy_eos_pools_at_argmax():
    """Configs from before transformers PR #24773 have eos_token_id == 2: pooling is at the largest id."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = randomise_constants(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(eos_token_id=2)))
    text = HookedText.from_pretrained(src)
    assert text.cfg.pool_type == "argmax"
    ids = text_ids(3, 16, src.config.vocab_size)
    with torch.no_grad():
        ref = src(input_ids=ids, output_hidden_states=True)
        out, cache = text.run_with_cache(ids)
    assert max_err(out, ref.text_embeds) <= TOL
    for i in range(src.config.num_hidden_layers):
        assert max_err(cache[f"blocks.{i}.hook_resid_post"], ref.hidden_states[i + 1]) <= TOL


def test_siglip_equivalence_bias_and_sigmoid():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = randomise_constants(transformers.SiglipModel(transformers.SiglipConfig()))
    model = HookedCLIP.from_pretrained(src)
    assert model.cfg.scoring == "sigmoid" and model.logit_bias is not None
    assert not model.text.cfg.causal and model.text.cfg.pool_type == "last"
    tc = src.config.text_config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, tc.vocab_size, (2, tc.max_position_embeddings), generator=g)
    x = images(2, 224)
    with torch.no_grad():
        out = src(input_ids=ids, pixel_values=x, output_hidden_states=True)
        logits, cache = model.run_with_cache(x, ids)
        # With a padding mask (bidirectional), as transformers applies one when it is passed.
        mask = torch.ones_like(ids)
        mask[1, 40:] = 0
        ref_masked = src.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        ours_masked = model.encode_text(ids, attention_mask=mask)
    assert max_err(logits, out.logits_per_image) <= TOL
    assert max_err(model.logits_to_probs(logits), torch.sigmoid(out.logits_per_image)) <= 1e-5
    assert max_err(cache["vision.hook_out"], src.get_image_features(pixel_values=x).pooler_output) <= TOL
    assert max_err(cache["text.hook_out"], src.get_text_features(input_ids=ids).pooler_output) <= TOL
    assert max_err(ours_masked, ref_masked) <= TOL
    for i in range(tc.num_hidden_layers):
        assert max_err(cache[f"vision.blocks.{i}.hook_resid_post"], out.vision_model_output.hidden_states[i + 1]) <= TOL
        assert max_err(cache[f"text.blocks.{i}.hook_resid_post"], out.text_model_output.hidden_states[i + 1]) <= TOL


# ----------------------------------------------------------------------------------------------- hook names
@pytest.fixture(scope="module")
def small():
    src = small_open_clip()
    return src, HookedCLIP.from_pretrained(src)


def test_small_model_matches_source(small):
    src, model = small
    ids, x = text_ids(3, 12, 100), images(2, 32)
    with torch.no_grad():
        ref, _ = src.get_logits(x, ids)
        assert max_err(model(x, ids), ref) <= TOL


def test_hook_names_are_prefixed_and_towers_keep_their_own(small):
    _, model = small
    ids, x = text_ids(2, 12, 100), images(2, 32)
    names = set(model.hook_dict)
    assert {"vision.blocks.2.hook_resid_post", "text.blocks.1.hook_resid_post", "text.hook_pooled",
            "text.ln_final.hook_scale", "vision.hook_out", "text.hook_out"} <= names
    assert all(n.split(".")[0] in ("vision", "text") for n in names)
    _, cache = model.run_with_cache(x, ids)
    assert set(cache.keys()) == names
    # Per-tower caches work with TransformerLens helpers that need the tower's cfg.
    assert cache.vision.accumulated_resid().shape == (4, 2, 17, 64)
    assert set(cache.text.keys()) == set(model.text.hook_dict)
    # A tower used on its own still names its hooks (and cache keys) without the prefix...
    _, vcache = model.vision.run_with_cache(x)
    assert "blocks.0.hook_resid_post" in vcache and "vision.blocks.0.hook_resid_post" not in vcache
    seen = []
    model.text.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: seen.append(hook.name))])
    assert seen == ["blocks.0.hook_resid_post"]
    # ...and the full model names them with the prefix again.
    model.run_with_hooks(x, ids, fwd_hooks=[("text.blocks.0.hook_resid_post", lambda a, hook: seen.append(hook.name))])
    assert seen[-1] == "text.blocks.0.hook_resid_post"


def test_run_with_hooks_full_names_patch_either_tower(small):
    _, model = small
    ids, x = text_ids(2, 12, 100), images(2, 32)
    with torch.no_grad():
        clean = model(x, ids)
        zero_text = model.run_with_hooks(
            x, ids, fwd_hooks=[("text.hook_pooled", lambda a, hook: torch.zeros_like(a))]
        )
        # Zeroed pooled text -> text embedding is the head bias (zero for open_clip) -> logits 0.
        assert zero_text.abs().max() < 1e-6 or torch.isnan(zero_text).all()
        # (A constant shift would be invisible: every reader of the residual stream is a LayerNorm.)
        shift = torch.randn(64, generator=torch.Generator().manual_seed(3))
        bumped = model.run_with_hooks(
            x, ids, fwd_hooks=[("vision.blocks.1.hook_resid_post", lambda a, hook: a + shift)]
        )
    assert (bumped - clean).abs().max() > 1e-3
    with pytest.raises(KeyError, match="vision.blocks.1.hook_resid_post"):
        model.run_with_hooks(x, ids, fwd_hooks=[("vision.blocks.1.hook_resid_pots", lambda a, hook: a)])


# ----------------------------------------------------------------------------------------------- SAE splicing
def _sae(d_in: int, hook_name: str, seed: int = 0, **meta) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4 * d_in, metadata=SAEMetadata(hook_name=hook_name, **meta)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_((0.2 if p.ndim > 1 else 0.02) * torch.randn(p.shape, generator=g))
    return sae


def test_vision_sae_recorded_on_hookedvit_splices_unchanged(small):
    src, model = small
    ids, x = text_ids(2, 12, 100), images(2, 32)
    sae = _sae(64, "blocks.1.hook_resid_post")
    before = sae.cfg.to_dict()
    standalone = model.vision  # the same weights as a HookedViT of the source's vision tower
    with torch.no_grad():
        clean = model(x, ids)
        spliced_img = standalone.run_with_saes(x, saes=[sae])
        logits = model.run_with_saes(x, ids, saes=[sae])
        with_error = model.run_with_saes(x, ids, saes=[sae], use_error_term=True)
        _, cache = model.run_with_cache_with_saes(x, ids, saes=[sae])
    assert sae.cfg.to_dict() == before and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert max_err(logits, model.logits_from_embeddings(spliced_img, model.encode_text(ids).detach())) <= 1e-5
    assert (logits - clean).abs().max() > 1e-3
    assert max_err(with_error, clean) <= 1e-5
    assert "vision.blocks.1.hook_resid_post.hook_sae_acts_post" in cache
    # Everything is restored: no SAE left, HookPoints back in both dictionaries.
    assert not model.acts_to_saes
    assert type(model.vision.blocks[1].hook_resid_post).__name__ == "HookPoint"
    assert model.hook_dict["vision.blocks.1.hook_resid_post"] is model.vision.blocks[1].hook_resid_post
    assert model.vision.hook_dict["blocks.1.hook_resid_post"] is model.vision.blocks[1].hook_resid_post
    with torch.no_grad():
        assert torch.equal(model(x, ids), clean)


def test_add_sae_keyed_by_its_own_name_and_reset(small):
    _, model = small
    x, ids = images(2, 32), text_ids(2, 12, 100)
    sae = _sae(64, "blocks.0.hook_resid_post")
    model.add_sae(sae)
    try:
        assert set(model.acts_to_saes) == {"blocks.0.hook_resid_post"}
        assert model.sae_hook_location(sae) == "vision.blocks.0.hook_resid_post"
        with torch.no_grad():
            _, cache = model.run_with_cache(x, ids)
        assert "vision.blocks.0.hook_resid_post.hook_sae_output" in cache
    finally:
        model.reset_saes()
    assert not model.acts_to_saes and type(model.vision.blocks[0].hook_resid_post).__name__ == "HookPoint"


def test_text_sae_resolution(small):
    _, model = small
    # Full name: the text tower.
    assert model.sae_hook_location(_sae(48, "text.blocks.1.hook_resid_post")) == "text.blocks.1.hook_resid_post"
    # Bare name whose width fits only the text tower (48 vs vision 64).
    assert model.sae_hook_location(_sae(48, "blocks.1.hook_resid_post")) == "text.blocks.1.hook_resid_post"
    # Bare name marked as recorded on a HookedText.
    sae = _sae(64, "blocks.0.hook_resid_post", model_class_name="HookedText")
    assert model.sae_hook_location(sae) == "text.blocks.0.hook_resid_post"
    ids, x = text_ids(2, 12, 100), images(2, 32)
    text_sae = _sae(48, "text.blocks.1.hook_resid_post")
    with torch.no_grad():
        clean = model(x, ids)
        out = model.run_with_saes(x, ids, saes=[text_sae])
        text_alone = model.text.run_with_saes(ids, saes=[_sae(48, "blocks.1.hook_resid_post")])
    assert max_err(out, model.logits_from_embeddings(model.encode_image(x).detach(), text_alone)) <= 1e-5
    assert (out - clean).abs().max() > 1e-3


def test_sae_errors_name_the_problem(small):
    _, model = small
    with pytest.raises(KeyError, match="Did you mean"):
        model.add_sae(_sae(64, "blocks.1.hook_resid_pots"))
    with pytest.raises(ValueError, match="d_in=32 does not match hook 'vision.blocks.1.hook_resid_post'"):
        model.add_sae(_sae(32, "vision.blocks.1.hook_resid_post"))
    assert not model.acts_to_saes


# ----------------------------------------------------------------------------------------------- inputs
def test_input_errors(small):
    _, model = small
    x = images(1, 32)
    with pytest.raises(ValueError, match="need both images and texts"):
        model(x)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.encode_text(["a red circle"])
    with pytest.raises(ValueError, match="12 positions"):
        model.encode_text(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="logit_scale"):
        HookedCLIP.from_pretrained(transformers.CLIPTextModel(transformers.CLIPTextConfig(num_hidden_layers=1)))
    img, txt = model(x, return_type="embeddings", texts=text_ids(1, 12, 100))
    assert img.shape == txt.shape == (1, 32)


# ----------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_transformers_directory_by_name(kind, tmp_path):
    small_text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    small_vision = dict(small_text, image_size=32, patch_size=8)
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config=small_text, vision_config=small_vision, projection_dim=16)
        src = transformers.CLIPModel(cfg)
    else:
        cfg = transformers.SiglipConfig(text_config=small_text, vision_config=small_vision)
        src = transformers.SiglipModel(cfg)
    src = randomise_constants(src)
    src.save_pretrained(tmp_path)
    model = HookedCLIP.from_pretrained(str(tmp_path))
    n_ctx = src.config.text_config.max_position_embeddings
    ids = torch.randint(1, 1000, (2, n_ctx), generator=torch.Generator().manual_seed(0))
    if kind == "clip":  # CLIP pools at the end-of-text token; SigLIP at the last position
        ids[:, -1] = src.config.text_config.eos_token_id
    x = images(2, 32)
    with torch.no_grad():
        ref = src(input_ids=ids, pixel_values=x).logits_per_image
        assert max_err(model(x, ids), ref) <= TOL
    assert model.text.tokenizer is None  # none was saved: strings then need tokenizer=
    with pytest.raises(ValueError, match="no tokenizer"):
        model.encode_text("a cat")


def test_unknown_name_is_explained(tmp_path):
    from sae_lens_multimodal.models.conversions import UnsupportedModelError

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UnsupportedModelError, match="model_type 'bert'"):
        HookedCLIP.from_pretrained(str(tmp_path))
