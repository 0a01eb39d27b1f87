"""open_clip text towers -> HookedText (a text family; see ``models/hooked_text.py``).

Handles ``open_clip.CLIP`` (whose text tower is spread over the CLIP object itself), ``CustomTextCLIP``
with a ``TextTransformer`` (``.text``), and a bare ``TextTransformer``. QuickGELU variants, layer scale
(folded into W_O / W_out), no-causal-mask towers with a padding mask, and pooling by argmax / eos / last /
first are converted exactly. CoCa's appended CLS embedding and open_clip's custom attention blocks are not.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_lens_multimodal.models.conversions import UnsupportedModelError
from sae_lens_multimodal.models.conversions._common import _c, ln_state
from sae_lens_multimodal.models.conversions._open_clip_common import check_resblocks, resblocks_state
from sae_lens_multimodal.models.hooked_text import HookedTextConfig, TextFamily, register_text_family


def _is_open_clip_text(obj: Any) -> bool:
    if not type(obj).__module__.startswith("open_clip"):
        return False
    name = type(obj).__name__
    return name == "TextTransformer" or hasattr(obj, "token_embedding") or hasattr(obj, "text")


def _parts(model: Any) -> dict[str, Any]:
    """The text-tower pieces, wherever this open_clip class keeps them."""
    from open_clip.transformer import TextTransformer

    if isinstance(model, TextTransformer) or isinstance(getattr(model, "text", None), TextTransformer):
        t = model if isinstance(model, TextTransformer) else model.text
        if t.cls_emb is not None:
            raise UnsupportedModelError("open_clip text towers with an appended CLS embedding (CoCa) are not supported.")
        return dict(
            token_embedding=t.token_embedding, positional_embedding=t.positional_embedding,
            transformer=t.transformer, ln_final=t.ln_final, text_projection=t.text_projection,
            attn_mask=t.attn_mask, pool_type=t.pool_type, eos_id=getattr(t, "eos_id", None),
            use_pad_mask=bool(t.use_pad_mask), pad_id=t.pad_id, vocab_size=t.vocab_size,
            context_length=t.context_length,
        )
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        # open_clip.CLIP: its encode_text never applies a padding mask, whatever the text config said.
        return dict(
            token_embedding=model.token_embedding, positional_embedding=model.positional_embedding,
            transformer=model.transformer, ln_final=model.ln_final, text_projection=model.text_projection,
            attn_mask=model.attn_mask, pool_type=model.text_pool_type,
            eos_id=getattr(model, "text_eos_id", None), use_pad_mask=False, pad_id=0,
            vocab_size=model.vocab_size, context_length=model.context_length,
        )
    text = getattr(model, "text", None)
    raise UnsupportedModelError(
        f"open_clip text tower {type(text).__name__} is not a TextTransformer (Hugging Face text encoders "
        "inside open_clip are not supported)."
    )


def convert_open_clip_text(model: Any) -> tuple[HookedTextConfig, dict[str, torch.Tensor]]:
    from open_clip.transformer import QuickGELU

    p = _parts(model)
    blocks = p["transformer"].resblocks
    check_resblocks(blocks)
    if p["pool_type"] not in ("argmax", "eos", "last", "first"):
        raise UnsupportedModelError(f"open_clip text pool_type {p['pool_type']!r} is not supported.")
    b0 = blocks[0]
    act = b0.mlp.gelu
    if isinstance(act, QuickGELU):
        act_fn = "quick_gelu"
    elif isinstance(act, torch.nn.GELU):
        act_fn = "gelu" if act.approximate == "none" else "gelu_new"
    else:
        raise UnsupportedModelError(f"open_clip text activation {type(act).__name__} is not supported.")
    proj = p["text_projection"]
    if isinstance(proj, torch.nn.Linear):
        W_head, b_head = _c(proj.weight.T), _c(proj.bias) if proj.bias is not None else None
    elif proj is not None:
        W_head, b_head = _c(proj), None
    else:
        W_head = b_head = None
    d_model = p["token_embedding"].weight.shape[1]
    n_heads = b0.attn.num_heads
    causal = p["attn_mask"] is not None
    dtype = p["token_embedding"].weight.dtype
    cfg = HookedTextConfig(
        n_layers=len(blocks),
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=b0.mlp.c_fc.out_features,
        d_vocab=p["vocab_size"],
        n_ctx=p["positional_embedding"].shape[0],
        act_fn=act_fn,
        eps=b0.ln_1.eps,
        causal=causal,
        pool_type=p["pool_type"],
        eos_token_id=p["eos_id"] if p["pool_type"] == "eos" else None,
        pad_token_id=p["pad_id"],
        pad_mask_from_tokens=p["use_pad_mask"],
        use_attention_mask=False,
        tokenizer_padding="max_length",
        d_out=W_head.shape[1] if W_head is not None else None,
        model_name=getattr(model, "name", None) or "open_clip",
        original_architecture=f"open_clip.{type(model).__name__}.text",
        dtype=dtype,
    )
    sd: dict[str, torch.Tensor] = {
        "embed.W_E": _c(p["token_embedding"].weight),
        "pos_embed.W_pos": _c(p["positional_embedding"]),
    }
    sd.update(resblocks_state(blocks, n_heads))
    sd.update(ln_state("ln_final.", p["ln_final"]))
    if W_head is not None:
        sd["head.W"] = W_head
        sd["head.b"] = b_head if b_head is not None else torch.zeros(W_head.shape[1], dtype=dtype)
    return cfg, sd


def open_clip_tokenizer(model: Any) -> Any:
    """open_clip's own BPE tokenizer (shipped with the package, so offline) for OpenAI-vocabulary towers."""
    name = getattr(model, "name", None)
    import open_clip

    if name:
        try:
            return open_clip.get_tokenizer(name)
        except Exception:  # a hub-tokenizer model whose files are not cached: fall through
            pass
    p = _parts(model)
    if p["vocab_size"] == 49408:  # the OpenAI CLIP BPE vocabulary
        return open_clip.SimpleTokenizer(context_length=p["context_length"])
    return None


register_text_family(
    TextFamily(
        name="open_clip_text",
        description="open_clip CLIP / CustomTextCLIP / TextTransformer text towers",
        matches=_is_open_clip_text,
        convert=convert_open_clip_text,
        tokenizer=open_clip_tokenizer,
    )
)
