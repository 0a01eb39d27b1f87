"""VLM analyses (analysis/vlm.py) against transformers' own LLaVA tensors.

Attention is compared with transformers' ``output_attentions``; the logit lens with transformers' hidden
states put through its own final norm and ``lm_head``; patching with the same patch applied to the original
decoder layer by a torch hook, and with what causality forces (patching every image token before block 0
restores the clean run exactly; patching them after the last block changes nothing at the answer position);
steering with the same clamp applied to the original vision layer.
"""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal.analysis.vlm import (
    answer_logit_metric,
    image_logit_lens,
    patch_image_tokens,
    steer_vision_feature,
    text_to_image_attention,
)
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.testing import tiny_random_llava
from tests.models.test_hooked_vlm import images, make_sae, padded_batch, prompt, torch_hooks

TOL = 1e-4


@pytest.fixture(scope="module")
def eager():
    hf = tiny_random_llava("llava", "llama", seed=11, attn_implementation="eager")
    return hf, HookedVLM.from_pretrained(hf)


@pytest.fixture(scope="module")
def sdpa():
    hf = tiny_random_llava("llava", "llama", seed=12)
    return hf, HookedVLM.from_pretrained(hf)


# ----------------------------------------------------------------------------------------------- attention
def test_text_to_image_attention_matches_transformers_attentions(eager):
    hf, model = eager
    ids, mask = padded_batch()
    px = images(2)
    result = text_to_image_attention(model, ids, px, attention_mask=mask)
    with torch.no_grad():
        attentions = hf(input_ids=ids, pixel_values=px, attention_mask=mask, output_attentions=True).attentions
    image_pos = model.image_token_positions(ids)
    query = torch.zeros_like(ids, dtype=torch.bool)
    query[0, 19:] = True  # text after the image, row 0
    query[1, 20:] = True  # row 1 (left-padded by 2)
    assert torch.equal(result.query_mask, query)
    n_layers, n_heads = model.lm.cfg.n_layers, model.lm.cfg.n_heads
    assert result.mass.shape == (2, n_layers, n_heads, ids.shape[1])
    for layer, att in enumerate(attentions):  # [b, h, q, k]
        on_image = torch.stack([att[b][..., image_pos[b]] for b in range(2)])  # [b, h, q, n_img]
        assert (result.mass[:, layer] - on_image.sum(-1)).abs().max() <= TOL
        w = query[:, None, :, None].float()
        mean = (on_image * w).sum(2) / w.sum(2)
        assert (result.to_image_tokens[:, layer] - mean).abs().max() <= TOL
    per_row = torch.stack([torch.stack([a[b][:, query[b]][..., image_pos[b]].sum(-1).mean(-1) for a in attentions])
                           for b in range(2)])  # [b, L, H]
    assert (result.by_layer_head() - per_row.mean(0)).abs().max() <= TOL
    assert (result.by_layer() - per_row.mean(0).mean(-1)).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------- logit lens
def test_image_logit_lens_matches_transformers_norm_and_head(sdpa):
    hf, model = sdpa
    ids, px = prompt(), images()
    lens = image_logit_lens(model, ids, px, top_k=4, tokens=[3, 40, 200])
    n_layers = model.lm.cfg.n_layers
    assert lens.layers == list(range(n_layers + 1))
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=px, output_hidden_states=True)
        image_pos = model.image_token_positions(ids)[0]
        for j in range(n_layers + 1):
            if j < n_layers:  # transformers' hidden_states[j] is the residual stream entering layer j
                logits = hf.lm_head(hf.model.language_model.norm(out.hidden_states[j]))
            else:
                logits = out.logits
            logprobs = logits[0, image_pos].log_softmax(-1)
            top = logprobs.topk(4, dim=-1)
            assert torch.equal(lens.top_tokens[j, 0], top.indices), j
            assert (lens.top_logprobs[j, 0] - top.values).abs().max() <= TOL
            assert (lens.token_logprobs[j, 0] - logprobs[:, [3, 40, 200]]).abs().max() <= TOL
    some = image_logit_lens(model, ids, px, layers=[0, 1], top_k=2)
    assert some.layers == [0, 1] and torch.equal(some.top_tokens[1], lens.top_tokens[1, ..., :2])
    with pytest.raises(ValueError, match="0..2"):
        image_logit_lens(model, ids, px, layers=[3])


# ----------------------------------------------------------------------------------------------- patching
def test_patching_image_tokens_against_causality_and_transformers(sdpa):
    hf, model = sdpa
    ids = prompt()
    clean_px, corrupt_px = images(1, seed=1), images(1, seed=2)
    answer, foil = 17, 99
    pre = patch_image_tokens(model, ids, clean_px, corrupt_px, answer_tokens=answer, foil_tokens=foil, hook="resid_pre")
    assert abs(pre.clean - pre.corrupted) > 1e-3
    # Before block 0 the image tokens are the only difference between the runs: full recovery.
    assert abs(float(pre.recovered[0]) - 1.0) <= 1e-4
    # After the last block, image positions no longer reach the answer position.
    post = patch_image_tokens(model, ids, clean_px, corrupt_px, answer_tokens=answer, foil_tokens=foil, hook="resid_post")
    assert abs(float(post.recovered[-1])) <= 1e-4

    # Block 1's input patched at the image tokens, done on the original model with a torch pre-hook.
    image_pos = model.image_token_positions(ids)[0]
    with torch.no_grad():
        clean_hidden = hf(input_ids=ids, pixel_values=clean_px, output_hidden_states=True).hidden_states[1]

    def patch(_m, args, kwargs):
        x = args[0].clone()
        x[:, image_pos] = clean_hidden[:, image_pos]
        return (x,) + args[1:], kwargs

    handle = hf.model.language_model.layers[1].register_forward_pre_hook(patch, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=corrupt_px).logits
    finally:
        handle.remove()
    expected = float(logits[0, -1, answer] - logits[0, -1, foil])
    assert abs(float(pre.patched[1]) - expected) <= TOL
    with torch.no_grad():
        clean_logits = hf(input_ids=ids, pixel_values=clean_px).logits
    assert abs(pre.clean - float(answer_logit_metric(answer, foil)(clean_logits))) <= TOL

    per_pos = patch_image_tokens(model, ids, clean_px, corrupt_px, answer_tokens=answer, hook="resid_post",
                                 layers=[1], per_position=True)
    assert per_pos.patched.shape == (1, 16)
    assert per_pos.recovered.abs().max() <= 1e-4


def test_patching_inputs_are_checked(sdpa):
    _, model = sdpa
    with pytest.raises(ValueError, match="answer_tokens"):
        patch_image_tokens(model, prompt(), images(), images(1, 1))
    with pytest.raises(ValueError, match="hook must be one of"):
        patch_image_tokens(model, prompt(), images(), images(1, 1), answer_tokens=3, hook="resid")
    with pytest.raises(ValueError, match="no image tokens"):
        patch_image_tokens(model, torch.tensor([[1, 2, 3]]), None, None, answer_tokens=3)


# ----------------------------------------------------------------------------------------------- steering
def test_steering_a_vision_sae_feature_matches_the_same_clamp_on_transformers(sdpa):
    hf, model = sdpa
    ids, px = prompt(), images()
    sae = make_sae(32, "blocks.1.hook_resid_post", seed=13, d_sae=16)  # a CLIP-tower SAE, HookedViT name
    feature, value, answer = 5, 4.0, 17
    result = steer_vision_feature(model, sae, feature, ids, px, value=value, answer_tokens=answer, n_random=6)
    assert result.hook == "vision.blocks.1.hook_resid_post"

    deltas = {}

    def clamp(out):
        acts = sae.encode(out)
        clamped = acts.clone()
        clamped[..., feature] = value
        deltas["d"] = sae.decode(clamped) - sae.decode(acts)
        return out + deltas["d"]

    with torch.no_grad():
        clean = hf(input_ids=ids, pixel_values=px).logits[0, -1]
        with torch_hooks([(hf.model.vision_tower.encoder.layers[1], clamp)]):
            steered = hf(input_ids=ids, pixel_values=px).logits[0, -1]
    assert abs(float(result.clean[0] - clean[answer])) <= TOL
    assert abs(float(result.steered[0] - steered[answer])) <= TOL
    assert abs(float(result.steered_prob[0] - steered.softmax(-1)[answer])) <= TOL
    assert int(result.steered_top[0]) == int(steered.argmax())
    # The random baseline moves each vision token by exactly as much as the clamp did.
    assert (result.intervention_norm - deltas["d"].norm(dim=-1)).abs().max() <= TOL
    assert result.random.shape == (6, 1) and result.random_effect.abs().max() > 0


def test_a_feature_along_the_answer_gradient_beats_random_directions_and_flips_the_answer(sdpa):
    hf, model = sdpa
    ids, px = prompt(), images()
    with torch.no_grad():
        top2 = hf(input_ids=ids, pixel_values=px).logits[0, -1].topk(2).indices
    first, second = int(top2[0]), int(top2[1])
    # Direction that raises the runner-up over the answer, from transformers' own gradient.
    kept = {}

    def keep(out):
        out.retain_grad()
        kept["x"] = out

    with torch_hooks([(hf.model.vision_tower.encoder.layers[1], keep)]):
        logits = hf(input_ids=ids, pixel_values=px).logits[0, -1]
    (logits[second] - logits[first]).backward()
    hf.zero_grad(set_to_none=True)
    grad = kept["x"].grad[0].sum(0)
    direction = grad / grad.norm()
    sae = make_sae(32, "blocks.1.hook_resid_post", seed=14, d_sae=8)
    with torch.no_grad():
        sae.W_dec[3] = direction
        sae.W_enc[:, 3] = direction
    result = steer_vision_feature(model, sae, 3, ids, px, value=5.0, answer_tokens=second, n_random=16,
                                  max_new_tokens=2)
    assert float(result.effect[0]) > 0
    assert float(result.fraction_random_below[0]) == 1.0 and float(result.z_score[0]) > 3
    assert bool(result.answer_changed[0]) and int(result.steered_top[0]) == second
    assert int(result.clean_answer[0, 0]) == first and int(result.steered_answer[0, 0]) == second


def test_steering_refuses_a_language_model_sae(sdpa):
    _, model = sdpa
    with pytest.raises(ValueError, match="steers the vision tower"):
        steer_vision_feature(model, make_sae(64, "lm.blocks.0.hook_resid_post", 0), 0, prompt(), images(),
                             value=1.0, answer_tokens=3)
