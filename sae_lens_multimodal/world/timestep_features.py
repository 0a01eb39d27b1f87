"""Shapes-diffusion features followed across denoising time (issue 19, part 5).

Two SAEs of ``shapes-diffusion-saes`` read the same hook (``up_blocks.0.attentions.1.hook_out``, conditional
branch) on the same kind of generations:

* the **bucketed** SAE (``up_blocks.0.attentions.1.hook_out``): one dictionary per timestep bucket, so latent
  i is a different feature in each bucket and its curve jumps at the bucket edges;
* the **conditioned** SAE (``up_blocks.0.attentions.1.hook_out.conditioned``, trained by
  world/training/train_conditioned_sae.py): one dictionary for every timestep, encoder scaled and shifted per
  bucket, so latent i is one decoder direction throughout and its curve is continuous.

:func:`timestep_feature_study` runs fresh generations once and measures, on those rows,

1. reconstruction (explained variance overall, per bucket and per timestep) of both SAEs;
2. continuity: each latent's step-to-step persistence (correlation of its value on the same token of the
   same generation at adjacent steps) within buckets and across bucket edges, and the jump of the mean
   activation curves at the edges;
3. the bucketed SAE's dictionaries matched across each edge (decoder cosine + activation correlation across
   the edge, Hungarian; analysis/feature_matching.py), chained into tracks, and each track's conditioned
   counterpart;
4. ground-truth factor purity of every conditioned latent at every step (do the top generations at that step
   share the prompt's colour / position / shape / size / texture?), and from it which latents are **coarse
   early** (colour or position, peaking in the first half of denoising) or **detail late** (shape, size or
   texture, peaking in the second half), and whether "something red in the upper left" turns into a specific
   object (colour + position pure early, shape purity rising later).

``cfg_branch="uncond"`` runs all of it on the unconditional half of the same CFG batches (the denoiser sees
only the noisy image) with the conditioned SAE trained on that branch (``...conditioned.uncond``).

Activations are in input units: a latent's value times its decoder norm, divided by the bucket's input
scaling factor, is the norm of what it adds to the reconstruction (the SAEs scale each bucket's input; without
this the curves would jump by the ratio of the factors). ``python -m sae_lens_multimodal.world.timestep_features``
prints the tables and writes the figures of docs/diffusion-time.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from sae_lens_multimodal.analysis.feature_matching import FeatureMatching, match_dictionaries, step_persistence
from sae_lens_multimodal.analysis.plotting import PathLike, new_figure, save_figure
from sae_lens_multimodal.core.denoising import timestep_context

__all__ = [
    "RELEASE", "BUCKETED_ID", "CONDITIONED_ID", "UNCOND_CONDITIONED_ID", "FACTORS", "COARSE", "DETAIL",
    "GenerationRows", "TimestepFeatureStudy", "generation_rows", "latent_activations", "continuity",
    "match_buckets", "factor_purity", "classify_features", "timestep_feature_study", "ground_truth_line", "main",
]

RELEASE = "shapes-diffusion-saes"
BUCKETED_ID = "up_blocks.0.attentions.1.hook_out"
CONDITIONED_ID = "up_blocks.0.attentions.1.hook_out.conditioned"
UNCOND_CONDITIONED_ID = CONDITIONED_ID + ".uncond"  # the same recipe on the unconditional CFG branch
FACTORS = ("color", "position", "shape", "size", "texture")
COARSE = ("color", "position")  # layout: "something red in the upper left"
DETAIL = ("shape", "size", "texture")  # what the object is
LIFT_THRESHOLD = 0.5  # a latent is selective for a factor at a step when its chance-corrected purity is >= this


# ------------------------------------------------------------------------------------------------ data
@dataclass
class GenerationRows:
    """Activations of whole generations at one hook: ``acts[g, s, p]`` = generation g, step s, token p
    (8x8 row-major); ``timesteps[s]``; ``factors[g]`` = the prompt's factor values (size / texture None when
    the prompt does not name them)."""

    acts: torch.Tensor
    timesteps: list[float]
    prompts: list[str]
    factors: list[dict[str, Optional[str]]]
    cfg_branch: str = "cond"  # "uncond": the half of the CFG batch that sees an empty prompt, i.e. only the image

    def chunk(self) -> Any:
        """The rows as an ActivationChunk (timestep-labelled), e.g. for training/evaluate.evaluate_sae."""
        from sae_lens_multimodal.training.cache import ActivationChunk

        g, s, p, d = self.acts.shape
        t = torch.tensor(self.timesteps, dtype=torch.float64)[None, :, None].expand(g, s, p)
        return ActivationChunk(self.acts.reshape(-1, d), torch.arange(g).repeat_interleave(s * p), t.reshape(-1))


def prompts_with_factors(n: int, seed: int) -> tuple[list[str], list[dict[str, Optional[str]]]]:
    """``n`` captions exactly as train_saes.diffusion_prompts draws them, with the factor values each names."""
    from sae_lens_multimodal.world.shapes import ShapesWorld, caption

    world = ShapesWorld(32, seed=seed)
    rng = np.random.default_rng(seed + 1)
    prompts, factors = [], []
    for f in world.sample_factors(n):
        size, texture = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        prompts.append(caption(f, size=size, texture=texture))
        factors.append({"color": f.color, "position": f.position, "shape": f.shape,
                        "size": f.size if size else None, "texture": f.texture if texture else None})
    return prompts, factors


def generation_rows(n_prompts: int = 96, *, seed: int = 2000, num_inference_steps: int = 20,
                    guidance_scale: float = 2.0, pipeline: Any = None, progress: bool = False,
                    cfg_branch: str = "cond") -> GenerationRows:
    """Generate ``n_prompts`` world captions (ShapesWorld ``seed``; noise seeds ``seed * 100``..) with the
    shipped pipeline as the SAEs were trained (DPM-Solver++, guidance 2) and keep the hook's activations of
    every step and token of ``cfg_branch`` (the SAEs' ``"cond"``, or ``"uncond"``: same trajectories, empty
    prompt). Seeds 0 and 1000 are the SAEs' training and evaluation draws."""
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from sae_lens_multimodal.training.cache import ActivationChunk
    from sae_lens_multimodal.training.diffusion_store import DiffusionActivationStore
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

    if n_prompts < 2:
        raise ValueError(f"n_prompts must be at least 2 (purity and correlations compare generations); got {n_prompts}.")
    _check_branch(cfg_branch)
    hooked = pipeline if isinstance(pipeline, HookedDiffusionPipeline) else HookedDiffusionPipeline(
        pipeline or load_shapes_pipeline())
    prompts, factors = prompts_with_factors(n_prompts, seed)
    # the store the SAEs were trained from (world/training/train_saes.py), with the same settings
    store = DiffusionActivationStore(
        hooked, BUCKETED_ID, prompts, seed_offset=seed * 100, cfg_branch=cfg_branch, batch_size=8, progress=progress,
        model_name="shapes-diffusion", pipeline_kwargs={"num_inference_steps": num_inference_steps,
                                                       "guidance_scale": guidance_scale, "output_type": "pt"})
    chunk = ActivationChunk.cat([chunks[BUCKETED_ID] for _, _, chunks in store.iter_chunks()])
    steps = chunk.timestep.reshape(n_prompts, num_inference_steps, -1)
    if not bool((steps == steps[:1, :, :1]).all()):  # rows are (generation, step, token) in that order
        raise RuntimeError("Unexpected row order from the activation store: timesteps differ within a step.")
    acts = chunk.acts.reshape(n_prompts, num_inference_steps, steps.shape[-1], -1)
    return GenerationRows(acts, [float(t) for t in steps[0, :, 0]], prompts, factors, cfg_branch)


def _check_branch(cfg_branch: str) -> None:
    if cfg_branch not in ("cond", "uncond"):
        raise ValueError(f"cfg_branch must be 'cond' or 'uncond' (one half of the CFG batch); got {cfg_branch!r}.")


def load_saes(cfg_branch: str = "cond") -> tuple[Any, Any]:
    """(bucketed, conditioned) SAEs of ``shapes-diffusion-saes``, by name; the conditioned one trained on
    ``cfg_branch`` (there is one bucketed SAE, trained on the conditional branch)."""
    from sae_lens import SAE

    _check_branch(cfg_branch)
    return (SAE.from_pretrained(RELEASE, BUCKETED_ID),
            SAE.from_pretrained(RELEASE, CONDITIONED_ID if cfg_branch == "cond" else UNCOND_CONDITIONED_ID))


def buckets_of(sae: Any, timesteps: Sequence[float]) -> list[int]:
    return sae.cfg.buckets.bucket_of(torch.tensor(list(timesteps), dtype=torch.float64)).tolist()


@torch.no_grad()
def latent_activations(sae: Any, rows: GenerationRows) -> torch.Tensor:
    """``(generations, steps, tokens, d_sae)`` latent activations in input units (value x decoder norm /
    bucket input scale: the norm each latent adds to the reconstruction)."""
    g, s, p, d = rows.acts.shape
    factors = sae.cfg.bucket_scaling_factors
    out = []
    for step, (t, b) in enumerate(zip(rows.timesteps, buckets_of(sae, rows.timesteps))):
        with timestep_context(float(t)):
            z = sae.encode(rows.acts[:, step].reshape(-1, d).to(sae.dtype)).float()
        w_dec = sae.W_dec[b] if sae.W_dec.ndim == 3 else sae.W_dec  # bucketed: one decoder per bucket
        scale = w_dec.norm(dim=-1).float() / (1.0 if factors is None else float(factors[b]))
        out.append((z * scale).reshape(g, p, -1))
    return torch.stack(out, 1)


# ------------------------------------------------------------------------------------------------ continuity
@dataclass
class Continuity:
    """Per adjacent step pair: mean step persistence of the latents active at both steps, and the median
    relative jump of their mean curves (|change| / the latent's curve maximum); ``edge[s]`` marks pairs that
    straddle a bucket edge."""

    persistence: list[float]
    jump: list[float]
    edge: list[bool]

    def _mean(self, values: list[float], at_edge: bool) -> float:
        v = [x for x, e in zip(values, self.edge) if e == at_edge and np.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def persistence_within(self) -> float:
        return self._mean(self.persistence, False)

    @property
    def persistence_at_edges(self) -> float:
        return self._mean(self.persistence, True)

    @property
    def jump_within(self) -> float:
        return self._mean(self.jump, False)

    @property
    def jump_at_edges(self) -> float:
        return self._mean(self.jump, True)


def continuity(z: torch.Tensor, buckets: Sequence[int]) -> Continuity:
    """:class:`Continuity` of latent activations ``z`` ``(generations, steps, tokens, n)``; ``buckets[s]`` is
    step s's timestep bucket (edges = where it changes)."""
    g, s, p, n = z.shape
    curve = z.mean(dim=(0, 2))  # (steps, n)
    top = curve.max(dim=0).values
    alive = top > 0
    persistence, jump = [], []
    for i in range(s - 1):
        per = step_persistence(z[:, i].reshape(-1, n), z[:, i + 1].reshape(-1, n))
        persistence.append(float(torch.nanmean(per[alive])) if bool(alive.any()) else float("nan"))
        rel = (curve[i + 1] - curve[i]).abs()[alive] / top[alive]
        jump.append(float(rel.median()) if bool(alive.any()) else float("nan"))
    return Continuity(persistence, jump, [buckets[i] != buckets[i + 1] for i in range(s - 1)])


# ------------------------------------------------------------------------------------------------ matching
@dataclass
class BucketMatching:
    """The bucketed SAE's dictionaries matched across each edge, in denoising order (high t -> low t)."""

    edges: list[tuple[int, int]]  # (bucket before the edge, bucket after)
    matchings: list[FeatureMatching]
    tracks: list[list[int]]  # one latent per bucket (denoising order), chained through confident matches
    track_partners: list[tuple[int, float]]  # per track: the conditioned latent most like it, mean cosine
    min_score: float

    def table(self) -> pd.DataFrame:
        rows = []
        for (a, b), m in zip(self.edges, self.matchings):
            rows.append({"edge": f"bucket {a} -> {b}", "pairs": len(m),
                         f"score >= {self.min_score}": m.fraction_above(self.min_score, "score"),
                         "median decoder cosine": float(np.median(m.cosine)),
                         "median activation correlation": float(np.median(m.correlation))})
        return pd.DataFrame(rows)


def _alive(z: torch.Tensor, min_rows: int = 5) -> list[int]:
    return torch.nonzero((z > 0).sum(0) >= min_rows).flatten().tolist()


def match_buckets(bucketed: Any, conditioned: Any, z_bucketed: torch.Tensor, z_conditioned: torch.Tensor,
                  timesteps: Sequence[float], *, min_score: float = 0.5, method: str = "hungarian") -> BucketMatching:
    """Match bucket b's latents to bucket b+1's across every edge of ``bucketed`` (activations: the last step
    of one bucket and the first of the next, same generation and token), chain confident matches (score >=
    ``min_score``) into tracks and find each track's conditioned latent (highest mean decoder cosine)."""
    b_of = buckets_of(bucketed, timesteps)
    n = z_bucketed.shape[-1]
    edges, matchings = [], []
    for s in range(len(b_of) - 1):
        if b_of[s] == b_of[s + 1]:
            continue
        a, b = z_bucketed[:, s].reshape(-1, n), z_bucketed[:, s + 1].reshape(-1, n)
        edges.append((b_of[s], b_of[s + 1]))
        matchings.append(match_dictionaries(
            bucketed.W_dec[b_of[s]].detach(), bucketed.W_dec[b_of[s + 1]].detach(), acts_a=a, acts_b=b,
            latents_a=_alive(a), latents_b=_alive(b), method=method,
            label_a=f"bucket {b_of[s]} latent", label_b=f"bucket {b_of[s + 1]} latent"))
    tracks: list[list[int]] = []
    if matchings:
        links = [{i: j for (i, j), sc in zip(m.pairs, m.score) if sc >= min_score} for m in matchings]
        for start in links[0]:
            track = [start]
            for link in links:
                if track[-1] not in link:
                    break
                track.append(link[track[-1]])
            if len(track) == len(links) + 1:
                tracks.append(track)
    w_c = conditioned.W_dec.detach().float()
    w_c = w_c / w_c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    partners = []
    for track in tracks:
        bucket_ids = [edges[0][0]] + [e[1] for e in edges]
        w_b = bucketed.W_dec.detach().float()
        cos = torch.stack([w_c @ (w_b[b, i] / w_b[b, i].norm().clamp_min(1e-12))
                           for b, i in zip(bucket_ids, track)]).mean(0)
        partners.append((int(cos.argmax()), float(cos.max())))
    order = np.argsort([-p[1] for p in partners], kind="stable")
    return BucketMatching(edges, matchings, [tracks[i] for i in order], [partners[i] for i in order], min_score)


# ------------------------------------------------------------------------------------------------ purity
def factor_purity(scores: torch.Tensor, factors: Sequence[dict[str, Optional[str]]], n_top: int,
                  names: Sequence[str] = FACTORS, seed: int = 0, n_draws: int = 1000
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Purity of each latent's top generations for each factor.

    ``scores``: ``(generations, n)``. For factor f, among the generations whose prompt names f, take the
    ``n_top`` scoring highest: purity = the share of them with their most common value of f (NaN when one of
    them scores 0: the latent does not fire on that many). Returns ``(purity (n, F), chance (F,), q99 (F,))``:
    the mean and 99th percentile of the same share for ``n_draws`` random sets of ``n_top`` of those
    generations (what a latent blind to f gets)."""
    g, n = scores.shape
    if not 1 <= n_top <= g:
        raise ValueError(f"n_top must be in [1, {g}] (the number of generations); got {n_top}.")
    rng = np.random.default_rng(seed)
    purity, chance, q99 = np.full((n, len(names)), np.nan), np.full(len(names), np.nan), np.full(len(names), np.nan)
    for k, name in enumerate(names):
        named = [i for i, f in enumerate(factors) if f[name] is not None]
        values = sorted({factors[i][name] for i in named})
        m = min(n_top, len(named))
        if m < 3:
            continue
        labels = torch.tensor([values.index(factors[i][name]) for i in named])
        onehot = torch.nn.functional.one_hot(labels, len(values)).float()
        top_vals, top_idx = scores[named].topk(m, dim=0)  # (m, n)
        share = onehot[top_idx].sum(0).max(-1).values / m  # (n,)
        fires = (top_vals > 0).all(dim=0)
        purity[fires.numpy(), k] = share[fires].numpy()
        draws = np.array([float(onehot[rng.choice(len(named), m, replace=False)].sum(0).max()) / m
                          for _ in range(n_draws)])
        chance[k], q99[k] = float(draws.mean()), float(np.quantile(draws, 0.99))
    return purity, chance, q99


@dataclass
class Classification:
    """Per conditioned latent (alive ones): the step of its curve's peak, the most selective factor at that
    step (chance-corrected purity ``lift``), and its category."""

    latents: list[int]
    peak_timestep: list[float]
    best_factor: list[Optional[str]]
    best_lift: list[float]
    category: list[str]
    lift: np.ndarray  # (steps, latents, factors), chance-corrected purity
    coarse_to_specific: list[int]  # latents: colour + position selective early, shape selective only later
    coarse_to_detail: list[int] = field(default_factory=list)  # looser: colour OR position early, any detail later

    def counts(self) -> dict[str, int]:
        return {c: self.category.count(c) for c in ("coarse early", "detail late", "coarse late", "detail early",
                                                    "unselective")}

    def table(self, n: int = 12) -> pd.DataFrame:
        df = pd.DataFrame({"latent": self.latents, "peak t": self.peak_timestep, "factor": self.best_factor,
                           "lift": np.round(self.best_lift, 2), "category": self.category})
        return df.sort_values("lift", ascending=False).head(n).reset_index(drop=True)


def classify_features(z: torch.Tensor, rows: GenerationRows, *, n_top: Optional[int] = None,
                      num_train_timesteps: int = 1000, shuffle_seed: Optional[int] = None) -> Classification:
    """Coarse early / detail late / ... for every latent of ``z`` ``(generations, steps, tokens, n)`` active in
    at least ``n_top`` generations; ``n_top`` defaults to an eighth of the generations (at least 5).

    A latent is selective for factor f at a step when its purity lift ``(purity - chance) / (1 - chance)`` is at
    least ``LIFT_THRESHOLD`` and its purity exceeds the 99th percentile of random sets (lifts within it count
    as 0). ``shuffle_seed``: shuffle the factor values across generations first (the false-positive baseline)."""
    g, s, _, n = z.shape
    n_top = n_top or max(5, g // 8)
    gen_scores = z.amax(dim=2)  # (generations, steps, n): strongest token of each generation
    lift = np.full((s, n, len(FACTORS)), np.nan)
    factors = list(rows.factors)
    if shuffle_seed is not None:  # the baseline: factor values shuffled across generations, column by column
        rng = np.random.default_rng(shuffle_seed)
        columns = {f: rng.permutation([x[f] for x in factors]) for f in FACTORS}
        factors = [{f: columns[f][i] for f in FACTORS} for i in range(len(factors))]
    for step in range(s):
        purity, chance, q99 = factor_purity(gen_scores[:, step], factors, n_top)
        lift[step] = (purity - chance) / (1 - chance)
        lift[step][purity <= q99] = np.minimum(lift[step][purity <= q99], 0.0)  # within chance's 99%: not selective
    curve = z.mean(dim=(0, 2))
    alive = ((gen_scores > 0).sum(0) >= n_top).any(0).nonzero().flatten().tolist()
    early = np.array([t >= num_train_timesteps / 2 for t in rows.timesteps])
    out = Classification([], [], [], [], [], lift, [])
    for i in alive:
        peak = int(curve[:, i].argmax())
        row = np.nan_to_num(lift[peak, i], nan=-np.inf)
        k = int(row.argmax())
        best = FACTORS[k] if row[k] >= LIFT_THRESHOLD else None
        phase = "early" if early[peak] else "late"
        kind = None if best is None else ("coarse" if best in COARSE else "detail")
        out.latents.append(i)
        out.peak_timestep.append(rows.timesteps[peak])
        out.best_factor.append(best)
        out.best_lift.append(float(row[k]) if np.isfinite(row[k]) else float("nan"))
        out.category.append("unselective" if kind is None else f"{kind} {phase}")
        col, pos, shp = (np.nan_to_num(lift[:, i, FACTORS.index(f)], nan=-1.0) for f in ("color", "position", "shape"))
        layout_early = (col[early] >= LIFT_THRESHOLD) & (pos[early] >= LIFT_THRESHOLD) & (shp[early] < LIFT_THRESHOLD / 2)
        if bool(layout_early.any()) and bool((shp[~early] >= LIFT_THRESHOLD).any()):
            out.coarse_to_specific.append(i)
        detail = lift[~early][:, i, [FACTORS.index(f) for f in DETAIL]]
        detail_late = np.nan_to_num(detail, nan=-1.0).max(-1) >= LIFT_THRESHOLD
        if bool((((col >= LIFT_THRESHOLD) | (pos >= LIFT_THRESHOLD)) & (shp < LIFT_THRESHOLD / 2))[early].any()) \
                and bool(detail_late.any()):
            out.coarse_to_detail.append(i)
    return out


# ------------------------------------------------------------------------------------------------ study
def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate)."""
    def cell(v: Any) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


@dataclass
class TimestepFeatureStudy:
    """Everything :func:`timestep_feature_study` measured (see the module docstring)."""

    n_generations: int
    timesteps: list[float]
    buckets: list[int]
    explained_variance: dict[str, dict[str, Any]]  # sae name -> {"overall", "buckets", "timesteps"}
    continuity: dict[str, Continuity]
    curves: dict[str, np.ndarray]  # sae name -> (steps, d_sae) mean activation in input units
    matching: BucketMatching
    classification: Classification
    extra: dict[str, Any] = field(default_factory=dict)
    cfg_branch: str = "cond"  # the rows' CFG branch (the conditioned SAE was trained on the same one)

    def ev_table(self) -> pd.DataFrame:
        rows = []
        for name, ev in self.explained_variance.items():
            rows.append({"SAE": name, "overall": ev["overall"],
                         **{f"t in [{int(r[0])}, {int(r[1])})": v for r, v in ev["buckets"]}})
        return pd.DataFrame(rows)

    def continuity_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"SAE": k, "persistence within buckets": c.persistence_within,
                              "persistence across edges": c.persistence_at_edges,
                              "curve jump within": c.jump_within, "curve jump at edges": c.jump_at_edges}
                             for k, c in self.continuity.items()])

    def summary(self) -> str:
        ev, c, m = self.explained_variance, self.continuity, self.matching
        matched = np.mean([x.fraction_above(m.min_score, "score") for x in m.matchings]) if m.matchings else 0.0
        b_edges = round(c["bucketed"].persistence_at_edges, 2) + 0.0  # + 0.0: print 0.00, not -0.00
        return (("" if self.cfg_branch == "cond" else "unconditional branch: ") +
                f"EV conditioned {ev['conditioned']['overall']:.3f} vs bucketed {ev['bucketed']['overall']:.3f} "
                f"({self.n_generations} fresh generations); step persistence across bucket edges "
                f"{c['conditioned'].persistence_at_edges:.2f} (conditioned) vs {b_edges:.2f} "
                f"(bucketed; within buckets {c['bucketed'].persistence_within:.2f}); {matched:.0%} of bucket "
                f"features matched across edges, {len(m.tracks)} tracks through all buckets; " + self.evolution_summary())

    def evolution_summary(self) -> str:
        """Coarse-early / detail-late counts and the colour+position -> shape test, in words."""
        cls, counts = self.classification, self.classification.counts()
        return (f"{counts['coarse early']} coarse-early vs {counts['detail late']} detail-late latents "
                f"({counts['coarse late']} coarse-late, {counts['detail early']} detail-early); "
                f"{len(cls.coarse_to_specific)} colour+position -> shape latents "
                f"({len(cls.coarse_to_detail)} colour or position -> any detail)"
                + (" (purity needs more generations: use >= 48)" if self.n_generations < 48 else ""))

    def to_markdown(self) -> str:
        tracks = pd.DataFrame([{"track (bucket latents, denoising order)": " -> ".join(map(str, t)),
                                "conditioned latent": p, "mean cosine": c}
                               for t, (p, c) in zip(self.matching.tracks[:10], self.matching.track_partners)])
        tables = [self.ev_table(), self.continuity_table(), self.matching.table(), tracks,
                  pd.DataFrame([self.classification.counts()]), self.classification.table()]
        return "\n\n".join([self.summary()] + [markdown_table(t) for t in tables])

    # -------------------------------------------------------------------------------------- figures
    def plot_curves(self, path: PathLike, latents: Optional[Sequence[int]] = None) -> Path:
        """Mean activation of conditioned latents over t (each divided by its maximum; default: the six most
        active factor-selective ones), and of the bucketed SAE's six most active latent indices drawn per bucket
        (unconnected: latent i is another feature in each bucket)."""
        fig, ax = new_figure(1, 2, figsize=(11, 3.6))
        t = np.array(self.timesteps)
        cls = self.classification
        cond, buck = self.curves["conditioned"], self.curves["bucketed"]
        if latents is None:
            selective = [i for i, f in zip(cls.latents, cls.best_factor) if f is not None]
            latents = sorted(selective, key=lambda i: -float(cond[:, i].mean()))[:6]
        edges = [(a + b) / 2 for a, b, e1, e2 in zip(t[:-1], t[1:], self.buckets[:-1], self.buckets[1:]) if e1 != e2]
        for i in latents:
            label = f"latent {i}" + (f" ({cls.best_factor[cls.latents.index(i)]})" if i in cls.latents else "")
            ax[0, 0].plot(t, cond[:, i] / max(float(cond[:, i].max()), 1e-12), marker=".", label=label)
        b = np.array(self.buckets)
        norm = buck / np.maximum(buck.max(0, keepdims=True), 1e-12)
        for k, i in enumerate(np.argsort(-norm.mean(0))[:6]):
            for bucket in sorted(set(self.buckets)):
                sel = b == bucket
                ax[0, 1].plot(t[sel], norm[sel, i], marker=".", color=f"C{k}",
                              label=f"latent {i}" if bucket == self.buckets[0] else None)
        for a, title in ((ax[0, 0], "conditioned SAE: one dictionary"), (ax[0, 1], "bucketed SAE: latent i per bucket")):
            for e in edges:
                a.axvline(e, color="grey", lw=0.8, ls=":")
            a.invert_xaxis()
            a.set_xlabel("timestep t (denoising runs right)")
            a.set_ylabel("mean activation / its maximum")
            a.set_title(title, fontsize=10)
            a.legend(fontsize=7)
        return save_figure(fig, path)

    def plot_matching(self, path: PathLike, n_tracks: int = 4) -> Path:
        """Left: decoder cosine vs activation correlation of the matched pairs at each edge. Right: the best
        tracks stitched across buckets next to their conditioned counterparts."""
        fig, ax = new_figure(1, 2, figsize=(11, 3.6))
        m = self.matching
        for k, ((a, b), mt) in enumerate(zip(m.edges, m.matchings)):
            ax[0, 0].scatter(mt.cosine, mt.correlation, s=8, alpha=0.6, color=f"C{k}", label=f"bucket {a} -> {b}")
        ax[0, 0].set_xlabel("decoder cosine")
        ax[0, 0].set_ylabel("activation correlation across the edge")
        ax[0, 0].set_title("matched bucket features (Hungarian)", fontsize=10)
        ax[0, 0].legend(fontsize=7)
        t = np.array(self.timesteps)
        b = np.array(self.buckets)
        order = [m.edges[0][0]] + [e[1] for e in m.edges] if m.edges else []
        for k, (track, (partner, cos)) in enumerate(list(zip(m.tracks, m.track_partners))[:n_tracks]):
            stitched = np.concatenate([self.curves["bucketed"][b == bk, i] for bk, i in zip(order, track)])
            ts = np.concatenate([t[b == bk] for bk in order])
            ax[0, 1].plot(ts, stitched, color=f"C{k}", ls="--", label=f"track {'>'.join(map(str, track))}")
            ax[0, 1].plot(t, self.curves["conditioned"][:, partner], color=f"C{k}",
                          label=f"conditioned {partner} (cos {cos:.2f})")
        ax[0, 1].invert_xaxis()
        ax[0, 1].set_xlabel("timestep t")
        ax[0, 1].set_title("tracks across buckets vs one conditioned latent", fontsize=10)
        ax[0, 1].legend(fontsize=6)
        return save_figure(fig, path)

    def plot_purity(self, path: PathLike) -> Path:
        """Share of alive conditioned latents selective for each factor (lift >= LIFT_THRESHOLD) per step."""
        fig, ax = new_figure(1, 1, figsize=(6, 3.6))
        lift = self.classification.lift[:, self.classification.latents]
        for k, name in enumerate(FACTORS):
            share = np.mean(np.nan_to_num(lift[:, :, k], nan=-1) >= LIFT_THRESHOLD, axis=1)
            ax[0, 0].plot(self.timesteps, share, marker=".", label=name, ls="-" if name in COARSE else "--")
        ax[0, 0].invert_xaxis()
        ax[0, 0].set_xlabel("timestep t")
        ax[0, 0].set_ylabel(f"share of latents with purity lift >= {LIFT_THRESHOLD}")
        ax[0, 0].set_title(f"conditioned SAE, {self.cfg_branch} branch: factor selectivity over denoising", fontsize=10)
        ax[0, 0].legend(fontsize=7)
        return save_figure(fig, path)


def _ev(sae: Any, rows: GenerationRows) -> dict[str, Any]:
    from sae_lens_multimodal.training.evaluate import evaluate_sae

    r = evaluate_sae(sae, rows.chunk(), n_rows=10**9)
    return {"overall": float(r["overall"]["explained_variance"]),
            "buckets": [(b["timestep_range"], float(b["explained_variance"])) for b in r["buckets"]],
            "timesteps": {float(t): float(m["explained_variance"]) for t, m in r["timesteps"].items()}}


def timestep_feature_study(n_prompts: int = 96, *, seed: int = 2000, rows: Optional[GenerationRows] = None,
                           saes: Optional[tuple[Any, Any]] = None, progress: bool = False,
                           cfg_branch: str = "cond") -> TimestepFeatureStudy:
    """Run the study on ``n_prompts`` fresh generations (or given ``rows``) of ``cfg_branch`` with the shipped
    SAEs (the conditioned one of that branch) or ``saes`` = (bucketed, conditioned)."""
    rows = rows or generation_rows(n_prompts, seed=seed, progress=progress, cfg_branch=cfg_branch)
    bucketed, conditioned = saes or load_saes(rows.cfg_branch)
    z_b, z_c = latent_activations(bucketed, rows), latent_activations(conditioned, rows)
    buckets = buckets_of(conditioned, rows.timesteps)
    return TimestepFeatureStudy(
        n_generations=rows.acts.shape[0], timesteps=rows.timesteps, buckets=buckets,
        explained_variance={"conditioned": _ev(conditioned, rows), "bucketed": _ev(bucketed, rows)},
        continuity={"conditioned": continuity(z_c, buckets), "bucketed": continuity(z_b, buckets_of(bucketed, rows.timesteps))},
        curves={"conditioned": z_c.mean(dim=(0, 2)).numpy(), "bucketed": z_b.mean(dim=(0, 2)).numpy()},
        matching=match_buckets(bucketed, conditioned, z_b, z_c, rows.timesteps),
        classification=classify_features(z_c, rows, num_train_timesteps=int(conditioned.cfg.num_train_timesteps)),
        cfg_branch=rows.cfg_branch,
    )


def ground_truth_line(quick: bool = False, progress: bool = False) -> tuple[str, TimestepFeatureStudy]:
    """The ``sae-lens-mm ground-truth`` line (check ``diffusion-time``): the study on 96 generations (12 quick),
    then its evolution test on their unconditional branch with that branch's SAE (``study.extra["uncond"]``)."""
    n = 12 if quick else 96
    study = timestep_feature_study(n, progress=progress)
    uncond = study.extra["uncond"] = timestep_feature_study(n, progress=progress, cfg_branch="uncond")
    ev = uncond.explained_variance["conditioned"]
    return (f"{study.summary()}; unconditional branch (its own conditioned SAE, EV {ev['overall']:.3f}, lowest "
            f"bucket {min(v for _, v in ev['buckets']):.3f}): {uncond.evolution_summary()}"), study


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-prompts", type=int, default=96)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--cfg-branch", choices=("cond", "uncond"), default="cond",
                        help="CFG branch of the rows (uncond: with the SAE trained on it; figures end in _uncond)")
    parser.add_argument("--figures", default=None, help="folder for diffusion_time_{curves,matching,purity}.png")
    args = parser.parse_args(argv)
    study = timestep_feature_study(args.n_prompts, seed=args.seed, progress=True, cfg_branch=args.cfg_branch)
    print(study.to_markdown())
    if args.figures:
        out, tag = Path(args.figures), "" if args.cfg_branch == "cond" else "_uncond"
        for name, plot in (("curves", study.plot_curves), ("matching", study.plot_matching), ("purity", study.plot_purity)):
            print("wrote", plot(out / f"diffusion_time_{name}{tag}.png"))


if __name__ == "__main__":
    main()
