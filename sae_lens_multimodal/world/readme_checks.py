"""The checks of ``sae-lens-mm ground-truth``: one row of README.md's table "What the shapes world lets us check"
per check (:data:`README_ROWS`), one function per check that computes its printed line, and the registry
:data:`CHECK_FUNCTIONS` (the runner and the command are in ``world/ground_truth.py``).

Each check is computed by the function that owns the analysis:

* zero-shot: ``world.clip.zero_shot_accuracy`` (2000 fresh images, 162 caption classes);
* diffusion: ``world.eval_diffusion.evaluate_pipeline`` (4 images per prompt, 20 steps, guidance 2);
* free-labels / steerability: ``world.feature_checks.shapes_ground_truth`` and ``shapes_steerability``
  (``toward="promoted"`` for the second figure);
* labelers (check 0): ``world.labeler_checks.compare_labelers`` via :func:`run_labeler_checks`;
* probes: ``analysis.temporal.timestep_probes`` at the last up block, unconditional branch, 10 steps;
* diffusion-patching: ``analysis.diffusion_patching.diffusion_patching`` (all blocks, "until" mode, 4 pairs,
  8 steps; a factor is "fixed by t" from the first column with p(source value) >= 0.9);
* typographic: ``world.typographic.typographic_analysis`` (block-0 SAE) and ``world.clip.typographic_attack``
  on the plain shapes CLIP;
* dit: ``world.unet_vs_dit.ground_truth_line`` (shapes-dit judged; commit timesteps of both models);
* circuit: ``world.circuits.ground_truth_line`` (the canonical colour / shape / position circuits);
* clip-patching: ``analysis.vision_patching.clip_activation_patching`` (red vs blue circle, as in
  docs/causal-analysis.md);
* diffusion-heads, diffusion-time: ``world.diffusion_heads.ground_truth_line`` and
  ``world.timestep_features.ground_truth_line``;
* vlm-answers, vlm-knockout, vlm-steering, vlm-typographic: ``world.vlm_report.GROUND_TRUTH_CHECKS`` (shapes-vlm
  and shapes-vlm-typographic; docs/vlm.md).

Adding a check: a row in :data:`README_ROWS` (the README's wording, in README order), a function
``(ctx: CheckContext) -> (printed line, result)`` (a long body goes in the module that owns the analysis, imported
when the check runs), an entry in :data:`CHECK_FUNCTIONS`, and the same row in README.md's table
(``tests/world/test_ground_truth.py`` checks that the three agree).
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["CHECKS", "CHECK_FUNCTIONS", "LABELER_NAMES", "LABELER_SAES", "PATCHING_SOURCES", "PATCHING_SWAPS",
           "README_ROWS", "CheckContext", "run_labeler_checks"]

# ------------------------------------------------------------------------------ the README's figures
#: Check name -> the row of README.md's table "What the shapes world lets us check" whose figures it prints
#: (README order). ``tests/world/test_ground_truth.py`` parses that table, so a row added there without a
#: check here (or renamed) fails the test.
README_ROWS: dict[str, str] = {
    "zero-shot": "Shapes CLIP zero-shot over 162 caption classes",
    "diffusion": "Shapes diffusion: generated images judged by the shapes CLIP (colour / shape / position)",
    "free-labels": "Free-label accuracy: features whose top-20 images share a factor value, label names it "
                   "(direct-path / causal)",
    "labelers": "Labelers side by side (check 0; labels from other images than the ones judged): labelled "
                "features named correctly, `shapes-clip-saes`",
    "steerability": "Steerability: features whose clamping moves zero-shot predictions toward their label beyond "
                    "baselines",
    "probes": "Per-timestep linear probes at the last up block (unconditional branch, 10 steps)",
    "diffusion-patching": "Diffusion patching (all blocks, first steps up to t)",
    "dit": "shapes-dit (SD3-style DiT) judged by the shapes CLIP (colour / shape / position); when each factor is "
           "committed (patching) in the UNet and the DiT",
    "typographic": "Typographic attack on `shapes-clip-typographic` (a wrong colour word written on the image)",
    "clip-patching": "CLIP activation patching, red vs blue circle",
    "circuit": "Canonical circuits of the shapes CLIP (`shapes-clip-layer-saes`): size, faithfulness, ablating "
               "their factor-pure features",
    "diffusion-time": "Features across denoising time: timestep-conditioned vs bucketed SAE, `shapes-diffusion-saes`",
    "diffusion-heads": "Diffusion bottleneck ablation and diffusion lens (`shapes-diffusion`, five factors judged)",
    "vlm-answers": "shapes-vlm answers about the image (greedy, held-out images), per factor",
    "vlm-knockout": "shapes-vlm attention knockout: the block where each factor reaches the answer",
    "vlm-steering": "Steering shapes-vlm's colour answer by clamping a vision-SAE colour feature in its tower",
    "vlm-typographic": "Typographic attack on `shapes-vlm-typographic` (the VLM on the typographic CLIP's tower)",
}
CHECKS: tuple[str, ...] = tuple(README_ROWS)


#: The bundled shapes-CLIP SAEs the labelers are compared on: (model, release, hook).
LABELER_SAES: tuple[tuple[str, str, str], ...] = (
    ("shapes-clip", "shapes-clip-saes", "blocks.2.hook_resid_post"),
    ("shapes-clip-typographic", "shapes-clip-typographic-saes", "blocks.0.hook_resid_post"),
    ("shapes-clip-typographic", "shapes-clip-typographic-saes", "blocks.1.hook_resid_post"),
    ("shapes-clip-typographic", "shapes-clip-typographic-saes", "blocks.2.hook_resid_post"),
)


def run_labeler_checks(
    saes: tuple[tuple[str, str, str], ...] = LABELER_SAES, *, quick: bool = False, verbose: bool = True,
    n_images: int = 1000,
) -> list[Any]:
    """Every labeler on every SAE of ``saes``: features judged on ``n_images`` images (seed 7, as the free-label
    check), labels made from ``n_images`` other images (seed 8); causal effects on 64 of them (16 with ``quick``)."""
    from sae_lens import SAE

    from sae_lens_multimodal.models.hooked_clip import HookedCLIP
    from sae_lens_multimodal.world.feature_checks import factor_text_embeddings
    from sae_lens_multimodal.world.labeler_checks import compare_labelers
    from sae_lens_multimodal.world.shapes import ShapesWorld, to_tensor

    images, factors = ShapesWorld(image_size=32, seed=7).sample(n_images)
    x = to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3)
    ref = to_tensor(ShapesWorld(image_size=32, seed=8).sample(n_images)[0], mean=(0.5,) * 3, std=(0.5,) * 3)
    out, models = [], {}
    for model_name, release, hook in saes:
        if model_name not in models:  # the model and its vocabulary embeddings, once per model
            model = HookedCLIP.from_pretrained(model_name)
            models[model_name] = (model, factor_text_embeddings(model))
        model, text = models[model_name]
        comparison = compare_labelers(model, SAE.from_pretrained(release, hook), x, factors, ref, text,
                                      n_effect_images=16 if quick else 64)
        comparison.hook_name = f"{release} {hook}"
        if verbose:
            print(comparison.to_table(), "", sep="\n", flush=True)
        out.append(comparison)
    return out


def _pct(x: float, digits: int = 1) -> str:
    """A percentage as the README writes it: ``97.7%``, but ``100%`` and ``0%`` without decimals."""
    text = f"{100 * x:.{digits}f}"
    return (text.split(".")[0] if float(text) in (0.0, 100.0) else text) + "%"


_NAMES = {"color": "colour"}  # the README's spelling


def _t(value: Any) -> str:
    return "never" if value is None else f"t≈{int(value)}"


class CheckContext:
    """Models, SAEs and shared runs loaded once per command (several checks use the same ones)."""

    def __init__(self, quick: bool, progress: bool, hooks: tuple[str, ...], branches: tuple[str, ...]) -> None:
        self.quick, self.progress, self.hooks, self.branches = quick, progress, hooks, branches
        self._cache: dict[str, Any] = {}

    def get(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def clip(self, name: str = "shapes-clip") -> Any:
        from sae_lens_multimodal.models.hooked_clip import HookedCLIP

        return self.get(f"clip:{name}", lambda: HookedCLIP.from_pretrained(name))

    def sae(self, release: str, hook: str) -> Any:
        from sae_lens import SAE

        return self.get(f"sae:{release}:{hook}", lambda: SAE.from_pretrained(release, hook))

    def pipe(self) -> Any:
        from sae_lens_multimodal.world.diffusion import load_shapes_pipeline

        return self.get("pipe", load_shapes_pipeline)

    def judge(self) -> Any:
        from sae_lens_multimodal.world.eval_diffusion import FactorClassifier

        return self.get("judge", FactorClassifier)

    def vision_report(self) -> Any:
        """Free-label accuracy and steerability toward the causal label (``shapes_ground_truth``), plus
        steerability toward the most-promoted value on the same images and features."""
        from sae_lens_multimodal.world.feature_checks import factor_text_embeddings, shapes_ground_truth, shapes_steerability
        from sae_lens_multimodal.world.shapes import ShapesWorld, to_tensor

        def make() -> tuple[Any, Any]:
            model, sae = self.clip(), self.sae("shapes-clip-saes", "blocks.2.hook_resid_post")
            n_images, n_steer, max_features = (200, 6, 8) if self.quick else (1000, 24, 64)
            report = shapes_ground_truth(model, sae, n_images=n_images, n_steer_images=n_steer,
                                         max_features=max_features, progress=self.progress, verbose=False)
            # the same images shapes_ground_truth draws (seed 7)
            images = ShapesWorld(image_size=32, seed=7).sample(n_images)[0][:n_steer]
            x = to_tensor(images, mean=(0.5,) * 3, std=(0.5,) * 3)
            promoted = shapes_steerability(model, sae, x, text=factor_text_embeddings(model), toward="promoted",
                                           max_features=max_features, progress=self.progress)
            return report, promoted

        return self.get("vision", make)


def _zero_shot(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.clip import load_shapes_clip, zero_shot_accuracy

    model, tokenizer = load_shapes_clip()
    r = zero_shot_accuracy(model, tokenizer, n=200 if ctx.quick else 2000, verbose=False)
    per = ", ".join(f"{_NAMES.get(k, k)} {_pct(v)}" for k, v in r.factor_accuracy.items())
    return f"{_pct(r.accuracy, 2)} ({r.n_images} fresh images, {r.n_classes} classes; {per})", r


def _diffusion(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.causal import shapes_prompts
    from sae_lens_multimodal.world.eval_diffusion import evaluate_pipeline

    kwargs: dict[str, Any] = dict(prompts=shapes_prompts(9), images_per_prompt=1, num_inference_steps=4) if ctx.quick \
        else dict(images_per_prompt=4, num_inference_steps=20)
    r = evaluate_pipeline(ctx.pipe(), guidance_scale=2.0, seed=0, classifier=ctx.judge(), progress=ctx.progress, **kwargs)
    acc = r.factor_accuracy
    return (f"{_pct(acc['color'])} / {_pct(acc['shape'])} / {_pct(acc['position'])} ({r.n_images} images, "
            f"{r.num_inference_steps} steps, guidance {r.guidance_scale:g}; all three {_pct(r.all_factors_accuracy)})"), r


def _free_labels(ctx: CheckContext) -> tuple[str, Any]:
    labels = ctx.vision_report()[0].labels
    names = _NAMES
    per = ", ".join(f"{names.get(k, k)} {_pct(d, 0)} / {_pct(c, 0)}"
                    for k, (_, d, c) in sorted(labels.per_factor().items(), key=lambda kv: -kv[1][1]))
    return (f"{_pct(labels.direct_accuracy)} / {_pct(labels.causal_accuracy)} over {labels.n_pure} features "
            f"(chance {_pct(labels.chance())}); {per}"), labels


#: How README.md names the labelers of ``analysis.labelers``.
LABELER_NAMES = {"textspan": "TextSpan-style", "decoder-projection": "DN-CBM-style decoder projection",
                 "splice": "SpLiCE-style"}


def _labelers(ctx: CheckContext) -> tuple[str, Any]:
    # causal effects on 16 images (run_labeler_checks' quick setting): the setting docs/clip.md and README measured
    saes = LABELER_SAES[:1] if ctx.quick else LABELER_SAES
    # verbose: the command prints the side-by-side tables (labeler x factor: accuracy / coverage / precision, slots)
    comparisons = run_labeler_checks(saes, quick=True, verbose=True, n_images=300 if ctx.quick else 1000)
    first, rest = comparisons[0], comparisons[1:]
    e = first.scores["enrichment"]
    others = sorted(((n, s.precision()) for n, s in first.scores.items() if n != "enrichment"), key=lambda kv: -kv[1])
    line = (f"`enrichment` {_pct(e.precision(), 0)} (coverage {_pct(e.coverage(), 0)}; "
            + ", ".join(f"{_NAMES.get(f, f)} {_pct(e.accuracy(f), 0)}" for f in ("color", "shape", "position"))
            + "); " + ", ".join(f"{LABELER_NAMES.get(n, n)} {_pct(p, 0)}" for n, p in others))
    if rest:
        line += "; typographic blocks 0-2: `enrichment` " + ", ".join(
            f"{_pct(c.scores['enrichment'].precision(), 0)} (" + ", ".join(
                f"{_NAMES.get(f, f)} {_pct(c.scores['enrichment'].accuracy(f), 0)}" for f in ("color", "shape", "position"))
            + ")" for c in rest)
    slots = [c.scores["enrichment"].slots for c in comparisons]  # multi-factor features, one slot per factor
    line += (f"; multi-factor slots right {sum(s[3] for s in slots)}/{sum(s[2] for s in slots)} "
             f"over {sum(s[0] for s in slots)} features")
    return line, comparisons


def _steerability(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.feature_checks import REAL_CLIP_STEERABLE_FRACTION

    report, promoted = ctx.vision_report()
    s = report.steerability
    lo, hi = REAL_CLIP_STEERABLE_FRACTION
    base = " / ".join(_pct(s.baseline_fraction_above(k)) for k in s.baseline_power)
    return (f"{_pct(s.fraction_steerable, 0)} of {len(s.feature_ids)} ({base} of "
            f"{' / '.join(s.baseline_power)} draws pass); toward the most-promoted value instead: "
            f"{_pct(promoted.fraction_steerable, 0)} (real CLIP: {100 * lo:.0f}-{100 * hi:.0f}%)"), (s, promoted)


def _probes(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.analysis.temporal import timestep_probes

    probes = [timestep_probes(ctx.pipe(), hook, cfg_branch=branch, n_train=36 if ctx.quick else 162,
                              n_test=18 if ctx.quick else 108, num_inference_steps=4 if ctx.quick else 10,
                              progress=ctx.progress)
              for hook in ctx.hooks for branch in ctx.branches]
    p = probes[0]
    start = p.decodable_from(0.9)
    order = sorted(p.factors, key=lambda f: -int(start[f]) if start[f] is not None else 1)  # earliest first
    cells = [f"{_NAMES.get(f, f)} {'decodable (>= 0.9) ' if i == 0 else ''}from {_t(start[f])}" if start[f] is not None
             else f"{_NAMES.get(f, f)} never above {float(p.accuracy[:, p.factors.index(f)].max()):.2f}"
             for i, f in enumerate(order)]
    at_start = ", ".join(f"{_NAMES.get(f, f)} {float(p.accuracy[0, i]):.2f} (chance {float(p.chance[i]):.2f})"
                         for i, f in enumerate(p.factors))
    return f"{', '.join(cells)}; at t={int(p.timesteps[0])}: {at_start} ({p.hook_name} [{p.cfg_branch}])", probes


#: The prompt pairs of tests/analysis/test_diffusion_patching.py (and docs/causal-analysis.md): a source and the
#: factor value it is swapped to; the full check also runs each pair in reverse (4 pairs).
PATCHING_SOURCES: tuple[dict[str, str], ...] = (
    {"color": "red", "shape": "circle", "position": "left"},
    {"color": "green", "shape": "square", "position": "top"},
)
PATCHING_SWAPS: dict[str, dict[str, str]] = {"position": {"left": "right", "top": "bottom"},
                                             "color": {"red": "blue", "green": "purple"}}


def _patching_pairs(factor: str, both_ways: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    source = [dict(p) for p in PATCHING_SOURCES]
    target = [dict(p, **{factor: PATCHING_SWAPS[factor][p[factor]]}) for p in source]
    return (source + target, target + source) if both_ways else (source, target)


def _diffusion_patching(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.analysis.diffusion_patching import diffusion_patching

    out, cells = {}, []
    for factor, name in (("position", "position is fixed"), ("color", "colour only")):
        source, target = _patching_pairs(factor, both_ways=not ctx.quick)
        r = diffusion_patching(ctx.pipe(), source, target, factor=factor, judge=ctx.judge(), per_block=False,
                               timestep_mode="until", num_inference_steps=4 if ctx.quick else 8,
                               progress=ctx.progress)
        p = r["p_source"][0].tolist()
        fixed = next((t for t, v in zip(r.timesteps, p) if v >= 0.9), None)
        out[factor] = r
        fixed_t = re.findall(r"\d+", str(fixed))[-1] if fixed is not None else None  # a column: "999..624"
        cells.append(f"{name} by {_t(fixed_t)} (p_source {' '.join(f'{v:.3g}' for v in p)})")
    return f"{'; '.join(cells)} ({len(source)} prompt pairs; columns {', '.join(map(str, r.timesteps))})", out


def _dit(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.unet_vs_dit import ground_truth_line  # loads diffusers

    return ground_truth_line(ctx)


def _typographic(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.clip import load_shapes_clip, typographic_attack
    from sae_lens_multimodal.world.typographic import typographic_analysis

    model, sae = ctx.clip("shapes-clip-typographic"), ctx.sae("shapes-clip-typographic-saes", "blocks.0.hook_resid_post")
    sizes = dict(n_discover=100, n_select=100, n_test=100, candidate_counts=(0, 8, 56)) if ctx.quick else {}
    r = typographic_analysis(model, sae, seed=0, progress=ctx.progress, model_name="shapes-clip-typographic", **sizes)
    plain, tokenizer = load_shapes_clip()
    flips = typographic_attack(plain, tokenizer, n=100 if ctx.quick else 1000, verbose=False)["predicted_written_word"]
    a = r.accuracy
    return (f"accuracy {_pct(a['clean'])} → {_pct(a['attacked'])} under attack → {_pct(a['attacked_suppressed'])} "
            f"with {r.n_suppressed} SAE text features suppressed (clean cost {100 * r.clean_cost:.1f} points; "
            f"{r.n_test} test images); the plain shapes CLIP is not fooled ({_pct(flips)} flips)"), (r, flips)


def _clip_patching(ctx: CheckContext) -> tuple[str, Any]:
    # the setup of docs/causal-analysis.md ("Vision / CLIP: activation patching"), as tests/analysis runs it
    from dataclasses import replace

    from sae_lens_multimodal.analysis import ZeroShotClassifier, clip_activation_patching
    from sae_lens_multimodal.world.causal import shape_patch_mask
    from sae_lens_multimodal.world.shapes import COLORS, ShapesWorld, all_captions, caption, to_tensor

    clip = ctx.clip()
    classifier = ZeroShotClassifier(clip, all_captions(), templates=("{}",))
    world = ShapesWorld(32, seed=3)
    red = world.sample_factors(1, shape="circle", color="red", position="left", size="large", texture="plain")[0]
    blue = replace(red, color="blue", rgb=COLORS["blue"])
    x = to_tensor(world.render([red, blue]), mean=(0.5,) * 3, std=(0.5,) * 3)
    region = shape_patch_mask(red, 32, 4)
    with torch.no_grad():
        r = clip_activation_patching(clip, x[:1], x[1:], classifier, caption(red), caption(blue), region_tokens=region,
                                     heads=False)
    grid = r.by_token["resid_pre"]
    last = grid.shape[0] - 1
    outside = [t for t in range(grid.shape[1]) if t not in region]
    return (f"the circle's patches carry the colour at layer 0 ({float(r.region['resid_pre'][0]):.2f}), the CLS "
            f"token by layer {last} ({float(grid[last, 0]):.2f}); every other token < 1e-4 at layer 0 (largest "
            f"{float(grid[0, outside].abs().max()):.1e})"), r


def _vlm(check: str) -> Any:
    """A check whose body is in world/vlm_report.py (imported when it runs: it loads transformers' LLaVA)."""
    def run(ctx: CheckContext) -> tuple[str, Any]:
        from sae_lens_multimodal.world.vlm_report import GROUND_TRUTH_CHECKS

        return GROUND_TRUTH_CHECKS[check](ctx)

    return run


def _diffusion_heads(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.diffusion_heads import ground_truth_line  # generates images: only when run

    return ground_truth_line(quick=ctx.quick, progress=ctx.progress)


def _circuit(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.circuits import ground_truth_line  # body in world/circuits.py

    return ground_truth_line(ctx.clip(), quick=ctx.quick)


def _diffusion_time(ctx: CheckContext) -> tuple[str, Any]:
    from sae_lens_multimodal.world.timestep_features import ground_truth_line  # generates images: only when run

    return ground_truth_line(quick=ctx.quick, progress=ctx.progress)


#: Check name -> the function that computes its printed line (in the order of :data:`README_ROWS`).
CHECK_FUNCTIONS: dict[str, Any] = {
    "zero-shot": _zero_shot, "diffusion": _diffusion, "free-labels": _free_labels, "labelers": _labelers,
    "steerability": _steerability, "probes": _probes, "diffusion-patching": _diffusion_patching, "dit": _dit,
    "typographic": _typographic, "clip-patching": _clip_patching, "circuit": _circuit,
    "diffusion-time": _diffusion_time, "diffusion-heads": _diffusion_heads,
    **{check: _vlm(check) for check in ("vlm-answers", "vlm-knockout", "vlm-steering", "vlm-typographic")},
}
