"""Loading a transformers LLaVA / LLaVA-NeXT checkpoint for HookedVLM, and what HookedVLM reads from it."""

from __future__ import annotations

from typing import Any, Optional

import torch

from sae_lens_multimodal.models.conversions._hf_common import _HUB_KWARGS, load_checkpoint, read_hf_config
from sae_lens_multimodal.models.registry import resolve_model_name

__all__ = ["VLM_CLASSES"]

#: The transformers classes HookedVLM.from_pretrained hooks.
VLM_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def _resolve_feature_layer(layer: int, n_layers: int) -> int:
    """transformers' ``hidden_states`` index -> number of vision blocks to run (hidden_states[k] is the
    residual stream after k blocks; hidden_states[0] is the embeddings after ln_pre)."""
    k = layer if layer >= 0 else n_layers + 1 + layer
    if not 0 <= k <= n_layers:
        raise ValueError(f"vision_feature_layer {layer} is out of range for a {n_layers}-block vision tower.")
    return k


def _generation_ids(model: Any) -> dict[str, Any]:
    """EOS / pad ids from the model's generation config (what transformers' generate stops and pads with)."""
    gen = getattr(model, "generation_config", None)
    return {k: getattr(gen, k, None) for k in ("eos_token_id", "pad_token_id")} if gen is not None else {}


def _load_vlm_source(name: str, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> tuple[Any, Any]:
    """The transformers LLaVA model and processor (or None) a registered name (``"shapes-vlm"``), hub repo id
    or local directory holds."""
    import transformers  # optional heavy dependency

    name = resolve_model_name(name)
    try:
        config = read_hf_config(name, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(
            f"Cannot read config.json of {name!r} (a hub repo id or a local directory). Offline, the model must "
            f"be in the local Hugging Face cache. ({err})"
        ) from err
    model_type = config.get("model_type")
    classes = {"llava": transformers.LlavaForConditionalGeneration,
               "llava_next": transformers.LlavaNextForConditionalGeneration}
    if model_type not in classes:
        raise TypeError(
            f"{name!r} has model_type {model_type!r}; HookedVLM loads 'llava' (e.g. llava-hf/llava-1.5-7b-hf) and "
            "'llava_next' (e.g. llava-hf/llava-v1.6-mistral-7b-hf) checkpoints."
        )
    if dtype is not None:
        kwargs["dtype"] = dtype
    model, _ = load_checkpoint(classes[model_type], name, **kwargs)  # refuses missing / damaged weights
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    try:
        processor = transformers.AutoProcessor.from_pretrained(name, **hub)
    except (OSError, ValueError, KeyError, TypeError):  # no processor files there (or not reachable offline)
        processor = None
    return model, processor
