"""shapes-vlm in the demo report and in ``sae-lens-mm ground-truth`` (issue 18, part 5).

* :func:`vlm_demo_section`: the demo report's VLM section (world/demo.py adds it): questions and greedy answers
  on a few world images, the attention-knockout curve per factor, and answers steered through colour features
  of the bundled vision SAE. A few seconds on one CPU thread.
* :data:`GROUND_TRUTH_CHECKS`: the bodies of the ground-truth command's VLM checks (world/readme_checks.py names
  them in ``README_ROWS``): per-factor answer accuracy, the knockout verdict, steering against baselines and
  the typographic attack on ``shapes-vlm-typographic``. Each takes the command's context (``ctx.quick``,
  ``ctx.get(key, make)`` to share loaded models) and returns ``(printed line, result)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from sae_lens import SAE

from sae_lens_multimodal.analysis.vlm import steer_vision_feature
from sae_lens_multimodal.analysis.vlm_flow import attention_knockout
from sae_lens_multimodal.models.vlm import HookedVLM
from sae_lens_multimodal.reports.html import Raw, figure_data_uri, image_tag, img_tag, paragraph, table
from sae_lens_multimodal.world.shapes import ShapesWorld
from sae_lens_multimodal.world.vlm import ASKED_FACTORS, QUESTIONS, answer_of, answer_questions, prompt, vlm_accuracy
from sae_lens_multimodal.world.vlm_flow import factor_batch
from sae_lens_multimodal.world.vlm_steering import SAE_HOOK, SAE_RELEASE, pick_colour_features, vlm_steering_study
from sae_lens_multimodal.world.vlm_typographic import TYPOGRAPHIC_SAE, TYPOGRAPHIC_VLM, vlm_typographic_study

__all__ = ["VLMDemoSection", "vlm_demo_section", "knockout_verdict", "GROUND_TRUTH_CHECKS"]

_NAMES = {"color": "colour"}  # the README's spelling


def _pct(x: float) -> str:
    text = f"{100 * x:.1f}"
    return (text.split(".")[0] if float(text) in (0.0, 100.0) else text) + "%"


def _window(w: Any) -> str:
    a, b = int(w[0]), int(w[1])
    return "none" if a == b else (f"L{a}" if b == a + 1 else f"L{a}-{b - 1}")


def _load_vlm(name: str = "shapes-vlm") -> Any:
    return HookedVLM.from_pretrained(name)


# ------------------------------------------------------------------------------------------------ knockout
def knockout_tables(model: Any, n_per_factor: int, seed: int = 30_000, *, same_images: bool = False
                    ) -> dict[str, dict[str, dict[str, Any]]]:
    """Attention knockout per factor: every single block knocked out from the answer position (``"answer"``:
    ``windows``, ``accuracy``, ``chance``) and every block from every text position (``"text"``: ``accuracy``).
    Images: ``world.vlm_flow``'s (seed ``seed + i`` for the i-th factor, as docs/vlm.md), or with ``same_images``
    one set of ``n_per_factor`` images (seed ``seed``) asked about every factor (fewer images to prepare)."""
    n_layers = model.lm.cfg.n_layers
    windows = [(0, 0)] + [(i, i + 1) for i in range(n_layers)]
    shared = ShapesWorld(image_size=32, seed=seed).sample(n_per_factor, text_prob=0) if same_images else None
    out: dict[str, dict[str, dict[str, Any]]] = {"answer": {}, "text": {}}
    with torch.no_grad():
        for i, factor in enumerate(ASKED_FACTORS):
            if shared is None:
                b = factor_batch(model.processor, factor, n_per_factor, seed=seed + i)
                inputs, answers, n_values = b.inputs, b.answer_tokens, len(b.value_tokens)
            else:
                inputs, answers, n_values = _question_batch(model.processor, factor, *shared)
            args = (model, inputs["input_ids"], inputs["pixel_values"], answers)
            res = attention_knockout(*args, windows=windows, attention_mask=inputs["attention_mask"], queries="answer")
            every = attention_knockout(*args, windows=[(0, n_layers)], attention_mask=inputs["attention_mask"],
                                       queries="text")
            out["answer"][factor] = {"windows": [list(w) for w in res.windows],
                                     "accuracy": [float(v) for v in res.accuracy], "chance": 1.0 / n_values}
            out["text"][factor] = {"accuracy": float(every.accuracy[0])}
    return out


def _question_batch(processor: Any, factor: str, images: np.ndarray, truth: list[Any]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Model inputs asking every image about ``factor`` (first phrasing), first answer tokens, number of values."""
    tok = processor.tokenizer
    inputs = processor(images=list(images), text=[prompt(QUESTIONS[factor][0])] * len(images), return_tensors="pt")
    first = [tok(answer_of(f, factor), add_special_tokens=False)["input_ids"][0] for f in truth]
    values = {tok(v, add_special_tokens=False)["input_ids"][0] for v in ShapesWorld.factor_values[factor]}
    return dict(inputs), torch.tensor(first), len(values)


@dataclass
class KnockoutVerdict:
    """Per factor: the block whose knockout hurts most (``reading``), the accuracy then, the largest change of
    any other single block, and the accuracy with every block knocked out from every text position."""

    reading: dict[str, str]
    accuracy_without: dict[str, float]
    other_blocks_max_change: float
    all_blocks_text: dict[str, float]
    chance: dict[str, float]
    clean: dict[str, float]
    tables: dict[str, Any] = field(default_factory=dict, repr=False)

    def line(self) -> str:
        by_block: dict[str, list[str]] = {}
        for f, block in self.reading.items():
            by_block.setdefault(block, []).append(_NAMES.get(f, f))
        reads = "; ".join(f"{', '.join(fs)} read in {b}" for b, fs in sorted(by_block.items()))
        without = ", ".join(f"{_NAMES.get(f, f)} {a:.2f}" for f, a in self.accuracy_without.items())
        chance = ", ".join(f"{_NAMES.get(f, f)} {a:.2f} (chance {self.chance[f]:.2f})" for f, a in self.all_blocks_text.items())
        return (f"bridge blocks: {reads} (answer accuracy with that block knocked out: {without}); any other single "
                f"block changes the accuracy by <= {self.other_blocks_max_change:.2f}; every block, every text position: "
                f"{chance}")


def knockout_verdict(tables: dict[str, dict[str, dict[str, Any]]]) -> KnockoutVerdict:
    """The reading block per factor and the other figures of the verdict, from :func:`knockout_tables`."""
    reading, without, clean, chance, all_text = {}, {}, {}, {}, {}
    other = 0.0
    for factor, row in tables["answer"].items():
        singles = [(w, a) for w, a in zip(row["windows"], row["accuracy"]) if w[1] - w[0] == 1]
        base = row["accuracy"][[w[0] == w[1] for w in row["windows"]].index(True)]
        w_min, a_min = min(singles, key=lambda wa: wa[1])
        reading[factor], without[factor], clean[factor] = _window(w_min), a_min, base
        other = max([other] + [abs(base - a) for w, a in singles if w != w_min])
        chance[factor] = row["chance"]
        all_text[factor] = tables["text"][factor]["accuracy"]
    return KnockoutVerdict(reading, without, other, all_text, chance, clean, tables)


def knockout_png(tables: dict[str, dict[str, dict[str, Any]]], title: str) -> str:
    """The knockout curve (answer accuracy per knocked-out window, one line per factor) as a PNG data URI."""
    import matplotlib  # optional heavy dependency: figures only

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.0))
    for factor, row in tables["answer"].items():
        labels = [_window(w) for w in row["windows"]] + ["all, every text pos."]
        ax.plot(labels, list(row["accuracy"]) + [tables["text"][factor]["accuracy"]], marker="o",
                label=_NAMES.get(factor, factor))
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("answer accuracy")
    ax.set_xlabel("blocks whose attention to the image is knocked out (answer position)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return figure_data_uri(fig, dpi=100)


# ------------------------------------------------------------------------------------------------ demo
@dataclass
class VLMDemoSection:
    """The demo's VLM section: ``html`` (the section body), the figures behind it, and its wall time."""

    html: str
    answers: list[dict[str, Any]]
    verdict: KnockoutVerdict
    steered: list[dict[str, Any]]
    seconds: float = 0.0


def _steered_answers(model: Any, images: np.ndarray, truth: list[Any], colours: tuple[str, ...], seed: int
                     ) -> list[dict[str, Any]]:
    """For each image: the clean colour answer and the answer with each colour's SAE feature clamped
    (``world.vlm_steering``'s feature choice and clamp: 4 x its max activation, error term kept)."""
    sae = SAE.from_pretrained(SAE_RELEASE, SAE_HOOK)
    picked = pick_colour_features(model, sae, 300, seed=seed + 1, top_k=40)  # vlm_steering_study's choice
    batch = model.processor(images=list(images), text=[prompt(QUESTIONS["color"][0])] * len(images), return_tensors="pt")
    tok = model.processor.tokenizer
    rows: list[dict[str, Any]] = [{"truth": f.color, "steered": {}} for f in truth]
    for c in colours:
        target = tok.convert_tokens_to_ids(c)
        res = steer_vision_feature(model, sae, picked[c]["feature"], batch["input_ids"], batch["pixel_values"],
                                   value=4.0 * picked[c]["max_act"], answer_tokens=torch.full((len(images),), target),
                                   n_random=0, attention_mask=batch["attention_mask"])
        for r, clean, steered in zip(rows, res.clean_top.tolist(), res.steered_top.tolist()):
            r["clean"] = tok.convert_ids_to_tokens(clean)
            r["steered"][f"{c} (feature {picked[c]['feature']})"] = tok.convert_ids_to_tokens(steered)
    return rows


def vlm_demo_section(*, seed: int = 0, n_images: int = 4, n_knockout: int = 30,
                     steer_colours: tuple[str, ...] = ("red", "blue", "orange")) -> VLMDemoSection:
    """The demo report's shapes-vlm section: ``n_images`` world images (seed ``seed + 2``) asked about every factor,
    the knockout curve on ``n_knockout`` images per factor, and the colour answers of the same images with each
    of ``steer_colours``' vision-SAE feature clamped."""
    start = time.perf_counter()
    model = _load_vlm()
    images, truth = ShapesWorld(image_size=32, seed=seed + 2).sample(n_images, text_prob=0.5)
    questions = [QUESTIONS[f][0] for f in ASKED_FACTORS]
    got = answer_questions(model, np.repeat(images, len(questions), axis=0), questions * n_images)
    answers, rows = [], []
    for i, f in enumerate(truth):
        cells = []
        for j, factor in enumerate(ASKED_FACTORS):
            a, want = got[i * len(questions) + j], answer_of(f, factor)
            answers.append({"image": i, "question": questions[j], "answer": a, "truth": want})
            cells.append(a if a == want else f"{a} (truth: {want})")
        word = f" (written: {f.text})" if f.text else ""
        rows.append([Raw(image_tag(images[i], 3, alt=f"image {i}")), f"image {i}{word}"] + cells)
    body = paragraph("HookedVLM.from_pretrained('shapes-vlm'): a transformers LLaVA made of the shapes CLIP's vision "
                     "tower, a projector and a 3-block Llama, trained on shapes-world questions (docs/vlm.md). Greedy "
                     "answers to one question per factor; a wrong answer shows the truth.")
    body += table(rows, ["image", ""] + [f"{q}" for q in questions])

    verdict = knockout_verdict(knockout_tables(model, n_knockout, seed + 3, same_images=True))
    body += "<h3>Where the image reaches the answer: attention knockout</h3>"
    body += img_tag(knockout_png(verdict.tables, f"{n_knockout} images per factor"), alt="knockout curve", css_class="plot")
    body += paragraph("Attention from the answer position to the image tokens blocked in one language-model block, "
                      "or in all of them from every text position (last point). " + verdict.line() + ".", "note")

    steered = _steered_answers(model, images, truth, steer_colours, seed)
    heads = list(steered[0]["steered"])
    body += "<h3>Answers steered through the vision tower</h3>"
    body += table([[Raw(image_tag(images[i], 3, alt=f"image {i}")), r["truth"], r["clean"]] + [r["steered"][h] for h in heads]
                   for i, r in enumerate(steered)],
                  ["image", "true colour", "answer"] + [f"clamped: {h}" for h in heads])
    body += paragraph("'what color is the shape ?' with one colour feature of the bundled vision SAE (shapes-clip-saes, "
                      "blocks.2.hook_resid_post) clamped to 4x its largest activation at every vision token, the SAE's "
                      "error term kept (world.vlm_steering picks each colour's feature from its top images). Over 300 "
                      "images this moves 57% of answers to the feature's colour, against 17% for random features and 4% "
                      "for random directions (docs/vlm.md).", "note")
    return VLMDemoSection(body, answers, verdict, steered, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ ground truth
def _vlm(ctx: Any, name: str = "shapes-vlm") -> Any:
    return ctx.get(f"vlm:{name}", lambda: _load_vlm(name))


def check_answers(ctx: Any) -> tuple[str, Any]:
    """Per-factor greedy answer accuracy on fresh images (seed 10000, as training.json), without and with a word
    written on every image."""
    n = 100 if ctx.quick else 1000
    clean = vlm_accuracy(_vlm(ctx), n, seed=10_000)
    words = vlm_accuracy(_vlm(ctx), n, seed=10_000, text_prob=1.0)
    per = ", ".join(f"{_NAMES.get(f, f)} {_pct(a)}" for f, a in clean.per_factor.items())
    return (f"{per} ({n} fresh images, greedy answers; with a word written on every image: {_pct(words.overall)} "
            f"overall)"), (clean, words)


def check_knockout(ctx: Any) -> tuple[str, Any]:
    """The knockout verdict on vlm_flow's images (100 per factor; 20 with ``quick``)."""
    verdict = knockout_verdict(knockout_tables(_vlm(ctx), 20 if ctx.quick else 100))
    return verdict.line() + f" ({20 if ctx.quick else 100} images per factor)", verdict


def check_steering(ctx: Any) -> tuple[str, Any]:
    """``world.vlm_steering.vlm_steering_study`` (60 images, seed 0; 12 images, 2 baselines with ``quick``)."""
    sae = ctx.sae(SAE_RELEASE, SAE_HOOK) if hasattr(ctx, "sae") else None
    study = vlm_steering_study(12 if ctx.quick else 60, 0, model=_vlm(ctx), sae=sae, n_random=2 if ctx.quick else 4)
    o = study.overall
    per = ", ".join(f"{c} {_pct(r['steered'])}" for c, r in study.per_colour.items())
    return (f"{_pct(o['steered'])} of {int(o['n'])} answers become the clamped feature's colour vs {_pct(o['random_feature'])}"
            f" / {_pct(o['random_direction'])} (random features / random directions, same value / norm); per colour: "
            f"{per}"), study


def check_typographic(ctx: Any) -> tuple[str, Any]:
    """``world.vlm_typographic.vlm_typographic_study`` at the CLIP-only study's sizes (100 per split with ``quick``)."""
    sizes: dict[str, Any] = dict(n_discover=100, n_select=100, n_test=100, candidate_counts=(0, 8, 56)) if ctx.quick else {}
    sae = ctx.sae(*TYPOGRAPHIC_SAE) if hasattr(ctx, "sae") else None
    clip = ctx.clip("shapes-clip-typographic") if hasattr(ctx, "clip") else None
    r = vlm_typographic_study(vlm=_vlm(ctx, TYPOGRAPHIC_VLM), plain_vlm=_vlm(ctx), clip=clip, sae=sae, **sizes)
    rows = list(r.rows.values())
    clip_row, vlm_row, plain = rows[0], rows[1], rows[-1]
    a, c = vlm_row["color_accuracy"], clip_row["color_accuracy"]
    k = vlm_row["n_suppressed"]
    suppressed = (f"{_pct(a['attacked_suppressed'])} with {k} SAE text feature{'' if k == 1 else 's'} suppressed in the "
                  "tower" if k else "suppression chooses no feature (none helps on the selection split)")
    return (f"colour answer {_pct(a['clean'])} → {_pct(a['attacked'])} under attack (answers the written word "
            f"{_pct(vlm_row['written_word']['attacked'])}) → {suppressed}; CLIP-only: {_pct(c['clean'])} → "
            f"{_pct(c['attacked'])} → {_pct(c['attacked_suppressed'])} ({clip_row['n_suppressed']} features); "
            f"shapes-vlm (plain tower): {_pct(plain['color_accuracy']['clean'])} → "
            f"{_pct(plain['color_accuracy']['attacked'])} ({r.n_test} test images)"), r


#: Ground-truth check name (world/readme_checks.py) -> body.
GROUND_TRUTH_CHECKS: dict[str, Callable[[Any], tuple[str, Any]]] = {
    "vlm-answers": check_answers,
    "vlm-knockout": check_knockout,
    "vlm-steering": check_steering,
    "vlm-typographic": check_typographic,
}
