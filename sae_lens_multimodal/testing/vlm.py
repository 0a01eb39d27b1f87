"""A tiny random transformers LLaVA / LLaVA-NeXT for HookedVLM's tests and offline examples."""

from __future__ import annotations

from typing import Any, Literal, Union

import torch

__all__ = ["tiny_random_llava"]


def tiny_random_llava(
    architecture: Literal["llava", "llava_next"] = "llava",
    text_model: Literal["llama", "mistral", "qwen2"] = "llama",
    *,
    vision_model: Literal["clip", "siglip"] = "clip",
    seed: int = 0,
    vision_feature_layer: Union[int, list[int]] = -2,
    vision_feature_select_strategy: str = "default",
    attn_implementation: str = "sdpa",
) -> Any:
    """A randomly initialised transformers LLaVA (or LLaVA-NeXT) with the real block structure at toy size,
    built offline: a 3-block CLIP vision tower (QuickGELU, 32x32 images, 8x8 patches: CLS + 16 patches; or a
    SigLIP tower with ``vision_model="siglip"``: no CLS, use strategy "full"), the
    GELU projector, and a 2-block Llama / Mistral / Qwen2 language model (grouped-query attention for
    Mistral and Qwen2) with a 256-token vocabulary; the image token is 255. Parameters that transformers
    initialises to constants (norm weights, biases, LLaVA-NeXT's newline) are randomised so that nothing
    is trivially 1 or 0. For examples and tests; real checkpoints load with HookedVLM.from_pretrained(name).
    """
    import transformers  # optional heavy dependency

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                 patch_size=8, layer_norm_eps=1e-5)
    if vision_model == "clip":
        vision = transformers.CLIPVisionConfig(hidden_act="quick_gelu", **tower)
    elif vision_model == "siglip":
        vision = transformers.SiglipVisionConfig(**tower)
    else:
        raise ValueError(f"vision_model must be 'clip' or 'siglip', got {vision_model!r}.")
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if text_model == "llama":
        text = transformers.LlamaConfig(num_key_value_heads=4, **common)
    elif text_model == "mistral":
        text = transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif text_model == "qwen2":
        text = transformers.Qwen2Config(num_key_value_heads=2, **common)
    else:
        raise ValueError(f"text_model must be 'llama', 'mistral' or 'qwen2', got {text_model!r}.")
    kw = dict(vision_config=vision, text_config=text, image_token_index=255, vision_feature_layer=vision_feature_layer,
              vision_feature_select_strategy=vision_feature_select_strategy, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    if architecture == "llava":
        config = transformers.LlavaConfig(image_seq_length=16, **kw)
        cls = transformers.LlavaForConditionalGeneration
    elif architecture == "llava_next":
        config = transformers.LlavaNextConfig(image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], **kw)
        cls = transformers.LlavaNextForConditionalGeneration
    else:
        raise ValueError(f"architecture must be 'llava' or 'llava_next', got {architecture!r}.")
    config._attn_implementation = attn_implementation
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                noise = torch.randn(p.shape, generator=g)
                is_scale = name.endswith("weight") and "norm" in name
                p.copy_(1 + 0.2 * noise if is_scale else 0.1 * noise)
    return model
