"""A diffusion circuit: which features of the bundled UNet SAE, at which timesteps, carry the prompt's colour
into the image shapes-diffusion generates.

Contrast: clean prompt "a <A> <shape> <position>", corrupted prompt with colour B, the same initial noise.
Metric (:func:`colour_probe`): a linear colour probe on the final image, the object's mean colour (pixels
weighted by their saturation, the background is black) projected on the line from the world's nominal colour
B to A: +0.5 at A, -0.5 at B. The shapes CLIP's zero-shot judgement of the images is the ground truth the
circuit is checked against.

Nodes: feature x denoising step of the timestep-bucketed SAE ``shapes-diffusion-saes`` /
``up_blocks.0.attentions.1.hook_out`` on the conditional CFG branch, plus one error node per step
(:mod:`sae_lens_multimodal.analysis.diffusion_attribution`: attribution patching through the whole sampler).

:func:`diffusion_colour_circuit` runs the study:

1. attribution of every node; exact patching of the top nodes (and a few random ones) validates it;
2. the circuit: the fewest top nodes whose faithfulness (every other feature of the SAE at every step patched
   from the corrupted run, error terms kept) reaches ``target_faithfulness``; the effect of ablating it;
3. ground truth: the circuit's features' top generations share a colour (purity), and clamping a feature in its
   window moves the CLIP-judged colour of other prompts towards that colour, leaving shape and position.

>>> circuit = diffusion_colour_circuit()        # the shipped model and SAE, ~10 minutes on one CPU core
>>> print(circuit); circuit.plot("diffusion_circuit.png")
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.analysis.diffusion_attribution import (
    SamplerAttribution,
    corrupted_features,
    feature_patched_run,
    node_keep_masks,
    sampler_attribution,
)
from sae_lens_multimodal.core.images import to_uint8
from sae_lens_multimodal.world.shapes import COLORS, POSITIONS, SHAPES, caption

__all__ = [
    "DIFFUSION_CIRCUIT_HOOK",
    "DIFFUSION_CIRCUIT_RELEASE",
    "DiffusionColourCircuit",
    "colour_pairs",
    "feature_key",
    "colour_probe",
    "colour_probe_per_image",
    "diffusion_colour_circuit",
]

DIFFUSION_CIRCUIT_RELEASE = "shapes-diffusion-saes"
DIFFUSION_CIRCUIT_HOOK = "up_blocks.0.attentions.1.hook_out"


def colour_pairs(n_pairs: int = 30) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(clean, corrupted) factor dicts: every ordered pair of different colours in turn (30), each with a shape
    and a position cycling through the world's values, the same in both prompts."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1; got {n_pairs}.")
    ordered = [(a, b) for a, b in itertools.permutations(COLORS, 2)]
    out = []
    for i in range(n_pairs):
        a, b = ordered[(i * 7) % len(ordered)]  # stride 7 (coprime to 30): the first pairs already mix colours
        shape, position = SHAPES[i % len(SHAPES)], POSITIONS[(i * 4) % len(POSITIONS)]
        out.append(({"color": a, "shape": shape, "position": position},
                    {"color": b, "shape": shape, "position": position}))
    return out


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(COLORS[name], dtype=torch.float32) / 255.0


def colour_probe_per_image(images: torch.Tensor, true_colours: Sequence[str],
                           foil_colours: Sequence[str]) -> torch.Tensor:
    """Per image (float [n, 3, H, W] in [0, 1]): the saturation-weighted mean pixel projected on the line from
    the foil's nominal colour to the true one, centred between them: +0.5 = the true colour, -0.5 = the foil."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be float [n, 3, H, W] (output_type='pt'); got shape {tuple(images.shape)}.")
    if not (len(true_colours) == len(foil_colours) == images.shape[0]):
        raise ValueError(f"One true and one foil colour per image: {images.shape[0]} images, {len(true_colours)} / "
                         f"{len(foil_colours)} colours.")
    a = torch.stack([_rgb(c) for c in true_colours]).to(images)
    b = torch.stack([_rgb(c) for c in foil_colours]).to(images)
    d = (a - b) / ((a - b) ** 2).sum(-1, keepdim=True)
    x = images.permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3)
    weight = x.max(-1).values - x.min(-1).values + 1e-6  # saturation: ~0 on the black background
    proj = ((x - ((a + b) / 2)[:, None]) * d[:, None]).sum(-1)
    return (weight * proj).sum(1) / weight.sum(1)


def colour_probe(true_colours: Sequence[str], foil_colours: Sequence[str]) -> Any:
    """The metric: images -> mean of :func:`colour_probe_per_image` (differentiable)."""

    def metric(images: torch.Tensor) -> torch.Tensor:
        return colour_probe_per_image(images, true_colours, foil_colours).mean()

    return metric


@dataclass
class DiffusionColourCircuit:
    """The result of :func:`diffusion_colour_circuit` (figures in :meth:`plot`, numbers in :meth:`to_dict`)."""

    attribution: SamplerAttribution = field(repr=False)
    #: timestep -> circuit features at that step
    nodes: dict[Any, list[int]]
    threshold: float
    faithfulness: float
    #: metric change when the circuit's nodes are patched from the corrupted run, the rest kept clean, as a
    #: fraction of the change when every feature at every step is patched
    ablation_effect: float
    #: (n_nodes, faithfulness) of the top-n nodes
    curve: list[tuple[int, float]]
    #: (timestep, feature, AtP estimate, exact patching change)
    validation: list[tuple[Any, int, float, float]]
    correlation: float
    sign_agreement: float
    #: metric: clean, corrupted, every feature patched, the circuit's nodes ablated, only the circuit kept
    metrics: dict[str, float]
    #: CLIP-judged fraction of images with the clean prompt's colour in the same runs
    clip_clean_colour: dict[str, float]
    #: timestep -> the SAE's dictionary (timestep bucket) at that step: a feature is (bucket, index)
    step_buckets: dict[Any, int]
    #: feature key ("b<bucket>:<index>") -> {"window": [timesteps], "colour": top generations' modal colour,
    #: "purity": fraction of the top generations with that colour, "top_prompts": [...]}
    purity: dict[str, dict[str, Any]]
    #: the same for random features outside the circuit, one per checked feature, same bucket and window
    random_purity: dict[str, dict[str, Any]]
    #: feature key -> steering result (CLIP colour fraction to the feature's colour before / after, shape and
    #: position kept); "random <key>": a random feature clamped alike (the baseline)
    steering: dict[str, dict[str, Any]]
    settings: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.nodes.values())

    @property
    def windows(self) -> dict[str, list[Any]]:
        """Feature key ("b<bucket>:<index>") -> the timesteps at which it is in the circuit."""
        out: dict[str, list[Any]] = {}
        for t, feats in self.nodes.items():
            for f in feats:
                out.setdefault(feature_key(self.step_buckets[t], f), []).append(t)
        return {k: sorted(ts, key=lambda t: -float(t)) for k, ts in out.items()}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "attribution"}
        out["nodes"] = {str(t): v for t, v in self.nodes.items()}
        out["step_buckets"] = {str(t): b for t, b in self.step_buckets.items()}
        out["size"] = self.size
        out["timesteps"] = list(self.attribution.timesteps)
        return out

    def __str__(self) -> str:
        m = self.metrics
        lines = [
            f"Diffusion colour circuit at {self.attribution.hook} ({self.settings.get('n_pairs')} prompt pairs, "
            f"{len(self.attribution.timesteps)} steps): {self.size} feature x step nodes, |AtP| >= {self.threshold:.4f}",
            f"metric (colour probe): clean {m['clean']:.3f}, corrupted {m['corrupted']:.3f}, every SAE feature patched "
            f"{m['all_features_patched']:.3f}, circuit ablated {m['circuit_ablated']:.3f}, circuit only {m['circuit_only']:.3f}",
            f"faithfulness {self.faithfulness:.3f}; ablating the circuit does {self.ablation_effect:.0%} of patching every feature",
            f"AtP vs exact patching on {len(self.validation)} nodes: r = {self.correlation:.3f}, sign agreement "
            f"{self.sign_agreement:.0%}",
            "CLIP: clean colour kept in " + ", ".join(f"{k} {v:.0%}" for k, v in self.clip_clean_colour.items()),
        ]
        if self.purity:
            mean = np.mean([p["purity"] for p in self.purity.values()])
            rand = np.mean([p["purity"] for p in self.random_purity.values()]) if self.random_purity else float("nan")
            lines.append(f"purity of {len(self.purity)} circuit features: mean {mean:.0%}; random features in the same "
                         f"buckets and windows {rand:.0%}; chance {1 / len(COLORS):.0%}")
        for f, p in list(self.purity.items())[:8]:
            lines.append(f"  feature {f} at t={p['window']}: top generations {p['colour']} (purity {p['purity']:.0%})")
        for f, s in self.steering.items():
            lines.append(f"  steer {f} ({len(s['features'])} feature(s)): CLIP colour -> {s['colour']} {s['before']:.0%} -> "
                         f"{s['after']:.0%}; shape kept {s['shape_kept']:.0%}, position kept {s['position_kept']:.0%}")
        return "\n".join(lines)

    def plot(self, path: Any, n_features: int = 24) -> Path:
        """PNG: timestep x feature heatmap of the AtP estimates (the top features by total |estimate|, circuit
        nodes boxed) with the error node per step, and the faithfulness curve."""
        from sae_lens_multimodal.analysis.plotting import blank_figure, heatmap, save_figure

        scores = self.attribution.node_scores
        steps = list(self.attribution.timesteps)
        bucket = torch.tensor([self.step_buckets[t] for t in steps])
        # A column is one feature of one bucket's dictionary: its estimates at that bucket's steps, 0 elsewhere.
        weight = {}
        for b in bucket.unique().tolist():
            rows = (bucket == b).nonzero().flatten()
            for f, w in enumerate(scores[rows].abs().sum(0).tolist()):
                weight[(b, f)] = w
        order = sorted(weight, key=lambda k: -weight[k])[:n_features]
        order.sort(key=lambda k: (-k[0], -weight[k]))
        table = torch.zeros(len(steps), len(order) + 1)
        for j, (b, f) in enumerate(order):
            table[:, j] = torch.where(bucket == b, scores[:, f], torch.zeros(()))
        table[:, -1] = self.attribution.errors.reshape(len(steps), -1).sum(1)
        fig = blank_figure(figsize=(0.36 * len(order) + 7.0, 0.32 * len(steps) + 2.4))
        gs = fig.add_gridspec(1, 2, width_ratios=(0.36 * len(order) + 1.5, 3.2), wspace=0.3)
        ax = fig.add_subplot(gs[0, 0])
        heatmap(ax, table, row_labels=[f"{t} (b{self.step_buckets[t]})" for t in steps],
                col_labels=[feature_key(b, f) for b, f in order] + ["err"], cbar_label="AtP estimate (probe change)",
                title=f"feature x timestep attribution, {self.attribution.hook}")
        ax.set_xlabel("SAE feature (b<bucket>:<index>; err: error node)", fontsize=8)
        ax.set_ylabel("timestep (bucket), denoising order", fontsize=8)
        from matplotlib.patches import Rectangle

        for s, t in enumerate(steps):
            for j, (b, f) in enumerate(order):
                if b == self.step_buckets[t] and f in self.nodes.get(t, []):
                    ax.add_patch(Rectangle((j - 0.5, s - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))
        ax2 = fig.add_subplot(gs[0, 1])
        sizes, faith = zip(*self.curve) if self.curve else ((), ())
        ax2.plot(sizes, faith, marker="o")
        ax2.axhline(1.0, color="grey", linewidth=0.6)
        ax2.axvline(self.size, color="black", linestyle=":", linewidth=0.8)
        ax2.set_xscale("log")
        ax2.set_xlabel("top-n feature x step nodes kept", fontsize=8)
        ax2.set_ylabel("faithfulness", fontsize=8)
        ax2.set_title(f"circuit: {self.size} nodes, F = {self.faithfulness:.2f}", fontsize=9)
        return save_figure(fig, path)


def _load(hooked: Any, sae: Any) -> tuple[Any, Any]:
    if hooked is None:
        # diffusers: the shapes pipeline loads only for this study
        from sae_lens_multimodal.diffusion.pipeline import HookedDiffusionPipeline
        from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

        hooked = HookedDiffusionPipeline(load_shapes_pipeline())
    if sae is None:
        from sae_lens import SAE

        sae = SAE.from_pretrained(DIFFUSION_CIRCUIT_RELEASE, DIFFUSION_CIRCUIT_HOOK)
    return hooked, sae


def feature_key(bucket: int, feature: int) -> str:
    """The name of feature ``feature`` of dictionary (timestep bucket) ``bucket``: ``"b<bucket>:<feature>"``."""
    return f"b{bucket}:{feature}"


def _step_buckets(sae: Any, timesteps: Sequence[Any]) -> dict[Any, int]:
    """Timestep -> the SAE's bucket there (0 for an SAE with one dictionary for every timestep)."""
    buckets = getattr(getattr(sae, "cfg", None), "buckets", None)
    if buckets is None or not hasattr(buckets, "bucket_of"):
        return {t: 0 for t in timesteps}
    idx = buckets.bucket_of(torch.tensor([float(t) for t in timesteps])).tolist()
    return {t: int(b) for t, b in zip(timesteps, idx)}


def _ranked(attr: SamplerAttribution) -> list[tuple[Any, int, float]]:
    return attr.top(attr.scores.numel())


def _nodes_of(ranked: Sequence[tuple[Any, int, float]]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for t, f, _ in ranked:
        out.setdefault(t, []).append(f)
    return out


def _clip_predictions(judge: Any, images: torch.Tensor) -> dict[str, list[str]]:
    return judge.predict(to_uint8(images))


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _purity(hooked: Any, sae: Any, windows: dict[str, tuple[int, list[Any]]], *, seed: int, top_k: int,
            pipe_kwargs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Each feature's top ``top_k`` generations among every colour x shape x three positions (54 prompts), scored
    by its largest activation over positions averaged over its window's steps (colour features fire on the
    object, wherever it is). ``windows``: key -> (feature index, timesteps). Returns purity records (chance:
    1/6) and each feature's typical active value (the mean score of its top generations)."""
    prompts = [{"color": c, "shape": s, "position": p} for c in COLORS for s in SHAPES for p in ("left", "center", "top right")]
    _, feats = corrupted_features(hooked, sae, [caption(p) for p in prompts], seed=seed, **pipe_kwargs)
    records, values = {}, {}
    for key, (f, window) in windows.items():
        acts = torch.stack([feats[t][..., f].flatten(1) for t in window])  # [steps, n_prompts, positions]
        score = acts.amax(dim=2).mean(dim=0)
        top = score.topk(top_k).indices.tolist()
        colours = [prompts[i]["color"] for i in top]
        modal = max(set(colours), key=colours.count)
        records[key] = {"feature": f, "window": list(window), "colour": modal, "purity": colours.count(modal) / top_k,
                        "top_prompts": [caption(prompts[i]) for i in top]}
        values[key] = float(score[top].mean())
    return records, values


def _steer(hooked: Any, sae: Any, steers: Sequence[tuple[int, list[Any], float]], colour: str, judge: Any, *,
           seed: int, pipe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Clamp each (feature, window, value) of ``steers`` to its value at every position in its window (conditional
    branch) on prompts of the colours other than ``colour``; CLIP's judgement before / after."""
    from sae_lens_multimodal.steering import FeatureSteer, steer

    prompts = [{"color": c, "shape": s, "position": POSITIONS[(3 * i + j) % len(POSITIONS)]}
               for i, c in enumerate(c for c in COLORS if c != colour) for j, s in enumerate(SHAPES)]
    text = [caption(p) for p in prompts]
    with torch.no_grad():
        before = _clip_predictions(judge, hooked(text, generator=torch.Generator().manual_seed(seed), **pipe_kwargs))
        specs = [FeatureSteer(sae, f, "clamp", value=v, timesteps=list(w), cfg_branch="cond") for f, w, v in steers]
        with steer(hooked, *specs):
            after = _clip_predictions(judge, hooked(text, generator=torch.Generator().manual_seed(seed), **pipe_kwargs))

    def frac(pred: dict[str, list[str]], factor: str, target: Optional[str] = None) -> float:
        return float(np.mean([v == (target if target is not None else p[factor]) for v, p in zip(pred[factor], prompts)]))

    return {"colour": colour, "features": [f for f, _, _ in steers], "windows": [list(w) for _, w, _ in steers],
            "values": [v for _, _, v in steers], "n_images": len(prompts),
            "before": frac(before, "color", colour), "after": frac(after, "color", colour),
            "prompt_colour_before": frac(before, "color"), "prompt_colour_after": frac(after, "color"),
            "shape_kept": frac(after, "shape"), "position_kept": frac(after, "position"),
            "shape_before": frac(before, "shape"), "position_before": frac(before, "position")}


def diffusion_colour_circuit(
    hooked: Any = None,
    sae: Any = None,
    *,
    n_pairs: int = 30,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    target_faithfulness: float = 0.8,
    sizes: Sequence[int] = (1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120),
    n_validate: int = 12,
    n_random_validate: int = 4,
    n_features_checked: int = 30,
    purity_top_k: int = 6,
    n_steered: int = 2,
    steer_multiplier: float = 4.0,
    judge: Any = None,
) -> DiffusionColourCircuit:
    """The study of the module docstring on the shipped shapes-diffusion and its bundled SAE (or ``hooked`` /
    ``sae``). ``n_pairs`` prompt pairs (:func:`colour_pairs`), DPM-Solver++ with ``num_inference_steps`` steps.
    ``sizes``: circuit sizes tried (top-n nodes by |AtP|); the circuit is the smallest reaching
    ``target_faithfulness`` (else the largest). A feature is one index of one timestep bucket's dictionary; the
    ``n_features_checked`` circuit features of largest summed |AtP| get the purity check (against a random feature
    of the same bucket outside the circuit, same window), the ``n_steered`` purest of them and every colour's
    group of checked features with purity >= 1/2 the steering check: clamped to ``steer_multiplier`` times their
    typical top activation in their window (conditional branch) on prompts of the other colours, against their
    random partners clamped alike."""
    if not 0 < target_faithfulness <= 1:
        raise ValueError(f"target_faithfulness must be in (0, 1]; got {target_faithfulness}.")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive node counts; got {list(sizes)}.")
    hooked, sae = _load(hooked, sae)
    if judge is None:
        from sae_lens_multimodal.world.eval_diffusion import FactorClassifier

        judge = FactorClassifier()
    pairs = colour_pairs(n_pairs)
    clean, corrupt = [caption(c) for c, _ in pairs], [caption(x) for _, x in pairs]
    true, foil = [c["color"] for c, _ in pairs], [x["color"] for _, x in pairs]
    metric = colour_probe(true, foil)
    kw: dict[str, Any] = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pt")
    d_sae = int(sae.cfg.d_sae)

    attr = sampler_attribution(hooked, sae, clean, corrupt, metric, seed=seed, **kw)
    corrupt_images, reference = corrupted_features(hooked, sae, corrupt, seed=seed, **kw)
    steps = list(attr.timesteps)

    def run(keep: dict[Any, torch.Tensor]) -> torch.Tensor:
        return feature_patched_run(hooked, sae, clean, reference, keep, seed=seed, **kw)

    def value(images: torch.Tensor) -> float:
        return float(metric(images))

    clean_images = run({})
    m_clean = value(clean_images)
    everything = run(node_keep_masks({}, d_sae, steps=steps))
    m_empty = value(everything)
    if abs(m_clean - m_empty) < 1e-6:
        raise RuntimeError("Patching every SAE feature at every step does not change the metric: no circuit to find.")

    ranked = _ranked(attr)
    rng = np.random.default_rng(seed)
    rest = ranked[n_validate:]
    random_picks = rng.choice(len(rest), size=min(n_random_validate, len(rest)), replace=False)
    picks = ranked[:n_validate] + [rest[i] for i in random_picks]
    validation = []
    for t, f, est in picks:
        exact = value(run(node_keep_masks({t: [f]}, d_sae, complement=True))) - m_clean
        validation.append((t, f, est, exact))

    def faith(nodes: dict[Any, list[int]]) -> tuple[float, torch.Tensor]:
        images = run(node_keep_masks(nodes, d_sae, steps=steps))
        return (value(images) - m_empty) / (m_clean - m_empty), images

    curve, chosen = [], None
    for n in sorted(set(int(s) for s in sizes if s <= len(ranked))):
        f_n, _ = faith(_nodes_of(ranked[:n]))
        curve.append((n, f_n))
        if chosen is None and f_n >= target_faithfulness:
            chosen = n
    n_nodes = chosen if chosen is not None else curve[-1][0]
    nodes = _nodes_of(ranked[:n_nodes])
    faithfulness, only_images = faith(nodes)
    ablated_images = run(node_keep_masks(nodes, d_sae, complement=True))
    m_ablated = value(ablated_images)

    clip = {}
    for name, images in (("clean", clean_images), ("corrupted", corrupt_images), ("all_features_patched", everything),
                         ("circuit_ablated", ablated_images), ("circuit_only", only_images)):
        pred = _clip_predictions(judge, images)["color"]
        clip[name] = float(np.mean([p == c for p, c in zip(pred, true)]))

    circuit = DiffusionColourCircuit(
        attribution=attr, nodes=nodes, threshold=abs(ranked[n_nodes - 1][2]), faithfulness=faithfulness,
        ablation_effect=(m_clean - m_ablated) / (m_clean - m_empty), curve=curve, validation=validation,
        correlation=_pearson([v[2] for v in validation], [v[3] for v in validation]),
        sign_agreement=float(np.mean([np.sign(v[2]) == np.sign(v[3]) for v in validation])),
        metrics={"clean": m_clean, "corrupted": value(corrupt_images), "all_features_patched": m_empty,
                 "circuit_ablated": m_ablated, "circuit_only": value(only_images)},
        clip_clean_colour=clip, step_buckets=_step_buckets(sae, steps), purity={}, random_purity={}, steering={},
        settings={"n_pairs": n_pairs, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "seed": seed, "target_faithfulness": target_faithfulness, "cfg_branch": attr.cfg_branch,
                  "hook": attr.hook, "metric": "colour probe (saturation-weighted mean pixel on the B->A line)",
                  "steer_multiplier": steer_multiplier, "purity_top_k": purity_top_k},
    )
    _check_features(circuit, hooked, sae, judge, rng, seed=seed, pipe_kwargs=kw, n_features_checked=n_features_checked,
                    purity_top_k=purity_top_k, n_steered=n_steered, steer_multiplier=steer_multiplier)
    return circuit


def _check_features(circuit: DiffusionColourCircuit, hooked: Any, sae: Any, judge: Any, rng: np.random.Generator, *,
                    seed: int, pipe_kwargs: dict[str, Any], n_features_checked: int, purity_top_k: int, n_steered: int,
                    steer_multiplier: float) -> None:
    """Fill ``circuit.purity``, ``random_purity`` and ``steering`` (see :func:`diffusion_colour_circuit`)."""
    kw, d_sae = pipe_kwargs, int(sae.cfg.d_sae)
    steps = list(circuit.attribution.timesteps)
    weight = {key: sum(abs(float(circuit.attribution.node_scores[steps.index(t), int(key.split(":")[1])])) for t in ts)
              for key, ts in circuit.windows.items()}
    checked = sorted(weight, key=lambda k: -weight[k])[:n_features_checked]
    windows = {k: (int(k.split(":")[1]), circuit.windows[k]) for k in checked}
    # Baseline: per checked feature, a random feature of the same bucket outside the circuit, same window.
    baseline: dict[str, tuple[int, list[Any]]] = {}
    for k in checked:
        bucket = k.split(":")[0]
        taken = {int(w.split(":")[1]) for w in weight if w.split(":")[0] == bucket} | {
            f for w, (f, _) in baseline.items() if w.split(":")[0] == bucket}
        f_r = int(rng.choice([f for f in range(d_sae) if f not in taken]))
        baseline[f"{bucket}:{f_r}"] = (f_r, windows[k][1])
    records, typical = _purity(hooked, sae, {**windows, **baseline}, seed=seed + 1, top_k=purity_top_k,
                               pipe_kwargs=kw)
    circuit.purity = {k: records[k] for k in checked}
    circuit.random_purity = {k: records[k] for k in baseline}
    # Steer the purest circuit features (ties: larger attribution), each against its random partner, then every
    # colour's circuit features (purity >= 1/2) together against their partners together.
    steered = sorted(checked, key=lambda k: (-records[k]["purity"], -weight[k]))[:n_steered]
    partner = dict(zip(checked, baseline))

    def spec(k: str, value_of: str) -> tuple[int, list[Any], float]:
        rec = records[k]
        return rec["feature"], rec["window"], steer_multiplier * typical[value_of]

    groups = {k: [k] for k in steered}
    for colour in COLORS:
        members = [k for k in checked if records[k]["colour"] == colour and records[k]["purity"] >= 0.5]
        if len(members) > 1:
            groups[f"{colour} features"] = members
    for name, members in groups.items():
        colour = records[members[0]]["colour"]
        circuit.steering[name] = _steer(hooked, sae, [spec(k, k) for k in members], colour, judge, seed=seed + 2,
                                        pipe_kwargs=kw)
        # the partners in the same windows with the same values
        rand = [(records[partner[k]]["feature"], records[k]["window"], steer_multiplier * typical[k]) for k in members]
        circuit.steering[f"random for {name}"] = _steer(hooked, sae, rand, colour, judge, seed=seed + 2, pipe_kwargs=kw)
