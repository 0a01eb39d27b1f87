"""HookedVLM: a LLaVA-style vision-language model with TransformerLens hook points in all three parts.

Built from transformers ``LlavaForConditionalGeneration`` (LLaVA 1.5) or ``LlavaNextForConditionalGeneration``
(LLaVA-NeXT / 1.6), by object or by name:

* ``model.vision`` is a :class:`HookedViT` converted from the model's vision tower (transformers CLIP or
  SigLIP vision model) through the same conversion registry as ``HookedViT.from_pretrained``, so its hook
  names are HookedViT's under the prefix ``vision.`` (``vision.blocks.9.hook_resid_post``). An SAE recorded
  on a standalone HookedViT (``blocks.9.hook_resid_post``) is spliced into the vision tower unchanged.
  LLaVA's ``vision_feature_layer`` is respected: the tower runs only as far as the selected layer (blocks
  after it neither run nor fire hooks) and ``vision_feature_select_strategy="default"`` drops the CLS token.
* ``model.projector`` wraps the multimodal projector's own modules with ``projector.hook_in`` (selected
  vision features), ``hook_pre`` / ``hook_post`` (first linear, activation) and ``hook_out`` (image
  features in the language model's width).
* ``model.lm`` runs the language model's own modules (Llama, Mistral or Qwen2 backbones, shared with the
  transformers model, not copied) in a loop that calls TransformerLens-named hook points:
  ``lm.hook_embed``, ``lm.blocks.{i}.hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``,
  ``ln1/ln2/ln_final.hook_scale/hook_normalized``, ``attn.hook_q/k/v/rot_q/rot_k/attn_scores/pattern/z/result``,
  ``mlp.hook_pre/hook_pre_linear/hook_post`` and ``lm.hook_logits``. Attention patterns are materialised only
  when observed; otherwise the model's own attention kernel runs.

Image-token positions in the language model's sequence are where ``input_ids == cfg.image_token_id``:
:meth:`HookedVLM.image_token_mask` / :meth:`HookedVLM.image_token_positions`; the mask of the last forward is
kept in ``model.last_image_token_mask``. Hook names, shapes and loading real checkpoints: docs/vlm.md.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule, is_observed, unknown_hook_error
from sae_lens_multimodal.core.nested import NestedSAEHostMixin
from sae_lens_multimodal.models.hooked_vit import HookedViT, ViTActivationCache

__all__ = [
    "HookedVLM",
    "HookedVLMConfig",
    "VLMActivationCache",
    "VLMLanguageModel",
    "VLMLanguageConfig",
    "VLMProjector",
    "PARTS",
    "SUPPORTED_LANGUAGE_MODELS",
]

#: The hooked parts of a HookedVLM, i.e. the first component of every hook name.
PARTS = ("vision", "projector", "lm")
#: transformers language-model classes whose decoder layers HookedVLM runs (same block structure:
#: RMSNorm -> rotary attention (GQA) -> residual -> RMSNorm -> gated MLP -> residual).
SUPPORTED_LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model")
_VLM_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def _observed(module: Optional[nn.Module]) -> bool:
    # A spliced SAE (not a HookPoint) always has to run; a bare HookPoint only when something watches it.
    return module is not None and (not isinstance(module, HookPoint) or is_observed(module))


# ============================================================================================ configs
@dataclass
class VLMLanguageConfig:
    """The language model's shape, with TransformerLens field names (read by ActivationCache helpers)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: int
    eps: float
    act_fn: str
    n_ctx: int
    original_architecture: str
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    attn_only: bool = False
    model_name: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass
class HookedVLMConfig:
    """What HookedVLM adds on top of its parts' configs (``model.vision.cfg``, ``model.lm.cfg``).

    ``vision_feature_layer`` / ``vision_feature_select_strategy`` are LLaVA's: the vision tower's
    ``hidden_states`` index (an int, or a list whose states are concatenated) and ``"default"`` (drop the
    CLS token) or ``"full"``. ``vision_layers_run`` is how many vision blocks run (the deepest selected layer).
    """

    image_token_id: int
    vision_feature_layer: Union[int, list[int]]
    vision_feature_select_strategy: str
    vision_layers_run: int
    d_vision: int
    d_text: int
    image_seq_length: Optional[int] = None
    architecture: Literal["llava", "llava_next"] = "llava"
    image_grid_pinpoints: Optional[list[list[int]]] = None
    model_name: str = "custom"
    original_architecture: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vision_token_offset(self) -> int:
        """Vision-tower positions dropped before the projector: image token k of the language model comes
        from vision position k + offset (1 with "default" on a tower with a CLS token, else 0)."""
        return 1 if self.vision_feature_select_strategy == "default" else 0


# ============================================================================================ language model
class VLMRMSNorm(nn.Module):
    """The backbone's RMSNorm (``w * x / sqrt(mean(x^2) + eps)``, in fp32 as transformers computes it).

    ``w`` is the transformers module's own weight. Hooks: ``hook_scale`` [..., 1] = ``sqrt(mean(x^2)+eps)``
    (TransformerLens's RMS scale) and ``hook_normalized`` [..., d] = the norm's output (weight applied).
    The scale is materialised only when observed; otherwise transformers' exact arithmetic runs.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.w = norm.weight
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        if _observed(self.hook_scale):
            scale = self.hook_scale((var + self.eps).sqrt())
            h = h / scale
        else:
            h = h * torch.rsqrt(var + self.eps)  # transformers' LlamaRMSNorm, op for op
        return self.hook_normalized(self.w * h.to(dtype))


class VLMAttention(nn.Module):
    """Rotary self-attention of one decoder layer, running the transformers module's own projections.

    Hooks ([b]atch, [p]os, [h]eads, [k]ey/value heads, [d]_head): ``hook_q`` [b,p,h,d], ``hook_k`` /
    ``hook_v`` [b,p,k,d] (grouped-query: the model's key/value heads, before rotary), ``hook_rot_q`` /
    ``hook_rot_k`` (after rotary), ``hook_attn_scores`` / ``hook_pattern`` [b,h,p_q,p_k] (scaled scores with
    the causal/padding mask added, and the softmax; p_k includes cached positions during generation),
    ``hook_z`` [b,p,h,d], ``hook_result`` [b,p,h,d_model] (per-head output without o_proj's bias).
    """

    def __init__(self, attn: nn.Module, layer_idx: int, sliding_window: Optional[int]):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        # The transformers module itself is kept unregistered (its projections are registered above):
        # attention kernels read attributes from it (is_causal, num_key_value_groups, config).
        self.__dict__["_hf"] = attn
        self.layer_idx = layer_idx
        self.d_head = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.n_rep = int(attn.num_key_value_groups)
        self.sliding_window = sliding_window
        self._rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        for name in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores",
                     "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())

    @property
    def n_heads(self) -> int:
        return self.q_proj.out_features // self.d_head

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: Callable[[bool], Any],
        past_key_values: Any = None,
    ) -> torch.Tensor:
        b, p, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, p, -1, self.d_head))
        k = self.hook_k(self.k_proj(x).view(b, p, -1, self.d_head))
        v = self.hook_v(self.v_proj(x).view(b, p, -1, self.d_head))
        cos, sin = position_embeddings
        q, k = self._rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [b, heads, p, d]
        v = v.transpose(1, 2)
        if _observed(self.hook_rot_q):
            q = self.hook_rot_q(q.transpose(1, 2)).transpose(1, 2)
        if _observed(self.hook_rot_k):
            k = self.hook_rot_k(k.transpose(1, 2)).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if _observed(self.hook_attn_scores) or _observed(self.hook_pattern):
            z = self._explicit_attention(q, k, v, mask(True))
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            hf = self.__dict__["_hf"]
            impl = hf.config._attn_implementation
            if impl in (None, "eager"):
                z = self._explicit_attention(q, k, v, mask(False))
            else:  # the model's own kernel (sdpa, flash...), called as its attention module calls it
                interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, None)
                z, _ = interface(hf, q, k, v, mask(False), dropout=0.0, scaling=self.scaling,
                                 sliding_window=self.sliding_window)
        z = self.hook_z(z.reshape(b, p, -1, self.d_head))
        if _observed(self.hook_result):
            w = self.o_proj.weight.view(self.o_proj.out_features, -1, self.d_head)
            result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w))
            out = result.sum(-2)
            return out + self.o_proj.bias if self.o_proj.bias is not None else out
        return self.o_proj(z.reshape(b, p, -1))

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """softmax(q k^T * scaling + mask) v, as transformers' eager attention computes it; [b, p, h, d]."""
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise NotImplementedError(
                    f"Attention patterns cannot be materialised with attn_implementation="
                    f"{self.__dict__['_hf'].config._attn_implementation!r} (its mask is a {type(mask).__name__}). "
                    "Load the model with attn_implementation='sdpa' or 'eager'."
                )
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
            scores = scores + mask
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v).transpose(1, 2).contiguous()


class VLMGatedMLP(nn.Module):
    """The gated MLP ``down(act(gate(x)) * up(x))`` with TransformerLens's gated-MLP hooks:
    ``hook_pre`` = gate(x), ``hook_pre_linear`` = up(x), ``hook_post`` = act(gate) * up, all [b, p, d_mlp]."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(self.gate_proj(x))
        post = self.hook_post(self.act_fn(pre) * self.hook_pre_linear(self.up_proj(x)))
        return self.down_proj(post)


class VLMDecoderBlock(nn.Module):
    """One pre-norm decoder layer: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid +
    mlp(ln2(resid_mid)), with TransformerLens's block hooks."""

    def __init__(self, layer: nn.Module, layer_idx: int, sliding_window: Optional[int]):
        super().__init__()
        self.ln1 = VLMRMSNorm(layer.input_layernorm)
        self.attn = VLMAttention(layer.self_attn, layer_idx, sliding_window)
        self.ln2 = VLMRMSNorm(layer.post_attention_layernorm)
        self.mlp = VLMGatedMLP(layer.mlp)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, x: torch.Tensor, position_embeddings: Any, mask: Callable[[bool], Any],
                past_key_values: Any = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(x), position_embeddings, mask, past_key_values))
        mid = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mid)))
        return self.hook_resid_post(mid + mlp_out)


class VLMLanguageModel(nn.Module):
    """The VLM's language model: embedding, decoder blocks, final norm and unembedding with hooks.

    The modules are the transformers model's own (shared, not copied). ``cfg`` has TransformerLens field
    names; ``W_E`` / ``W_U`` are the embedding [d_vocab, d_model] and unembedding [d_model, d_vocab].
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear):
        super().__init__()
        name = type(language_model).__name__
        if name not in SUPPORTED_LANGUAGE_MODELS:
            raise TypeError(
                f"HookedVLM runs {', '.join(SUPPORTED_LANGUAGE_MODELS)} language models; this VLM's is {name}. "
                "Its decoder layers differ from the Llama block this class hooks."
            )
        config = language_model.config
        self.hf_config = config
        self.embed = language_model.embed_tokens
        self.rotary_emb = language_model.rotary_emb
        layer_types = getattr(config, "layer_types", None)
        model_type = getattr(config, "model_type", "")
        self.layer_types: list[str] = []
        blocks = []
        for i, layer in enumerate(language_model.layers[: config.num_hidden_layers]):
            if layer_types:
                kind = layer_types[i]
            elif model_type == "mistral" and getattr(config, "sliding_window", None):
                kind = "sliding_attention"  # Mistral applies its window to every layer
            else:
                kind = "full_attention"
            self.layer_types.append(kind)
            window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
            blocks.append(VLMDecoderBlock(layer, i, window))
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = VLMRMSNorm(language_model.norm)
        self.unembed = lm_head
        self.hook_embed = HookPoint()
        self.hook_logits = HookPoint()
        attn0 = language_model.layers[0].self_attn
        weight = self.embed.weight
        self.cfg = VLMLanguageConfig(
            n_layers=len(blocks),
            d_model=config.hidden_size,
            n_heads=config.num_attention_heads,
            d_head=int(attn0.head_dim),
            d_mlp=config.intermediate_size,
            d_vocab=lm_head.out_features,
            n_key_value_heads=config.num_key_value_heads,
            eps=self.ln_final.eps,
            act_fn=str(config.hidden_act),
            n_ctx=int(getattr(config, "max_position_embeddings", 0) or 0),
            original_architecture=f"transformers.{name}",
            device=str(weight.device),
            dtype=weight.dtype,
        )

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        return self.unembed.weight.T

    def masks(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor], past_key_values: Any,
              position_ids: torch.Tensor, blocks: Iterable[VLMDecoderBlock]) -> Callable[[int, bool], Any]:
        """Per-layer attention masks as transformers builds them, as ``get(layer, explicit)``.

        ``explicit=True`` gives a full tensor mask (no "is causal" shortcut) for materialised patterns. All
        masks are built before any layer runs: their sizes read the key/value cache, which layers update.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        eager = self.hf_config._attn_implementation in (None, "eager")
        built: dict[tuple[str, bool], Any] = {}
        for i, block in enumerate(blocks):
            explicit = eager or _observed(block.attn.hook_attn_scores) or _observed(block.attn.hook_pattern)
            for want in {False, explicit}:
                key = (self.layer_types[i], want)
                if key not in built:
                    fn = create_sliding_window_causal_mask if key[0] == "sliding_attention" else create_causal_mask
                    built[key] = fn(
                        config=self.hf_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        past_key_values=past_key_values, position_ids=position_ids, allow_is_causal_skip=not want,
                    )

        def get(layer: int, explicit: bool) -> Any:
            key = (self.layer_types[layer], explicit)
            if key not in built:
                raise RuntimeError(
                    f"A hook on lm.blocks.{layer}.attn.hook_pattern / hook_attn_scores was added during this forward; "
                    "add attention-pattern hooks before the forward starts."
                )
            return built[key]

        return get

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Any = None,
        stop_at_layer: Optional[int] = None,
        return_type: Optional[str] = "logits",
    ) -> Optional[torch.Tensor]:
        """Run the decoder on ``inputs_embeds`` [b, p, d] (the residual stream entering block 0).

        ``stop_at_layer=n`` returns the residual stream after blocks 0..n-1 (TransformerLens semantics).
        ``return_type``: ``"logits"``, ``"resid"`` (after ln_final) or None.
        """
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + seen
        blocks = self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]
        masks = self.masks(inputs_embeds, attention_mask, past_key_values, position_ids, blocks)
        x = inputs_embeds
        position_embeddings = self.rotary_emb(x, position_ids=position_ids)
        for i, block in enumerate(blocks):
            x = block(x, position_embeddings, (lambda explicit, i=i: masks(i, explicit)), past_key_values)
        if stop_at_layer is not None:
            return x
        x = self.ln_final(x)
        if return_type == "resid":
            return x
        logits = self.hook_logits(self.unembed(x))
        return logits if return_type == "logits" else None


# ============================================================================================ projector
class VLMProjector(nn.Module):
    """LLaVA's multimodal projector (linear -> activation -> linear), running the original modules.

    Hooks: ``hook_in`` [n_images, n_tokens, d_vision * n_feature_layers] (selected vision features),
    ``hook_pre`` / ``hook_post`` [.., d_text] (first linear; activation), ``hook_out`` [.., d_text].
    """

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = projector.linear_1, projector.act, projector.linear_2
        for name in ("hook_in", "hook_pre", "hook_post", "hook_out"):
            setattr(self, name, HookPoint())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.hook_in(features)
        x = self.hook_post(self.act(self.hook_pre(self.linear_1(x))))
        return self.hook_out(self.linear_2(x))


# ============================================================================================ cache
class VLMActivationCache(ActivationCache):
    """A TransformerLens ActivationCache over a HookedVLM, keyed by full names (``vision.blocks.0...``).

    ``cache.vision`` is the vision tower's cache with bare HookedViT names (a ``ViTActivationCache``) and
    ``cache.lm`` the language model's with bare TransformerLens names, on which helpers that read
    ``model.cfg`` (``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack``...) work.
    """

    def _part(self, part: str) -> ActivationCache:
        prefix = part + "."
        sub = {k[len(prefix):]: v for k, v in self.cache_dict.items() if k.startswith(prefix)}
        cls = ViTActivationCache if part == "vision" else ActivationCache
        return cls(sub, getattr(self.model, part), has_batch_dim=self.has_batch_dim)

    @property
    def vision(self) -> ActivationCache:
        return self._part("vision")

    @property
    def lm(self) -> ActivationCache:
        return self._part("lm")


# ============================================================================================ the model
Tensorish = Union[torch.Tensor, Iterable[Iterable[int]]]


class HookedVLM(NestedSAEHostMixin, MultimodalHookedRootModule):
    """A LLaVA-style VLM with every activation of the vision tower, projector and language model hookable.

    Build with :meth:`from_pretrained` (a transformers ``LlavaForConditionalGeneration`` /
    ``LlavaNextForConditionalGeneration`` object, a hub repo id such as ``"llava-hf/llava-1.5-7b-hf"``, or a
    local directory). ``model(input_ids, pixel_values)`` returns the logits [batch, pos, d_vocab]; the image
    placeholders in ``input_ids`` (``cfg.image_token_id``, one per image-feature token) are replaced by the
    projected image features, as transformers does.
    """

    #: Parts where a bare hook name (as recorded on a standalone sub-model) may live, preferred first.
    BARE_NAME_PARTS = ("vision", "lm")

    activation_cache_class = VLMActivationCache

    def __init__(self, vision: HookedViT, projector: VLMProjector, lm: VLMLanguageModel, cfg: HookedVLMConfig,
                 image_newline: Optional[torch.Tensor] = None, processor: Any = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.projector = projector
        self.lm = lm
        if image_newline is not None:  # LLaVA-NeXT's learned row separator (the original Parameter)
            self.image_newline = image_newline
        #: [n_image_tokens_total, d_text]: the image features in the order they fill the placeholders
        #: (LLaVA: projector.hook_out flattened; LLaVA-NeXT: after crop packing and newline tokens).
        self.hook_image_features = HookPoint()
        #: The transformers processor (tokenizer + image processor) when loaded by name, else None.
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        #: bool [batch, pos]: image-token positions of the last forward (the prompt, during generate).
        self.last_image_token_mask: Optional[torch.Tensor] = None
        self._sae_locations: dict[str, tuple[str, str]] = {}
        self.setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, Path, nn.Module],
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        processor: Any = None,
        **source_kwargs: Any,
    ) -> "HookedVLM":
        """Hook a transformers LLaVA / LLaVA-NeXT model.

        ``model`` is a ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` object (its
        language model and projector modules are reused in place, sharing weights with it; the vision tower
        is converted to a HookedViT, a copy; the object itself is not modified), or a hub repo id / local directory
        whose ``config.json`` has ``model_type`` "llava" or "llava_next" (loaded with ``from_pretrained``;
        ``dtype`` and ``source_kwargs`` go there, e.g. ``attn_implementation="sdpa"``). ``processor``
        overrides the processor found next to the checkpoint.
        """
        if isinstance(model, (str, Path)):
            model, found = _load_vlm_source(str(model), dtype=dtype, **source_kwargs)
            processor = processor if processor is not None else found
        elif source_kwargs:
            raise TypeError(
                f"Keyword arguments {sorted(source_kwargs)} only apply when loading by name; got a built model."
            )
        if isinstance(model, HookedVLM):
            return model
        kind = type(model).__name__
        if kind not in _VLM_CLASSES:
            raise TypeError(
                f"HookedVLM.from_pretrained takes a transformers {' or '.join(_VLM_CLASSES)} (or a name); got "
                f"{type(model).__module__}.{kind}. For a vision tower alone use HookedViT.from_pretrained."
            )
        if dtype is not None:
            model = model.to(dtype)  # casts the given object: its language-model modules are shared
        config = model.config
        inner = model.model
        vision = HookedViT.from_pretrained(inner.vision_tower)
        projector = VLMProjector(inner.multi_modal_projector)
        lm = VLMLanguageModel(inner.language_model, model.lm_head)
        layers = config.vision_feature_layer
        n_vision = vision.cfg.n_layers
        resolved = [_resolve_feature_layer(l, n_vision) for l in (layers if isinstance(layers, (list, tuple)) else [layers])]
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"Unknown vision_feature_select_strategy {strategy!r}; LLaVA uses 'default' or 'full'.")
        is_next = kind.startswith("LlavaNext")
        cfg = HookedVLMConfig(
            image_token_id=int(config.image_token_id),
            vision_feature_layer=list(layers) if isinstance(layers, (list, tuple)) else int(layers),
            vision_feature_select_strategy=strategy,
            vision_layers_run=max(resolved),
            d_vision=vision.cfg.d_model,
            d_text=lm.cfg.d_model,
            image_seq_length=getattr(config, "image_seq_length", None),
            architecture="llava_next" if is_next else "llava",
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints] if is_next else None,
            model_name=getattr(model, "name_or_path", "") or kind,
            original_architecture=f"transformers.{kind}",
            device=lm.cfg.device,
            dtype=lm.cfg.dtype,
            extra={"hf_config": config.to_dict(), **_generation_ids(model)},
        )
        hooked = cls(vision, projector, lm, cfg, image_newline=getattr(inner, "image_newline", None) if is_next else None,
                     processor=processor)
        if device is not None:
            hooked.to(device)
        return hooked.eval()

    # ------------------------------------------------------------------ image tokens
    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [batch, pos]: True where ``input_ids`` holds the image placeholder (an image-feature token)."""
        return torch.as_tensor(input_ids) == self.cfg.image_token_id

    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the image tokens, LongTensor [batch, n_image_tokens] (every row must hold the same
        number; use :meth:`image_token_mask` otherwise)."""
        mask = self.image_token_mask(input_ids)
        counts = mask.sum(-1)
        if mask.ndim != 2:
            raise ValueError(f"input_ids must be [batch, pos], got shape {tuple(mask.shape)}.")
        if len(counts) and bool((counts != counts[0]).any()):
            raise ValueError(
                f"Rows hold different numbers of image tokens ({counts.tolist()}); positions do not form a "
                "tensor. Use model.image_token_mask(input_ids) instead."
            )
        return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)

    def text_token_mask(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool [batch, pos]: text (non-image, non-padding) positions."""
        mask = ~self.image_token_mask(input_ids)
        return mask & attention_mask.bool() if attention_mask is not None else mask

    # ------------------------------------------------------------------ vision -> image features
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the vision tower as far as ``vision_feature_layer`` needs and select LLaVA's features:
        [n_images (or crops), n_tokens, d_vision * n_feature_layers], the projector's input."""
        cfg = self.cfg
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
        wanted = [_resolve_feature_layer(l, self.vision.cfg.n_layers) for l in layers]
        x = self.vision(pixel_values, stop_at_layer=0)  # embeddings (+ ln_pre): transformers' hidden_states[0]
        states = [x]
        for block in self.vision.blocks[: max(wanted)]:
            x = block(x)
            states.append(x)
        feats = [states[k] for k in wanted]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image features as the language model receives them: [n_image_tokens_total, d_text], in the order
        they fill the image placeholders. LLaVA: pixel_values [n_images, C, H, W]. LLaVA-NeXT: pixel_values
        [n_images, n_crops, C, H, W] and ``image_sizes`` [n_images, 2] (the processor's outputs)."""
        if self.cfg.architecture == "llava_next":
            return self.hook_image_features(self._encode_images_next(pixel_values, image_sizes))
        if pixel_values.ndim != 4:
            raise ValueError(
                f"LLaVA expects pixel_values of shape (n_images, C, H, W), got {tuple(pixel_values.shape)}"
                + (": add the image dimension with pixel_values.unsqueeze(0)." if pixel_values.ndim == 3 else ".")
            )
        return self.hook_image_features(self.projector(self.vision_features(pixel_values)).flatten(0, 1))

    def _encode_images_next(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor]) -> torch.Tensor:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns it next to pixel_values).")
        grid = self.cfg.image_grid_pinpoints
        n_crops = [
            image_size_to_num_patches(image_size=s, grid_pinpoints=grid, patch_size=self.vision.cfg.image_size[0])
            for s in image_sizes
        ]
        if pixel_values.ndim == 5:
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_crops)], dim=0)
        elif pixel_values.ndim != 4:
            raise ValueError(f"LLaVA-NeXT pixel_values must have 4 or 5 dimensions, got {tuple(pixel_values.shape)}.")
        feats = self.projector(self.vision_features(pixel_values))
        # transformers' own packing (crop grid, unpadding, newline tokens); it reads only .config from self.
        shim = _ConfigShim(_next_config(self))
        packed, _ = LlavaNextModel.pack_image_features(
            shim, list(torch.split(feats, n_crops, dim=0)), image_sizes,
            vision_feature_select_strategy=self.cfg.vision_feature_select_strategy, image_newline=self.image_newline,
        )
        return torch.cat(packed, dim=0)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                     image_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The residual stream entering the language model's block 0: token embeddings (``lm.hook_embed``) with
        the image placeholders replaced by the image features."""
        embeds = self.lm.hook_embed(self.lm.embed(input_ids))
        if pixel_values is None:
            return embeds
        features = self.encode_images(pixel_values.to(self.vision.cfg.dtype), image_sizes)
        mask = self.image_token_mask(input_ids)
        n_tokens, n_features = int(mask.sum()), features.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"The prompt holds {n_tokens} image tokens (id {self.cfg.image_token_id}) but the images give "
                f"{n_features} image-feature tokens. Put one placeholder per feature token in input_ids (the "
                f"model's processor expands '<image>' to them; LLaVA 1.5: cfg.image_seq_length="
                f"{self.cfg.image_seq_length} per image)."
            )
        return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), features.to(embeds.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensorish,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
        return_type: Optional[Literal["logits", "resid"]] = "logits",
        stop_at_layer: Optional[int] = None,
        past_key_values: Any = None,
    ) -> Optional[torch.Tensor]:
        """Logits [batch, pos, d_vocab] of the language model on the prompt with the images spliced in.

        ``attention_mask`` [batch, pos] (1 = token, 0 = padding) as in transformers; ``position_ids`` default
        to 0..pos-1 as in transformers' forward (``generate`` derives them from the mask, as transformers'
        generate does). ``stop_at_layer=n`` returns the language model's residual stream after its blocks
        0..n-1; ``return_type="resid"`` the final normed residual stream; None runs for hooks only.
        """
        input_ids = self._as_ids(input_ids)
        self.last_image_token_mask = self.image_token_mask(input_ids)
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        return self.lm(embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, stop_at_layer=stop_at_layer, return_type=return_type)

    def _as_ids(self, input_ids: Tensorish) -> torch.Tensor:
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], str)):
            raise TypeError(
                "HookedVLM takes token ids. Build them (and pixel_values) with the model's processor: "
                "inputs = model.processor(images=image, text=prompt, return_tensors='pt'), then "
                "model(inputs['input_ids'], inputs['pixel_values'])."
            )
        ids = torch.as_tensor(input_ids, device=self.lm.embed.weight.device)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids [batch, pos], got {tuple(ids.shape)} {ids.dtype}.")
        return ids.long()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensorish,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        stop_at_eos: bool = True,
        pad_token_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Generate with a key/value cache; returns prompt + new tokens [batch, pos + n_new].

        The images are encoded once (the prompt pass); every later step feeds one token. Hooks, caching and
        SAEs apply at every step: use ``with model.hooks(fwd_hooks=...)`` / ``with model.saes(saes=[...])``
        around this call, or :meth:`generate_with_cache`. Language-model hooks see the prompt positions on the
        first step and one new position per later step (attention patterns [b, h, 1, pos_so_far]).
        Greedy by default (``do_sample=False``), which reproduces transformers' greedy ``generate``.
        """
        from transformers.cache_utils import DynamicCache

        ids = self._as_ids(input_ids)
        batch = ids.shape[0]
        mask = attention_mask.to(ids.device).long() if attention_mask is not None else torch.ones_like(ids)
        eos = eos_token_id if eos_token_id is not None else self._default_eos()
        eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else (eos or []), device=ids.device, dtype=torch.long)
        if pad_token_id is None:
            pad_token_id = self.cfg.extra.get("pad_token_id")
        pad = pad_token_id if pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
        cache = DynamicCache(config=self.lm.hf_config)
        # transformers' generate: positions count only real tokens (left padding).
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = self(ids, pixel_values, attention_mask=mask, position_ids=positions, image_sizes=image_sizes,
                      past_key_values=cache)
        prompt_image_mask = self.last_image_token_mask
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        out = ids
        for step in range(max_new_tokens):
            next_logits = logits[:, -1, :].float()
            token = self._sample(next_logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            out = torch.cat([out, token[:, None]], dim=1)
            if stop_at_eos and len(eos_ids):
                finished |= torch.isin(token, eos_ids)
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
            embeds = self.lm.hook_embed(self.lm.embed(token[:, None]))
            logits = self.lm(embeds, attention_mask=mask, position_ids=positions, past_key_values=cache)
        self.last_image_token_mask = prompt_image_mask
        return out

    def _default_eos(self) -> Optional[Union[int, list[int]]]:
        eos = self.cfg.extra.get("eos_token_id")  # the checkpoint's generation config, as transformers uses
        if eos is None:
            eos = (self.cfg.extra.get("hf_config") or {}).get("text_config", {}).get("eos_token_id")
        return eos if isinstance(eos, (int, list)) else None

    @staticmethod
    def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    def generate_with_cache(
        self,
        input_ids: Tensorish,
        pixel_values: Optional[torch.Tensor] = None,
        names_filter: Any = None,
        **generate_kwargs: Any,
    ) -> tuple[torch.Tensor, VLMActivationCache]:
        """``generate`` while caching activations: returns (tokens, cache).

        Language-model activations are concatenated over the steps along the position dimension, so the
        cache holds every processed position (the prompt and all generated tokens but the last, which is
        never fed back) as a forward on the generated sequence would; attention scores/patterns become
        [b, h, q, k] with future keys 0 (pattern) / the dtype's minimum (scores). Vision and projector
        activations come from the single image pass.
        """
        self._check_names_filter(names_filter)
        if names_filter is None:
            wanted = lambda name: True  # noqa: E731
        elif isinstance(names_filter, str):
            wanted = lambda name: name == names_filter  # noqa: E731
        elif callable(names_filter):
            wanted = names_filter
        else:
            names = set(names_filter)
            wanted = lambda name: name in names  # noqa: E731
        steps: dict[str, list[torch.Tensor]] = {}

        def save(tensor: torch.Tensor, hook: HookPoint) -> None:
            steps.setdefault(hook.name, []).append(tensor.detach())

        hooks = [(name, save) for name in self.hook_dict if wanted(name)]
        with self.hooks(fwd_hooks=hooks):
            tokens = self.generate(input_ids, pixel_values, **generate_kwargs)
        cache = {name: _concat_steps(name, parts) for name, parts in steps.items()}
        return tokens, VLMActivationCache(cache, self, has_batch_dim=True)

    # ------------------------------------------------------------------ hook names and SAEs
    def setup(self) -> None:
        if "vision" in self._modules:
            self._modules["vision"].setup()  # type: ignore[operator]
        super().setup()

    def part_and_name(self, name: str) -> tuple[str, str]:
        """Split a full hook name into (part, name within the part): ``("vision", "blocks.9.hook_resid_post")``."""
        part, _, rest = name.partition(".")
        if part not in PARTS or not rest:
            raise unknown_hook_error(name, self.hook_dict.keys())
        return part, rest

    def hook_width(self, name: str) -> Optional[int]:
        if name == "hook_image_features":
            return self.cfg.d_text
        part, rest = self.part_and_name(name)
        if part == "vision":
            return self.vision.hook_width(rest)
        tail = rest.rsplit(".", 1)[-1]
        if part == "projector":
            return self.cfg.d_vision * self._n_feature_layers() if tail == "hook_in" else self.cfg.d_text
        c = self.lm.cfg
        if tail in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z"):
            return c.d_head
        if tail in ("hook_pre", "hook_pre_linear", "hook_post"):
            return c.d_mlp
        if tail == "hook_logits":
            return c.d_vocab
        if tail in ("hook_attn_scores", "hook_pattern", "hook_scale", "hook_result"):
            return None if tail != "hook_result" else c.d_model
        return c.d_model

    def _n_feature_layers(self) -> int:
        layer = self.cfg.vision_feature_layer
        return len(layer) if isinstance(layer, list) else 1

    def _hook_z_width(self, hook_name: str, per_head: Optional[int]) -> Optional[int]:
        if hook_name == "hook_image_features":
            return per_head
        part, _ = self.part_and_name(hook_name)
        n_heads = self.vision.cfg.n_heads if part == "vision" else self.lm.cfg.n_heads
        return None if per_head is None else per_head * n_heads

    # ------------------------------------------------------------------ SAE splicing (core/nested.py)
    def _is_full_name(self, name: str) -> bool:
        return name.partition(".")[0] in PARTS or name == "hook_image_features"

    def _part_named_by_metadata(self, metadata: Any) -> Optional[str]:
        # TransformerLens language-model SAEs go to the LM; SAEs recorded on a standalone HookedViT to vision.
        cls_name = metadata.get("model_class_name")
        if cls_name in ("HookedTransformer", "HookedSAETransformer"):
            return "lm"
        return "vision" if cls_name == "HookedViT" else None

    def _apply(self, fn, *args, **kwargs):  # keep cfg.device/dtype in step with .to()/.half()
        out = super()._apply(fn, *args, **kwargs)
        w = self.lm.embed.weight
        self.cfg.device, self.cfg.dtype = str(w.device), w.dtype
        self.lm.cfg.device, self.lm.cfg.dtype = str(w.device), w.dtype
        return out


# ============================================================================================ helpers
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


def _concat_steps(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Join one hook's activations over generation steps (see HookedVLM.generate_with_cache)."""
    if len(parts) == 1 or not name.startswith("lm."):
        return parts[0]
    if name.endswith(("hook_attn_scores", "hook_pattern")):
        total = parts[-1].shape[-1]
        fill = 0.0 if name.endswith("hook_pattern") else torch.finfo(parts[0].dtype).min
        padded = [torch.nn.functional.pad(p, (0, total - p.shape[-1]), value=fill) for p in parts]
        return torch.cat(padded, dim=2)
    return torch.cat(parts, dim=1)


class _ConfigShim:
    def __init__(self, config: Any):
        self.config = config


def _next_config(model: HookedVLM) -> Any:
    from transformers import LlavaNextConfig

    cached = model.__dict__.get("_next_config_obj")
    if cached is None:
        cached = LlavaNextConfig.from_dict(model.cfg.extra["hf_config"])
        model.__dict__["_next_config_obj"] = cached
    return cached


def _load_vlm_source(name: str, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> tuple[Any, Any]:
    """The transformers LLaVA model and processor (or None) a hub repo id / local directory holds."""
    import transformers

    from sae_lens_multimodal.models.conversions._hf_common import _HUB_KWARGS, read_hf_config

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
    model = classes[model_type].from_pretrained(name, **kwargs).eval()
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    try:
        processor = transformers.AutoProcessor.from_pretrained(name, **hub)
    except (OSError, ValueError, KeyError, TypeError):  # no processor files there (or not reachable offline)
        processor = None
    return model, processor


# ============================================================================================ tiny models
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
    import transformers

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
