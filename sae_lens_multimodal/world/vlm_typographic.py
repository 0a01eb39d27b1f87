"""Typographic attacks on the shapes VLMs (issue 18, part 4): does a wrong colour word written on the image change
the VLM's colour answer when its vision tower is ``shapes-clip-typographic``, and does suppressing the bundled
SAE's text features in that tower restore it?

The study runs on the attack sets of :mod:`sae_lens_multimodal.world.typographic` (each image clean and with a
wrong colour name written in a row the shape is not in; discovery / selection / test splits of seeds ``seed``,
``seed + 1``, ``seed + 2``) and puts three models side by side:

* ``shapes-clip-typographic`` zero-shot (the CLIP-only study, :func:`~sae_lens_multimodal.world.typographic.typographic_analysis`;
  its colour accuracy is whether the predicted caption names the right colour);
* ``shapes-vlm-typographic`` (the shapes-vlm recipe on that tower): its answer to "what color is the shape ?"
  (the arg-max at the answer position, which is the greedy answer: colour names are one token);
* ``shapes-vlm`` (the plain shapes CLIP's tower) under the same attack.

Suppression uses the same SAE (``shapes-clip-typographic-saes``, ``blocks.0.hook_resid_post``), the same feature
ranking (the CLIP study's :func:`~sae_lens_multimodal.world.typographic.find_text_features` on the discovery
split: it reads only the tower and the SAE, which the VLM shares) and the same selection rule (the number of top
features with the best attacked-image accuracy on the selection split whose clean accuracy falls by at most
``max_clean_cost``; ties: fewer), here applied to the VLM's answers; the VLM is also scored with exactly the
CLIP's chosen features. Features are ablated through the steering API (``FeatureSteer(..., "ablate")``), the
SAE's error term kept.

``python -m sae_lens_multimodal.world.vlm_typographic --out docs`` prints the table and writes
``vlm_typographic.png`` / ``vlm_typographic.json`` (the figures of docs/vlm.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from sae_lens import SAE

from sae_lens_multimodal.core.atomic import atomic_save, atomic_write_json
from sae_lens_multimodal.models.hooked_clip import HookedCLIP
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.steering import FeatureSteer, steer
from sae_lens_multimodal.world.typographic import TypographicAttackSet, build_attack_set, typographic_analysis
from sae_lens_multimodal.world.vlm import QUESTIONS, prompt

__all__ = ["TYPOGRAPHIC_VLM", "TYPOGRAPHIC_SAE", "VLM_CONDITIONS", "VLMTypographicResult", "colour_answers",
           "attack_rates", "vlm_typographic_study", "main"]

#: The VLM built on the typographic tower, and the SAE (release, id) whose text features are suppressed.
TYPOGRAPHIC_VLM = "shapes-vlm-typographic"
TYPOGRAPHIC_SAE = ("shapes-clip-typographic-saes", "blocks.0.hook_resid_post")
#: Conditions of every row, in order (as the CLIP-only study's ``ATTACK_CONDITIONS``).
VLM_CONDITIONS: tuple[str, ...] = ("clean", "attacked", "attacked_suppressed", "clean_suppressed")
_LABELS = {"clean": "clean", "attacked": "under attack", "attacked_suppressed": "attack + suppression",
           "clean_suppressed": "clean + suppression"}


@torch.no_grad()
def colour_answers(model: Any, images: np.ndarray, *, steers: Sequence[Any] = (), batch_size: int = 250) -> list[str]:
    """The VLM's answer to "what color is the shape ?" for each uint8 image [n, H, W, 3]: the arg-max token at
    the answer position, decoded (colour names are single tokens of the word-level tokenizer, so this is the
    first and only word of the greedy answer). ``steers``: steering-API steers applied during the runs."""
    processor = getattr(model, "processor", None)
    if processor is None or not isinstance(model, HookedVLM):
        raise TypeError(f"colour_answers needs a HookedVLM with its processor (HookedVLM.from_pretrained('shapes-vlm'));"
                        f" got {type(model).__name__}.")
    text = prompt(QUESTIONS["color"][0])
    ids: list[torch.Tensor] = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        batch = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt")
        if steers:
            with steer(model, *steers):
                logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        else:
            logits = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        ids.append(logits[:, -1].argmax(-1))  # one prompt for every image: no padding, the answer position is last
    return processor.tokenizer.convert_ids_to_tokens(torch.cat(ids).tolist())


def attack_rates(answers: Sequence[str], attack_set: TypographicAttackSet, images: str) -> dict[str, float]:
    """Colour accuracy of ``answers`` on ``attack_set`` and (for ``images="attacked"``) the share that is the
    written word."""
    right = float(np.mean([a == c for a, c in zip(answers, attack_set.colors)]))
    out = {"color_accuracy": right}
    if images == "attacked":
        out["written_word"] = float(np.mean([a == w for a, w in zip(answers, attack_set.words)]))
    return out


@dataclasses.dataclass
class VLMTypographicResult:
    """Colour accuracy (per condition of :data:`VLM_CONDITIONS`) and written-word rate of each model on the same
    test split. ``rows[name]``: ``color_accuracy`` {condition: value}, ``written_word`` {condition: value},
    ``n_suppressed``, ``features`` (the suppressed latent indices). ``selection``: per candidate count, the
    VLM's attacked / clean colour accuracy on the selection split (``other_selections``: the same for the VLMs
    passed as ``also``)."""

    n_test: int
    seed: int
    max_clean_cost: float
    sae: tuple[str, str]
    rows: dict[str, dict[str, Any]]
    selection: list[dict[str, float]]
    clip_accuracy_162: dict[str, float]
    other_selections: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)

    def to_table(self) -> str:
        lines = [f"Typographic attack, {self.n_test} test images (seed {self.seed + 2}): colour accuracy; suppression "
                 f"ablates the top text features of {self.sae[0]} {self.sae[1]} (error term kept)", "",
                 "| model (colour read from) | " + " | ".join(_LABELS[c] for c in VLM_CONDITIONS)
                 + " | colour = written word (attack / + suppression) | features suppressed |",
                 "|---|" + "---|" * (len(VLM_CONDITIONS) + 2)]
        for name, row in self.rows.items():
            acc = row["color_accuracy"]
            cells = [f"{acc[c]:.1%}" if c in acc else "-" for c in VLM_CONDITIONS]
            word = row["written_word"]
            words = " / ".join(f"{word[c]:.1%}" for c in ("attacked", "attacked_suppressed") if c in word)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {words} | {row['n_suppressed'] or '-'} |")
        return "\n".join(lines)

    __str__ = to_table

    def plot(self, path: Union[str, os.PathLike]) -> Path:
        """Grouped bars: colour accuracy per condition, one bar per model row (PNG, written atomically)."""
        import matplotlib  # optional heavy dependency: figures only

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        x = np.arange(len(VLM_CONDITIONS))
        width = 0.8 / max(1, len(self.rows))
        fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
        try:
            for i, (name, row) in enumerate(self.rows.items()):
                values = [row["color_accuracy"].get(c, np.nan) for c in VLM_CONDITIONS]
                bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width=width, label=name)
                ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0%}" for v in values], fontsize=7)
            ax.set_xticks(x, [_LABELS[c] for c in VLM_CONDITIONS], fontsize=8)
            ax.set_ylim(0, 1.25)
            ax.set_ylabel("colour accuracy")
            ax.set_title(f"A wrong colour word written on the image ({self.n_test} test images); suppression: "
                         f"text features of {self.sae[0]}", fontsize=9)
            ax.legend(fontsize=7, loc="upper center", ncol=2)
            fig.tight_layout()
            atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=path.suffix)
        finally:
            plt.close(fig)
        return path


def _ablate(sae: Any, features: Sequence[int]) -> list[Any]:
    return [FeatureSteer(sae, [int(f) for f in features], "ablate", positions="all")] if len(features) else []


def _vlm_row(model: Any, sae: Any, test: TypographicAttackSet, features: Sequence[int], batch_size: int
             ) -> dict[str, Any]:
    steers = _ablate(sae, features)
    runs = {"clean": (test.clean, ()), "attacked": (test.attacked, ()),
            "attacked_suppressed": (test.attacked, steers), "clean_suppressed": (test.clean, steers)}
    acc, word = {}, {}
    for cond, (images, s) in runs.items():
        if cond.endswith("suppressed") and not features:
            continue
        rates = attack_rates(colour_answers(model, images, steers=s, batch_size=batch_size), test,
                             "attacked" if cond.startswith("attacked") else "clean")
        acc[cond] = rates["color_accuracy"]
        if "written_word" in rates:
            word[cond] = rates["written_word"]
    return {"color_accuracy": acc, "written_word": word, "n_suppressed": len(features), "features": list(features)}


def vlm_typographic_study(
    *,
    vlm: Any = None,
    plain_vlm: Any = None,
    clip: Any = None,
    sae: Any = None,
    n_discover: int = 500,
    n_select: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    candidate_counts: Sequence[int] = (0, 1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96),
    max_clean_cost: float = 0.05,
    batch_size: int = 250,
    progress: bool = False,
    also: Optional[dict[str, Any]] = None,
) -> VLMTypographicResult:
    """The CLIP-only typographic study and the same attack on ``shapes-vlm-typographic`` (with suppression) and
    on the plain ``shapes-vlm``, on the same test split. Defaults load the shipped models and bundled SAE;
    the split sizes, ``candidate_counts`` and ``max_clean_cost`` are the CLIP-only study's. ``also``: more VLMs
    on the typographic tower (name -> HookedVLM), measured as shapes-vlm-typographic."""
    if not candidate_counts or min(candidate_counts) != 0:
        raise ValueError(f"candidate_counts must be non-negative feature counts including 0 (the unsuppressed "
                         f"baseline of the selection rule); got {list(candidate_counts)}.")
    clip = clip if clip is not None else HookedCLIP.from_pretrained("shapes-clip-typographic")
    sae = sae if sae is not None else SAE.from_pretrained(*TYPOGRAPHIC_SAE)
    vlm = vlm if vlm is not None else HookedVLM.from_pretrained(TYPOGRAPHIC_VLM)
    plain_vlm = plain_vlm if plain_vlm is not None else HookedVLM.from_pretrained("shapes-vlm")
    clip_study = typographic_analysis(clip, sae, n_discover=n_discover, n_select=n_select, n_test=n_test, seed=seed,
                                      candidate_counts=candidate_counts, max_clean_cost=max_clean_cost,
                                      batch_size=batch_size, progress=progress, model_name="shapes-clip-typographic")
    ranked = [f.index for f in clip_study.features]  # tower + SAE only: the same ranking inside the VLM

    select = build_attack_set(n_select, seed=seed + 1)
    test = build_attack_set(n_test, seed=seed + 2)
    c = clip_study
    rows: dict[str, dict[str, Any]] = {
        "shapes-clip-typographic, zero-shot (CLIP-only study)": {
            "color_accuracy": dict(c.color_accuracy), "written_word": dict(c.written_word_rate),
            "n_suppressed": c.n_suppressed, "features": list(c.suppressed_features)},
    }
    selections: dict[str, list[dict[str, float]]] = {}
    for name, model in {TYPOGRAPHIC_VLM: vlm, **(also or {})}.items():
        selections[name] = _selection(model, sae, ranked, select, candidate_counts, batch_size)
        k = _chosen_count(selections[name], max_clean_cost)
        rows[f"{name}, answer ({k} feature{'' if k == 1 else 's'} chosen on the VLM)"] = _vlm_row(
            model, sae, test, ranked[:k], batch_size)
        if c.n_suppressed != k:
            rows[f"{name}, answer (the CLIP's {c.n_suppressed} features)"] = _vlm_row(
                model, sae, test, c.suppressed_features, batch_size)
    rows["shapes-vlm (plain tower), answer"] = _vlm_row(plain_vlm, None, test, [], batch_size)
    selection = selections.pop(TYPOGRAPHIC_VLM)
    return VLMTypographicResult(n_test=n_test, seed=seed, max_clean_cost=max_clean_cost, sae=TYPOGRAPHIC_SAE, rows=rows,
                                selection=selection, clip_accuracy_162=dict(c.accuracy), other_selections=selections)


def _selection(model: Any, sae: Any, ranked: Sequence[int], select: TypographicAttackSet,
               candidate_counts: Sequence[int], batch_size: int) -> list[dict[str, float]]:
    """Per candidate count k: the VLM's colour accuracy on the selection split, attacked and clean, with the top k
    ranked features ablated."""
    out = []
    for k in sorted({min(k, len(ranked)) for k in candidate_counts}):
        steers = _ablate(sae, ranked[:k])
        att = attack_rates(colour_answers(model, select.attacked, steers=steers, batch_size=batch_size), select, "clean")
        cln = attack_rates(colour_answers(model, select.clean, steers=steers, batch_size=batch_size), select, "clean")
        out.append({"n_features": k, "attacked_accuracy": att["color_accuracy"], "clean_accuracy": cln["color_accuracy"]})
    return out


def _chosen_count(selection: list[dict[str, float]], max_clean_cost: float) -> int:
    """The CLIP-only study's rule: the best attacked accuracy whose clean accuracy falls by at most
    ``max_clean_cost`` from no suppression (ties: fewer features)."""
    base = selection[0]["clean_accuracy"]  # counts are sorted and include 0 (see vlm_typographic_study)
    allowed = [s for s in selection if base - s["clean_accuracy"] <= max_clean_cost + 1e-12]
    return int(max(allowed or selection[:1], key=lambda s: (s["attacked_accuracy"], -s["n_features"]))["n_features"])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for vlm_typographic.png / .json")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                        help="another VLM on the typographic tower to measure (a train_vlm output folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    also = {}
    for item in args.also:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--also takes NAME=DIR; got {item!r}.")
        also[name] = HookedVLM.from_pretrained(directory)
    result = vlm_typographic_study(n_test=args.n_test, seed=args.seed, progress=False, also=also)
    print(result.to_table())
    print("\nselection split (features suppressed -> colour accuracy attacked / clean):")
    for name, selection in {TYPOGRAPHIC_VLM: result.selection, **result.other_selections}.items():
        print(f"  {name}")
        for s in selection:
            print(f"  {int(s['n_features']):3d} -> {s['attacked_accuracy']:.1%} / {s['clean_accuracy']:.1%}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result.plot(args.out / "vlm_typographic.png")
        atomic_write_json(args.out / "vlm_typographic.json", dataclasses.asdict(result), indent=1)
        print(f"\nwrote {args.out / 'vlm_typographic.png'} and {args.out / 'vlm_typographic.json'}")


if __name__ == "__main__":
    main()
