"""transformers CLIP text towers -> HookedText (a text family; see ``models/hooked_text.py``).

Handles ``CLIPModel`` (text model + ``text_projection``), ``CLIPTextModelWithProjection`` and
``CLIPTextModel`` (no projection). The tower is causal and takes the tokenizer's attention mask for
padding, as transformers does. The text embedding is read at the end-of-text token exactly as
transformers picks it: the largest token id when the config has the legacy ``eos_token_id == 2``,
otherwise the first ``eos_token_id``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from sae_lens_multimodal.models.conversions._common import _c, ln_state
from sae_lens_multimodal.models.conversions._hf_common import CLIP_STYLE_BLOCK, hf_blocks_state, is_transformers_class
from sae_lens_multimodal.models.hooked_text import HookedTextConfig, TextFamily, TextPool, register_text_family

_CLASSES = ("CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection")


def _is_hf_clip_text(obj: Any) -> bool:
    return is_transformers_class(obj, "clip", _CLASSES)


def _text_model_and_projection(model: Any) -> tuple[Any, Any]:
    name = type(model).__name__
    if name == "CLIPTextModel":
        return model, None
    return model.text_model, model.text_projection


def hf_text_layers_state(text_model: Any, n_heads: int) -> dict[str, torch.Tensor]:
    """Embeddings, blocks and final LN of a transformers CLIP-style text model (shared with SigLIP)."""
    emb = text_model.embeddings
    sd: dict[str, torch.Tensor] = {
        "embed.W_E": _c(emb.token_embedding.weight),
        "pos_embed.W_pos": _c(emb.position_embedding.weight),
    }
    sd.update(hf_blocks_state(text_model.encoder.layers, CLIP_STYLE_BLOCK, n_heads))
    sd.update(ln_state("ln_final.", text_model.final_layer_norm))
    return sd


def hf_text_config(
    model: Any,
    text_model: Any,
    *,
    default_name: str,
    causal: bool,
    pool_type: TextPool,
    use_attention_mask: bool,
    tokenizer_padding: Literal["max_length", "longest"],
    d_out: Optional[int],
    eos_token_id: Optional[int] = None,
) -> HookedTextConfig:
    """The HookedTextConfig of a transformers CLIP-style text tower (shared with SigLIP): its shape from the
    transformers config; masking, pooling and padding, which differ per family, from the caller."""
    c = text_model.config
    return HookedTextConfig(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
        n_ctx=c.max_position_embeddings,
        act_fn=c.hidden_act,
        eps=c.layer_norm_eps,
        causal=causal,
        pool_type=pool_type,
        eos_token_id=eos_token_id,
        pad_token_id=c.pad_token_id,
        use_attention_mask=use_attention_mask,
        tokenizer_padding=tokenizer_padding,
        d_out=d_out,
        model_name=getattr(c, "_name_or_path", "") or default_name,
        original_architecture=f"transformers.{type(model).__name__}.text",
        dtype=text_model.embeddings.token_embedding.weight.dtype,
    )


def convert_hf_clip_text(model: Any) -> tuple[HookedTextConfig, dict[str, torch.Tensor]]:
    text_model, proj = _text_model_and_projection(model)
    c = text_model.config
    eos = getattr(text_model, "eos_token_id", c.eos_token_id)
    cfg = hf_text_config(
        model,
        text_model,
        default_name="transformers-clip",
        causal=True,
        pool_type="argmax" if eos == 2 else "eos",
        eos_token_id=None if eos == 2 else eos,
        use_attention_mask=True,
        tokenizer_padding="longest",
        d_out=proj.weight.shape[0] if proj is not None else None,
    )
    sd = hf_text_layers_state(text_model, c.num_attention_heads)
    if proj is not None:
        sd["head.W"] = _c(proj.weight.T)
        sd["head.b"] = _c(proj.bias) if proj.bias is not None else torch.zeros(proj.weight.shape[0], dtype=cfg.dtype)
    return cfg, sd


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def has_tokenizer_files(name: str) -> bool:
    """Whether a local directory or hub repo (cache, or the network unless offline) holds tokenizer files.
    transformers would otherwise build a default tokenizer from the config alone, with a bogus vocabulary."""
    from pathlib import Path

    path = Path(name).expanduser()
    if path.is_dir():
        return any((path / f).is_file() for f in _TOKENIZER_FILES)
    from sae_lens_multimodal.models.conversions import _hub_json

    return _hub_json(name, "tokenizer_config.json") is not None


def load_hf_tokenizer(name: str, vocab_size: int) -> Any:
    """The transformers tokenizer saved at ``name`` (directory or hub id), or None when there is none that
    fits the model (no tokenizer files, not cached offline, or ids beyond the model's vocabulary)."""
    if not name or not has_tokenizer_files(name):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    except Exception:  # unreadable or not cached offline: strings then need tokenizer=
        return None
    return tok if len(tok) <= vocab_size else None


def hf_tokenizer(model: Any) -> Any:
    """The tokenizer saved next to the model (its ``config._name_or_path``), if there is one offline."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", config)
    return load_hf_tokenizer(getattr(config, "_name_or_path", "") or "", getattr(text_config, "vocab_size", 0))


register_text_family(
    TextFamily(
        name="hf_clip_text",
        description="transformers CLIPModel / CLIPTextModel / CLIPTextModelWithProjection",
        matches=_is_hf_clip_text,
        convert=convert_hf_clip_text,
        tokenizer=hf_tokenizer,
    )
)
