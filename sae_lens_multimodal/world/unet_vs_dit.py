"""UNet and DiT side by side: when each factor is committed in shapes-diffusion and in shapes-dit.

Both models are measured with the same existing analyses and the same settings (docs/causal-analysis.md,
"UNet and DiT side by side"):

* **patching** (:func:`~sae_lens_multimodal.analysis.diffusion_patching.diffusion_patching`): every block
  patched from a source prompt into a target prompt that differs in one factor, over the first steps up to
  each timestep (``timestep_mode="until"``); the factor is *committed* at the first timestep whose column
  gives the source's value a judged probability >= 0.9 (the prompt can no longer change it afterwards);
* **probes** (:func:`~sae_lens_multimodal.analysis.temporal.timestep_probes`): linear probes per timestep in
  the unconditional branch (what the noisy sample itself shows) at a middle and the last block; a factor is
  *decodable* from the first timestep after which test accuracy stays >= 0.9.

"Layout early, detail late" holds in a model when the position is committed at an earlier (noisier, larger)
timestep than colour and shape.

    python -m sae_lens_multimodal.world.unet_vs_dit            # both models, full settings (a few minutes)
    python -m sae_lens_multimodal.world.unet_vs_dit --quick
    python -m sae_lens_multimodal.world.unet_vs_dit --dit /tmp/dit   # a retrained DiT before it is shipped
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from sae_lens_multimodal.analysis.diffusion_patching import diffusion_patching, unet_blocks
from sae_lens_multimodal.analysis.temporal import ProbeResult, timestep_probes

__all__ = ["FACTORS", "PATCHING_SOURCES", "PATCHING_SWAPS", "PROBE_HOOKS", "CommitTimes", "commit_times",
           "compare_unet_and_dit", "ground_truth_line", "main"]

FACTORS = ("position", "color", "shape")
#: Two source prompts; each factor's target swaps one value (the full run also swaps each pair back: 4 pairs).
#: Position and colour swaps are those of world.ground_truth (docs/causal-analysis.md's UNet table).
PATCHING_SOURCES: tuple[dict[str, str], ...] = (
    {"color": "red", "shape": "circle", "position": "left"},
    {"color": "green", "shape": "square", "position": "top"},
)
PATCHING_SWAPS: dict[str, dict[str, str]] = {
    "position": {"left": "right", "top": "bottom"},
    "color": {"red": "blue", "green": "purple"},
    "shape": {"circle": "triangle", "square": "circle"},
}
#: model name -> (a middle block, the last block) probed; the UNet's are docs/causal-analysis.md's.
PROBE_HOOKS: dict[str, tuple[str, str]] = {
    "shapes-diffusion": ("up_blocks.0.attentions.1.hook_out", "up_blocks.2.resnets.1.hook_out"),
    "shapes-dit": ("transformer_blocks.2.hook_out", "transformer_blocks.5.hook_out"),
}


def _pairs(factor: str, both_ways: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    source = [dict(p) for p in PATCHING_SOURCES]
    target = [dict(p, **{factor: PATCHING_SWAPS[factor][p[factor]]}) for p in source]
    return (source + target, target + source) if both_ways else (source, target)


def _first_t(label: Any) -> Optional[int]:
    """A patching column's last timestep ("999..624" -> 624; 999 -> 999)."""
    return None if label is None else int(re.findall(r"\d+", str(label))[-1])


@dataclass
class CommitTimes:
    """When each factor is committed (patching) and decodable (probes) in one model."""

    model: str
    #: factor -> p_source per column (all blocks patched up to the column's timestep)
    p_source: dict[str, list[float]]
    #: the columns' timesteps (the last one of each "until" window)
    timesteps: list[int]
    #: factor -> first timestep with p_source >= 0.9 (None: never)
    committed: dict[str, Optional[int]]
    #: hook -> factor -> first timestep decodable (>= 0.9 until the end; None: never)
    decodable: dict[str, dict[str, Optional[int]]]
    probes: dict[str, ProbeResult] = field(default_factory=dict, repr=False)
    patching: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def layout_early(self) -> bool:
        """Position committed strictly earlier (at a larger timestep) than colour and shape."""
        pos = self.committed.get("position")
        rest = [self.committed.get(f) for f in ("color", "shape")]
        return pos is not None and all(t is None or t < pos for t in rest)

    def to_table(self) -> str:
        lines = [f"{self.model}: patching, all blocks, steps up to t; p_source",
                 "| factor | " + " | ".join(map(str, self.timesteps)) + " | committed |",
                 "|---|" + "---|" * (len(self.timesteps) + 1)]
        for f, p in self.p_source.items():
            lines.append(f"| {f} | " + " | ".join(f"{v:.3g}" for v in p) + f" | {_t(self.committed[f])} |")
        for hook, per in self.decodable.items():
            lines.append(f"probes (uncond) at {hook}: " + ", ".join(f"{f} {_t(t)}{self._best(hook, f, t)}"
                                                                  for f, t in per.items()))
        lines.append(f"layout early, detail late: {'yes' if self.layout_early else 'no'}")
        return "\n".join(lines)

    __str__ = to_table

    def _best(self, hook: str, factor: str, t: Optional[int]) -> str:
        """The suffix " (max 0.58)" for a factor never decodable at ``hook``: its best probe accuracy."""
        probe = self.probes.get(hook)
        if t is not None or probe is None or factor not in probe.factors:
            return ""
        return f" (max {float(probe.accuracy[:, probe.factors.index(factor)].max()):.2f})"


def _t(t: Optional[int]) -> str:
    return "never" if t is None else f"t≈{t}"


def commit_times(pipe: Any, model: str, *, quick: bool = False, judge: Any = None, probe_hooks: Optional[tuple[str, ...]] = None,
                 progress: bool = False) -> CommitTimes:
    """Patching commit timesteps and probe decodability of ``pipe`` (a shapes-world pipeline or a
    HookedDiffusionPipeline), ``model`` naming it (its probe hooks: :data:`PROBE_HOOKS`). ``quick``: 2
    prompt pairs, 4 steps, 36 / 18 probe runs, the last block only (a smoke run, not the documented figures)."""
    if judge is None:
        from sae_lens_multimodal.world.eval_diffusion import FactorClassifier  # the shapes CLIP: loads open_clip

        judge = FactorClassifier()
    steps = 4 if quick else 8
    p_source, committed, patching = {}, {}, {}
    timesteps: list[int] = []
    for factor in FACTORS:
        source, target = _pairs(factor, both_ways=not quick)
        r = diffusion_patching(pipe, source, target, factor=factor, judge=judge, per_block=False, blocks="auto",
                               timestep_mode="until", num_inference_steps=steps, progress=progress)
        p = [float(v) for v in r["p_source"][0]]
        timesteps = [_first_t(c) for c in r.timesteps]  # type: ignore[misc]
        p_source[factor], patching[factor] = p, r
        committed[factor] = next((t for t, v in zip(timesteps, p) if v >= 0.9), None)
    hooks = probe_hooks or PROBE_HOOKS.get(model) or (f"{unet_blocks(pipe)[-1]}.hook_out",)
    if quick:
        hooks = hooks[-1:]
    probes, decodable = {}, {}
    for hook in hooks:
        pr = timestep_probes(pipe, hook, cfg_branch="uncond", n_train=36 if quick else 162, n_test=18 if quick else 108,
                             num_inference_steps=4 if quick else 10, progress=progress)
        probes[hook] = pr
        decodable[hook] = {f: (None if t is None else int(t)) for f, t in pr.decodable_from(0.9).items()}
    return CommitTimes(model, p_source, timesteps, committed, decodable, probes, patching)


def compare_unet_and_dit(*, quick: bool = False, progress: bool = False, dit: Optional[str] = None) -> dict[str, CommitTimes]:
    """:func:`commit_times` of the shipped shapes-diffusion (UNet) and shapes-dit, with one judge. ``dit``: a
    DiT pipeline directory to measure instead of the shipped one (e.g. a retrain before it is shipped)."""
    from sae_lens_multimodal.world.dit import load_shapes_dit_pipeline  # diffusers: loaded by the models only
    from sae_lens_multimodal.world.diffusion import load_shapes_pipeline
    from sae_lens_multimodal.world.eval_diffusion import FactorClassifier

    judge = FactorClassifier()
    return {
        "shapes-diffusion": commit_times(load_shapes_pipeline(), "shapes-diffusion", quick=quick, judge=judge, progress=progress),
        "shapes-dit": commit_times(load_shapes_dit_pipeline(dit), "shapes-dit", quick=quick, judge=judge, progress=progress),
    }


def ground_truth_line(ctx: Any) -> tuple[str, Any]:
    """The ``sae-lens-mm ground-truth`` line for shapes-dit: its judged accuracy and the commit timesteps of
    both models (``ctx``: world.readme_checks.CheckContext, for its quick flag, progress, UNet pipeline and judge)."""
    from sae_lens_multimodal.world.dit import load_shapes_dit_pipeline
    from sae_lens_multimodal.world.eval_diffusion import evaluate_pipeline

    dit = ctx.get("dit", load_shapes_dit_pipeline)
    kwargs: dict[str, Any] = dict(images_per_prompt=1, num_inference_steps=4) if ctx.quick else \
        dict(images_per_prompt=4, num_inference_steps=20)
    if ctx.quick:
        from sae_lens_multimodal.world.causal import shapes_prompts

        kwargs["prompts"] = shapes_prompts(9)
    ev = evaluate_pipeline(dit, guidance_scale=2.0, seed=0, classifier=ctx.judge(), progress=ctx.progress, **kwargs)
    both = {name: commit_times(pipe, name, quick=ctx.quick, judge=ctx.judge(), progress=ctx.progress)
            for name, pipe in (("shapes-diffusion", ctx.pipe()), ("shapes-dit", dit))}
    acc = ev.factor_accuracy
    commits = "; ".join(
        f"{'UNet' if name == 'shapes-diffusion' else 'DiT'} committed: "
        + ", ".join(f"{'colour' if f == 'color' else f} {_t(t)}" for f, t in c.committed.items())
        + f" (layout early: {'yes' if c.layout_early else 'no'})"
        for name, c in both.items())
    line = (f"{100 * acc['color']:.1f}% / {100 * acc['shape']:.1f}% / {100 * acc['position']:.1f}% "
            f"({ev.n_images} images, {ev.num_inference_steps} steps); {commits}")
    return line, {"evaluation": ev, **both}


def main(argv: Optional[list[str]] = None) -> dict[str, CommitTimes]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--dit", default=None, help="a DiT pipeline directory instead of the shipped shapes-dit")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = compare_unet_and_dit(quick=args.quick, progress=args.progress, dit=args.dit)
    for c in out.values():
        print(c, end="\n\n")
    return out


if __name__ == "__main__":
    main()
