"""Match the latents of two SAE dictionaries (or of one dictionary at two moments) one to one.

Model-agnostic: everything here works on decoder matrices and activation matrices.

* :func:`decoder_cosine`: cosine similarity of every pair of decoder rows, ``(n_a, n_b)``.
* :func:`activation_correlation`: Pearson correlation of every pair of latents over paired rows (row ``r`` of
  ``acts_a`` and row ``r`` of ``acts_b`` describe the same thing, e.g. the same token of the same generation at
  two adjacent denoising steps), ``(n_a, n_b)``; a latent that never varies correlates 0 with everything.
* :func:`match_features`: a one-to-one matching maximising a similarity matrix, ``"hungarian"`` (optimal;
  scipy) or ``"greedy"`` (best remaining pair first; no dependency), dropping pairs under ``min_similarity``.
* :func:`match_dictionaries`: both similarities, combined (their mean by default), matched, returned as a
  :class:`FeatureMatching` with a table per pair.
* :func:`step_persistence`: how much each latent of paired rows keeps its value from one moment to the next
  (the diagonal of :func:`activation_correlation`): near 1 for a latent that means the same feature at both
  moments, near 0 when latent i at the second moment is another feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

__all__ = [
    "MATCH_METHODS",
    "FeatureMatching",
    "activation_correlation",
    "decoder_cosine",
    "match_dictionaries",
    "match_features",
    "step_persistence",
]

MATCH_METHODS = ("hungarian", "greedy")


def _matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-d matrix; got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite entries.")
    return t


def decoder_cosine(w_dec_a: torch.Tensor, w_dec_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of decoder rows, ``(d_sae_a, d_in)`` x ``(d_sae_b, d_in)`` -> ``(d_sae_a, d_sae_b)``.
    A zero row has cosine 0 with everything."""
    a, b = _matrix(w_dec_a, "w_dec_a"), _matrix(w_dec_b, "w_dec_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"The decoders have different widths d_in ({a.shape[1]} vs {b.shape[1]}): they are not "
                         "dictionaries of the same activation space.")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).float()


def activation_correlation(acts_a: torch.Tensor, acts_b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every latent of ``acts_a`` ``(rows, n_a)`` and every latent of ``acts_b``
    ``(rows, n_b)`` over paired rows -> ``(n_a, n_b)``. A constant latent correlates 0."""
    a, b = _matrix(acts_a, "acts_a"), _matrix(acts_b, "acts_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"acts_a and acts_b must be paired rows; got {a.shape[0]} and {b.shape[0]} rows.")
    if a.shape[0] < 2:
        raise ValueError("A correlation needs at least 2 paired rows.")
    a, b = a - a.mean(0), b - b.mean(0)
    sa, sb = a.norm(dim=0), b.norm(dim=0)
    corr = (a.T @ b) / (sa[:, None] * sb[None, :]).clamp_min(1e-12)
    corr[sa < 1e-12] = 0.0
    corr[:, sb < 1e-12] = 0.0
    return corr.float()


def step_persistence(acts_before: torch.Tensor, acts_after: torch.Tensor) -> torch.Tensor:
    """Per latent, the correlation of its value on paired rows at two moments, ``(n,)``; NaN for a latent
    constant at either moment (nothing to persist)."""
    a, b = _matrix(acts_before, "acts_before"), _matrix(acts_after, "acts_after")
    if a.shape != b.shape:
        raise ValueError(f"acts_before and acts_after must have the same shape; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    a, b = a - a.mean(0), b - b.mean(0)
    sa, sb = a.norm(dim=0), b.norm(dim=0)
    out = (a * b).sum(0) / (sa * sb).clamp_min(1e-12)
    out[(sa < 1e-12) | (sb < 1e-12)] = float("nan")
    return out.float()


def match_features(similarity: torch.Tensor | np.ndarray, *, method: str = "hungarian",
                   min_similarity: Optional[float] = None) -> list[tuple[int, int, float]]:
    """One-to-one pairs ``(i, j, similarity[i, j])`` maximising the total similarity, best first.

    ``"hungarian"`` solves the assignment exactly (scipy's ``linear_sum_assignment``); ``"greedy"`` takes the
    most similar remaining pair until one side is used up (no dependency; optimal when every latent has one
    clear partner). Pairs under ``min_similarity`` are dropped after matching.
    """
    if method not in MATCH_METHODS:
        raise ValueError(f"method must be one of {MATCH_METHODS}; got {method!r}.")
    s = _matrix(similarity, "similarity").numpy()
    if method == "hungarian":
        try:  # scipy is optional: only the exact assignment needs it
            from scipy.optimize import linear_sum_assignment
        except ImportError as exc:  # pragma: no cover - scipy ships with the test environment
            raise ImportError("method='hungarian' needs scipy (pip install scipy); or use method='greedy'.") from exc
        rows, cols = linear_sum_assignment(s, maximize=True)
        pairs = [(int(i), int(j), float(s[i, j])) for i, j in zip(rows, cols)]
    else:
        order = np.argsort(-s, axis=None, kind="stable")
        used_i: set[int] = set()
        used_j: set[int] = set()
        pairs = []
        for flat in order:
            i, j = divmod(int(flat), s.shape[1])
            if i in used_i or j in used_j:
                continue
            used_i.add(i)
            used_j.add(j)
            pairs.append((i, j, float(s[i, j])))
            if len(pairs) == min(s.shape):
                break
    if min_similarity is not None:
        pairs = [p for p in pairs if p[2] >= min_similarity]
    return sorted(pairs, key=lambda p: -p[2])


@dataclass
class FeatureMatching:
    """A one-to-one matching of dictionary A's latents to dictionary B's.

    ``pairs``: ``(latent in A, latent in B)``, best first; ``cosine`` / ``correlation`` / ``score``: per pair
    (``correlation`` NaN without activations); ``method``: how the pairs were chosen."""

    pairs: list[tuple[int, int]]
    cosine: list[float]
    correlation: list[float]
    score: list[float]
    method: str
    label_a: str = "A"
    label_b: str = "B"

    def __len__(self) -> int:
        return len(self.pairs)

    def partner(self, latent_a: int) -> Optional[int]:
        """The latent of B matched to ``latent_a`` of A, or None."""
        return next((j for i, j in self.pairs if i == latent_a), None)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({self.label_a: [i for i, _ in self.pairs], self.label_b: [j for _, j in self.pairs],
                             "decoder cosine": self.cosine, "activation correlation": self.correlation,
                             "score": self.score})

    def fraction_above(self, threshold: float, what: str = "cosine") -> float:
        """Share of pairs whose ``what`` ("cosine", "correlation" or "score") is at least ``threshold``."""
        values = np.asarray(getattr(self, what), dtype=float)
        return float(np.mean(values >= threshold)) if len(values) else 0.0


def match_dictionaries(w_dec_a: torch.Tensor, w_dec_b: torch.Tensor, *, acts_a: Optional[torch.Tensor] = None,
                       acts_b: Optional[torch.Tensor] = None, weight_cosine: float = 0.5, method: str = "hungarian",
                       latents_a: Optional[list[int]] = None, latents_b: Optional[list[int]] = None,
                       min_score: Optional[float] = None, label_a: str = "A", label_b: str = "B") -> FeatureMatching:
    """Match two dictionaries by ``weight_cosine * decoder cosine + (1 - weight_cosine) * activation
    correlation`` (decoder cosine only without ``acts_a``/``acts_b``, paired rows of both dictionaries'
    latent activations). ``latents_a`` / ``latents_b`` restrict the candidates (e.g. to latents alive on these
    rows); returned indices are the dictionaries' own."""
    if not 0.0 <= weight_cosine <= 1.0:
        raise ValueError(f"weight_cosine is a weight in [0, 1]; got {weight_cosine!r}.")
    if (acts_a is None) != (acts_b is None):
        raise ValueError("Pass both acts_a and acts_b (paired rows), or neither.")
    ia = list(range(int(torch.as_tensor(w_dec_a).shape[0]))) if latents_a is None else list(latents_a)
    ib = list(range(int(torch.as_tensor(w_dec_b).shape[0]))) if latents_b is None else list(latents_b)
    if not ia or not ib:
        raise ValueError("Nothing to match: latents_a or latents_b is empty.")
    cos = decoder_cosine(torch.as_tensor(w_dec_a)[ia], torch.as_tensor(w_dec_b)[ib])
    if acts_a is not None:
        corr = activation_correlation(torch.as_tensor(acts_a)[:, ia], torch.as_tensor(acts_b)[:, ib])
        score = weight_cosine * cos + (1 - weight_cosine) * corr
    else:
        corr, score = torch.full_like(cos, float("nan")), cos
    pairs = match_features(score, method=method, min_similarity=min_score)
    return FeatureMatching(
        pairs=[(ia[i], ib[j]) for i, j, _ in pairs], cosine=[float(cos[i, j]) for i, j, _ in pairs],
        correlation=[float(corr[i, j]) for i, j, _ in pairs], score=[s for _, _, s in pairs], method=method,
        label_a=label_a, label_b=label_b,
    )
