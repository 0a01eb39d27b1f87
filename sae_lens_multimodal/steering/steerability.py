"""Steerability of a CLIP's vision SAE features: how far clamping one feature moves text-space predictions.

For each feature ``f`` and each strength ``s`` of a sweep, the feature is clamped to ``s * max_f`` (its
largest activation on the reference images) at the chosen tokens, with the SAE error term kept (the
activation becomes ``x + (s * max_f - a_f) * W_dec[f]``), and the image embeddings are read against a
vocabulary: probabilities are the model's own (``softmax(exp(logit_scale) * cos(image, text))`` over the
vocabulary). ``delta[v]`` is the change of word ``v``'s probability averaged over the images.

* **target**: the feature's most-promoted word (largest ``delta`` summed over the sweep), or a word given
  per feature (e.g. its label).
* **power** at strength ``s``: ``delta[target]``, the probability moved onto the target.
* **specificity** at ``s``: ``delta[target] / sum_v max(delta[v], 0)``, the share of all promoted
  probability that went to the target (1: only the target gained).

Baselines get exactly the same treatment (same coefficients: those of a randomly drawn evaluated feature,
same decoder norm, same choice of target):

* ``random-direction``: an isotropic Gaussian direction, norm-matched;
* ``random-feature``: the drawn feature's own decoder row with its entries randomly permuted (same norm and
  same distribution of entries, its meaning destroyed).

Thresholds are set **per strength** from the baselines. (One threshold over the whole sweep would not
do: a large enough perturbation in any direction drives the softmax onto a single word, so at high
strengths the baselines' most-promoted word gains almost all probability too.) At each strength the
reference is the ``quantile`` (default 95th percentile) of the baselines' power there (the larger of the
two baselines'); a draw's score is its largest ``power / reference`` over the sweep; the calibration
factor ``c`` is the ``quantile`` of the baselines' scores (again the larger of the two), so that the rule
below calls at most ``1 - quantile`` of each baseline's draws steerable (checked by
:meth:`SteerabilityResult.baseline_fraction_above`). A feature is **steerable** when its power exceeds
``threshold = c * reference`` at some strength of the sweep.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from sae_lens_multimodal.analysis.vocabulary import load_vocabulary
from sae_lens_multimodal.analysis.zero_shot import class_text_embeddings
from sae_lens_multimodal.core.arguments import as_feature_indices, check_latent_value, finite_float, finite_values, positive_int
from sae_lens_multimodal.core.atomic import atomic_save
from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.core.hooked_root import has_parts
from sae_lens_multimodal.core.positions import Positions, token_mask

__all__ = ["BASELINES", "SteerabilityResult", "steerability"]

BASELINES = ("random-feature", "random-direction")


@dataclass
class SteerabilityResult:
    """Steerability of features (rows) over a strength sweep (columns), with baselines and threshold."""

    hook_name: str
    feature_ids: list[int]
    #: the sweep, as multiples of each feature's maximum activation on the reference images
    strengths: list[float]
    vocabulary: list[str]
    #: [F, S] probability moved onto the target word, and the share of promoted probability it got
    power: torch.Tensor
    specificity: torch.Tensor
    #: index into ``vocabulary`` of each feature's target word
    target: list[int]
    #: per baseline kind: [B, S] power and specificity, and target indices
    baseline_power: dict[str, torch.Tensor]
    baseline_specificity: dict[str, torch.Tensor]
    baseline_target: dict[str, list[int]]
    quantile: float
    #: per baseline kind: the quantile of its power at each strength [S]; ``threshold`` is the larger
    baseline_thresholds: dict[str, torch.Tensor]
    n_images: int
    max_activation: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    #: multiplier of the per-strength reference so that the any-strength rule has the nominal false-positive rate
    calibration: float = 1.0

    @property
    def threshold(self) -> torch.Tensor:
        """[S] power a feature must exceed at a strength to count as steerable there."""
        return self.calibration * torch.stack(list(self.baseline_thresholds.values())).max(dim=0).values

    @property
    def margin(self) -> torch.Tensor:
        """[F] largest excess of power over the threshold across the sweep (> 0: steerable)."""
        return (self.power - self.threshold).max(dim=1).values

    @property
    def best_strength(self) -> torch.Tensor:
        """[F] index into ``strengths`` where the power exceeds the threshold most."""
        return (self.power - self.threshold).argmax(dim=1)

    @property
    def best_power(self) -> torch.Tensor:
        """[F] power at each feature's best strength."""
        return self.power.gather(1, self.best_strength[:, None])[:, 0]

    @property
    def best_specificity(self) -> torch.Tensor:
        return self.specificity.gather(1, self.best_strength[:, None])[:, 0]

    @property
    def steerable(self) -> torch.Tensor:
        """[F] bool: power above the baseline threshold at some strength."""
        return self.margin > 0

    @property
    def fraction_steerable(self) -> float:
        return float(self.steerable.float().mean()) if len(self.feature_ids) else float("nan")

    def baseline_fraction_above(self, kind: str) -> float:
        """Share of a baseline's draws that the steerability rule would call steerable (false positives)."""
        return float((self.baseline_power[kind] > self.threshold).any(dim=1).float().mean())

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per feature."""
        out = []
        for i, f in enumerate(self.feature_ids):
            out.append({
                "feature": f,
                "hook_name": self.hook_name,
                "target": self.vocabulary[self.target[i]],
                "power": [float(p) for p in self.power[i]],
                "specificity": [float(s) for s in self.specificity[i]],
                "best_power": float(self.best_power[i]),
                "best_strength": self.strengths[int(self.best_strength[i])],
                "best_specificity": float(self.best_specificity[i]),
                "margin": float(self.margin[i]),
                "steerable": bool(self.steerable[i]),
            })
        return out

    def summary(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            return "/".join(f"{float(v):.3f}" for v in t)

        thr = ", ".join(f"{k} {fmt(v)}" for k, v in self.baseline_thresholds.items())
        fp = ", ".join(f"{k} {self.baseline_fraction_above(k):.1%}" for k in self.baseline_power)
        return (
            f"steerability at {self.hook_name}: {int(self.steerable.sum())}/{len(self.feature_ids)} features "
            f"steerable ({self.fraction_steerable:.1%}); thresholds per strength {self.strengths}: {fmt(self.threshold)} "
            f"(calibration {self.calibration:.3f} x the larger {self.quantile:.0%} quantile of baseline power: {thr}); baseline draws called steerable: "
            f"{fp}; {self.n_images} images"
        )

    def to_table(self, max_rows: Optional[int] = 30) -> str:
        """Text table, most steerable features first."""
        order = self.margin.argsort(descending=True).tolist()
        rows = order if max_rows is None else order[:max_rows]
        lines = [self.summary(), f"{'feature':>8} {'target':<14} {'power':>8} {'margin':>8} {'specif.':>8} {'strength':>8}  steerable"]
        for i in rows:
            lines.append(
                f"{self.feature_ids[i]:>8} {self.vocabulary[self.target[i]][:14]:<14} {float(self.best_power[i]):>8.4f} "
                f"{float(self.margin[i]):>8.4f} {float(self.best_specificity[i]):>8.3f} {self.strengths[int(self.best_strength[i])]:>8g}  "
                f"{'yes' if bool(self.steerable[i]) else 'no'}"
            )
        if max_rows is not None and len(order) > max_rows:
            lines.append(f"... {len(order) - max_rows} more")
        return "\n".join(lines)

    __str__ = to_table

    def plot(self, path: Union[str, os.PathLike]) -> Path:
        """PNG: power vs specificity at the best strength (with the threshold), and power vs strength."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        colors = {"random-feature": "tab:orange", "random-direction": "tab:gray"}
        thr = self.threshold
        for kind, power in self.baseline_power.items():
            best = (power - thr).argmax(1)
            spec = self.baseline_specificity[kind].gather(1, best[:, None])[:, 0]
            ax1.scatter((power - thr).max(1).values, spec, s=10, alpha=0.5, c=colors.get(kind, "k"), label=kind)
        st = self.steerable
        ax1.scatter(self.margin[~st], self.best_specificity[~st], s=14, c="tab:blue", alpha=0.6, label="feature")
        ax1.scatter(self.margin[st], self.best_specificity[st], s=18, c="tab:red", label="steerable feature")
        ax1.axvline(0.0, ls="--", c="k", lw=1, label="baseline threshold")
        ax1.set_xlabel("steering power minus baseline threshold (best strength)")
        ax1.set_ylabel("specificity")
        ax1.set_title(f"{self.fraction_steerable:.1%} of {len(self.feature_ids)} features steerable")
        ax1.legend(fontsize=7)
        xs = self.strengths
        for i in range(len(self.feature_ids)):
            ax2.plot(xs, self.power[i], c="tab:red" if bool(st[i]) else "tab:blue", alpha=0.35, lw=0.8)
        for kind, t in self.baseline_thresholds.items():
            ax2.plot(xs, t, c=colors.get(kind, "k"), lw=2, ls="--", label=f"{kind} {self.quantile:.0%} quantile")
        ax2.plot(xs, thr, c="k", lw=2, label="threshold (calibrated)")
        ax2.set_xscale("log")
        ax2.set_xticks(xs, [f"{v:g}" for v in xs])
        ax2.minorticks_off()
        ax2.set_xlabel("clamp strength (x max activation)")
        ax2.set_ylabel("steering power")
        ax2.legend(fontsize=7)
        fig.suptitle(self.hook_name, fontsize=9)
        fig.tight_layout()
        path = Path(path)
        try:
            atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), suffix=".png")
        finally:
            plt.close(fig)
        return path


def _vision_hook(model: Any, sae: Any) -> HookSpec:
    spec = model.locate(sae)
    location = spec.name
    if spec.part != "vision" or not has_parts(model, "vision", "text"):
        raise ValueError(f"Steerability needs an SAE on the vision tower of a HookedCLIP; this one is at {location!r}.")
    if spec.width is not None and spec.width != sae.cfg.d_in:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match hook {location!r} of width {spec.width}.")
    if getattr(sae.cfg, "normalize_activations", "none") not in (None, "none"):
        raise ValueError(
            "This SAE normalises its inputs at run time, so its decoder rows are not directions in the model's "
            "activation space; fold the normalisation into the weights first (sae.fold_activation_norm_scaling_factor)."
        )
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise ValueError("Steerability supports SAEs on residual-like hooks (no hook_z reshaping).")
    return spec


def _text_side(model: Any, vocabulary: Any, text_embeds: Optional[torch.Tensor], templates: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    vocab = list(load_vocabulary(vocabulary).words)
    if text_embeds is None:
        text_embeds = class_text_embeddings(model, vocab, templates)
    if text_embeds.shape[0] != len(vocab):
        raise ValueError(f"text_embeds has {text_embeds.shape[0]} rows for a vocabulary of {len(vocab)} entries.")
    return vocab, F.normalize(text_embeds.detach().float(), dim=-1)


@torch.no_grad()
def steerability(
    model: Any,
    sae: Any,
    images: Any,
    vocabulary: Any = None,
    *,
    text_embeds: Optional[torch.Tensor] = None,
    templates: Sequence[str] = ("a photo of {}.",),
    feature_ids: Optional[Sequence[int]] = None,
    max_features: Optional[int] = None,
    strengths: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    positions: Positions = "all",
    targets: Optional[Sequence[Union[int, str]]] = None,
    n_baseline: Optional[int] = None,
    quantile: float = 0.95,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> SteerabilityResult:
    """Measure steering power and specificity of SAE features on a HookedCLIP (module docs).

    Args:
        model: a HookedCLIP; ``sae``: an SAELens SAE on its vision tower (bare or ``vision.`` hook name).
        images: reference images (preprocessed tensor [N, 3, H, W] or what ``model.encode_image`` takes).
        vocabulary: words to read probabilities over (None: the default vocabulary), or pass
            ``text_embeds`` [V, d_embed] for them (e.g. caption-context embeddings).
        feature_ids: features to measure (default: every feature active on the images, at most
            ``max_features``, most active first).
        strengths: clamp values as multiples of each feature's maximum activation on the images.
        positions: the tokens clamped (``"all"``, ``"patches"``, ``"cls"``, indices or masks; see
            :func:`~sae_lens_multimodal.steering.core.token_mask`).
        targets: per feature, a vocabulary index or word to measure power toward (default: most-promoted).
        n_baseline: draws per baseline kind (default: as many as features, at least 32).
        quantile: baseline quantile that defines the threshold.

    >>> res = steerability(model, sae, images, ["red", "blue", "circle", "square"])
    >>> print(res.to_table()); res.plot("steerability.png")
    """
    from tqdm.auto import tqdm

    if not 0 < finite_float(quantile, "quantile") < 1:
        raise ValueError(f"quantile must be in (0, 1); got {quantile}.")
    strengths = finite_values(strengths, "strengths").tolist()
    # Strength s clamps a feature to s * its largest activation: a negative one sets non-negative latents < 0.
    check_latent_value(sae, "clamp", torch.tensor(strengths), what="strengths")
    if feature_ids is not None:
        feature_ids = as_feature_indices(feature_ids, int(sae.cfg.d_sae), what="feature_ids")
    if max_features is not None:
        max_features = positive_int(max_features, "max_features")
    spec = _vision_hook(model, sae)
    hook = spec.local_name
    vision = model.part("vision")
    cfg = vision.cfg
    vocab, text = _text_side(model, vocabulary, text_embeds, templates)
    device, dtype = vision.embed.W_patch.device, cfg.dtype
    text = text.to(device, dtype)
    scale = model.logit_scale.detach().exp()
    x_all = images
    n = len(x_all)
    if n == 0:
        raise ValueError("Pass at least one reference image.")

    _, cache = vision.run_with_cache(x_all, names_filter=hook)
    acts = cache[hook]  # [N, T, d]
    clean_emb = vision(x_all)
    p0 = (scale * F.normalize(clean_emb, dim=-1) @ text.T).softmax(-1)  # [N, V]
    W = sae.W_dec.detach().to(device, dtype)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # decode divides latents by the row norms
        W = W / W.norm(dim=-1, keepdim=True)
    lat = sae.encode(acts.to(sae.W_dec.dtype)).to(dtype)  # [N, T, d_sae]
    n_tokens = acts.shape[1]
    pos = token_mask(positions, n_tokens, spec, where=repr(hook), device=device).to(dtype)
    max_act = lat.amax(dim=(0, 1))  # [d_sae]
    d_sae = W.shape[0]
    if feature_ids is None:
        alive = (max_act > 0).nonzero()[:, 0]
        order = alive[max_act[alive].argsort(descending=True)]
        ids = order.tolist()[:max_features] if max_features else order.tolist()
    else:
        ids = list(feature_ids)
        dead = [i for i in ids if float(max_act[i]) <= 0]
        if dead:
            raise ValueError(f"Features {dead[:10]} never activate on these images; their clamp strength is undefined.")
    if not ids:
        raise ValueError("No feature is active on these images.")
    target_idx: Optional[list[int]] = None
    if targets is not None:
        if len(targets) != len(ids):
            raise ValueError(f"targets has {len(targets)} entries for {len(ids)} features.")
        target_idx = [vocab.index(t) if isinstance(t, str) else int(t) for t in targets]

    n_s = len(strengths)
    s_vec = torch.tensor(strengths, dtype=dtype, device=device)
    per_chunk = max(1, batch_size // (n_s * n))

    def sweep(dirs: torch.Tensor, coef_src: list[int], what: str) -> torch.Tensor:
        """Mean probability change [K, S, V] when direction k gets clamp coefficients of feature coef_src[k]."""
        out = []
        for k0 in tqdm(range(0, len(coef_src), per_chunk), desc=f"steerability ({what})", disable=not progress, leave=False):
            src = coef_src[k0:k0 + per_chunk]
            k = len(src)
            a = lat[..., src].permute(2, 0, 1)  # [k, N, T]
            coef = (s_vec[None, :, None, None] * max_act[src][:, None, None, None] - a[:, None]) * pos  # [k, S, N, T]
            delta = coef[..., None] * dirs[k0:k0 + k][:, None, None, None, :]  # [k, S, N, T, d]
            delta = delta.reshape(k * n_s * n, n_tokens, -1)
            xs = x_all.repeat(k * n_s, *([1] * (x_all.ndim - 1))) if isinstance(x_all, torch.Tensor) else list(x_all) * (k * n_s)

            def add(act: torch.Tensor, hook: Any, delta: torch.Tensor = delta) -> torch.Tensor:
                return act + delta.to(act.dtype)

            emb = vision.run_with_hooks(xs, fwd_hooks=[(hook, add)])
            p = (scale * F.normalize(emb, dim=-1) @ text.T).softmax(-1).reshape(k, n_s, n, -1)
            out.append((p - p0).mean(dim=2))
        return torch.cat(out)

    def score(delta: torch.Tensor, tgt: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        t = delta.sum(1).argmax(-1) if tgt is None else torch.tensor(tgt, device=delta.device)
        power = delta.gather(2, t[:, None, None].expand(-1, n_s, 1))[..., 0]
        promoted = delta.clamp_min(0).sum(-1)
        spec = torch.where(promoted > 0, power / promoted.clamp_min(1e-12), torch.zeros_like(power))
        return power.cpu(), spec.cpu(), t.tolist()

    feat_delta = sweep(W[ids], ids, "features")
    power, spec, tgt = score(feat_delta, target_idx)

    gen = torch.Generator().manual_seed(seed)
    n_b = n_baseline or max(32, len(ids))
    src = [ids[int(i)] for i in torch.randint(0, len(ids), (n_b,), generator=gen)]
    norms = W[src].norm(dim=-1, keepdim=True)
    rand_dir = torch.randn(n_b, W.shape[1], generator=gen).to(device, dtype)
    rand_dir = rand_dir / rand_dir.norm(dim=-1, keepdim=True) * norms
    perms = torch.stack([torch.randperm(W.shape[1], generator=gen) for _ in range(n_b)]).to(device)
    rand_feat = W[src].gather(1, perms)
    b_power, b_spec, b_tgt, thresholds = {}, {}, {}, {}
    for kind, dirs in (("random-feature", rand_feat), ("random-direction", rand_dir)):
        bp, bs, bt = score(sweep(dirs, src, kind), None if target_idx is None else [tgt[ids.index(s)] for s in src])
        b_power[kind], b_spec[kind], b_tgt[kind] = bp, bs, bt
        thresholds[kind] = bp.quantile(quantile, dim=0)
    reference = torch.stack(list(thresholds.values())).max(dim=0).values.clamp_min(1e-12)
    calibration = max(float((bp / reference).max(dim=1).values.quantile(quantile)) for bp in b_power.values())
    return SteerabilityResult(
        hook_name=f"vision.{hook}",
        feature_ids=ids,
        strengths=strengths,
        vocabulary=vocab,
        power=power,
        specificity=spec,
        target=tgt,
        baseline_power=b_power,
        baseline_specificity=b_spec,
        baseline_target=b_tgt,
        quantile=quantile,
        baseline_thresholds=thresholds,
        n_images=n,
        max_activation=max_act[ids].cpu(),
        calibration=calibration,
    )

