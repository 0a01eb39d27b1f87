"""Free text labels for vision features (SAE latents or any residual directions), validated.

Projecting a feature's decoder direction naively into text space fails away from the last layers: the
direction is read and transformed by later layers before it reaches the embedding. Two labels are given,
with scores that say which to trust:

``direct-path``
    The decoder direction ``d`` goes through the direct path only: the final LayerNorm linearised at the
    real activation of each reference image (its Jacobian there: the real scale, plus the first-order
    change of the scale itself) and the projection, i.e. the first-order change of the image embedding if
    ``d`` were added to the residual that the head reads and no layer in between reacted. **validity** is the share of the feature's real effect on the
    embedding that this direct path accounts for: ``1 - sum |total - direct|^2 / sum |total|^2`` over the
    reference images (clipped to [0, 1]), where ``total`` is the embedding change in the real forward pass
    under the same intervention. Near 1 for features at the last layer; low where later layers carry the
    effect, and then the direct-path label should not be trusted.

``causal``
    The feature is added (or clamped, or ablated) in the real forward pass on the reference images, and
    the change of the normalised image embedding, averaged over images, is read against the vocabulary.

Both label vectors are changes of normalised image embeddings, compared with the vocabulary's text
embeddings after removing the modality gap: text embeddings are centred (their vocabulary mean removed)
and, on the image side, a difference of image embeddings has no image mean left; the component along the
mean image embedding (the direction every image shares) is removed as well. **agreement** is the Pearson
correlation of the two labels' scores over the vocabulary (``top_k_overlap`` the overlap of their top k).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F

from sae_lens_multimodal.analysis.decomposition import direct_path_matrix, read_weights
from sae_lens_multimodal.analysis.vocabulary import Vocabulary, VocabularyLike, load_vocabulary
from sae_lens_multimodal.analysis.zero_shot import class_text_embeddings
from sae_lens_multimodal.core.positions import token_mask
from sae_lens_multimodal.core.hooked_root import has_parts

__all__ = [
    "LABEL_TEMPLATES",
    "METHODS",
    "FeatureLabels",
    "LabelReport",
    "label_features",
    "direct_path_labels",
    "causal_labels",
    "vocabulary_text_embeddings",
]

#: Prompt templates whose averaged embeddings represent a vocabulary word.
LABEL_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}.")
METHODS = ("direct-path", "causal")
Intervention = Literal["add", "clamp", "ablate"]

_RESID = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out)$")
_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


# ---------------------------------------------------------------------------------------------- report
@dataclass
class FeatureLabels:
    """Labels of one feature: top-k (word, score) lists, validity of the direct path, and agreement."""

    feature: int
    direct_path: Optional[list[tuple[str, float]]]
    causal: Optional[list[tuple[str, float]]]
    validity: Optional[float]
    agreement: Optional[float]
    top_k_overlap: Optional[float]

    @property
    def label(self) -> Optional[str]:
        """The best single label: the causal top word when computed, else the direct-path top word."""
        best = self.causal or self.direct_path
        return best[0][0] if best else None


@dataclass
class LabelReport:
    """Labels of many features. Scores are cosine similarities in the de-gapped joint space, [F, V]."""

    vocabulary: Vocabulary
    feature_ids: list[int]
    hook_name: str
    intervention: str
    #: The intervention's per-feature size: added activation (add), clamp value (clamp), or NaN (ablate).
    strength: torch.Tensor
    k: int
    direct_scores: Optional[torch.Tensor] = None
    causal_scores: Optional[torch.Tensor] = None
    validity: Optional[torch.Tensor] = None
    agreement: Optional[torch.Tensor] = None
    top_k_overlap: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.feature_ids)

    def _row(self, feature: int) -> int:
        try:
            return self.feature_ids.index(feature)
        except ValueError:
            raise KeyError(f"Feature {feature} was not labelled; labelled features: {self.feature_ids[:20]}...") from None

    def _top(self, scores: Optional[torch.Tensor], row: int, k: int) -> Optional[list[tuple[str, float]]]:
        if scores is None:
            return None
        vals, idx = scores[row].topk(min(k, scores.shape[1]))
        return [(self.vocabulary[int(i)], float(v)) for v, i in zip(vals, idx)]

    def __getitem__(self, feature: int) -> FeatureLabels:
        row = self._row(feature)

        def item(t: Optional[torch.Tensor]) -> Optional[float]:
            return None if t is None else float(t[row])

        return FeatureLabels(
            feature=feature,
            direct_path=self._top(self.direct_scores, row, self.k),
            causal=self._top(self.causal_scores, row, self.k),
            validity=item(self.validity),
            agreement=item(self.agreement),
            top_k_overlap=item(self.top_k_overlap),
        )

    def __iter__(self):
        return (self[f] for f in self.feature_ids)

    def top_labels(self, method: str = "causal", k: Optional[int] = None) -> list[list[tuple[str, float]]]:
        """Top-k (word, score) per feature for ``method`` ("direct-path" or "causal")."""
        scores = {"direct-path": self.direct_scores, "causal": self.causal_scores}.get(method)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if scores is None:
            raise ValueError(f"{method!r} labels were not computed; pass methods=({method!r},).")
        return [self._top(scores, r, k or self.k) or [] for r in range(len(self.feature_ids))]

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready records, one per feature."""
        out = []
        for f in self.feature_ids:
            lab = self[f]
            out.append(
                {
                    "feature": f,
                    "hook_name": self.hook_name,
                    "direct_path": lab.direct_path,
                    "causal": lab.causal,
                    "validity": lab.validity,
                    "agreement": lab.agreement,
                    "top_k_overlap": lab.top_k_overlap,
                }
            )
        return out

    def __str__(self) -> str:
        lines = [f"Labels for {len(self)} features at {self.hook_name} ({self.intervention}):"]
        for lab in self:
            parts = []
            if lab.direct_path is not None:
                parts.append("direct-path " + ", ".join(w for w, _ in lab.direct_path[:3]))
                parts.append(f"validity {lab.validity:.2f}" if lab.validity == lab.validity else "validity n/a")
            if lab.causal is not None:
                parts.append("causal " + ", ".join(w for w, _ in lab.causal[:3]))
            if lab.agreement is not None:
                parts.append(f"agreement {lab.agreement:.2f}")
            lines.append(f"  feature {lab.feature}: " + " | ".join(parts))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def vocabulary_text_embeddings(
    model: Any, vocabulary: VocabularyLike = None, templates: Sequence[str] = LABEL_TEMPLATES, batch_size: int = 256
) -> torch.Tensor:
    """Normalised text embeddings [V, d_embed] of a vocabulary (templates averaged)."""
    vocab = load_vocabulary(vocabulary)
    return class_text_embeddings(model, list(vocab.words), templates, batch_size=batch_size)


def _degap_text(text_embeds: torch.Tensor) -> torch.Tensor:
    t = F.normalize(text_embeds, dim=-1)
    return F.normalize(t - t.mean(dim=0, keepdim=True), dim=-1)


def _degap_image(v: torch.Tensor, mean_image: torch.Tensor) -> torch.Tensor:
    mu = F.normalize(mean_image, dim=-1)
    return v - (v @ mu)[..., None] * mu


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)


def _resolve_hook(model: Any, hook_name: str) -> str:
    spec = model.locate(hook_name)  # bare names are vision-tower names
    if spec.part != "vision":
        raise ValueError(f"{hook_name!r} is a {spec.part}-tower hook; these labels are for vision features.")
    name = spec.local_name
    vision = model.part("vision")
    start = "ln_pre.hook_normalized" if vision.cfg.has_ln_pre else "hook_full_embed"
    if not (_RESID.match(name) or _MLP_POST.match(name) or name == start):
        raise ValueError(
            f"Cannot label features at {name!r}: labels need a hook that writes linearly into the residual "
            f"stream: blocks.<l>.hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, blocks.<l>.mlp.hook_post "
            f"or {start!r}."
        )
    return name


def _to_residual(vision: Any, hook: str, directions: torch.Tensor) -> torch.Tensor:
    m = _MLP_POST.match(hook)
    if m:  # a neuron-space direction writes d @ W_out into the residual stream
        return directions @ vision.blocks[int(m.group(1))].mlp.W_out
    return directions


def _sae_parts(sae: Any) -> tuple[torch.Tensor, Optional[str]]:
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in (None, "none"):
        raise ValueError(
            f"This SAE normalises its inputs at run time (normalize_activations={norm!r}), so its decoder rows "
            "are not directions in the model's activation space. Fold the normalisation into the weights first "
            "(e.g. sae.fold_activation_norm_scaling_factor(scaling_factor))."
        )
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        raise ValueError("hook_z SAEs are not supported for labels; use a residual-stream or MLP SAE.")
    w_dec = sae.W_dec.detach()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        # SAELens then decodes acts / |W_dec row| @ W_dec: each feature's direction is its unit-norm row.
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    return w_dec, sae.cfg.metadata.hook_name


def _normalised_ln_input(vision: Any, final: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The final LN's input, centred and divided by its real scale, at each token it reads: [N, T, d_model].
    With the LN after pooling, every token sees the pooled input (the LN's Jacobian is taken there)."""
    cfg = vision.cfg
    if cfg.final_ln_after_pool:
        pooled = final[:, :1] if cfg.pool_type == "cls" else final[:, cfg.n_prefix_tokens :].mean(1, keepdim=True)
        x = pooled.expand_as(final)
        s = scale.reshape(-1, 1, 1)
    else:
        x = final
        s = scale.reshape(final.shape[0], -1, 1)
    return (x - x.mean(-1, keepdim=True)) / s


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


# ---------------------------------------------------------------------------------------------- main
@torch.no_grad()
def label_features(
    model: Any,
    features: Any,
    images: Any,
    vocabulary: VocabularyLike = None,
    *,
    hook_name: Optional[str] = None,
    feature_ids: Optional[Sequence[int]] = None,
    methods: Sequence[str] = METHODS,
    intervention: Intervention = "add",
    strength: Optional[Union[float, torch.Tensor]] = None,
    positions: Union[Literal["all", "cls", "patches"], Sequence[int], torch.Tensor] = "all",
    templates: Sequence[str] = LABEL_TEMPLATES,
    text_embeds: Optional[torch.Tensor] = None,
    k: int = 5,
    batch_size: int = 64,
) -> LabelReport:
    """Label vision features of a HookedCLIP with text (``direct-path`` and/or ``causal``; module docs).

    ``features``: an SAELens SAE (its decoder rows; hook from ``sae.cfg.metadata.hook_name``, bare
    HookedViT names or ``vision.``-prefixed) or a tensor of directions [n_features, d_in] with ``hook_name``.
    ``images``: reference images (a preprocessed tensor or PIL images) on which the activation scale, the
    causal effect and the validity are measured. ``vocabulary``: None (the default vocabulary), a list of
    words, a word file or a :class:`Vocabulary`; ``text_embeds`` reuses precomputed vocabulary embeddings.

    ``intervention`` (the causal effect and the validity use it):
      * ``"add"``: add ``strength * d`` at ``positions``. Default strength: for an SAE, the feature's mean
        activation where it is active on the reference images; for raw directions, a quarter of the mean
        residual norm at the hook divided by ``|d|``.
      * ``"clamp"`` (SAE only): set the feature's activation to ``strength`` (default: its maximum on the
        reference images) at ``positions``, i.e. add ``(strength - a) * d``.
      * ``"ablate"`` (SAE only): remove the feature's own contribution ``a * d``; the effect reported is
        that of the feature being present (clean minus ablated).

    ``positions``: the tokens the intervention edits, read as everywhere in the package
    (:func:`sae_lens_multimodal.steering.core.token_mask`: ``"all"``, ``"cls"``, ``"patches"``, token indices,
    a boolean mask over tokens or a spatial mask over the patch grid).
    """
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}.")
    if intervention not in ("add", "clamp", "ablate"):
        raise ValueError(f"intervention must be 'add', 'clamp' or 'ablate', got {intervention!r}.")
    if not has_parts(model, "vision", "text"):
        raise TypeError("label_features needs a HookedCLIP (both towers: the vocabulary is embedded by its text tower).")
    vision = model.part("vision")
    vocab = load_vocabulary(vocabulary)
    sae = None
    if isinstance(features, torch.Tensor):
        if hook_name is None:
            raise ValueError("With a tensor of directions, pass hook_name= (the vision hook they live at).")
        all_dirs = features.detach()
        if all_dirs.ndim == 1:
            all_dirs = all_dirs[None]
    else:
        sae = features
        all_dirs, sae_hook = _sae_parts(sae)
        if hook_name is None:
            hook_name = sae_hook
        if hook_name is None:
            raise ValueError("The SAE has no cfg.metadata.hook_name; pass hook_name=.")
    if intervention != "add" and sae is None:
        raise ValueError(f"intervention={intervention!r} needs an SAE (to read the feature's activation); use 'add'.")
    hook = _resolve_hook(model, hook_name)
    ids = list(range(all_dirs.shape[0])) if feature_ids is None else [int(i) for i in feature_ids]
    if not ids:
        raise ValueError("No features to label.")
    if max(ids) >= all_dirs.shape[0] or min(ids) < 0:
        raise ValueError(f"feature_ids must be in [0, {all_dirs.shape[0]}), got {min(ids)}..{max(ids)}.")
    cfg = vision.cfg
    dtype, device = cfg.dtype, vision.embed.W_patch.device
    dirs = all_dirs[ids].to(device, dtype)  # [F, d_in] in hook space
    width = vision.hook_width(hook)
    if width is not None and dirs.shape[1] != width:
        raise ValueError(f"Directions have width {dirs.shape[1]} but hook {hook!r} has width {width}.")
    resid_dirs = _to_residual(vision, hook, dirs)  # [F, d_model]
    n_feat = len(ids)

    # ---- clean pass on the reference images: activations at the hook, final-LN scales, embeddings
    acts, scales, embeds, finals = [], [], [], []
    n_images = len(images)
    if n_images == 0:
        raise ValueError("Pass at least one reference image.")
    final_name = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    for sl in _batches(n_images, batch_size):
        _, cache = vision.run_with_cache(
            images[sl], names_filter=list(dict.fromkeys([hook, final_name, "ln_final.hook_scale", "hook_out"]))
        )
        acts.append(cache[hook])
        finals.append(cache[final_name])
        scales.append(cache["ln_final.hook_scale"])
        embeds.append(cache["hook_out"])
    act = torch.cat(acts)  # [N, T, d_in]
    scale = torch.cat(scales)
    emb = torch.cat(embeds)  # [N, d_embed]
    n_tokens = act.shape[1]
    w_read = read_weights(vision, scale, n_tokens)  # [N, T]
    x_hat = _normalised_ln_input(vision, torch.cat(finals), scale)  # [N, T, d_model]

    pos_mask = token_mask(positions, n_tokens, vision.hook_spec(hook), where=repr(hook), device=device).to(dtype)

    feat_acts = None
    if sae is not None and (intervention != "add" or strength is None):
        feat_acts = torch.cat([sae.encode(act[sl].to(sae.W_dec.dtype))[..., ids] for sl in _batches(n_images, batch_size)])
        feat_acts = feat_acts.to(dtype).permute(2, 0, 1)  # [F, N, T]

    # ---- the intervention's coefficient per feature, image and token (delta at the hook = coef * d)
    strength_vec = torch.full((n_feat,), float("nan"), dtype=dtype, device=device)
    if intervention == "add":
        if strength is not None:
            strength_vec = torch.as_tensor(strength, dtype=dtype, device=device).expand(n_feat).clone()
        elif feat_acts is not None:
            active = feat_acts > 0
            mean_active = (feat_acts * active).sum((1, 2)) / active.sum((1, 2)).clamp_min(1)
            fallback = mean_active[active.any(2).any(1)].median() if active.any() else torch.tensor(1.0)
            strength_vec = torch.where(active.any(2).any(1), mean_active, fallback.to(dtype))
        else:
            resid_norm = act.norm(dim=-1).mean()
            strength_vec = 0.25 * resid_norm / dirs.norm(dim=-1).clamp_min(1e-12)
        coef = strength_vec[:, None, None] * pos_mask[None, None, :].expand(n_feat, n_images, n_tokens)
        sign = 1.0
    elif intervention == "clamp":
        assert feat_acts is not None
        if strength is not None:
            strength_vec = torch.as_tensor(strength, dtype=dtype, device=device).expand(n_feat).clone()
        else:
            strength_vec = feat_acts.amax(dim=(1, 2))
        coef = (strength_vec[:, None, None] - feat_acts) * pos_mask
        sign = 1.0
    else:
        assert feat_acts is not None
        coef = feat_acts * pos_mask  # the feature's own contribution, removed in the intervened pass
        sign = -1.0

    # ---- the direct path (final LN linearised at each image's real scale, then the projection)
    M, _ = direct_path_matrix(vision)
    M = M - M.mean(dim=0, keepdim=True)
    u = resid_dirs @ M  # [F, d_embed]: centre(d) * ln_w @ W_head
    d_c = resid_dirs - resid_dirs.mean(-1, keepdim=True)
    radial = torch.einsum("bqd,fd->fbq", x_hat, d_c) / cfg.d_model  # the LN scale's own first-order change
    x_hat_M = x_hat @ M  # [N, T, d_embed]

    def direct(c: torch.Tensor) -> torch.Tensor:  # [F, N, T] coefficients -> [F, N, d_embed]
        wc = w_read[None] * c
        return wc.sum(-1)[..., None] * u[:, None, :] - torch.einsum("fbq,bqe->fbe", wc * radial, x_hat_M)

    direct_delta = direct(coef)
    e_norm = emb.norm(dim=-1, keepdim=True)
    e_hat = emb / e_norm
    mean_image = e_hat.mean(dim=0)

    def tangent(delta: torch.Tensor) -> torch.Tensor:  # first-order change of the normalised embedding
        return (delta - (delta * e_hat).sum(-1, keepdim=True) * e_hat) / e_norm

    # ---- the real forward pass with the intervention
    total_delta = None
    causal_vec = None
    need_real = "causal" in methods or "direct-path" in methods  # validity needs the real effect too
    if need_real:
        totals, causal = [], []
        per_chunk = max(1, batch_size // max(1, min(n_images, batch_size)))
        for fs in _batches(n_feat, per_chunk):
            tot_f, cau_f = [], []
            for sl in _batches(n_images, batch_size):
                n_f, n_b = fs.stop - fs.start, sl.stop - sl.start
                delta = sign * coef[fs, sl][..., None] * dirs[fs][:, None, None, :]  # [f, b, T, d_in]
                delta = delta.reshape(n_f * n_b, n_tokens, -1)
                x = images[sl]
                x = x.repeat(n_f, *([1] * (x.ndim - 1))) if isinstance(x, torch.Tensor) else list(x) * n_f

                def add_delta(a: torch.Tensor, hook: Any, delta: torch.Tensor = delta) -> torch.Tensor:
                    return a + delta.to(a.dtype)

                out = vision.run_with_hooks(x, fwd_hooks=[(hook, add_delta)]).reshape(n_f, n_b, -1)
                clean = emb[sl][None]
                tot_f.append(sign * (out - clean))
                cau_f.append(sign * (F.normalize(out, dim=-1) - F.normalize(clean, dim=-1)))
            totals.append(torch.cat(tot_f, dim=1))
            causal.append(torch.cat(cau_f, dim=1))
        total_delta = torch.cat(totals)  # [F, N, d_embed]
        causal_vec = torch.cat(causal).mean(dim=1)  # [F, d_embed]

    if text_embeds is None:
        text_embeds = vocabulary_text_embeddings(model, vocab, templates)
    if text_embeds.shape[0] != len(vocab):
        raise ValueError(f"text_embeds has {text_embeds.shape[0]} rows for a vocabulary of {len(vocab)} words.")
    text_c = _degap_text(text_embeds.to(device, dtype))

    def scores(v: torch.Tensor) -> torch.Tensor:
        return F.normalize(_degap_image(v, mean_image), dim=-1) @ text_c.T

    report = LabelReport(
        vocabulary=vocab, feature_ids=ids, hook_name=hook, intervention=intervention, strength=strength_vec.cpu(), k=k
    )
    if "direct-path" in methods:
        # Adding d at every token the head reads, through the linearised final LN and the projection.
        direct_vec = tangent(direct(torch.ones_like(coef))).mean(dim=1)
        report.direct_scores = scores(direct_vec).cpu()
        report.extra["direct_vector"] = direct_vec.cpu()  # [F, d_embed], for labelers that decompose it
        assert total_delta is not None
        err = (total_delta - direct_delta).pow(2).sum((1, 2))
        tot = total_delta.pow(2).sum((1, 2))
        validity = torch.where(tot > 0, (1 - err / tot.clamp_min(1e-30)).clamp(0, 1), torch.full_like(tot, float("nan")))
        report.validity = validity.cpu()
    if "causal" in methods:
        assert causal_vec is not None
        report.causal_scores = scores(causal_vec).cpu()
        report.extra["causal_vector"] = causal_vec.cpu()  # [F, d_embed], the mean change of the normalised embedding
    if report.direct_scores is not None and report.causal_scores is not None:
        report.agreement = _pearson(report.direct_scores, report.causal_scores)
        kk = min(k, len(vocab))
        a = report.direct_scores.topk(kk).indices
        b = report.causal_scores.topk(kk).indices
        report.top_k_overlap = torch.tensor(
            [len(set(a[i].tolist()) & set(b[i].tolist())) / kk for i in range(n_feat)]
        )
    report.extra.update(direct_delta_norm=direct_delta.norm(dim=-1).mean(1).cpu())
    if total_delta is not None:
        report.extra.update(total_delta_norm=total_delta.norm(dim=-1).mean(1).cpu())
    return report


def direct_path_labels(model: Any, features: Any, images: Any, vocabulary: VocabularyLike = None, **kwargs: Any) -> LabelReport:
    """``direct-path`` labels with their validity scores (see :func:`label_features`)."""
    return label_features(model, features, images, vocabulary, methods=("direct-path",), **kwargs)


def causal_labels(model: Any, features: Any, images: Any, vocabulary: VocabularyLike = None, **kwargs: Any) -> LabelReport:
    """``causal`` labels: the feature's effect on the embedding in the real forward pass (see :func:`label_features`)."""
    return label_features(model, features, images, vocabulary, methods=("causal",), **kwargs)
