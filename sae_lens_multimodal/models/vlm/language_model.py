"""The VLM's language model with TransformerLens hook points: RMSNorm, rotary attention, gated MLP,
decoder block and the whole decoder, running the transformers model's own modules."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.hooked_root import is_observed
from sae_lens_multimodal.models.vlm.config import SUPPORTED_LANGUAGE_MODELS, VLMLanguageConfig

__all__ = ["VLMAttention", "VLMDecoderBlock", "VLMGatedMLP", "VLMLanguageModel", "VLMRMSNorm"]


def _observed(module: Optional[nn.Module]) -> bool:
    # A spliced SAE (not a HookPoint) always has to run; a bare HookPoint only when something watches it.
    return module is not None and (not isinstance(module, HookPoint) or is_observed(module))


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
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # optional heavy dependency

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
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # optional heavy dependency

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
