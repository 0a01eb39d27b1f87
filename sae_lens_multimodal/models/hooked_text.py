"""HookedText: the text tower of a CLIP-style model with TransformerLens hook points, converted exactly
from open_clip, transformers CLIP or transformers SigLIP weights.

Hook names follow TransformerLens: ``hook_embed``, ``hook_pos_embed``, ``blocks.{i}.*`` (the same block
as HookedViT, with a causal mask where the source has one), ``ln_final.hook_scale/hook_normalized``,
then ``hook_pooled`` (the end-of-text token, picked exactly as the source picks it) and ``hook_out``
(after the projection into the joint space).

Text towers have their own small registry of source families (:func:`register_text_family`), kept apart
from the vision registry; the family modules are ``models/conversions/*_text.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.contract import HookSpec, norm_specs, transformer_block_specs
from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule
from sae_lens_multimodal.models.components import LayerNorm, TransformerBlock
from sae_lens_multimodal.models.config import TransformerTowerConfig

__all__ = [
    "HookedText",
    "HookedTextConfig",
    "TextFamily",
    "TEXT_FAMILIES",
    "register_text_family",
    "convert_text_model",
    "TextInput",
]

TextInput = Union[str, Sequence[str], torch.Tensor]
TextPool = Literal["argmax", "eos", "last", "first"]
ReturnType = Optional[Literal["output", "pooled", "tokens"]]


@dataclass
class HookedTextConfig(TransformerTowerConfig):
    """A pre-norm text transformer: token + learned position embeddings, blocks, final LN, pooling, projection.

    ``pool_type`` says which token's final state is the text embedding, exactly as the source does it:
    ``"argmax"`` (the position of the largest token id: open_clip CLIP and transformers CLIP with the legacy
    ``eos_token_id == 2``, where end-of-text is the largest id), ``"eos"`` (the first ``eos_token_id``),
    ``"last"`` (the last position, padding included: SigLIP) or ``"first"``.
    """

    d_vocab: int
    n_ctx: int
    causal: bool = True
    pool_type: TextPool = "argmax"
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    #: Mask keys whose token id is ``pad_token_id`` (open_clip bidirectional towers with use_pad_mask).
    pad_mask_from_tokens: bool = False
    #: Whether strings are tokenized with the tokenizer's attention mask passed on (transformers CLIP does;
    #: open_clip and SigLIP, which were trained on fixed-length padded text, do not).
    use_attention_mask: bool = False
    #: "max_length" pads to n_ctx (what open_clip and SigLIP were trained with); "longest" to the batch.
    tokenizer_padding: Literal["max_length", "longest"] = "max_length"
    d_out: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_type not in ("argmax", "eos", "last", "first"):
            raise ValueError(f"pool_type={self.pool_type!r}; expected 'argmax', 'eos', 'last' or 'first'")
        if self.pool_type == "eos" and self.eos_token_id is None:
            raise ValueError("pool_type='eos' needs eos_token_id")
        if self.pad_mask_from_tokens and self.pad_token_id is None:
            raise ValueError("pad_mask_from_tokens=True needs pad_token_id")

    @property
    def output_dim(self) -> int:
        return self.d_out or self.d_model


# ---------------------------------------------------------------------------------------------- registry
TextConvertResult = tuple[HookedTextConfig, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TextFamily:
    """A source family of text towers: ``matches(obj)`` (no source import needed) and an exact ``convert``.

    ``tokenizer(obj)`` optionally returns the source's tokenizer for a built model object (None when it
    cannot be found offline).
    """

    name: str
    description: str
    matches: Callable[[Any], bool]
    convert: Callable[[Any], TextConvertResult]
    tokenizer: Optional[Callable[[Any], Any]] = None


TEXT_FAMILIES: dict[str, TextFamily] = {}


def register_text_family(family: TextFamily) -> TextFamily:
    """Register (or re-register, idempotently) a text source family."""
    TEXT_FAMILIES[family.name] = family
    return family


def _text_summary() -> str:
    return "\n".join(f"  - {f.name}: {f.description}" for f in TEXT_FAMILIES.values())


def find_text_family(model: Any) -> TextFamily:
    import sae_lens_multimodal.models.conversions  # noqa: F401  (imports and registers the *_text families)

    for family in TEXT_FAMILIES.values():
        if family.matches(model):
            return family
    from sae_lens_multimodal.models.conversions import UnsupportedModelError

    raise UnsupportedModelError(
        f"Unsupported text model type {type(model).__module__}.{type(model).__qualname__}. "
        f"Supported text families:\n{_text_summary()}"
    )


def convert_text_model(model: Any) -> tuple[HookedTextConfig, dict[str, torch.Tensor], Any]:
    """Convert a source text tower (or the whole CLIP holding it) to (config, state dict, tokenizer or None)."""
    family = find_text_family(model)
    cfg, sd = family.convert(model)
    tokenizer = family.tokenizer(model) if family.tokenizer is not None else None
    return cfg, sd, tokenizer


# ---------------------------------------------------------------------------------------------- model
class TextEmbed(nn.Module):
    def __init__(self, cfg: HookedTextConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.zeros(cfg.d_vocab, cfg.d_model, device=cfg.device, dtype=cfg.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_E[tokens]


class TextPosEmbed(nn.Module):
    def __init__(self, cfg: HookedTextConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model, device=cfg.device, dtype=cfg.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        return self.W_pos[:n].unsqueeze(0).expand(b, -1, -1).clone()


class TextHead(nn.Module):
    """The projection into the joint embedding space (``W [d_model, d_out]``, ``b [d_out]``)."""

    def __init__(self, cfg: HookedTextConfig):
        super().__init__()
        assert cfg.d_out is not None
        kw = dict(device=cfg.device, dtype=cfg.dtype)
        self.W = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_out, **kw))
        self.b = nn.Parameter(torch.zeros(cfg.d_out, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W + self.b


class HookedText(MultimodalHookedRootModule):
    """A CLIP/SigLIP text tower whose every intermediate activation is a TransformerLens HookPoint.

    ``forward`` takes token ids [batch, pos] (with an optional ``attention_mask`` [batch, pos], 1 = keep,
    as transformers does) or strings, tokenized with the source model's tokenizer (``self.tokenizer``).
    Build one with :meth:`from_pretrained` from a source model object, or from a :class:`HookedTextConfig`.
    """

    PART = "text"

    def __init__(self, cfg: HookedTextConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=cfg.device, dtype=cfg.dtype)
        self.embed = TextEmbed(cfg)
        self.hook_embed = HookPoint()
        self.pos_embed = TextPosEmbed(cfg)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.act_fn, cfg.eps, causal=cfg.causal, **kw
            )
            for _ in range(cfg.n_layers)
        )
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps, **kw)
        self.hook_pooled = HookPoint()
        if cfg.d_out is not None:
            self.head = TextHead(cfg)
        self.hook_out = HookPoint()
        self.tokenizer = tokenizer
        self.setup()
        if cfg.normalization_type == "LNPre":
            for block in self.blocks:
                block.ln1.remove_weights()
                block.ln2.remove_weights()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "HookedText":
        """Convert a source text tower exactly: open_clip CLIP / CustomTextCLIP / TextTransformer,
        transformers CLIPModel / CLIPTextModel(WithProjection), SiglipModel / SiglipTextModel.

        ``tokenizer`` overrides the tokenizer found for the source (needed for strings when none is found
        offline). To load by name use :meth:`HookedCLIP.from_pretrained` and take ``.text``.
        """
        cfg, state_dict, found = convert_text_model(model)
        if dtype is not None:
            cfg.dtype = dtype
        if device is not None:
            cfg.device = str(device)
        hooked = cls(cfg, tokenizer=tokenizer if tokenizer is not None else found)
        hooked.load_state_dict({k: v.to(cfg.dtype) for k, v in state_dict.items()}, strict=True)
        return hooked.eval()

    # ------------------------------------------------------------------ tokenization
    def to_tokens(self, texts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokenize strings with the source model's tokenizer: (token ids [batch, pos], attention mask or None).

        The attention mask is returned only where the source model uses one (``cfg.use_attention_mask``).
        """
        if self.tokenizer is None:
            raise ValueError(
                "This text tower has no tokenizer, so it cannot take strings. Pass token ids (a LongTensor "
                "[batch, pos]), or set model.tokenizer (e.g. open_clip.get_tokenizer('<model>') or "
                "transformers.AutoTokenizer.from_pretrained('<local dir>'))."
            )
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise TypeError("Expected a string or a non-empty list of strings.")
        tok = self.tokenizer
        device = self.embed.W_E.device
        if type(tok).__module__.startswith("open_clip") or not hasattr(tok, "pad_token_id"):
            ids = tok(items)  # open_clip tokenizers pad to their context length and return a tensor
            if not isinstance(ids, torch.Tensor):
                raise TypeError(f"Tokenizer {type(tok).__name__} returned {type(ids).__name__}, not a tensor.")
            return ids.to(device), None
        padding = "max_length" if self.cfg.tokenizer_padding == "max_length" else True
        enc = tok(items, padding=padding, truncation=True, max_length=self.cfg.n_ctx, return_tensors="pt")
        mask = enc.get("attention_mask") if self.cfg.use_attention_mask else None
        return enc["input_ids"].to(device), (mask.to(device) if mask is not None else None)

    def _prepare(
        self, text: TextInput, attention_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(text, str) or (isinstance(text, (list, tuple)) and text and isinstance(text[0], str)):
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with token ids, not with strings.")
            return self.to_tokens(text)  # type: ignore[arg-type]
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"Expected strings or token ids (LongTensor [batch, pos]), got {type(text).__name__}.")
        tokens = text
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"Expected integer token ids of shape [batch, pos], got {tuple(text.shape)} {text.dtype}."
            )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"Got {tokens.shape[1]} tokens but this text tower has {self.cfg.n_ctx} positions; truncate "
                f"the input (the source tokenizer does when called with strings)."
            )
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}."
            )
        return tokens.to(self.embed.W_E.device).long(), attention_mask

    def _additive_mask(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        keep = None
        if attention_mask is not None:
            keep = attention_mask.to(tokens.device).bool()
        if self.cfg.pad_mask_from_tokens:
            not_pad = tokens != self.cfg.pad_token_id
            keep = not_pad if keep is None else keep & not_pad
        if keep is None:
            return None
        dtype = self.embed.W_E.dtype
        # The most negative finite value (as transformers uses), so a fully masked row stays finite.
        mask = torch.zeros(keep.shape, dtype=dtype, device=tokens.device)
        mask = mask.masked_fill(~keep, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        text: TextInput,
        attention_mask: Optional[torch.Tensor] = None,
        return_type: ReturnType = "output",
        stop_at_layer: Optional[int] = None,
    ) -> Optional[torch.Tensor]:
        """Run the text tower.

        ``return_type``: ``"output"`` (the text embedding in the joint space, unnormalised, what the source
        returns), ``"pooled"`` (before the projection), ``"tokens"`` (all final-LN tokens) or None.
        ``stop_at_layer=n`` returns the residual stream after blocks 0..n-1.
        """
        tokens, attention_mask = self._prepare(text, attention_mask)
        mask = self._additive_mask(tokens, attention_mask)
        x = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        blocks = self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]
        for block in blocks:
            x = block(x, attention_mask=mask)
        if stop_at_layer is not None:
            return x
        x = self.ln_final(x)
        if return_type == "tokens":
            return x
        pooled = self.hook_pooled(x[torch.arange(x.shape[0], device=x.device), self.pool_index(tokens)])
        if return_type == "pooled":
            return pooled
        out = self.hook_out(self.head(pooled) if self.cfg.d_out is not None else pooled)
        return out if return_type == "output" else None

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position whose final state is the text embedding, per sequence (as the source picks it)."""
        pool = self.cfg.pool_type
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            is_eos = tokens == self.cfg.eos_token_id
            if not bool(is_eos.any(-1).all()):
                raise ValueError(
                    f"Some sequences contain no end-of-text token (id {self.cfg.eos_token_id}), which this "
                    "model pools from; tokenize with the model's tokenizer."
                )
            return is_eos.int().argmax(dim=-1)
        if pool == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device, dtype=torch.long)
        return torch.zeros(tokens.shape[0], device=tokens.device, dtype=torch.long)

    # ------------------------------------------------------------------ hook contract (core/contract.py)
    def _build_hook_specs(self) -> dict[str, HookSpec]:
        cfg = self.cfg
        specs = [HookSpec("hook_embed", "text", "tokens", cfg.d_model),
                 HookSpec("hook_pos_embed", "text", "tokens", cfg.d_model)]
        for layer in range(cfg.n_layers):
            specs += transformer_block_specs(
                layer, "text", d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp
            ).values()
        specs += norm_specs("ln_final", cfg.d_model, part="text")
        specs += [HookSpec("hook_pooled", "text", "pooled", cfg.d_model),
                  HookSpec("hook_out", "text", "pooled", cfg.output_dim)]
        return {s.name: s for s in specs}

    def _apply(self, fn, *args, **kwargs):  # keep cfg.device/dtype in step with .to()/.half()
        out = super()._apply(fn, *args, **kwargs)
        p = self.embed.W_E
        self.cfg.device, self.cfg.dtype = str(p.device), p.dtype
        return out
