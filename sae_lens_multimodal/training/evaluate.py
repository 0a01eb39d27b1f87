"""Evaluating SAEs on image and diffusion activations.

* :func:`evaluate_sae`: reconstruction and sparsity on activation data (a store, a cache or a tensor):
  explained variance / FVU (SAELens's ``ExplainedVarianceCalculator``), MSE, L0, dead and dense latents,
  overall, per timestep bucket and per timestep; decoder/encoder weight statistics from SAELens's
  ``get_featurewise_weight_based_metrics``.
* :func:`image_embedding_cosine` and :func:`clip_zero_shot`: downstream effect on image models, SAE
  spliced vs clean (CLIP logits with the model's logit scale applied).
* :func:`diffusion_downstream`: denoiser-output MSE per timestep on the clean trajectory and final-image
  difference, SAE spliced vs clean, with and without the error term.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens.evals import ExplainedVarianceCalculator, get_featurewise_weight_based_metrics

from sae_lens_multimodal.analysis.zero_shot import DEFAULT_TEMPLATES, ZeroShotClassifier
from sae_lens_multimodal.core.denoising import current_denoising_state, timestep_context
from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.core.sae_metadata import check_sae_model_match
from sae_lens_multimodal.models.registry import model_name_aliases
from sae_lens_multimodal.training.cache import ActivationCacheReader
from sae_lens_multimodal.training.providers import chunk_stream, coverage_filter

__all__ = ["clip_zero_shot", "diffusion_downstream", "evaluate_sae", "image_embedding_cosine", "weight_metrics"]


class _Group:
    """Running reconstruction/sparsity statistics of one group of rows."""

    def __init__(self, d_sae: int):
        self.ev = ExplainedVarianceCalculator()
        self.sq_err = 0.0
        self.l0 = 0.0
        self.rows = 0
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, recon: torch.Tensor, acts: torch.Tensor) -> None:
        x, recon = x.float(), recon.float()
        self.ev.add_batch(recon, x)
        self.sq_err += (x - recon).pow(2).sum().item()
        active = acts != 0
        self.l0 += active.sum().item()
        self.fired += active.sum(0).double().cpu()
        self.rows += x.shape[0]

    def result(self, dense_threshold: float) -> dict[str, Any]:
        if self.rows == 0:
            return {"n_rows": 0}
        ev = self.ev.compute()
        freq = self.fired / self.rows
        return {
            "n_rows": self.rows,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "mse": self.sq_err / self.rows,  # per row, summed over dimensions (SAELens's mse_loss)
            "l0": self.l0 / self.rows,
            "dead_latents": int((freq == 0).sum()),
            "dense_latents": int((freq > dense_threshold).sum()),
            "frac_dead": float((freq == 0).double().mean()),
            "frac_dense": float((freq > dense_threshold).double().mean()),
        }


@torch.no_grad()
def evaluate_sae(sae: Any, data: Any, *, hook: Optional[str] = None, n_rows: int = 100_000,
                 batch_size: int = 4096, dense_threshold: float = 0.1, per_timestep: bool = True,
                 seed: int = 0, on_model_mismatch: str = "warn") -> dict[str, Any]:
    """Reconstruction and sparsity metrics of ``sae`` on up to ``n_rows`` activation rows.

    ``data`` is an activation store, a cache (reader or directory) or a (rows, d_in) tensor. Returns
    ``{"overall": {...}, "buckets": [...], "timesteps": {t: {...}}, "weights": {...}}`` with
    ``explained_variance``, ``fvu``, ``mse``, ``l0``, ``dead_latents`` (never active on these rows),
    ``dense_latents`` (active on more than ``dense_threshold`` of rows). Buckets and timesteps are
    reported for timestep-labelled data; a bucketed SAE's dead/dense counts per bucket refer to that
    bucket's own dictionary. An SAE whose metadata records another model than the one that made a cache
    warns (``on_model_mismatch="error"`` refuses, ``"ignore"`` skips the check; core/sae_metadata).
    """
    identity = _data_model_identity(data, hook)
    if identity is not None:
        check_sae_model_match(sae, identity=identity, on_mismatch=on_model_mismatch)
    was_training = sae.training
    sae.eval()
    d_sae = sae.cfg.d_sae
    keep = coverage_filter(sae)
    overall = _Group(d_sae)
    buckets: dict[int, _Group] = {}
    per_t: dict[float, _Group] = {}
    seen = 0
    try:
        for chunk in chunk_stream(data, hook=hook, epochs=1, seed=seed):
            if keep is not None:
                chunk = keep(chunk)
            for i in range(0, len(chunk), batch_size):
                part = chunk.select(slice(i, min(i + batch_size, len(chunk), i + n_rows - seen)))  # type: ignore[arg-type]
                if len(part) == 0:
                    break
                x = part.acts.to(sae.device, sae.dtype)
                labelled = part.timestep is not None
                if labelled:
                    with timestep_context(part.timestep.to(x.device), branch=part.branch):
                        acts = sae.encode(x)
                        recon = sae.decode(acts)
                else:
                    acts = sae.encode(x)
                    recon = sae.decode(acts)
                overall.add(x, recon, acts)
                if labelled and hasattr(sae, "plan_rows"):
                    plan = sae.plan_rows(part.timestep.shape, part.timestep.device,
                                         labels=(part.timestep, part.branch), out_of_range="passthrough")
                    for b in plan.bucket.unique().tolist():
                        rows = (plan.bucket == b).to(x.device)
                        buckets.setdefault(b, _Group(d_sae)).add(x[rows], recon[rows], acts[rows])
                if labelled and per_timestep:
                    for t in part.timestep.unique().tolist():
                        rows = (part.timestep == t).to(x.device)
                        per_t.setdefault(t, _Group(d_sae)).add(x[rows], recon[rows], acts[rows])
                seen += len(part)
            if seen >= n_rows:
                break
    finally:
        sae.train(was_training)
    if seen == 0:
        raise ValueError("No activation rows to evaluate on (none in the SAE's timestep ranges?).")
    out: dict[str, Any] = {"overall": overall.result(dense_threshold), "weights": weight_metrics(sae)}
    if buckets:
        ranges = sae.cfg.timestep_ranges
        out["buckets"] = [{"bucket": b, "timestep_range": ranges[b], **g.result(dense_threshold)}
                          for b, g in sorted(buckets.items()) if b >= 0]
    if per_t:
        out["timesteps"] = {_num(t): g.result(dense_threshold) for t, g in sorted(per_t.items())}
    return out


def _data_model_identity(data: Any, hook: Optional[str]) -> Optional[dict[str, Any]]:
    """The recorded model of a cache (reader or directory) or activation store, with its registry aliases."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        data = ActivationCacheReader(data)
    if isinstance(data, ActivationCacheReader):
        identity = dict(data.metadata.get("model") or {})
    elif hasattr(data, "describe") and hasattr(data, "hook_names"):
        names = list(data.hook_names)
        hook = hook or (names[0] if len(names) == 1 else None)
        identity = dict(data.describe(hook).get("model") or {}) if hook else {}
    else:
        return None
    if identity.get("name"):
        identity["names"] = model_name_aliases(str(identity["name"]))
    return identity or None


def _num(t: float) -> Any:
    return int(t) if float(t).is_integer() else t


def _summary(m: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, values in m.items():
        v = torch.tensor(values, dtype=torch.float64)
        out[f"{key}_mean"] = float(v.mean())
        out[f"{key}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return out


@torch.no_grad()
def weight_metrics(sae: Any) -> dict[str, Any]:
    """Summaries (mean, std) of SAELens's featurewise weight metrics; one entry per bucket for bucketed SAEs."""
    if hasattr(sae, "bucket_sae"):
        return {"buckets": [_summary(get_featurewise_weight_based_metrics(sae.bucket_sae(b)))
                            for b in range(sae.n_buckets)]}
    return _summary(get_featurewise_weight_based_metrics(sae))


# ---------------------------------------------------------------------- image downstream
def _batches(images: Any, batch_size: int) -> list[Any]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


@torch.no_grad()
def image_embedding_cosine(model: Any, sae: Any, images: Any, *, batch_size: int = 32,
                           use_error_term: bool = False) -> dict[str, float]:
    """Cosine between the image embedding with the SAE spliced in and the clean one.

    ``model`` is a HookedViT (its output: the projected embedding when it has a head) or a HookedCLIP
    (``encode_image``). Returns mean / min cosine over the images.
    """
    encode = model.encode_image if has_parts(model, "vision", "text") else model
    cos = []
    for batch in _batches(images, batch_size):
        clean = encode(batch)
        with model.saes(saes=[sae], use_error_term=use_error_term):
            spliced = encode(batch)
        cos.append(F.cosine_similarity(clean.float(), spliced.float(), dim=-1))
    c = torch.cat(cos)
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "n_images": int(c.numel())}


@torch.no_grad()
def clip_zero_shot(clip: Any, sae: Any, images: Any, labels: Sequence[int], class_names: Sequence[str], *,
                   templates: Optional[Sequence[str]] = None, classifier: Any = None, batch_size: int = 32,
                   use_error_term: bool = False) -> dict[str, float]:
    """Zero-shot classification with the SAE spliced into the image tower vs clean.

    Logits come from :class:`sae_lens_multimodal.analysis.zero_shot.ZeroShotClassifier` (class-name
    prompts averaged over ``templates``; ``exp(logit_scale) * cos`` (+ SigLIP bias)), so the model's logit
    scale is always applied. Returns clean and spliced accuracy and cross-entropy, the KL divergence of
    the spliced class distribution from the clean one, and the mean image-embedding cosine.
    """
    clf = classifier or ZeroShotClassifier(clip, class_names, templates or DEFAULT_TEMPLATES)
    labels_t = torch.as_tensor(list(labels))
    if len(labels_t) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels_t)} labels.")
    stats: dict[str, float] = defaultdict(float)
    cos = []
    for i, batch in enumerate(_batches(images, batch_size)):
        y = labels_t[i * batch_size:i * batch_size + len(batch)]
        clean = clip.encode_image(batch)
        with clip.saes(saes=[sae], use_error_term=use_error_term):
            spliced = clip.encode_image(batch)
        lc, ls = clf.logits_from_embeddings(clean).float(), clf.logits_from_embeddings(spliced).float()
        y = y.to(lc.device)
        stats["correct_clean"] += int((lc.argmax(-1) == y).sum())
        stats["correct_spliced"] += int((ls.argmax(-1) == y).sum())
        stats["ce_clean"] += float(F.cross_entropy(lc, y, reduction="sum"))
        stats["ce_spliced"] += float(F.cross_entropy(ls, y, reduction="sum"))
        stats["kl"] += float(F.kl_div(ls.log_softmax(-1), lc.log_softmax(-1), log_target=True, reduction="sum"))
        cos.append(F.cosine_similarity(clean.float(), spliced.float(), dim=-1))
    n = len(labels_t)
    return {
        "accuracy_clean": stats["correct_clean"] / n,
        "accuracy_spliced": stats["correct_spliced"] / n,
        "cross_entropy_clean": stats["ce_clean"] / n,
        "cross_entropy_spliced": stats["ce_spliced"] / n,
        "kl_mean": stats["kl"] / n,
        "cosine_mean": float(torch.cat(cos).mean()),
        "logit_scale": float(clf.logit_scale),
        "n_images": n,
    }


# ---------------------------------------------------------------------- diffusion downstream
def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


@torch.no_grad()
def diffusion_downstream(pipeline: Any, sae: Any, calls: Sequence[dict[str, Any]], *,
                         seeds: Optional[Sequence[int]] = None, on_model_mismatch: str = "warn") -> dict[str, Any]:
    """Effect of splicing ``sae`` into a HookedDiffusionPipeline, per timestep and on the final image.

    ``calls``: pipeline keyword arguments, one dict per generation (e.g. prompt, num_inference_steps,
    guidance_scale); each run uses ``torch.Generator().manual_seed(seed)`` (``seeds`` default 0, 1, ...).

    Returns, per timestep, the denoiser-output MSE of a call with the SAE spliced (without and with the
    error term) against the clean call on the SAME input (the clean trajectory), relative MSE
    (``mse / mean(clean output^2)``), and, per generation and on average, the final-image MSE / max
    abs difference of a full spliced run against the clean run with the same seed.
    """
    check_sae_model_match(sae, pipeline, on_mismatch=on_model_mismatch)  # spliced through hooks, not add_sae
    seeds = list(seeds) if seeds is not None else list(range(len(calls)))
    denoiser = pipeline.denoiser
    inst = pipeline._installation
    per_t: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    images: dict[str, list[float]] = defaultdict(list)
    state_box: list[Any] = []
    busy = [False]

    def pre(module: Any, args: tuple, kwargs: dict) -> None:
        state_box.append(current_denoising_state())

    def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        state = state_box.pop()
        if busy[0]:
            return
        clean = _first_tensor(output).float()
        provider = inst.state_provider
        inst.state_provider = lambda *_: state  # the re-run is the same denoiser call, not a new one
        busy[0] = True
        try:
            for name, error_term in (("mse", False), ("mse_error_term", True)):
                with pipeline.saes(saes=[sae], use_error_term=error_term):
                    out = _first_tensor(module(*args, **kwargs)).float()
                mse = float((out - clean).pow(2).mean())
                per_t[_key(state.timestep)][name].append(mse)
                if name == "mse":
                    per_t[_key(state.timestep)]["rel_mse"].append(mse / max(float(clean.pow(2).mean()), 1e-12))
        finally:
            busy[0] = False
            inst.state_provider = provider

    for kwargs, seed in zip(calls, seeds):
        handles = [denoiser.register_forward_pre_hook(pre, with_kwargs=True),
                   denoiser.register_forward_hook(post, with_kwargs=True)]
        try:
            clean_img = pipeline(**kwargs, generator=torch.Generator().manual_seed(seed))
        finally:
            for h in handles:
                h.remove()
        for label, error_term in (("", False), ("_error_term", True)):
            img = pipeline.run_with_saes(**kwargs, generator=torch.Generator().manual_seed(seed), saes=[sae],
                                         use_error_term=error_term)
            diff = (_as_tensor(img) - _as_tensor(clean_img)).float()
            images["image_mse" + label].append(float(diff.pow(2).mean()))
            images["image_max_abs_diff" + label].append(float(diff.abs().max()))
    timesteps = {
        t: {k: sum(v) / len(v) for k, v in d.items()} for t, d in sorted(per_t.items(), key=lambda kv: -_sort_key(kv[0]))
    }
    return {
        "timesteps": timesteps,
        "images": {k: sum(v) / len(v) for k, v in images.items()},
        "per_generation": dict(images),
    }


def _key(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return tuple(t.flatten().tolist())
    return _num(t) if isinstance(t, float) else t


def _sort_key(t: Any) -> float:
    return float(t[0]) if isinstance(t, tuple) else (float(t) if t is not None else math.inf)


def _as_tensor(img: Any) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, (list, tuple)) and img and hasattr(img[0], "size"):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in img])
    return torch.from_numpy(np.asarray(img, dtype=np.float32))
