"""Hook a LLaVA-style VLM end to end, offline: caching, hooks and SAEs across the vision tower, projector and
language model, in one forward and in generate, then the VLM analyses.

    python examples/vlm_offline.py

Uses a tiny randomly initialised transformers LLaVA with the real block structure (CLIP vision tower,
GELU projector, Llama language model), so the numbers mean nothing about real models. With a checkpoint:
    model = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device="cuda")
    inputs = model.processor(images=image, text="USER: <image>\\nWhat is shown? ASSISTANT:", return_tensors="pt")
(docs/vlm.md).
"""

from __future__ import annotations

import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_multimodal.analysis.vlm import (
    image_logit_lens,
    patch_image_tokens,
    steer_vision_feature,
    text_to_image_attention,
)
from sae_lens_multimodal.models.hooked_vit import HookedViT
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.testing import tiny_random_llava

torch.manual_seed(0)

# 1. Hook a transformers LLaVA: the vision tower becomes a HookedViT, the projector and language model are
#    run from the original modules with TransformerLens hook names. Same logits as transformers.
hf = tiny_random_llava("llava", "llama", seed=0)
model = HookedVLM.from_pretrained(hf)
image_token = model.cfg.image_token_id
input_ids = torch.tensor([[1, 5, 6] + [image_token] * 16 + [7, 8, 9, 10]])  # "<s> USER: <image x16> question"
image = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    ref = hf(input_ids=input_ids, pixel_values=image).logits
    logits, cache = model.run_with_cache(input_ids, image)
print(f"max |HookedVLM - transformers| logits = {(logits - ref).abs().max():.1e}")
print("image tokens at positions", model.image_token_positions(input_ids)[0].tolist())
for name in ("vision.blocks.1.hook_resid_post", "projector.hook_out", "lm.blocks.1.attn.hook_pattern", "lm.hook_logits"):
    print(f"  {name:34s} {tuple(cache[name].shape)}")
print(f"vision blocks run: {model.cfg.vision_layers_run} of {model.vision.cfg.n_layers} "
      f"(vision_feature_layer={model.cfg.vision_feature_layer}, CLS dropped: {model.cfg.vision_token_offset == 1})")

# 2. Generation: greedy tokens identical to transformers' generate; hooks fire at every step.
with torch.no_grad():
    expected = hf.generate(input_ids=input_ids, pixel_values=image, max_new_tokens=6, do_sample=False)
tokens, gen_cache = model.generate_with_cache(input_ids, image, max_new_tokens=6,
                                              names_filter=lambda n: n.endswith("hook_resid_post"))
print(f"generate == transformers: {torch.equal(tokens, expected)}; new tokens {tokens[0, input_ids.shape[1]:].tolist()}")
print(f"cached over generation: lm.blocks.1.hook_resid_post {tuple(gen_cache['lm.blocks.1.hook_resid_post'].shape)}")

# 3. A vision SAE recorded on the standalone CLIP tower (a bare HookedViT hook name) splices in unchanged,
#    together with a language-model SAE, in one forward and in generate.
clip_tower = HookedViT.from_pretrained(hf.model.vision_tower)
vision_sae = StandardSAE(StandardSAEConfig(d_in=clip_tower.cfg.d_model, d_sae=64))
vision_sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
lm_sae = StandardSAE(StandardSAEConfig(d_in=model.lm.cfg.d_model, d_sae=128))
lm_sae.cfg.metadata.hook_name = "lm.blocks.0.hook_resid_post"
for sae in (vision_sae, lm_sae):
    torch.nn.init.normal_(sae.W_enc, std=0.2)
    torch.nn.init.normal_(sae.W_dec, std=0.2)
print(f"vision SAE splices at {model.sae_hook_location(vision_sae)!r}")
_, sae_cache = model.run_with_cache_with_saes(input_ids, image, saes=[vision_sae, lm_sae], use_error_term=True)
acts = sae_cache["vision.blocks.1.hook_resid_post.hook_sae_acts_post"]
print(f"vision SAE latents in the VLM {tuple(acts.shape)}; L0 = {(acts > 0).float().sum(-1).mean():.1f}")
with model.saes(saes=[vision_sae, lm_sae]):
    spliced = model.generate(input_ids, image, max_new_tokens=6)
print(f"generation with both SAEs spliced (no error term): {spliced[0, input_ids.shape[1]:].tolist()}")

# 4. Analyses.
att = text_to_image_attention(model, input_ids, image)
print("attention from text to image tokens, per layer x head:\n", att.by_layer_head().numpy().round(3))
lens = image_logit_lens(model, input_ids, image, top_k=3)
print(f"logit lens top tokens at image token 0 per layer: {lens.top_tokens[:, 0, 0, 0].tolist()}")
answer = int(logits[0, -1].argmax())
foil = int(logits[0, -1].topk(2).indices[1])
patched = patch_image_tokens(model, input_ids, image, torch.randn(1, 3, 32, 32),
                             answer_tokens=answer, foil_tokens=foil, hook="resid_pre")
print(f"image-token patching (resid_pre), recovered per layer: {patched.recovered.numpy().round(3).tolist()}")
# Clamp one feature of the vision SAE in the vision tower; compare with random directions of the same size
# (random SAE here, so expect no special effect; with a trained CLIP SAE pick a labelled feature).
steer = steer_vision_feature(model, vision_sae, 0, input_ids, image, value=8.0, answer_tokens=foil,
                             n_random=8, max_new_tokens=3)
print(f"steering vision SAE feature 0 (clamped to {steer.value}): logit change of token {foil} "
      f"{float(steer.effect[0]):+.4f} vs random directions of equal size {steer.random_effect[:, 0].abs().mean():.4f} "
      f"(z = {float(steer.z_score[0]):.1f}); top token {int(steer.clean_top[0])} -> {int(steer.steered_top[0])}; "
      f"answer {steer.clean_answer[0].tolist()} -> {steer.steered_answer[0].tolist()}")
