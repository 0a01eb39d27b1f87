"""The shapes-world demo: the whole workflow, offline, on the models and SAEs shipped with the package.

1. load ``HookedCLIP.from_pretrained("shapes-clip")``, ``HookedDiffusionPipeline.from_pretrained("shapes-diffusion")``
   and the bundled SAEs by name (``SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post")``,
   ``SAE.from_pretrained("shapes-diffusion-saes", "up_blocks.0.attentions.1.hook_out")``);
2. cache vision activations on world images and measure the SAE on them;
3. label vision features with both labelers (direct-path with validity, causal), and check the labels
   against the ground truth of each feature's top images;
4. clamp each feature and read the zero-shot change (162 caption classes);
5. generate images with and without a diffusion feature clamped at chosen timesteps, and trace each
   feature's activation across timesteps;
   (then the shapes-vlm section, world/vlm_report.py, and "Diffusion models side by side", world/diffusion_report.py:
   shapes-diffusion next to shapes-dit, the diffusion lens, head roles, features across time)
6. write ``report.html`` (pictures inline) and per-feature dashboards under ``dashboards/``, atomically.

Run it with ``python examples/shapes_demo.py --out shapes-report`` or ``sae-lens-mm demo --out shapes-report``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from sae_lens_multimodal.analysis.labelers import BEST_LABELER, LABELERS, prepare_inputs
from sae_lens_multimodal.analysis.zero_shot import text_embeddings
from sae_lens_multimodal.cli_options import (
    add_deprecated_alias,
    add_no_progress_option,
    add_num_inference_steps_option,
    add_seed_option,
    positive_int,
)
from sae_lens_multimodal.cli_options import check_output_dir as check_artefact_dir
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.reports.dashboard_data import FeatureDashboard, ZeroShotProbe, _preprocess_uint8
from sae_lens_multimodal.reports.dashboards import _shared_vmax, _steering_html, dashboard_pages
from sae_lens_multimodal.reports.diffusion_dashboards import diffusion_feature_dashboards
from sae_lens_multimodal.reports.html import (
    Page,
    Raw,
    check_output_dir,
    comparison_grid,
    escape,
    heatmap_overlay,
    image_grid,
    image_tag,
    img_tag,
    link,
    paragraph,
    table,
    timestep_curve_png,
    write_site,
)
from sae_lens_multimodal.reports.vision_dashboards import vision_feature_dashboards
from sae_lens_multimodal.world.diffusion_report import DiffusionReportConfig, diffusion_demo_section
from sae_lens_multimodal.world.shapes import ShapesWorld, all_captions, caption
from sae_lens_multimodal.world.vlm_report import vlm_demo_section

__all__ = [
    "VISION_RELEASE",
    "DIFFUSION_RELEASE",
    "DemoConfig",
    "DemoResult",
    "BundledSAEMissingError",
    "load_bundled_sae",
    "caption_word_embeddings",
    "run_shapes_demo",
]

#: (release, SAE id) of the bundled SAEs the demo loads by name
VISION_RELEASE = ("shapes-clip-saes", "blocks.2.hook_resid_post")
DIFFUSION_RELEASE = ("shapes-diffusion-saes", "up_blocks.0.attentions.1.hook_out")
#: vocabulary of the vision labels: every word a caption of the world uses for a factor value
LABEL_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle",
               "left", "right", "top", "bottom", "center", "small", "large", "striped")


class BundledSAEMissingError(FileNotFoundError):
    """A bundled SAE release the demo loads by name is not installed."""


@dataclass
class DemoConfig:
    """Sizes of the demo run (the defaults take a few minutes on 2 CPU cores)."""

    n_images: int = 1024  # world images whose activations are cached
    n_vision_features: int = 8
    top_k: int = 8  # top images per feature
    label_images: int = 64  # reference images of the labels
    steer_images: int = 64  # images on which the zero-shot change is measured
    vision_clamp_multiplier: float = 2.0
    n_prompts: int = 24
    n_diffusion_features: int = 4
    num_inference_steps: int = 20
    steer_prompts: int = 4
    #: measured on the bundled SAE: at 2x its max a feature rarely changed the CLIP reading of an image, at 5x often
    diffusion_clamp_multiplier: float = 5.0
    seed: int = 0
    #: sizes of the "Diffusion models side by side" section (world/diffusion_report.py)
    diffusion_models: DiffusionReportConfig = field(default_factory=DiffusionReportConfig)

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A small run (seconds): few images, features and denoising steps; for tests and a first look."""
        return cls(n_images=96, n_vision_features=3, top_k=6, label_images=32, steer_images=24, n_prompts=6,
                   n_diffusion_features=2, num_inference_steps=6, steer_prompts=2,
                   diffusion_models=DiffusionReportConfig.quick())


@dataclass
class DemoResult:
    """Where the demo wrote its report, and what it found."""

    out_dir: Path
    report: Path
    dashboards_index: Path
    dashboards: list[FeatureDashboard]
    timings: dict[str, float] = field(default_factory=dict)
    label_checks: list[dict[str, Any]] = field(default_factory=list)


def load_bundled_sae(release: str, sae_id: str) -> Any:
    """``SAE.from_pretrained(release, sae_id)`` for a release bundled with the package, offline; a missing
    release raises :class:`BundledSAEMissingError` saying how to get it."""
    # the releases are registered with SAELens by the package's import (this module's parent)
    try:
        sae = SAE.from_pretrained(release, sae_id)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise BundledSAEMissingError(
            f"The demo loads the bundled SAE {release!r} / {sae_id!r} by name, and it could not be loaded: "
            f"{err}\nIt ships with the package (sae_lens_multimodal/world/weights/saes/); regenerate it with "
            "`python -m sae_lens_multimodal.world.training.train_saes`, or pass your own SAE to run_shapes_demo(vision_sae=..., "
            "diffusion_sae=...)."
        ) from err
    return sae[0] if isinstance(sae, tuple) else sae  # SAELens < 6 returned (sae, cfg, sparsity)


@torch.no_grad()
def caption_word_embeddings(model: Any, words: Sequence[str]) -> torch.Tensor:
    """Each word's text embedding in the context the shapes CLIP was trained on: the normalised mean of the
    normalised embeddings of every caption of the world that contains it. (The CLIP never saw a lone
    word; "square" alone is off its distribution.)"""
    caps = all_captions(("color", "shape", "position", "size", "texture"))
    emb = text_embeddings(model, caps, normalize=True)
    out = []
    for w in words:
        mask = torch.tensor([w in c.split() for c in caps])
        if not bool(mask.any()):
            raise ValueError(f"No caption of the shapes world contains {w!r}.")
        out.append(torch.nn.functional.normalize(emb[mask].mean(0), dim=0))
    return torch.stack(out)


def _factor_values(f: Any) -> list[tuple[str, str]]:
    out = [(key, getattr(f, key)) for key in ("color", "shape", "size", "texture")]
    return out + [("position", w) for w in f.position.split()]  # "top left" counts for "top" and "left"


def _shared_factor(top: Sequence[Any], everyone: Sequence[Any]) -> tuple[str, str, int]:
    """The factor value the top examples share most beyond chance: the largest excess of its count among
    ``top`` over the count expected from its frequency among ``everyone``. Returns (factor, value, count)."""
    base = Counter(v for f in everyone for v in _factor_values(f))
    counts = Counter(v for f in top for v in _factor_values(f))
    n, n_all = len(top), len(everyone)
    (key, value), count = max(counts.items(), key=lambda kv: (kv[1] - n * base[kv[0]] / n_all, kv[1]))
    return key, value, count


def _timer() -> Any:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def run_shapes_demo(
    out_dir: Union[str, os.PathLike],
    config: Optional[DemoConfig] = None,
    *,
    vision_sae: Any = None,
    diffusion_sae: Any = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo and write ``out_dir/report.html`` plus ``out_dir/dashboards/`` (atomically).

    ``vision_sae`` / ``diffusion_sae``: SAEs to use instead of the bundled releases
    (:data:`VISION_RELEASE`, :data:`DIFFUSION_RELEASE`).
    """
    # diffusers: the diffusion package imports it; `sae-lens-mm dashboards --images shapes` imports this module
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    cfg = config or DemoConfig()
    check_output_dir(out_dir)  # refuse a foreign directory now, not after minutes of work
    timings: dict[str, float] = {}
    total = _timer()
    stages = tqdm(total=7, desc="shapes demo", disable=not progress)  # one update per stage below

    def stage(name: str) -> None:
        stages.set_postfix_str(name)

    # ---- 1. models and SAEs by name
    stage("loading models and SAEs")
    clock = _timer()
    clip = HookedCLIP.from_pretrained("shapes-clip")
    pipe = HookedDiffusionPipeline.from_pretrained("shapes-diffusion", local_files_only=True)
    pipe.pipe.set_progress_bar_config(disable=True)
    vision_sae = vision_sae if vision_sae is not None else load_bundled_sae(*VISION_RELEASE)
    diffusion_sae = diffusion_sae if diffusion_sae is not None else load_bundled_sae(*DIFFUSION_RELEASE)
    vision_sae.eval()
    diffusion_sae.eval()
    timings["load models and SAEs"] = clock()
    stages.update()

    # ---- 2. cache vision activations
    stage("caching activations")
    clock = _timer()
    world = ShapesWorld(image_size=32, seed=cfg.seed)
    images, factors = world.sample(cfg.n_images)
    captions = [caption(f) for f in factors]
    x = _preprocess_uint8(clip.vision, list(images))
    hook = vision_sae.cfg.metadata.hook_name
    hook = hook[len("vision."):] if hook.startswith("vision.") else hook
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, len(x), 128), desc="caching activations", leave=False, disable=not progress):
            _, cache = clip.vision.run_with_cache(x[i : i + 128], names_filter=[hook])
            chunks.append(cache[hook])
        acts = torch.cat(chunks)
        recon = torch.cat([vision_sae.decode(vision_sae.encode(acts[i : i + 128].to(vision_sae.dtype)))
                           for i in range(0, len(acts), 128)])
        l0 = torch.cat([(vision_sae.encode(acts[i : i + 128].to(vision_sae.dtype)) > 0).sum(-1).float()
                        for i in range(0, len(acts), 128)]).mean()
        centred = acts - acts.mean((0, 1))
        explained = 1 - float((acts - recon).pow(2).sum() / centred.pow(2).sum())
    timings["cache activations"] = clock()
    stages.update()

    # ---- 3-4. vision dashboards: labels (both labelers) and zero-shot steering
    stage("labelling and steering vision features")
    clock = _timer()
    word_embeds = caption_word_embeddings(clip, LABEL_WORDS)
    classes = all_captions()
    probe = ZeroShotProbe(clip, classes, ("{}",))
    vision = vision_feature_dashboards(
        clip, vision_sae, images, n_features=cfg.n_vision_features, top_k=cfg.top_k, captions=captions,
        vocabulary=list(LABEL_WORDS), text_embeds=word_embeds, label_images=cfg.label_images,
        class_names=classes, class_embeds=probe.classifier.weights, clamp_multiplier=cfg.vision_clamp_multiplier,
        steer_images=cfg.steer_images, activations=acts, progress=progress,
    )
    # the best labeler on the shapes world's ground truth (issue 16), on the same images
    best = LABELERS[BEST_LABELER]().label(
        clip, vision_sae, [d.feature for d in vision],
        inputs=prepare_inputs(clip, vision_sae, list(LABEL_WORDS), x, text_embeds=word_embeds))
    best_by_id = {b.feature: b for b in best}
    checks = []
    for d in vision:
        top_factors = [factors[t.index] for t in d.top]
        key, value, count = _shared_factor(top_factors, factors)
        lab = d.labels
        checks.append({
            "feature": d.feature, "shared_factor": key, "shared_value": value, "shared_count": count,
            "n_top": len(top_factors),
            "direct_path": lab.direct_path[0][0] if lab is not None and lab.direct_path else None,
            "causal": lab.causal[0][0] if lab is not None and lab.causal else None,
            "validity": lab.validity if lab is not None else None,
            "best_label": best_by_id[d.feature].label, "best_validity": best_by_id[d.feature].validity,
        })
    timings["label and steer vision features"] = clock()
    stages.update()

    # ---- 5. diffusion: per-timestep activation and steered generations
    stage("generating with and without steering")
    clock = _timer()
    _, prompt_factors = ShapesWorld(image_size=32, seed=cfg.seed + 1).sample(cfg.n_prompts)
    prompts = [caption(f) for f in prompt_factors]
    diffusion = diffusion_feature_dashboards(
        pipe, diffusion_sae, prompts, n_features=cfg.n_diffusion_features, top_k=min(cfg.top_k, len(prompts)),
        num_inference_steps=cfg.num_inference_steps, seed=cfg.seed, steer_prompts=cfg.steer_prompts,
        clamp_multiplier=cfg.diffusion_clamp_multiplier, probe=probe, progress=progress,
    )
    timings["diffusion: trace and steer"] = clock()
    stages.update()

    # ---- shapes-vlm: questions and answers, knockout curve, steered answers (the section: world/vlm_report.py)
    stage("asking the shapes VLM")
    vlm = vlm_demo_section(seed=cfg.seed)
    timings["shapes-vlm: answers, knockout, steering"] = vlm.seconds
    stages.update()

    # ---- diffusion models side by side: UNet vs DiT, lens, head roles, features across time (world/diffusion_report.py)
    stage("diffusion models side by side")
    models = diffusion_demo_section(config=cfg.diffusion_models, seed=cfg.seed, unet=pipe)
    timings["diffusion models side by side"] = models.seconds
    stages.update()

    # ---- 6. the report
    stage("writing the report")
    clock = _timer()
    dashboards = vision + diffusion
    files = dashboard_pages(dashboards, directory="dashboards", title="Shapes demo: feature dashboards",
                            extra_nav=[("report.html", "report")])
    timings["total"] = total()
    files["report.html"] = _render_report(
        cfg, vision, diffusion, checks, timings,
        vision_sae=vision_sae, diffusion_sae=diffusion_sae, vision_hook=hook, acts_shape=tuple(acts.shape),
        l0=float(l0), explained=explained, prompts=prompts, vlm_html=vlm.html, diffusion_models_html=models.html,
    )
    out = write_site(out_dir, files)
    timings["write report"] = clock()
    stages.update()
    stages.close()
    return DemoResult(out_dir=out, report=out / "report.html", dashboards_index=out / "dashboards" / "index.html",
                      dashboards=dashboards, timings=timings, label_checks=checks)


def _render_report(cfg: DemoConfig, vision: list[FeatureDashboard], diffusion: list[FeatureDashboard],
                   checks: list[dict[str, Any]], timings: dict[str, float], *, vision_sae: Any, diffusion_sae: Any,
                   vision_hook: str, acts_shape: tuple[int, ...], l0: float, explained: float,
                   prompts: list[str], vlm_html: str = "", diffusion_models_html: str = "") -> str:
    page = Page(
        "sae-lens-multimodal demo: the shapes world",
        subtitle=f"Offline, on the shipped shapes CLIP, diffusion models and VLM and the bundled SAEs. "
                 f"Ran in {timings.get('total', float('nan')):.0f} s.",
        nav=[("dashboards/index.html", "feature dashboards"), ("#labels", "labels"), ("#steering", "steering"),
             ("#timesteps", "timesteps"), ("#generations", "generations"), ("#vlm", "VLM"),
             ("#diffusion-models", "UNet vs DiT")],
    )
    v_name, d_name = vision[0].sae_name if vision else "", diffusion[0].sae_name if diffusion else ""
    setup = [
        ["vision model", "HookedCLIP.from_pretrained('shapes-clip')"],
        ["vision SAE", f"{v_name} at {vision_hook}"],
        ["diffusion model", "HookedDiffusionPipeline.from_pretrained('shapes-diffusion')"],
        ["diffusion SAE", f"{d_name} at {diffusion[0].hook_name if diffusion else ''}"],
        ["next to it", "HookedDiffusionPipeline.from_pretrained('shapes-dit') (section 'Diffusion models side by side')"],
        ["world images", cfg.n_images], ["prompts", len(prompts)], ["denoising steps", cfg.num_inference_steps],
    ]
    body = table(setup, ["", ""])
    body += table([[k, v] for k, v in timings.items()], ["stage", "seconds"], digits=1)
    body += paragraph("Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()), "note")
    page.add("What ran", body, id="setup")

    page.add("Cached activations", paragraph(
        f"Activations at vision.{vision_hook}: {' x '.join(map(str, acts_shape))} (images x tokens x width). "
        f"The SAE on them: mean L0 {l0:.1f} active features per token, {100 * explained:.1f}% of the variance "
        "explained."), id="activations")

    # ---- labels vs ground truth
    rows = []
    by_id = {c["feature"]: c for c in checks}
    for d in vision:
        c = by_id[d.feature]
        lab = d.labels
        shared = f"{c['shared_factor']} = {c['shared_value']} ({c['shared_count']}/{c['n_top']})"
        hit = [m.replace("_", "-") for m in ("direct_path", "causal") if c[m] is not None and c[m] == c["shared_value"]]
        top = d.top[0]
        thumb = heatmap_overlay(top.image, top.heatmap) if top.heatmap is not None else top.image
        rows.append([
            link(f"dashboards/{d.file_name}", f"feature {d.feature}"), Raw(image_tag(thumb, 2, alt="top image")),
            c["best_label"] or "(no label)", c["best_validity"],
            _words(lab.direct_path if lab is not None else None), lab.validity if lab is not None and lab.validity is not None else float("nan"),
            _words(lab.causal if lab is not None else None), lab.agreement if lab is not None and lab.agreement is not None else float("nan"),
            shared, ", ".join(hit) if hit else "neither",
        ])
    named = sum(1 for c in checks if c["causal"] == c["shared_value"])
    page.add("Vision features: text labels", table(rows, [
        "feature", "top image", f"{BEST_LABELER} label (best on the ground truth)", f"{BEST_LABELER} validity",
        "direct-path label (score)", "validity", "causal label (score)", "agreement",
        "shared by its top images (ground truth)", "label names it"]) + paragraph(
        f"The causal label names the factor value most of the feature's top images share for {named} of "
        f"{len(checks)} features. Direct-path labels are to be trusted only where their validity is high.", "note"),
        id="labels")

    # ---- top images with patch heatmaps
    blocks = []
    for d in vision:
        vmax = _shared_vmax(d.top)
        items = [(heatmap_overlay(t.image, t.heatmap, vmax=vmax) if t.heatmap is not None else t.image, t.caption)
                 for t in d.top]
        title = f"feature {d.feature}" + (f" \u00b7 {d.short_label}" if d.short_label else "")
        blocks.append(f"<h3>{_esc(title)}</h3>" + image_grid(items, scale=3))
    page.add("Top-activating images with patch heatmaps", "".join(blocks), id="top-images")

    # ---- steering: zero-shot change
    st_rows = []
    for d in vision:
        e = d.steering[0] if d.steering else None
        if e is None:
            continue
        toward = e.toward_label
        st_rows.append([link(f"dashboards/{d.file_name}", f"feature {d.feature}"), d.labels.label if d.labels else "",
                        f"{toward[1]:.3f} \u2192 {toward[2]:.3f}" if toward else "n/a",
                        f"{100 * e.changed_fraction:.0f}%", ", ".join(f"{w} {v:+.2f}" for w, v in e.gained[:2])])
    body = table(st_rows, ["feature", "label", "p(classes with the label word) clean \u2192 clamped",
                           "predictions changed", "most gained classes"])
    best = max((d for d in vision if d.steering and d.steering[0].toward_label),
               key=lambda d: d.steering[0].toward_label[2] - d.steering[0].toward_label[1], default=None)
    if best is not None:
        body += f"<h3>Feature {best.feature} in detail</h3>" + _steering_html(best.steering)
    page.add("Steering a feature: zero-shot change", body, id="steering")

    # ---- diffusion: per-timestep curves
    if diffusion:
        curves = {f"feature {d.feature}": (d.curve.mean, d.curve.low, d.curve.high) for d in diffusion if d.curve}
        t = diffusion[0].curve.timesteps if diffusion[0].curve else []
        body = img_tag(timestep_curve_png(t, curves, title="spatial mean per prompt: mean and 10-90% band over prompts",
                                          size=(6.5, 3.2)), alt="per-timestep curves", css_class="plot")
        body += table([[link(f"dashboards/{d.file_name}", f"feature {d.feature}"),
                        f"{d.curve.half_max_timestep:g}" if d.curve and d.curve.half_max_timestep is not None else "n/a",
                        f"{d.curve.commit_timestep:g}" if d.curve and d.curve.commit_timestep is not None else "n/a",
                        float(d.curve.mean.max()) if d.curve else float("nan")] for d in diffusion],
                      ["feature", "mean reaches half its max at timestep",
                       "commits at timestep (stays within 10% of its final value)", "peak mean activation"])
        if len(getattr(diffusion_sae.cfg, "timestep_ranges", None) or []) > 1:
            body += paragraph(
                f"The diffusion SAE is timestep-bucketed ({diffusion_sae.cfg.timestep_ranges}): each range has its own "
                "dictionary, so a latent index names a different feature in each range, and curves step at the range "
                "boundaries. Read each curve inside the range where the feature is active; steering stays there.", "note")
        page.add("Diffusion: feature activation across timesteps", body, id="timesteps")

        blocks = []
        for d in diffusion:
            if d.generations is None:
                continue
            cols, rows_g, labels = d.generations
            blocks.append(f"<h3>feature {d.feature}</h3>" + comparison_grid(rows_g, cols, labels, scale=4))
            if d.steering:
                blocks.append(paragraph(" ".join(
                    f"{e.description.split(':')[0]}: predictions changed on {100 * e.changed_fraction:.0f}%, most gained "
                    + ", ".join(f"{w} {v:+.2f}" for w, v in e.gained[:2]) + "." for e in d.steering), "note"))
        page.add("Diffusion: generations with and without a feature steered", "".join(blocks) + paragraph(
            "Each row uses the same initial noise; the feature is clamped to "
            f"{cfg.diffusion_clamp_multiplier:g} x its largest observed activation during the named timesteps only "
            "(on the SAE's CFG branch), with the SAE's error term kept. Captions: the shapes CLIP's zero-shot "
            "reading of the image.", "note"), id="generations")

    if vlm_html:
        page.add("shapes-vlm: questions and answers, knockout, steered answers", vlm_html, id="vlm")
    if diffusion_models_html:
        page.add("Diffusion models side by side", diffusion_models_html, id="diffusion-models")
    links = [link(f"dashboards/{d.file_name}", f"{d.kind} feature {d.feature}") for d in vision + diffusion]
    page.add("Feature dashboards", paragraph("One page per feature: top images with heatmaps, histogram, labels, "
                                             "steering, and per-timestep curves for diffusion features.")
             + "<p>" + " \u00b7 ".join(cell.html for cell in [link("dashboards/index.html", "index")] + links) + "</p>",
             id="dashboards")
    return page.to_html()


def _esc(text: str) -> str:
    return escape(text)


def _words(words: Optional[list[tuple[str, float]]], n: int = 3) -> str:
    if not words:
        return "n/a"
    return ", ".join(f"{w} ({s:.2f})" for w, s in words[:n])


# --------------------------------------------------------------------------------------------- command line
def add_demo_arguments(parser: Any) -> None:
    """The demo's command-line options (shared by examples/shapes_demo.py and ``sae-lens-mm demo``)."""
    parser.add_argument("--out", default="shapes-demo-report",
                        help="report directory (created, or replaced if it holds an earlier report)")
    parser.add_argument("--quick", action="store_true", help="a small configuration that runs in seconds")
    # Counts are --n-* / --top-features (as in the other subcommands, where --images / --prompts / --features
    # name inputs and ids); the old count spellings still work, with a deprecation message.
    n_images = parser.add_argument("--n-images", type=positive_int, help="world images whose activations are cached")
    add_deprecated_alias(parser, "--images", n_images)
    top = parser.add_argument("--top-features", type=positive_int, help="vision features to label, steer and show")
    add_deprecated_alias(parser, "--features", top)
    n_prompts = parser.add_argument("--n-prompts", type=positive_int, help="prompts to generate")
    add_deprecated_alias(parser, "--prompts", n_prompts)
    parser.add_argument("--diffusion-features", type=positive_int, help="diffusion features to trace and steer")
    add_num_inference_steps_option(parser, default=None, deprecated_steps=True, type=positive_int)
    add_seed_option(parser, default=None, help="seed of the world images and the initial noise")
    add_no_progress_option(parser)


def config_from_args(args: Any) -> DemoConfig:
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    for arg, name in (("n_images", "n_images"), ("top_features", "n_vision_features"), ("n_prompts", "n_prompts"),
                      ("diffusion_features", "n_diffusion_features"), ("num_inference_steps", "num_inference_steps"),
                      ("seed", "seed")):
        value = getattr(args, arg, None)
        if value is not None:
            if value < 1 and arg != "seed":
                raise ValueError(f"--{arg.replace('_', '-')} must be at least 1, got {value}.")
            setattr(cfg, name, value)
    return cfg


def run_from_args(args: Any) -> int:
    """Run the demo from parsed arguments and print where the report is."""
    check_artefact_dir(args.out, "report")  # not a file, a cache or an SAE folder
    result = run_shapes_demo(args.out, config_from_args(args), progress=not args.no_progress)
    print(f"Report: {result.report}")
    print(f"Feature dashboards: {result.dashboards_index}")
    print(f"Open it in a browser: {result.report.as_uri()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="shapes_demo.py")
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (BundledSAEMissingError, FileExistsError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
