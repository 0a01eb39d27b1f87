"""The CLIP shared space on random-init models: zero-shot classifier, logit lens and the exact embedding
decomposition, checked against the original libraries' own outputs; label mechanics; the vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from sae_lens_multimodal.analysis import (  # noqa: E402
    Vocabulary,
    ZeroShotClassifier,
    ce_recovered,
    clip_logit_lens,
    decompose_image_embedding,
    default_vocabulary,
    label_features,
    load_vocabulary,
)
from sae_lens_multimodal.models.hooked_clip import HookedCLIP  # noqa: E402
from sae_lens_multimodal.models.hooked_vit import HookedViT  # noqa: E402
from sae_lens_multimodal.models.config import HookedViTConfig  # noqa: E402

TOL = 1e-4


@torch.no_grad()
def randomise_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise parameters initialised to constants (LayerNorm w/b, biases) so no path can hide."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            noise = torch.randn(p.shape, generator=g)
            is_scale = name.endswith("weight") and ("norm" in name or "ln" in name)
            p.copy_(1 + 0.3 * noise if is_scale else 0.1 * noise)
    return model.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class WordTokenizer:
    """A tiny deterministic word tokenizer for the small test CLIP (vocab 100, context 12): start 98,
    words 1..97, end-of-text 99 (the largest id, where open_clip pools), zero padding."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 12, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [self.ids.setdefault(w, 1 + len(self.ids) % 97) for w in t.lower().split()][:10]
            out[i, : len(words) + 2] = torch.tensor([98, *words, 99])
        return out


@pytest.fixture(scope="module")
def small():
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=8, image_size=32),
            text_cfg=CLIPTextCfg(context_length=12, vocab_size=100, width=48, heads=4, layers=2),
        )
    src = randomise_constants(src)
    tok = WordTokenizer()
    return src, tok, HookedCLIP.from_pretrained(src, tokenizer=tok)


@pytest.fixture(scope="module")
def b16():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = randomise_constants(open_clip.create_model("ViT-B-16", pretrained=None))
    return src, HookedCLIP.from_pretrained(src)


# ----------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_matches_original_with_logit_scale(small):
    src, tok, model = small
    classes, templates = ["red circle", "blue square", "green triangle"], ["a photo of a {}.", "{}"]
    clf = ZeroShotClassifier(model, classes, templates)
    x = images(4, 32)
    with torch.no_grad():
        # The CLIP paper's prompt ensemble, computed from open_clip's own encoders.
        t = F.normalize(src.encode_text(tok([tp.format(c) for c in classes for tp in templates])), dim=-1)
        w = F.normalize(t.reshape(3, 2, -1).mean(1), dim=-1)
        ref = src.logit_scale.exp() * F.normalize(src.encode_image(x), dim=-1) @ w.T
        logits = clf(x)
    assert (logits - ref).abs().max() <= TOL
    assert float(src.logit_scale.detach().exp()) > 2  # the scale is real, so dropping it would fail the check above
    # With one template the classifier's logits are the model's own image-text logits.
    clf1 = ZeroShotClassifier(model, classes, ["{}"])
    with torch.no_grad():
        ref1, _ = src.get_logits(x, tok(classes))
    assert (clf1(x) - ref1).abs().max() <= TOL
    labels = ref.argmax(-1)
    metrics = clf.evaluate(x, labels, batch_size=3)
    assert metrics.accuracy == 1.0 and metrics.n == 4
    assert abs(metrics.cross_entropy - float(F.cross_entropy(ref, labels))) <= 1e-4


def test_zero_shot_evaluate_with_sae_and_ce_recovered(small):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    _, _, model = small
    clf = ZeroShotClassifier(model, ["red", "blue", "green", "yellow"], ["{}"])
    x = images(6, 32, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128, metadata=SAEMetadata(hook_name="blocks.2.hook_resid_post")))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    clean = clf.evaluate(x, labels)
    spliced = clf.evaluate(x, labels, saes=[sae])
    with_error = clf.evaluate(x, labels, saes=[StandardSAE(sae.cfg)], fwd_hooks=[])
    assert spliced.cross_entropy != clean.cross_entropy
    assert not model.acts_to_saes
    assert ce_recovered(clean=1.0, spliced=1.5, ablated=3.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="undefined"):
        ce_recovered(1.0, 1.0, 1.0)
    assert with_error.n == 6


# ----------------------------------------------------------------------------------------------- logit lens
def test_logit_lens_matches_original_intermediates(b16):
    src, model = b16
    tok = open_clip.get_tokenizer("ViT-B-16")
    classes = ["cat", "dog", "car", "tree"]
    clf = ZeroShotClassifier(model, classes, ["a photo of a {}."])
    x = images(2, 224)
    outs: dict[int, torch.Tensor] = {}
    handles = [
        b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o.detach()))
        for k, b in enumerate(src.visual.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            ref_img = src.encode_image(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        text = F.normalize(src.encode_text(tok([f"a photo of a {c}." for c in classes])), dim=-1)
        lens_pooled = clip_logit_lens(model, x, clf)
        lens_cls = clip_logit_lens(model, x, clf, position="cls")
    assert lens_pooled.layers[0] == "embed" and len(lens_pooled.layers) == 13
    assert (lens_pooled.embeddings[-1] - ref_img).abs().max() <= TOL
    for layer in range(12):
        # The original's own final LN + projection applied to its block output at the CLS token.
        ref = src.visual.ln_post(outs[layer][:, 0]) @ src.visual.proj
        ref_logits = src.logit_scale.exp() * F.normalize(ref, dim=-1) @ text.T
        assert (lens_cls.embeddings[layer + 1] - ref).abs().max() <= TOL, layer
        assert (lens_cls.logits[layer + 1] - ref_logits).abs().max() <= TOL, layer
    assert lens_cls.predictions.shape == (13, 2)
    assert [n for n, _ in lens_cls.predicted_names(0)] == lens_cls.layers


# ----------------------------------------------------------------------------------------------- decomposition
def test_decomposition_sums_to_original_embedding_b16(b16):
    src, model = b16
    x = images(1, 224, seed=2)
    with torch.no_grad():
        ref = src.encode_image(x)
    dec = decompose_image_embedding(model, x)
    assert dec.heads.shape == (1, 12, 12, 197, 512)
    assert (dec.embedding - ref).abs().max() <= TOL
    assert (dec.total() - ref).abs().max() <= TOL
    parts, labels = dec.components()
    assert len(labels) == 1 + 12 * 14 + 1 and (parts.sum(0) - ref).abs().max() <= TOL
    assert (dec.position_contributions().sum(1) + dec.attn_bias.sum(1) + dec.mlp.sum(1) + dec.embed + dec.bias
            - ref).abs().max() <= TOL
    # The frozen scale is the real one: the original's ln_post input at CLS has exactly this std.
    cls_final = model.vision.run_with_cache(x, names_filter="blocks.11.hook_resid_post")[1]["blocks.11.hook_resid_post"][:, 0]
    real = (cls_final.var(-1, unbiased=False) + model.vision.ln_final.eps).sqrt()
    assert (dec.ln_scale[:, 0] - real).abs().max() <= 1e-5


def test_decomposition_transformers_clip_ln_after_pool():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = randomise_constants(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig()))
    vit = HookedViT.from_pretrained(src)
    assert vit.cfg.final_ln_after_pool
    x = images(1, 224, seed=3)
    with torch.no_grad():
        ref = src(pixel_values=x).image_embeds
    dec = decompose_image_embedding(vit, x, per_position=False)
    assert dec.heads.shape == (1, 12, 12, 512)
    assert (dec.total() - ref).abs().max() <= TOL


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_decomposition_mean_pooling(final_ln_after_pool):
    from open_clip.transformer import VisionTransformer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        src = VisionTransformer(
            image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=4, output_dim=16,
            pool_type="avg", final_ln_after_pool=final_ln_after_pool,
        )
    src = randomise_constants(src)
    vit = HookedViT.from_pretrained(src)
    x = images(3, 32)
    with torch.no_grad():
        ref = src(x)
    dec = decompose_image_embedding(vit, x)
    assert (dec.total() - ref).abs().max() <= TOL


def test_decomposition_refuses_attention_pooling():
    vit = HookedViT(HookedViTConfig(n_layers=1, d_model=32, n_heads=4, d_mlp=64, image_size=16, patch_size=8,
                                    has_cls_token=False, n_pos_prefix_tokens=0, pool_type="attn"))
    with pytest.raises(ValueError, match="Attention pooling"):
        decompose_image_embedding(vit, images(1, 16))


# ----------------------------------------------------------------------------------------------- labels
def test_labels_validity_high_at_last_layer_and_low_earlier(small):
    _, _, model = small
    vocab = ["red", "green", "blue", "circle", "square", "triangle", "left", "right"]
    dirs = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x = images(6, 32, seed=4)
    last = label_features(model, dirs, x, vocab, hook_name="blocks.2.hook_resid_post", strength=1e-3)
    first = label_features(model, dirs, x, vocab, hook_name="vision.blocks.0.hook_resid_post", strength=1e-3)
    # At the last block's output the direct path is the only path, so a small intervention's real
    # effect is the linearised direct effect and both labels coincide.
    assert last.validity.min() > 0.999
    assert last.agreement.min() > 0.999 and last.top_k_overlap.min() == 1.0
    # Two blocks earlier, later layers carry much of the effect.
    assert first.validity.max() < 0.9
    assert last.direct_scores.shape == (4, 8) and last.causal_scores.shape == (4, 8)
    rec = last.to_records()
    assert rec[0]["feature"] == 0 and len(rec[0]["direct_path"]) == 5 and rec[0]["hook_name"] == "blocks.2.hook_resid_post"
    assert "validity" in str(last) and last[3].label in vocab


def test_labels_argument_errors(small):
    _, _, model = small
    x = images(2, 32)
    dirs = torch.randn(2, 64)
    with pytest.raises(ValueError, match="hook_name"):
        label_features(model, dirs, x, ["a", "b"])
    with pytest.raises(ValueError, match="needs an SAE"):
        label_features(model, dirs, x, ["a", "b"], hook_name="blocks.0.hook_resid_post", intervention="clamp")
    with pytest.raises(ValueError, match="vision features"):
        label_features(model, torch.randn(2, 48), x, ["a"], hook_name="text.blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="writes linearly"):
        label_features(model, torch.randn(2, 16), x, ["a"], hook_name="blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="width 32"):
        label_features(model, torch.randn(2, 32), x, ["a"], hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="methods"):
        label_features(model, dirs, x, ["a"], hook_name="blocks.0.hook_resid_post", methods=("naive",))


# ----------------------------------------------------------------------------------------------- vocabulary
def test_default_vocabulary_offline():
    vocab = default_vocabulary()
    assert 300 <= len(vocab) <= 600
    assert len(set(vocab.words)) == len(vocab)
    for w in ("red", "blue", "circle", "square", "striped", "left", "dog", "car", "text"):
        assert w in vocab.words
    assert {"colors", "shapes", "positions and layout", "animals"} <= set(vocab.category_names())
    colours = default_vocabulary(["colors"])
    assert "red" in colours.words and "dog" not in colours.words
    with pytest.raises(ValueError, match="Unknown categories"):
        default_vocabulary(["colours-typo"])


def test_user_vocabulary(tmp_path):
    v = load_vocabulary(["zebra stripes", "  neon sign ", "zebra stripes"])
    assert v.words == ("zebra stripes", "neon sign") and v.categories == ("user", "user")
    merged = load_vocabulary(["red", "quokka"], include_default=True)
    assert merged.words[-1] == "quokka" and merged.words.count("red") == 1
    f = tmp_path / "mine.txt"
    f.write_text("# comment\n## fruit\napple\npear\n## tools\nhammer\n")
    fv = load_vocabulary(f)
    assert fv.words == ("apple", "pear", "hammer") and fv.categories == ("fruit", "fruit", "tools")
    with pytest.raises(FileNotFoundError, match="list of words"):
        load_vocabulary("red")
    with pytest.raises(ValueError, match="at least one word"):
        Vocabulary.from_words([])


def test_analysis_after_folding_layer_norms(small):
    """fold_layer_norm / center_writing_weights move the final LN's weights into the head; the
    decomposition, the lens and the labels read the folded weights and still agree with the source."""
    src, tok, _ = small
    model = HookedCLIP.from_pretrained(src, tokenizer=tok)
    model.vision.fold_layer_norm()
    model.vision.center_writing_weights()
    assert model.vision.ln_final.w is None
    x = images(3, 32, seed=5)
    with torch.no_grad():
        ref = src.encode_image(x)
    assert (decompose_image_embedding(model, x).total() - ref).abs().max() <= TOL
    clf = ZeroShotClassifier(model, ["red", "blue"], ["{}"])
    assert (clip_logit_lens(model, x, clf).embeddings[-1] - ref).abs().max() <= TOL
    dirs = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    rep = label_features(model, dirs, x, ["red", "blue", "green"], hook_name="blocks.2.hook_resid_post", strength=1e-3)
    assert rep.validity.min() > 0.999


def test_label_positions_accept_tensors_and_check_range(small):
    _, _, model = small
    x = images(3, 32, seed=5)
    dirs = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    common = dict(hook_name="blocks.1.hook_resid_post", strength=1e-3)
    as_list = label_features(model, dirs, x, ["red", "blue", "left"], positions=[1, 2, 5], **common)
    as_tensor = label_features(model, dirs, x, ["red", "blue", "left"], positions=torch.tensor([1, 2, 5]), **common)
    torch.testing.assert_close(as_tensor.causal_scores, as_list.causal_scores)
    torch.testing.assert_close(as_tensor.direct_scores, as_list.direct_scores)
    with pytest.raises(IndexError, match="out of range"):
        label_features(model, dirs, x, ["red"], positions=[999], **common)
    with pytest.raises(ValueError, match="'all', 'cls', 'patches'"):
        label_features(model, dirs, x, ["red"], positions="middle", **common)


def test_labels_of_a_topk_sae_with_decoder_norm_rescaling_use_unit_rows(small):
    # SAELens decodes acts / |W_dec row| @ W_dec when rescale_acts_by_decoder_norm is set, so a feature's
    # direction is its unit-norm row: scaling a row must not change what "add strength * d" does.
    from sae_lens import TopKSAE, TopKSAEConfig

    _, _, model = small
    x = images(3, 32, seed=6)
    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=8, k=2, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)))
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    vocab = ["red", "blue", "left", "circle"]
    before = label_features(model, sae, x, vocab, feature_ids=[0, 1], strength=0.5)
    with torch.no_grad():
        sae.W_dec[0] *= 7.0
    after = label_features(model, sae, x, vocab, feature_ids=[0, 1], strength=0.5)
    torch.testing.assert_close(after.causal_scores, before.causal_scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.direct_scores, before.direct_scores, atol=1e-5, rtol=1e-4)
