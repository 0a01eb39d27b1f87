"""transformers SigLIP text towers -> HookedText (a text family; see ``models/hooked_text.py``).

Handles ``SiglipModel`` and ``SiglipTextModel``. SigLIP's text tower is bidirectional (no causal mask),
reads the LAST position (padding included: SigLIP was trained on text padded to 64 tokens, so strings
are padded to ``max_length`` and no attention mask is passed, as the model card prescribes) and
projects with a linear ``head`` that has a bias.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_multimodal.models.conversions._common import _c
from sae_lens_multimodal.models.conversions._hf_common import is_transformers_class
from sae_lens_multimodal.models.conversions.hf_clip_text import hf_text_config, hf_text_layers_state, hf_tokenizer
from sae_lens_multimodal.models.hooked_text import HookedTextConfig, TextFamily, register_text_family


def _is_hf_siglip_text(obj: Any) -> bool:
    return is_transformers_class(obj, "siglip", ("SiglipModel", "SiglipTextModel"))


def convert_hf_siglip_text(model: Any) -> tuple[HookedTextConfig, dict[str, torch.Tensor]]:
    text_model = model.text_model if type(model).__name__ == "SiglipModel" else model
    head = text_model.head
    cfg = hf_text_config(
        model,
        text_model,
        default_name="transformers-siglip",
        causal=False,
        pool_type="last",
        use_attention_mask=False,
        tokenizer_padding="max_length",
        d_out=head.weight.shape[0],
    )
    sd = hf_text_layers_state(text_model, text_model.config.num_attention_heads)
    sd["head.W"] = _c(head.weight.T)
    sd["head.b"] = _c(head.bias)
    return cfg, sd


register_text_family(
    TextFamily(
        name="hf_siglip_text",
        description="transformers SiglipModel / SiglipTextModel",
        matches=_is_hf_siglip_text,
        convert=convert_hf_siglip_text,
        tokenizer=hf_tokenizer,
    )
)
