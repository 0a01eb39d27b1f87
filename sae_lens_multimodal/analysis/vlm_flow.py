"""Attention knockout in a LLaVA-style VLM (:class:`~sae_lens_multimodal.models.vlm.HookedVLM`): where does the
language model read the image?

Knocking out attention edges (Geva et al. 2023, "Dissecting recall"; applied to VLMs by e.g. Neo et al.
2024) blocks some query positions from attending to the image tokens in a window of language-model layers,
by setting those attention scores to the dtype's minimum before the softmax (``lm.blocks.{l}.attn.
hook_attn_scores``). The rest of the computation is unchanged, so a drop in the answer's probability means
the blocked edges carried information the answer needs.

* ``queries="answer"``: only the position that predicts the answer (the last prompt token; during
  generation also every generated token) is blocked: does the answer position read the image itself, in
  these layers?
* ``queries="text"``: every text position (the question too) is blocked: in these layers no text token
  reads the image. Blocking every layer this way leaves the answer no path to the image (chance level).

:func:`image_knockout_hooks` gives the hooks (for ``model.hooks(...)`` around a forward or ``generate``);
:func:`attention_knockout` runs windows of layers and reports the answer-token probability per window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch

from sae_lens_multimodal.core.arguments import as_layer_indices, positive_int

__all__ = ["KNOCKOUT_QUERIES", "KnockoutResult", "image_knockout_hooks", "attention_knockout", "layer_windows"]

KNOCKOUT_QUERIES = ("answer", "text")
Window = tuple[int, int]


def _query_mask(model: Any, ids: torch.Tensor, mask: torch.Tensor, queries: str) -> torch.Tensor:
    """bool [batch, pos]: the prompt positions whose attention to the image is blocked."""
    if queries not in KNOCKOUT_QUERIES:
        raise ValueError(f"queries must be one of {KNOCKOUT_QUERIES}, got {queries!r}.")
    if queries == "text":
        return ~model.image_token_mask(ids) & mask.bool()
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (pos * mask).argmax(-1)  # each row's last real token (left or right padding)
    return pos == last[:, None]


def image_knockout_hooks(
    model: Any,
    input_ids: Any,
    layers: Sequence[int],
    *,
    queries: Literal["answer", "text"] = "answer",
    attention_mask: Optional[torch.Tensor] = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks that block attention from the ``queries`` positions of ``input_ids`` (the prompt) to its
    image tokens in the language-model blocks ``layers``. Positions after the prompt (tokens ``generate``
    adds) are always blocked. Use with ``model.hooks(fwd_hooks=...)`` / ``model.run_with_hooks``."""
    ids = model._as_ids(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}.")
    image = model.image_token_mask(ids)
    if not bool(image.any()):
        raise ValueError(f"input_ids hold no image tokens (id {model.cfg.image_token_id}); nothing to knock out.")
    query = _query_mask(model, ids, mask, queries)
    n_prompt = ids.shape[1]
    layer_ids = as_layer_indices(list(layers), model.lm.cfg.n_layers, model="the language model") if len(layers) else []

    def block(scores: torch.Tensor, hook: Any) -> torch.Tensor:
        n_q, n_k = scores.shape[-2:]
        q_pos = torch.arange(n_k - n_q, n_k, device=scores.device)  # absolute query positions (KV cache aware)
        q_sel = torch.ones(scores.shape[0], n_q, dtype=torch.bool, device=scores.device)
        inside = q_pos < n_prompt
        q_sel[:, inside] = query[:, q_pos[inside]].to(scores.device)
        k_sel = torch.zeros(scores.shape[0], n_k, dtype=torch.bool, device=scores.device)
        k_sel[:, :min(n_k, n_prompt)] = image[:, :n_k].to(scores.device)
        edges = q_sel[:, None, :, None] & k_sel[:, None, None, :]
        return scores.masked_fill(edges, torch.finfo(scores.dtype).min)

    return [(f"lm.blocks.{l}.attn.hook_attn_scores", block) for l in layer_ids]


def layer_windows(n_layers: int, window: int = 1) -> list[Window]:
    """Sliding windows ``[start, start + window)`` over ``n_layers`` blocks, plus none ``(0, 0)`` first and
    all ``(0, n_layers)`` last."""
    window = positive_int(window, "window")
    if window > n_layers:
        raise ValueError(f"window={window} is wider than the language model's {n_layers} blocks.")
    return [(0, 0)] + [(s, s + window) for s in range(n_layers - window + 1)] + [(0, n_layers)]


@dataclass
class KnockoutResult:
    """Attention knockout per window of layers.

    ``windows[j] = (start, stop)`` (blocks ``start .. stop - 1``; ``(0, 0)`` knocks out nothing);
    ``answer_prob[j, b]`` is the probability of row b's answer token at its last position with window j
    knocked out, ``top_token[j, b]`` the arg-max token there; ``clean_prob`` / ``clean_top`` without knockout.
    """

    queries: str
    windows: list[Window]
    answer_prob: torch.Tensor
    top_token: torch.Tensor
    clean_prob: torch.Tensor
    clean_top: torch.Tensor
    answer_tokens: torch.Tensor

    @property
    def drop(self) -> torch.Tensor:
        """Mean drop of the answer's probability per window (clean minus knocked out), [n_windows]."""
        return (self.clean_prob[None] - self.answer_prob).mean(-1)

    @property
    def relative_prob(self) -> torch.Tensor:
        """Mean knocked-out / clean answer probability per window, [n_windows] (1: no effect)."""
        return (self.answer_prob / self.clean_prob.clamp_min(1e-12)[None]).mean(-1)

    @property
    def changed(self) -> torch.Tensor:
        """Share of rows whose arg-max token changes under each window's knockout, [n_windows]."""
        return (self.top_token != self.clean_top[None]).float().mean(-1)

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of rows whose arg-max token is the answer token, per window, [n_windows]."""
        return (self.top_token == self.answer_tokens[None]).float().mean(-1)


@torch.no_grad()
def attention_knockout(
    model: Any,
    input_ids: Any,
    pixel_values: torch.Tensor,
    answer_tokens: Union[int, Sequence[int], torch.Tensor],
    *,
    windows: Optional[Sequence[Window]] = None,
    window: int = 1,
    queries: Literal["answer", "text"] = "answer",
    attention_mask: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
) -> KnockoutResult:
    """Knock out attention to the image tokens in each window of layers and read the answer token's
    probability at the last prompt position. ``windows``: ``(start, stop)`` pairs (default
    :func:`layer_windows` with ``window``); ``answer_tokens``: one id, or one per row (the first token of
    each row's expected answer)."""
    ids = model._as_ids(input_ids)
    n_layers = model.lm.cfg.n_layers
    windows = layer_windows(n_layers, window) if windows is None else [(int(a), int(b)) for a, b in windows]
    for a, b in windows:
        if not 0 <= a <= b <= n_layers:
            raise ValueError(f"window ({a}, {b}) is not 0 <= start <= stop <= {n_layers} (the LM's blocks).")
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
    answers = torch.as_tensor(answer_tokens, device=ids.device, dtype=torch.long).reshape(-1)
    if answers.numel() == 1:
        answers = answers.expand(ids.shape[0])
    if answers.numel() != ids.shape[0]:
        raise ValueError(f"answer_tokens must be one token id or one per batch row ({ids.shape[0]}); got {answers.numel()}.")
    rows = torch.arange(ids.shape[0], device=ids.device)
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (pos * mask).argmax(-1)

    def read(fwd_hooks: list) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model.run_with_hooks(ids, pixel_values, attention_mask=mask, image_sizes=image_sizes, fwd_hooks=fwd_hooks)
        probs = logits[rows, last].float().softmax(-1)
        return probs[rows, answers], probs.argmax(-1)

    clean_prob, clean_top = read([])
    probs, tops = [], []
    for a, b in windows:
        hooks = image_knockout_hooks(model, ids, range(a, b), queries=queries, attention_mask=mask) if b > a else []
        p, t = read(hooks)
        probs.append(p)
        tops.append(t)
    return KnockoutResult(queries=queries, windows=windows, answer_prob=torch.stack(probs), top_token=torch.stack(tops),
                          clean_prob=clean_prob, clean_top=clean_top, answer_tokens=answers)
