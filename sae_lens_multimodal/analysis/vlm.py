"""How visual information flows through a LLaVA-style VLM (:class:`~sae_lens_multimodal.models.vlm.HookedVLM`).

* :func:`text_to_image_attention`: how much attention each text token pays to the image tokens, per layer
  and head (and which image tokens it attends to).
* :func:`image_logit_lens`: the language model's unembedding read off the residual stream at the image-token
  positions, layer by layer (what the image tokens "say" as words).
* :func:`patch_image_tokens`: activation patching of the image tokens per layer (clean image -> corrupted
  image run) with a metric on the answer logits: where the image's information is still carried by the
  image tokens, and from which layer on the text tokens have already read it.
* :func:`steer_vision_feature`: clamp one feature of a vision SAE (e.g. an SAE trained on a CLIP vision
  tower, spliced by its HookedViT hook name) inside the VLM's vision tower and measure the change in the
  answer against random directions of the same size.

Every function runs the model with temporary hooks only (removed also when a hook raises) and keeps only
the reduced quantities, so they scale to 7B checkpoints. docs/vlm.md shows them on a real LLaVA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch

from sae_lens_multimodal.core.arguments import (
    as_feature_index,
    as_indices,
    as_layer_indices,
    check_latent_value,
    finite_float,
)

__all__ = [
    "ImageAttention",
    "ImageLogitLens",
    "ImagePatchingResult",
    "VisionSteeringResult",
    "text_to_image_attention",
    "image_logit_lens",
    "patch_image_tokens",
    "steer_vision_feature",
    "answer_logit_metric",
]

Tokens = Union[int, Sequence[int], torch.Tensor]
PATCHABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _inputs(model: Any, input_ids: Any, attention_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = model._as_ids(input_ids)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device).long()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}.")
    return ids, mask


def _per_row(tokens: Tokens, batch: int, device: torch.device, what: str) -> torch.Tensor:
    t = torch.as_tensor(tokens, device=device, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{what} must be one token id or one per batch row ({batch}); got {t.numel()}.")
    return t


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding allowed; left padding ends at pos - 1)."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (pos * mask).argmax(-1)


# ============================================================================================ attention
@dataclass
class ImageAttention:
    """Attention from text tokens to image tokens.

    ``mass[b, layer, head, q]``: the attention query position q pays to all image tokens together (0..1);
    ``to_image_tokens[b, layer, head, i]``: the attention to image token i, averaged over the query
    positions in ``query_mask``; ``query_mask[b, q]``: the text tokens averaged over (default: every text
    token after the first image token; earlier ones cannot see the image).
    """

    mass: torch.Tensor
    to_image_tokens: torch.Tensor
    query_mask: torch.Tensor
    image_mask: torch.Tensor

    def by_layer_head(self) -> torch.Tensor:
        """[n_layers, n_heads]: the mean over the batch and the query text tokens of ``mass``."""
        w = self.query_mask[:, None, None, :].to(self.mass.dtype)
        per_row = (self.mass * w).sum(-1) / w.sum(-1).clamp_min(1)
        return per_row.mean(0)

    def by_layer(self) -> torch.Tensor:
        """[n_layers]: ``by_layer_head`` averaged over heads."""
        return self.by_layer_head().mean(-1)


@torch.no_grad()
def text_to_image_attention(
    model: Any,
    input_ids: Any,
    pixel_values: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    layers: Optional[Sequence[int]] = None,
) -> ImageAttention:
    """Attention paid by text tokens to image tokens, per layer and head (one forward pass).

    ``query_mask`` (bool [batch, pos]) picks the query positions to average in ``to_image_tokens``
    (default: the text tokens after the first image token, without padding). ``layers`` defaults to all.
    Rows must hold the same number of image tokens.
    """
    ids, mask = _inputs(model, input_ids, attention_mask)
    image_mask = model.image_token_mask(ids)
    image_pos = model.image_token_positions(ids)
    if image_pos.shape[1] == 0:
        raise ValueError(f"input_ids hold no image tokens (id {model.cfg.image_token_id}).")
    if query_mask is None:
        after_image = image_mask.long().cumsum(-1) > 0
        query_mask = after_image & ~image_mask & mask.bool()
    query_mask = query_mask.to(ids.device).bool()
    layer_ids = list(range(model.lm.cfg.n_layers)) if layers is None else as_layer_indices(
        layers, model.lm.cfg.n_layers, model="the language model")
    mass: dict[int, torch.Tensor] = {}
    to_tokens: dict[int, torch.Tensor] = {}
    w = query_mask.float()
    gather = image_pos[:, None, None, :]

    def reduce(layer: int) -> Callable:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            p = pattern.float()  # [b, h, q, k]
            img = torch.take_along_dim(p, gather.expand(-1, p.shape[1], p.shape[2], -1), dim=-1)  # [b, h, q, n_img]
            mass[layer] = img.sum(-1)
            to_tokens[layer] = (img * w[:, None, :, None]).sum(2) / w.sum(-1).clamp_min(1)[:, None, None]
        return hook

    hooks = [(f"lm.blocks.{l}.attn.hook_pattern", reduce(l)) for l in layer_ids]
    model.run_with_hooks(ids, pixel_values, attention_mask=attention_mask, image_sizes=image_sizes,
                         return_type=None, fwd_hooks=hooks)
    return ImageAttention(
        mass=torch.stack([mass[l] for l in layer_ids], dim=1),
        to_image_tokens=torch.stack([to_tokens[l] for l in layer_ids], dim=1),
        query_mask=query_mask,
        image_mask=image_mask,
    )


# ============================================================================================ logit lens
@dataclass
class ImageLogitLens:
    """The logit lens at the image-token positions.

    ``layers[j]`` is a residual-stream index: 0 = entering block 0 (the projected image features), i + 1 =
    after block i (TransformerLens's ``accumulated_resid`` order). ``top_tokens`` / ``top_logprobs``
    [n_sel_layers, batch, n_image_tokens, k]; ``token_logprobs`` [n_sel_layers, batch, n_image_tokens,
    n_tokens] for the requested ``tokens`` (None without).
    """

    layers: list[int]
    image_positions: torch.Tensor
    top_tokens: torch.Tensor
    top_logprobs: torch.Tensor
    token_logprobs: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor]

    def decode(self, tokenizer: Any, layer: int, batch: int = 0) -> list[list[str]]:
        """The top tokens as strings for one residual-stream index: one list per image token."""
        j = self.layers.index(layer)
        return [[tokenizer.decode([int(t)]) for t in row] for row in self.top_tokens[j, batch]]


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    # The language model's final RMSNorm (weight applied), without firing its hooks.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.w * h.to(x.dtype)


@torch.no_grad()
def image_logit_lens(
    model: Any,
    input_ids: Any,
    pixel_values: torch.Tensor,
    *,
    layers: Optional[Sequence[int]] = None,
    top_k: int = 5,
    tokens: Optional[Sequence[int]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
) -> ImageLogitLens:
    """Apply the final norm and unembedding to the residual stream at every image-token position.

    ``layers``: residual-stream indices 0..n_layers (default all; n_layers gives the model's own logits at
    those positions). ``tokens``: token ids whose log-probabilities to report (e.g. object names).
    """
    ids, _ = _inputs(model, input_ids, attention_mask)
    image_pos = model.image_token_positions(ids)
    if image_pos.shape[1] == 0:
        raise ValueError(f"input_ids hold no image tokens (id {model.cfg.image_token_id}).")
    n_layers = model.lm.cfg.n_layers
    # residual-stream indices 0..n_layers (n_layers: after the last block)
    sel = list(range(n_layers + 1)) if layers is None else as_indices(
        layers, n_layers + 1, what="layers", noun="layer", owner=f"residual-stream indices run 0..{n_layers}")
    resid: dict[int, torch.Tensor] = {}
    index = image_pos[..., None]

    def keep(j: int) -> Callable:
        def hook(x: torch.Tensor, hook: Any) -> None:
            resid[j] = torch.take_along_dim(x, index.expand(-1, -1, x.shape[-1]), dim=1)
        return hook

    hooks = [("lm.blocks.0.hook_resid_pre" if j == 0 else f"lm.blocks.{j - 1}.hook_resid_post", keep(j)) for j in sel]
    model.run_with_hooks(ids, pixel_values, attention_mask=attention_mask, image_sizes=image_sizes,
                         stop_at_layer=max(sel), fwd_hooks=hooks)
    tok = torch.as_tensor(list(tokens), device=ids.device, dtype=torch.long) if tokens is not None else None
    tops, top_lp, tok_lp = [], [], []
    for j in sel:
        logprobs = model.lm.unembed(_rms_norm(model.lm.ln_final, resid[j])).float().log_softmax(-1)
        v, i = logprobs.topk(top_k, dim=-1)
        tops.append(i)
        top_lp.append(v)
        if tok is not None:
            tok_lp.append(logprobs[..., tok])
    return ImageLogitLens(
        layers=sel, image_positions=image_pos, top_tokens=torch.stack(tops), top_logprobs=torch.stack(top_lp),
        token_logprobs=torch.stack(tok_lp) if tok is not None else None, tokens=tok,
    )


# ============================================================================================ patching
def answer_logit_metric(
    answer_tokens: Tokens,
    foil_tokens: Optional[Tokens] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A metric on logits [batch, pos, vocab]: the answer token's logit at each row's last real position
    (minus the foil token's, when given), averaged over the batch."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones(logits.shape[:2], device=logits.device)
        last = logits[torch.arange(b, device=logits.device), _last_positions(mask.to(logits.device))].float()
        ans = _per_row(answer_tokens, b, logits.device, "answer_tokens")
        value = last.gather(-1, ans[:, None])[:, 0]
        if foil_tokens is not None:
            value = value - last.gather(-1, _per_row(foil_tokens, b, logits.device, "foil_tokens")[:, None])[:, 0]
        return value.mean()

    return metric


@dataclass
class ImagePatchingResult:
    """Activation patching of the image tokens: the corrupted-image run with the clean run's activation at
    ``lm.blocks.{layer}.hook_{hook}`` on the image-token positions.

    ``patched[layer]`` (or ``[layer, image_token]`` when patched one position at a time) is the metric;
    :attr:`recovered` normalises it: 0 = the corrupted run, 1 = the clean run.
    """

    hook: str
    layers: list[int]
    clean: float
    corrupted: float
    patched: torch.Tensor

    @property
    def recovered(self) -> torch.Tensor:
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-12:
            raise ValueError("The clean and corrupted runs give the same metric, so recovery is undefined.")
        return (self.patched - self.corrupted) / gap


@torch.no_grad()
def patch_image_tokens(
    model: Any,
    input_ids: Any,
    clean_pixel_values: torch.Tensor,
    corrupted_pixel_values: torch.Tensor,
    *,
    answer_tokens: Optional[Tokens] = None,
    foil_tokens: Optional[Tokens] = None,
    metric: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    hook: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "resid_pre",
    layers: Optional[Sequence[int]] = None,
    per_position: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
) -> ImagePatchingResult:
    """Patch the clean image's activations into the corrupted-image run at the image tokens, layer by layer.

    The prompt is the same in both runs; only the image differs. ``metric(logits) -> scalar`` defaults to
    :func:`answer_logit_metric` (``answer_tokens`` minus ``foil_tokens`` logit at the last position).
    ``per_position=True`` patches one image token at a time ([n_layers, n_image_tokens] forwards).
    """
    if hook not in PATCHABLE:
        raise ValueError(f"hook must be one of {PATCHABLE}, got {hook!r}.")
    if metric is None:
        if answer_tokens is None:
            raise ValueError("Pass answer_tokens (and optionally foil_tokens), or a metric(logits) function.")
        metric = answer_logit_metric(answer_tokens, foil_tokens, attention_mask)
    ids, _ = _inputs(model, input_ids, attention_mask)
    image_pos = model.image_token_positions(ids)
    n_img = image_pos.shape[1]
    if n_img == 0:
        raise ValueError(f"input_ids hold no image tokens (id {model.cfg.image_token_id}).")
    layer_ids = list(range(model.lm.cfg.n_layers)) if layers is None else as_layer_indices(
        layers, model.lm.cfg.n_layers, model="the language model")
    names = {l: f"lm.blocks.{l}.hook_{hook}" for l in layer_ids}
    kw = dict(attention_mask=attention_mask, image_sizes=image_sizes)
    clean_acts: dict[int, torch.Tensor] = {}
    index = image_pos[..., None]

    def keep(l: int) -> Callable:
        def fn(x: torch.Tensor, hook: Any) -> None:
            clean_acts[l] = torch.take_along_dim(x, index.expand(-1, -1, x.shape[-1]), dim=1)
        return fn

    clean_logits = model.run_with_hooks(ids, clean_pixel_values, fwd_hooks=[(names[l], keep(l)) for l in layer_ids], **kw)
    clean = float(metric(clean_logits))
    corrupted = float(metric(model(ids, corrupted_pixel_values, **kw)))

    def patch(l: int, which: Optional[int]) -> Callable:
        def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
            cols = image_pos if which is None else image_pos[:, which:which + 1]
            vals = clean_acts[l] if which is None else clean_acts[l][:, which:which + 1]
            x = x.clone()
            x.scatter_(1, cols[..., None].expand(-1, -1, x.shape[-1]), vals.to(x.dtype))
            return x
        return fn

    rows = []
    for l in layer_ids:
        targets: list[Optional[int]] = list(range(n_img)) if per_position else [None]
        vals = [float(metric(model.run_with_hooks(ids, corrupted_pixel_values, fwd_hooks=[(names[l], patch(l, t))], **kw)))
                for t in targets]
        rows.append(vals if per_position else vals[0])
    return ImagePatchingResult(hook=hook, layers=layer_ids, clean=clean, corrupted=corrupted,
                               patched=torch.tensor(rows, dtype=torch.float64))


# ============================================================================================ steering
@dataclass
class VisionSteeringResult:
    """One vision-SAE feature clamped in the VLM's vision tower, against random directions.

    Per batch row: ``clean`` / ``steered`` answer logits and ``random`` [n_random, batch] (the same
    per-token intervention norm along random directions at the same hook and positions); ``*_prob`` the
    answer probabilities; ``clean_top`` / ``steered_top`` the argmax token at the last position, and
    ``clean_answer`` / ``steered_answer`` greedy continuations when ``max_new_tokens > 0`` was asked.
    """

    hook: str
    feature: int
    value: float
    answer_tokens: torch.Tensor
    clean: torch.Tensor
    steered: torch.Tensor
    random: torch.Tensor
    clean_prob: torch.Tensor
    steered_prob: torch.Tensor
    random_prob: torch.Tensor
    clean_top: torch.Tensor
    steered_top: torch.Tensor
    intervention_norm: torch.Tensor
    clean_answer: Optional[torch.Tensor] = None
    steered_answer: Optional[torch.Tensor] = None

    @property
    def effect(self) -> torch.Tensor:
        """Change of the answer logit by the feature clamp, [batch]."""
        return self.steered - self.clean

    @property
    def random_effect(self) -> torch.Tensor:
        """Changes by the random directions, [n_random, batch]."""
        return self.random - self.clean[None]

    @property
    def z_score(self) -> torch.Tensor:
        """(effect - mean random effect) / std of the random effects, [batch]."""
        r = self.random_effect
        return (self.effect - r.mean(0)) / r.std(0).clamp_min(1e-12)

    @property
    def fraction_random_below(self) -> torch.Tensor:
        """Share of random directions whose |effect| is below the feature's, [batch] (1 = beats them all)."""
        return (self.random_effect.abs() < self.effect.abs()[None]).float().mean(0)

    @property
    def answer_changed(self) -> torch.Tensor:
        """bool [batch]: the argmax token at the last position differs after the clamp."""
        return self.steered_top != self.clean_top


def _sae_delta(sae: Any, x: torch.Tensor, feature: int, value: float, positions: torch.Tensor) -> torch.Tensor:
    """decode(clamped) - decode(original) at the chosen positions: the clamp's change to the activation
    (the SAE's reconstruction error is kept, so nothing else changes)."""
    h = x.to(sae.W_dec.dtype)
    acts = sae.encode(h)
    clamped = acts.clone()
    clamped[..., feature] = value
    delta = (sae.decode(clamped) - sae.decode(acts)).to(x.dtype)
    return delta * positions.to(x.dtype)[None, :, None]


@torch.no_grad()
def steer_vision_feature(
    model: Any,
    sae: Any,
    feature: int,
    input_ids: Any,
    pixel_values: torch.Tensor,
    *,
    value: float,
    answer_tokens: Tokens,
    positions: Union[Literal["all", "image_tokens"], Sequence[int]] = "all",
    n_random: int = 16,
    seed: int = 0,
    max_new_tokens: int = 0,
    attention_mask: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
) -> VisionSteeringResult:
    """Clamp SAE feature ``feature`` to ``value`` in the vision tower and measure the VLM's answer.

    ``sae`` is an SAELens SAE at a vision hook: its ``hook_name`` is a bare HookedViT name (an SAE trained on
    the CLIP tower alone) or ``vision.``-prefixed. The clamp replaces the feature's activation at every
    chosen vision position and keeps the SAE's reconstruction error (the activation changes by
    ``decode(clamped) - decode(original)``). ``positions``: ``"all"`` vision tokens, ``"image_tokens"`` (those
    the projector passes on, i.e. without CLS under the "default" strategy) or explicit vision positions.
    The baseline adds, at the same hook and positions, random directions (seeded) with the clamp's
    per-token norm. ``answer_tokens``: the token(s) whose logit at the last position is the answer.
    """
    location = model.locate(sae).name
    if not location.startswith("vision."):
        raise ValueError(f"steer_vision_feature steers the vision tower; this SAE splices at {location!r}.")
    feature = as_feature_index(feature, int(sae.cfg.d_sae), what="feature")
    value = finite_float(value, "value")
    check_latent_value(sae, "clamp", torch.tensor([value]))
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random is a number of random baseline directions, an int >= 0; got {n_random!r}.")
    ids, mask = _inputs(model, input_ids, attention_mask)
    batch = ids.shape[0]
    answers = _per_row(answer_tokens, batch, ids.device, "answer_tokens")
    kw = dict(attention_mask=attention_mask, image_sizes=image_sizes)
    last = _last_positions(mask)
    rows = torch.arange(batch, device=ids.device)

    def readout(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        final = logits[rows, last].float()
        ans = final.gather(-1, answers[:, None])[:, 0]
        return ans, final.softmax(-1).gather(-1, answers[:, None])[:, 0], final.argmax(-1)

    clean, clean_p, clean_top = readout(model(ids, pixel_values, **kw))
    norms: list[torch.Tensor] = []

    def pos_mask(n_tokens: int, device: torch.device) -> torch.Tensor:
        m = torch.zeros(n_tokens, dtype=torch.bool, device=device)
        if positions == "all":
            m[:] = True
        elif positions == "image_tokens":
            m[model.cfg.vision_token_offset:] = True
        else:
            m[list(positions)] = True
        return m

    def clamp_hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        delta = _sae_delta(sae, x, feature, value, pos_mask(x.shape[1], x.device))
        norms.append(delta.norm(dim=-1))
        return x + delta

    steered_logits = model.run_with_hooks(ids, pixel_values, fwd_hooks=[(location, clamp_hook)], **kw)
    steered, steered_p, steered_top = readout(steered_logits)
    token_norm = norms[-1]  # [n_images, n_vision_tokens]: the clamp's size per token
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand, rand_p = [], []
    for _ in range(n_random):
        direction = torch.randn(sae.cfg.d_in, generator=gen).to(token_norm.device)
        direction = direction / direction.norm()

        def random_hook(x: torch.Tensor, hook: Any, direction: torch.Tensor = direction) -> torch.Tensor:
            return x + (token_norm[..., None] * direction.to(x.dtype)).to(x.dtype)

        a, p, _ = readout(model.run_with_hooks(ids, pixel_values, fwd_hooks=[(location, random_hook)], **kw))
        rand.append(a)
        rand_p.append(p)
    clean_answer = steered_answer = None
    if max_new_tokens > 0:
        clean_answer = model.generate(ids, pixel_values, max_new_tokens=max_new_tokens, **kw)[:, ids.shape[1]:]
        with model.hooks(fwd_hooks=[(location, clamp_hook)]):
            steered_answer = model.generate(ids, pixel_values, max_new_tokens=max_new_tokens, **kw)[:, ids.shape[1]:]
    return VisionSteeringResult(
        hook=location, feature=int(feature), value=float(value), answer_tokens=answers,
        clean=clean, steered=steered, random=torch.stack(rand) if rand else clean.new_zeros(0, batch),
        clean_prob=clean_p, steered_prob=steered_p,
        random_prob=torch.stack(rand_p) if rand_p else clean.new_zeros(0, batch),
        clean_top=clean_top, steered_top=steered_top, intervention_norm=token_norm,
        clean_answer=clean_answer, steered_answer=steered_answer,
    )
