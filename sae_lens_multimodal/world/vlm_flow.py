"""How visual information flows into the shapes VLM's language model, per factor asked about (issue 18, part 2).

Three measurements on ``HookedVLM.from_pretrained("shapes-vlm")``, each per factor (colour, shape, position,
size, texture), on fresh text-free world images whose answers are known:

* attention knockout (:func:`sae_lens_multimodal.analysis.vlm_flow.attention_knockout`): attention from the
  answer position, or from every text position, to the image tokens blocked in one layer / all layers; the
  answer's probability, and how often the arg-max answer token changes;
* image-token patching (:func:`sae_lens_multimodal.analysis.vlm.patch_image_tokens`): the clean image's
  residual stream at the image tokens patched into a run on a counterfactual image that differs only in
  the asked factor, per layer; recovery 1 = the clean answer, 0 = the counterfactual's;
* the image-token logit lens (:func:`sae_lens_multimodal.analysis.vlm.image_logit_lens`): whether the image
  tokens themselves read out as the factor's value words, per residual-stream index.

``python -m sae_lens_multimodal.world.vlm_flow --out docs`` prints the tables and writes ``vlm_flow.png``
and ``vlm_flow.json`` (the figures docs/vlm.md quotes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.world.shapes import ShapeFactors, ShapesWorld
from sae_lens_multimodal.world.vlm import ASKED_FACTORS, QUESTIONS, prompt

__all__ = ["FlowStudy", "factor_batch", "knockout_study", "patching_study", "logit_lens_study", "flow_study", "main"]


@dataclasses.dataclass
class FactorBatch:
    """Prompts about one factor: model inputs, first answer token per row, and a counterfactual image per row
    that differs only in that factor (its answer's first token is the foil)."""

    factor: str
    inputs: dict[str, torch.Tensor]
    counterfactual_pixels: torch.Tensor
    answer_tokens: torch.Tensor
    foil_tokens: torch.Tensor
    value_tokens: torch.Tensor  # first token of each of the factor's values (the logit-lens vocabulary)
    value_index: torch.Tensor  # the row's value, as an index into value_tokens


def _first_token(tokenizer: Any, text: str) -> int:
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


def _other_value(factor: str, value: str, rng: np.random.Generator) -> str:
    values = [v for v in ShapesWorld.factor_values[factor] if v != value]
    if factor == "position":  # the foil must start with another word ("top" vs "top left" share one)
        values = [v for v in values if v.split()[0] != value.split()[0]]
    return str(values[rng.integers(len(values))])


def factor_batch(processor: Any, factor: str, n: int, seed: int = 0) -> FactorBatch:
    """``n`` fresh text-free images asked about ``factor`` (first phrasing), with counterfactual images."""
    world = ShapesWorld(image_size=32, seed=seed)
    rng = np.random.default_rng(seed + 1)
    images, truth = world.sample(n)
    swapped: list[ShapeFactors] = []
    for f in truth:
        keep = {k: getattr(f, k) for k in ASKED_FACTORS if k != factor}
        keep[factor] = _other_value(factor, getattr(f, factor), rng)
        swapped.append(world.sample_factors(1, text_prob=0, **keep)[0])
    counter = world.render(swapped)
    tok = processor.tokenizer
    inputs = processor(images=list(images), text=[prompt(QUESTIONS[factor][0])] * n, return_tensors="pt", padding=True)
    counter_px = processor(images=list(counter), text=[prompt(QUESTIONS[factor][0])] * n, return_tensors="pt")["pixel_values"]
    values = list(ShapesWorld.factor_values[factor])
    value_tokens = sorted({_first_token(tok, v) for v in values})
    return FactorBatch(
        factor=factor, inputs=dict(inputs), counterfactual_pixels=counter_px,
        answer_tokens=torch.tensor([_first_token(tok, getattr(f, factor)) for f in truth]),
        foil_tokens=torch.tensor([_first_token(tok, getattr(f, factor)) for f in swapped]),
        value_tokens=torch.tensor(value_tokens),
        value_index=torch.tensor([value_tokens.index(_first_token(tok, getattr(f, factor))) for f in truth]),
    )


def knockout_study(model: Any, batch: FactorBatch, queries: str = "answer") -> dict[str, Any]:
    """Knockout of every single layer, and of all layers, from the ``queries`` positions."""
    from sae_lens_multimodal.analysis.vlm_flow import attention_knockout

    res = attention_knockout(model, batch.inputs["input_ids"], batch.inputs["pixel_values"], batch.answer_tokens,
                             attention_mask=batch.inputs["attention_mask"], queries=queries)
    chance = 1.0 / len(batch.value_tokens)
    return {
        "windows": [list(w) for w in res.windows],
        "relative_prob": [round(float(v), 4) for v in res.relative_prob],
        "accuracy": [round(float(v), 4) for v in res.accuracy],
        "changed": [round(float(v), 4) for v in res.changed],
        "clean_accuracy": round(float((res.clean_top == res.answer_tokens).float().mean()), 4),
        "chance": round(chance, 4),
    }


def patching_study(model: Any, batch: FactorBatch, hook: str = "resid_pre") -> dict[str, Any]:
    """Recovery per layer when the clean image tokens are patched into the counterfactual run."""
    from sae_lens_multimodal.analysis.vlm import patch_image_tokens

    res = patch_image_tokens(model, batch.inputs["input_ids"], batch.inputs["pixel_values"],
                             batch.counterfactual_pixels, answer_tokens=batch.answer_tokens,
                             foil_tokens=batch.foil_tokens, attention_mask=batch.inputs["attention_mask"], hook=hook)
    return {"hook": hook, "layers": res.layers, "recovered": [round(float(v), 4) for v in res.recovered],
            "clean": round(res.clean, 4), "corrupted": round(res.corrupted, 4)}


def logit_lens_study(model: Any, batch: FactorBatch) -> dict[str, Any]:
    """Per residual-stream index: how often the image token that most favours any of the factor's value words
    favours the right one (the value with the largest log-probability at any image token), and the mean
    log-probability mass of the factor's value words at the image tokens."""
    from sae_lens_multimodal.analysis.vlm import image_logit_lens

    lens = image_logit_lens(model, batch.inputs["input_ids"], batch.inputs["pixel_values"],
                            tokens=batch.value_tokens.tolist(), attention_mask=batch.inputs["attention_mask"])
    lp = lens.token_logprobs  # [layers, batch, image tokens, values]
    best = lp.max(dim=2).values.argmax(-1)  # the value read out most strongly anywhere in the image
    accuracy = (best == batch.value_index[None]).float().mean(-1)
    mass = lp.exp().sum(-1).mean((-1, -2))
    return {"layers": lens.layers, "accuracy": [round(float(v), 4) for v in accuracy],
            "value_word_mass": [round(float(v), 4) for v in mass], "chance": round(1 / len(batch.value_tokens), 4)}


@dataclasses.dataclass
class FlowStudy:
    n_per_factor: int
    seed: int
    knockout_answer: dict[str, Any]
    knockout_text: dict[str, Any]
    patching: dict[str, Any]
    logit_lens: dict[str, Any]


@torch.no_grad()
def flow_study(model: Any = None, n_per_factor: int = 100, seed: int = 30_000) -> FlowStudy:
    """All three measurements for every factor (default model: the shipped shapes-vlm)."""
    if model is None:
        from sae_lens_multimodal.models.vlm import HookedVLM

        model = HookedVLM.from_pretrained("shapes-vlm")
    out: dict[str, dict[str, Any]] = {k: {} for k in ("knockout_answer", "knockout_text", "patching", "logit_lens")}
    for i, factor in enumerate(ASKED_FACTORS):
        batch = factor_batch(model.processor, factor, n_per_factor, seed=seed + i)
        out["knockout_answer"][factor] = knockout_study(model, batch, "answer")
        out["knockout_text"][factor] = knockout_study(model, batch, "text")
        out["patching"][factor] = patching_study(model, batch)
        out["logit_lens"][factor] = logit_lens_study(model, batch)
    return FlowStudy(n_per_factor=n_per_factor, seed=seed, **out)


def _label(window: list[int]) -> str:
    a, b = window
    return "none" if a == b else (f"L{a}" if b == a + 1 else f"L{a}-{b - 1}")


def print_study(study: FlowStudy) -> None:
    for name, title in (("knockout_answer", "knockout from the answer position"),
                        ("knockout_text", "knockout from every text position")):
        table = getattr(study, name)
        windows = [_label(w) for w in next(iter(table.values()))["windows"]]
        print(f"\n{title}: answer accuracy (first token) per knocked-out window")
        print(f"{'factor':10s} " + " ".join(f"{w:>7s}" for w in windows) + "   chance")
        for factor, row in table.items():
            print(f"{factor:10s} " + " ".join(f"{v:7.2f}" for v in row["accuracy"]) + f"   {row['chance']:.2f}")
    print("\nimage-token patching (resid_pre), recovery per layer")
    for factor, row in study.patching.items():
        print(f"{factor:10s} " + " ".join(f"L{l}:{v:5.2f}" for l, v in zip(row["layers"], row["recovered"])))
    print("\nimage-token logit lens: right value read out at the image tokens (per residual index)")
    for factor, row in study.logit_lens.items():
        print(f"{factor:10s} " + " ".join(f"r{l}:{v:5.2f}" for l, v in zip(row["layers"], row["accuracy"]))
              + f"   chance {row['chance']:.2f}")


def plot_study(study: FlowStudy, path: Path) -> None:
    import matplotlib  # optional heavy dependency: figures only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sae_lens_multimodal.core.atomic import atomic_save

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, name, title in ((axes[0], "knockout_answer", "knockout: answer position -> image"),
                            (axes[1], "knockout_text", "knockout: all text -> image")):
        table = getattr(study, name)
        for factor, row in table.items():
            ax.plot([_label(w) for w in row["windows"]], row["accuracy"], marker="o", label=factor)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("answer accuracy (first token)")
        ax.set_ylim(-0.02, 1.02)
    for factor, row in study.patching.items():
        axes[2].plot(row["layers"], row["recovered"], marker="o", label=factor)
    axes[2].set_title("image-token patching (resid_pre)", fontsize=10)
    axes[2].set_xlabel("layer patched")
    axes[2].set_ylabel("recovery")
    for factor, row in study.logit_lens.items():
        axes[3].plot(row["layers"], row["accuracy"], marker="o", label=factor)
    axes[3].set_title("logit lens at image tokens", fontsize=10)
    axes[3].set_xlabel("residual index (0 = projector output)")
    axes[3].set_ylabel("right value read out")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="images per factor")
    parser.add_argument("--seed", type=int, default=30_000)
    parser.add_argument("--out", type=Path, default=None, help="folder for vlm_flow.png / vlm_flow.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    study = flow_study(n_per_factor=args.n, seed=args.seed)
    print_study(study)
    if args.out is not None:
        from sae_lens_multimodal.core.atomic import atomic_write_json

        args.out.mkdir(parents=True, exist_ok=True)
        plot_study(study, args.out / "vlm_flow.png")
        atomic_write_json(args.out / "vlm_flow.json", dataclasses.asdict(study), indent=1)
        print(f"\nwrote {args.out / 'vlm_flow.png'} and {args.out / 'vlm_flow.json'}")


if __name__ == "__main__":
    main()
