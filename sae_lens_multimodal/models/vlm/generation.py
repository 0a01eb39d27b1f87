"""Generation for HookedVLM: a key/value-cached sampling loop with hooks and SAEs applied at every step,
and ``generate_with_cache`` (activations joined over the steps)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.models.vlm.cache import VLMActivationCache
from sae_lens_multimodal.models.vlm.config import Tensorish

__all__ = ["VLMGenerationMixin"]

class VLMGenerationMixin:
    """``generate`` / ``generate_with_cache`` of :class:`HookedVLM` (which provides ``cfg``, ``lm``,
    ``_as_ids``, ``forward`` and the hook machinery)."""

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
        from transformers.cache_utils import DynamicCache  # optional heavy dependency

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
