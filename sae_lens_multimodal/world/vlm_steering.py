"""Steering shapes-vlm's colour answer through its vision tower (issue 18, part 3: the survey's LLaVA claim).

A colour feature of the bundled vision SAE (``shapes-clip-saes`` at ``blocks.2.hook_resid_post``) is clamped in
the VLM's vision tower with :func:`~sae_lens_multimodal.analysis.vlm.steer_vision_feature` (the SAE's error term
is kept), and the greedy answer to a colour question is read at the answer position. Reported: the fraction of
images (whose true colour is another one) whose answer becomes the feature's colour, against two baselines on
the same images at the same hook: random SAE features clamped to the same value, and random directions added
with the clamp's per-token norm.

Feature choice (no model internals beyond the SAE's activations; the world's colour labels of a separate set
of rendered *selection* images say what the top images share): for each colour, the feature whose
``top_k`` most-activating selection images (max over tokens) are most often of that colour, ties broken by the
gap between its mean activation on that colour and on the others. Scoring uses fresh images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.world.shapes import COLORS, ShapesWorld
from sae_lens_multimodal.world.vlm import QUESTIONS, prompt

__all__ = ["VLMSteeringStudy", "pick_colour_features", "vlm_steering_study", "SAE_RELEASE", "SAE_HOOK"]

SAE_RELEASE = "shapes-clip-saes"
SAE_HOOK = "blocks.2.hook_resid_post"


@dataclasses.dataclass
class VLMSteeringStudy:
    """Fractions of steered images whose greedy colour answer became the target colour.

    ``per_colour[c]`` has ``feature`` (the picked latent), ``purity`` (share of its top selection images of
    colour ``c``), ``steered``, ``random_feature`` and ``random_direction`` (fractions over the images whose
    true colour is not ``c``) and ``n`` (their number). ``overall`` pools the images of every colour.
    """

    hook: str
    value_scale: float
    n_random: int
    per_colour: dict[str, dict[str, Any]]
    overall: dict[str, float]
    clean_accuracy: float

    def __str__(self) -> str:
        lines = [f"steering shapes-vlm's colour answer at vision.{SAE_HOOK} (clamp = {self.value_scale:g} x the "
                 f"feature's max activation; {self.n_random} random features / directions; clean accuracy "
                 f"{self.clean_accuracy:.0%})",
                 f"{'colour':8} {'feature':>7} {'purity':>6} {'n':>4} {'steered':>8} {'rand feat':>9} {'rand dir':>8}"]
        for c, r in self.per_colour.items():
            lines.append(f"{c:8} {r['feature']:>7} {r['purity']:>6.2f} {r['n']:>4} {r['steered']:>8.2f} "
                         f"{r['random_feature']:>9.2f} {r['random_direction']:>8.2f}")
        o = self.overall
        lines.append(f"{'overall':8} {'':>7} {'':>6} {int(o['n']):>4} {o['steered']:>8.2f} "
                     f"{o['random_feature']:>9.2f} {o['random_direction']:>8.2f}")
        return "\n".join(lines)


def _first_token(tokenizer: Any, text: str) -> int:
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


@torch.no_grad()
def _image_acts(model: Any, sae: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """SAE latents in the VLM's vision tower, max over tokens: [n_images, d_sae]."""
    name = model.locate(sae).name
    acts = []

    def grab(x: torch.Tensor, hook: Any) -> None:
        acts.append(sae.encode(x.to(sae.W_dec.dtype)).amax(1))

    model.vision.run_with_hooks(pixel_values, fwd_hooks=[(name[len("vision."):], grab)])
    return acts[0]


def pick_colour_features(model: Any, sae: Any, n_images: int = 300, *, seed: int = 0, top_k: int = 40
                         ) -> dict[str, dict[str, Any]]:
    """For each colour: the SAE feature whose top ``top_k`` selection images most share that colour."""
    if n_images < top_k * len(COLORS) // 2:
        raise ValueError(f"n_images={n_images} is too few to rank {top_k} top images per feature; pass >= {top_k * 3}.")
    world = ShapesWorld(image_size=32, seed=seed)
    images, truth = world.sample(n_images, text_prob=0)
    px = model.processor(images=list(images), text=[prompt("x")] * n_images, return_tensors="pt")["pixel_values"]
    acts = _image_acts(model, sae, px)  # [n, d_sae]
    colours = list(COLORS)
    label = torch.tensor([colours.index(f.color) for f in truth])
    top = acts.topk(top_k, dim=0).indices  # [top_k, d_sae]
    alive = acts.amax(0) > 0
    picked: dict[str, dict[str, Any]] = {}
    for ci, c in enumerate(colours):
        purity = (label[top] == ci).float().mean(0) * alive
        on = acts[label == ci].mean(0)
        off = acts[label != ci].mean(0)
        score = purity + 1e-3 * torch.tanh(on - off) / 1e3  # purity first, the activation gap breaks ties
        f = int(score.argmax())
        picked[c] = {"feature": f, "purity": float(purity[f]), "max_act": float(acts[:, f].max())}
    return picked


def vlm_steering_study(n_images: int = 60, seed: int = 0, *, model: Any = None, sae: Any = None,
                       value_scale: float = 4.0, n_random: int = 4, n_select: int = 300) -> VLMSteeringStudy:
    """Steer shapes-vlm's colour answer with each colour's SAE feature; fractions and baselines.

    ``n_images`` fresh text-free images (seed ``seed``) are asked the first colour question; each colour's
    feature is clamped to ``value_scale`` x its max activation on the selection images (seed ``seed + 1``)
    at every vision token. Baselines on the same images: ``n_random`` random live features clamped to the
    same value, and ``n_random`` random directions with the clamp's per-token norm.
    """
    from sae_lens import SAE  # SAELens loads the bundled SAE by release name

    from sae_lens_multimodal.analysis.vlm import steer_vision_feature
    from sae_lens_multimodal.models.vlm import HookedVLM

    if n_images < 2 or n_random < 1 or not value_scale > 0:
        raise ValueError("n_images >= 2, n_random >= 1 and value_scale > 0 are needed for a steering study.")
    model = model if model is not None else HookedVLM.from_pretrained("shapes-vlm")
    sae = sae if sae is not None else SAE.from_pretrained(SAE_RELEASE, SAE_HOOK)
    picked = pick_colour_features(model, sae, n_select, seed=seed + 1)
    world = ShapesWorld(image_size=32, seed=seed)
    images, truth = world.sample(n_images, text_prob=0)
    colours = list(COLORS)
    true_colour = np.array([f.color for f in truth])
    batch = model.processor(images=list(images), text=[prompt(QUESTIONS["color"][0])] * n_images,
                            return_tensors="pt", padding=True)
    ids, px, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    tok = model.processor.tokenizer
    colour_token = {c: _first_token(tok, c) for c in colours}
    location = model.locate(sae).name
    last = ids.shape[1] - 1  # one question for every image: no padding, the answer is read at the end
    gen = torch.Generator().manual_seed(seed)
    alive = [f for f in range(int(sae.cfg.d_sae)) if f not in {p["feature"] for p in picked.values()}]
    clean_top: Optional[torch.Tensor] = None
    per_colour: dict[str, dict[str, Any]] = {}
    totals = {"steered": 0.0, "random_feature": 0.0, "random_direction": 0.0, "n": 0.0}
    for c in colours:
        rows = torch.from_numpy(true_colour != c)
        target = colour_token[c]
        value = value_scale * picked[c]["max_act"]
        kw = dict(value=value, answer_tokens=torch.full((n_images,), target), n_random=0, attention_mask=mask)
        res = steer_vision_feature(model, sae, picked[c]["feature"], ids, px, **kw)
        clean_top = res.clean_top
        steered = (res.steered_top == target)[rows].float().mean()
        rand_feat = []
        for f in torch.randperm(len(alive), generator=gen)[:n_random].tolist():
            r = steer_vision_feature(model, sae, alive[f], ids, px, **kw)
            rand_feat.append((r.steered_top == target)[rows].float().mean())
        rand_dir = []
        norm = res.intervention_norm  # [n_images, n_vision_tokens]
        for _ in range(n_random):
            d = torch.randn(int(sae.cfg.d_in), generator=gen)
            d = d / d.norm()

            def add(x: torch.Tensor, hook: Any, d: torch.Tensor = d) -> torch.Tensor:
                return x + norm[..., None].to(x.dtype) * d.to(x.dtype)

            with torch.no_grad():
                logits = model.run_with_hooks(ids, px, fwd_hooks=[(location, add)], attention_mask=mask)
            top = logits[torch.arange(n_images), last].argmax(-1)
            rand_dir.append((top == target)[rows].float().mean())
        n = int(rows.sum())
        r = {"feature": picked[c]["feature"], "purity": round(picked[c]["purity"], 3), "n": n,
             "steered": float(steered), "random_feature": float(torch.stack(rand_feat).mean()),
             "random_direction": float(torch.stack(rand_dir).mean())}
        per_colour[c] = r
        for k in ("steered", "random_feature", "random_direction"):
            totals[k] += r[k] * n
        totals["n"] += n
    overall = {k: (v / totals["n"] if k != "n" else v) for k, v in totals.items()}
    answers = torch.tensor([colour_token[c] for c in true_colour])
    clean_acc = float((clean_top == answers).float().mean()) if clean_top is not None else float("nan")
    return VLMSteeringStudy(hook=location, value_scale=value_scale, n_random=n_random, per_colour=per_colour,
                            overall=overall, clean_accuracy=clean_acc)
