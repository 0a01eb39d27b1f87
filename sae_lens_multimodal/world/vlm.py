"""The shapes-world VLM (``"shapes-vlm"``): a transformers ``LlavaForConditionalGeneration`` made of the shipped
shapes CLIP's vision tower (frozen, converted exactly from open_clip), LLaVA's two-layer projector and a small
Llama language model trained to answer questions about the one shape in a world image.

Questions ask about one factor each (colour, shape, position, size, texture; several phrasings per factor,
:data:`QUESTIONS`); answers are the factor's value, one or two words ("red", "top left"), then end-of-text.
The tokenizer is word-level over the prompt, question and answer words (built with ``tokenizers``, wrapped in
a transformers fast tokenizer) and the processor is a ``LlavaProcessor`` with the ``CLIPImageProcessor`` that
reproduces the shapes CLIP's preprocessing; both are saved beside the weights, so everything loads offline:

>>> model, processor = load_shapes_vlm()                    # transformers objects
>>> vlm = HookedVLM.from_pretrained("shapes-vlm")           # hooked, by name
>>> answer_questions(vlm, images, ["what color is the shape ?"] * len(images))

Because the vision tower is the shapes CLIP's own (LLaVA's ``vision_feature_layer=-1`` with strategy "full":
all 4 blocks run and the CLS token is kept, 65 image tokens), the bundled ``shapes-clip-saes`` vision SAE
splices into ``vision.blocks.2`` unchanged.
Training: :mod:`sae_lens_multimodal.world.training.train_vlm`; figures: ``weights/shapes_vlm/training.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from sae_lens_multimodal.world.paths import SHAPES_CLIP_DIR, SHAPES_VLM_DIR
from sae_lens_multimodal.world.shapes import ShapeFactors, ShapesWorld

__all__ = [
    "SHAPES_VLM_DIR",
    "ASKED_FACTORS",
    "QUESTIONS",
    "PROMPT_TEMPLATE",
    "prompt",
    "answer_of",
    "vlm_vocabulary",
    "build_tokenizer",
    "build_processor",
    "vision_tower_state_from_open_clip",
    "build_shapes_vlm",
    "load_shapes_vlm",
    "QuestionSet",
    "sample_questions",
    "answer_questions",
    "VLMAccuracy",
    "vlm_accuracy",
]

#: The factors the model is asked about (the written word is never asked about).
ASKED_FACTORS: tuple[str, ...] = ("color", "shape", "position", "size", "texture")
#: Question phrasings per factor; training draws one uniformly for each image.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("what color is the shape ?", "what colour is it ?", "which color is the object ?",
              "what is the color of the shape ?"),
    "shape": ("what shape is it ?", "what is the shape ?", "which shape is in the image ?",
              "what kind of shape is shown ?"),
    "position": ("where is the shape ?", "where is it ?", "what is the position of the shape ?",
                 "where in the image is the object ?"),
    "size": ("what size is the shape ?", "how big is it ?", "is the shape small or large ?",
             "what is the size of the object ?"),
    "texture": ("what texture is the shape ?", "is it plain or striped ?", "what pattern does the shape have ?",
                "what is the texture of the object ?"),
}
#: LLaVA-1.5's conversation format; the processor expands ``<image>`` into one placeholder per image token.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"


def prompt(question: str) -> str:
    """The full prompt for one question (before the processor expands ``<image>``)."""
    return PROMPT_TEMPLATE.format(question=question)


def answer_of(factors: Union[ShapeFactors, dict[str, Any]], factor: str) -> str:
    """The expected answer: the factor's value as the world names it ("red", "top left", "striped")."""
    if factor not in ASKED_FACTORS:
        raise ValueError(f"Unknown factor {factor!r}; the VLM is asked about {list(ASKED_FACTORS)}.")
    value = factors.to_dict()[factor] if isinstance(factors, ShapeFactors) else factors[factor]
    return str(value)


def vlm_vocabulary() -> list[str]:
    """Every word the tokenizer knows, sorted: prompt, question and answer words (punctuation included)."""
    words = {"user", ":", "assistant"}
    for phrasings in QUESTIONS.values():
        for q in phrasings:
            words.update(q.split())
    for factor, values in ShapesWorld.factor_values.items():
        if factor in ASKED_FACTORS:
            for v in values:
                words.update(v.split())
    return sorted(words)


def build_tokenizer() -> Any:
    """The word-level tokenizer as a transformers ``PreTrainedTokenizerFast``: lower-cased, whitespace /
    punctuation split, ``<s>`` prepended, unknown words -> ``<unk>``; ``<image>`` is a special token (the
    largest id), padding on the left (for batched generation)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast  # optional heavy dependency

    vocab = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}
    for word in vlm_vocabulary():
        vocab[word] = len(vocab)
    vocab[IMAGE] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, UNK, BOS, EOS, IMAGE)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=128,
    )


def build_processor(tokenizer: Any = None, *, image_size: int = 32, patch_size: int = 4,
                    mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                    vision_feature_select_strategy: str = "full") -> Any:
    """A ``LlavaProcessor``: the shapes CLIP's preprocessing as a ``CLIPImageProcessor`` (shortest side to
    ``image_size``, centre crop, scale to [0, 1], normalise with the CLIP's mean / std; world images pass
    unchanged but for the normalisation) and the tokenizer; ``<image>`` expands to one placeholder per image
    token: (image_size / patch_size)^2 patches plus the CLS token (LLaVA's "full" strategy; "default" drops it)."""
    from transformers import CLIPImageProcessor, LlavaProcessor  # optional heavy dependency

    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=patch_size, vision_feature_select_strategy=vision_feature_select_strategy, image_token=IMAGE,
        num_additional_image_tokens=1,
    )


@torch.no_grad()
def vision_tower_state_from_open_clip(clip_model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An open_clip ``CLIP``'s vision tower as a transformers ``CLIPVisionModel``: (config kwargs, state dict).

    Both are pre-LN ViTs with a CLS token, learned position embeddings, ``ln_pre`` and exact GELU, so the
    weights map one to one (open_clip's fused ``in_proj`` splits into q / k / v). open_clip's output
    projection has no place in ``CLIPVisionModel`` and LLaVA does not use it."""
    visual = clip_model.visual
    blocks = visual.transformer.resblocks
    first = blocks[0]
    act = first.mlp.gelu
    if type(act).__name__ != "GELU" or getattr(act, "approximate", "none") != "none":
        raise ValueError(f"Only open_clip vision towers with exact GELU convert (this one uses {type(act).__name__}).")
    if getattr(visual, "attn_pool", None) is not None or type(visual.ln_pre).__name__ != "LayerNorm":
        raise ValueError("Only plain open_clip ViTs (ln_pre, no attentional pooling) convert to CLIPVisionModel.")
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0]
    config = dict(
        hidden_size=width, intermediate_size=first.mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads, image_size=patch * visual.grid_size[0], patch_size=patch,
        hidden_act="gelu", layer_norm_eps=visual.ln_pre.eps, projection_dim=width, num_channels=3,
    )
    p = ""  # transformers 5: CLIPVisionModel holds the embeddings and encoder directly
    state = {
        p + "embeddings.class_embedding": visual.class_embedding,
        p + "embeddings.patch_embedding.weight": visual.conv1.weight,
        p + "embeddings.position_embedding.weight": visual.positional_embedding,
        p + "pre_layrnorm.weight": visual.ln_pre.weight, p + "pre_layrnorm.bias": visual.ln_pre.bias,
        p + "post_layernorm.weight": visual.ln_post.weight, p + "post_layernorm.bias": visual.ln_post.bias,
    }
    for i, block in enumerate(blocks):
        b = f"{p}encoder.layers.{i}."
        for name, w, bias in zip(("q", "k", "v"), block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            state[f"{b}self_attn.{name}_proj.weight"], state[f"{b}self_attn.{name}_proj.bias"] = w, bias
        state[b + "self_attn.out_proj.weight"] = block.attn.out_proj.weight
        state[b + "self_attn.out_proj.bias"] = block.attn.out_proj.bias
        for ours, theirs in (("layer_norm1", block.ln_1), ("layer_norm2", block.ln_2)):
            state[f"{b}{ours}.weight"], state[f"{b}{ours}.bias"] = theirs.weight, theirs.bias
        state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"] = block.mlp.c_fc.weight, block.mlp.c_fc.bias
        state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"] = block.mlp.c_proj.weight, block.mlp.c_proj.bias
    return config, {k: v.detach().clone() for k, v in state.items()}


def build_shapes_vlm(
    clip_dir: Optional[os.PathLike] = None,
    *,
    d_model: int = 128,
    n_layers: int = 3,
    n_heads: int = 4,
    d_mlp: int = 384,
    vision_feature_layer: int = -1,
    vision_feature_select_strategy: str = "full",
    seed: int = 0,
) -> tuple[Any, Any]:
    """An untrained shapes VLM and its processor: the shapes CLIP's vision tower (converted, frozen), a
    randomly initialised GELU projector and Llama language model (``d_model`` wide, ``n_layers`` blocks,
    rotary attention, SwiGLU MLP, RMSNorm, untied embeddings). By default LLaVA reads the tower's last
    ``hidden_states`` (the residual stream after block 3 of 4, before ``ln_post``) with the CLS token: 65 image
    tokens. (With LLaVA-1.5's usual layer -2 and no CLS, small circles and squares were confused: shape
    accuracy stayed at 94%.)"""
    import transformers  # optional heavy dependency

    from sae_lens_multimodal.world.clip import load_shapes_clip

    clip, _ = load_shapes_clip(clip_dir)
    vision_kwargs, vision_state = vision_tower_state_from_open_clip(clip)
    tokenizer = build_tokenizer()
    pre = getattr(clip.visual, "preprocess_cfg", None) or {}
    processor = build_processor(tokenizer, image_size=vision_kwargs["image_size"], patch_size=vision_kwargs["patch_size"],
                                mean=pre.get("mean", (0.5,) * 3), std=pre.get("std", (0.5,) * 3),
                                vision_feature_select_strategy=vision_feature_select_strategy)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, IMAGE)}
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=128, rms_norm_eps=1e-5,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], tie_word_embeddings=False,
    )
    n_image_tokens = (vision_kwargs["image_size"] // vision_kwargs["patch_size"]) ** 2
    n_image_tokens += vision_feature_select_strategy == "full"  # the CLS token stays
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision_kwargs), text_config=text,
        image_token_index=ids[IMAGE], image_seq_length=n_image_tokens, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy, projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_state, strict=True)
    model.model.vision_tower.requires_grad_(False)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids[BOS], ids[EOS], ids[PAD]
    gen.max_new_tokens, gen.do_sample = 3, False
    return model.eval(), processor


def _check_dir(directory: Path) -> None:
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a shapes-world VLM directory (missing {missing}). Retrain with "
            "`python -m sae_lens_multimodal.world.training.train_vlm --out <dir>`."
        )


def load_shapes_vlm(directory: Optional[os.PathLike] = None) -> tuple[Any, Any]:
    """``(model, processor)`` as transformers loads them from ``directory`` (default: the shipped model):
    a ``LlavaForConditionalGeneration`` in eval mode and a ``LlavaProcessor``."""
    import transformers  # optional heavy dependency

    directory = Path(directory) if directory is not None else SHAPES_VLM_DIR
    _check_dir(directory)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(directory))
    return model.eval(), transformers.AutoProcessor.from_pretrained(str(directory))


# ------------------------------------------------------------------------------------ questions and answers
@dataclass
class QuestionSet:
    """World images with one question each: ``images`` uint8 [n, H, W, 3], the ground truth, and per image
    the factor asked about, the question and the expected answer."""

    images: np.ndarray
    factors: list[ShapeFactors]
    asked: list[str]
    questions: list[str]
    answers: list[str]


def sample_questions(
    n: int,
    *,
    seed: int = 0,
    factors: Sequence[str] = ASKED_FACTORS,
    text_prob: float = 0.0,
    world: Optional[ShapesWorld] = None,
    **restrictions: Any,
) -> QuestionSet:
    """``n`` fresh world images (``ShapesWorld(seed=seed, text_prob=...)`` unless ``world`` is given;
    ``restrictions`` as in ``ShapesWorld.sample``), each asked about one of ``factors`` in turn (image i about
    ``factors[i % len(factors)]``) with a phrasing drawn from :data:`QUESTIONS`."""
    bad = [f for f in factors if f not in ASKED_FACTORS]
    if bad or not factors:
        raise ValueError(f"Unknown factor(s) {bad or list(factors)}; the VLM is asked about {list(ASKED_FACTORS)}.")
    world = world if world is not None else ShapesWorld(image_size=32, seed=seed, text_prob=text_prob)
    images, truth = world.sample(n, **restrictions)
    rng = np.random.default_rng(seed + 7919)
    asked = [factors[i % len(factors)] for i in range(n)]
    questions = [QUESTIONS[f][rng.integers(len(QUESTIONS[f]))] for f in asked]
    answers = [answer_of(t, f) for t, f in zip(truth, asked)]
    return QuestionSet(images, truth, asked, questions, answers)


@torch.no_grad()
def answer_questions(model: Any, images: np.ndarray, questions: Sequence[str], *, processor: Any = None,
                     max_new_tokens: int = 3, batch_size: int = 256) -> list[str]:
    """Greedy answers to one question per image, decoded (special tokens dropped). ``model`` is a
    ``HookedVLM`` (its ``generate``; hooks and SAEs in place apply) or a transformers
    ``LlavaForConditionalGeneration`` (its own ``generate``); ``processor`` defaults to the HookedVLM's."""
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError("answer_questions needs the processor (load_shapes_vlm returns it; HookedVLM keeps it).")
    if len(images) != len(questions):
        raise ValueError(f"One question per image: got {len(images)} images and {len(questions)} questions.")
    tokenizer = processor.tokenizer
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        batch = processor(images=list(images[i:i + batch_size]), text=[prompt(q) for q in questions[i:i + batch_size]],
                          return_tensors="pt", padding=True)
        n_prompt = batch["input_ids"].shape[1]
        if type(model).__name__ == "HookedVLM":
            tokens = model.generate(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                                    max_new_tokens=max_new_tokens)
        else:
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        out += [s.strip() for s in tokenizer.batch_decode(tokens[:, n_prompt:], skip_special_tokens=True)]
    return out


@dataclass
class VLMAccuracy:
    """Held-out answer accuracy: overall and per factor asked about (exact match of the decoded answer)."""

    overall: float
    per_factor: dict[str, float]
    n: int

    def __str__(self) -> str:
        parts = ", ".join(f"{f} {100 * a:.1f}%" for f, a in self.per_factor.items())
        return f"{100 * self.overall:.1f}% of {self.n} answers ({parts})"


def vlm_accuracy(model: Any, n: int = 500, *, seed: int = 10_000, text_prob: float = 0.0, processor: Any = None,
                 factors: Sequence[str] = ASKED_FACTORS) -> VLMAccuracy:
    """Accuracy of greedy answers on ``n`` fresh images (seed ``seed``; training uses other seeds), each
    factor asked about equally often."""
    qs = sample_questions(n, seed=seed, factors=factors, text_prob=text_prob)
    got = answer_questions(model, qs.images, qs.questions, processor=processor)
    right = np.array([g == a for g, a in zip(got, qs.answers)])
    asked = np.array(qs.asked)
    per = {f: float(right[asked == f].mean()) for f in factors if (asked == f).any()}
    return VLMAccuracy(float(right.mean()), per, n)
