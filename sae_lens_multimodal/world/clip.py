"""The shapes-world CLIP: an open_clip ``CLIP`` (its own architecture classes, loaded through its own
``local-dir:`` path), its word-level tokenizer, and zero-shot evaluation.

The shipped weights live in ``weights/shapes_clip/`` in open_clip's local-dir layout:
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors``, and the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``) that open_clip's ``HFTokenizer`` reads from
that directory. A word-level vocabulary of the world's ~40 words keeps the token embedding tiny (CLIP's
49,408-token BPE embedding alone would be 12 MB at width 64); unknown words map to ``[UNK]``.

>>> model, tokenizer = load_shapes_clip()          # plain open_clip objects
>>> zero_shot_accuracy(model, tokenizer)           # prints the figures
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sae_lens_multimodal.core.atomic import atomic_save, atomic_write_json
from sae_lens_multimodal.models.conversions.open_clip_vit import load_open_clip
from sae_lens_multimodal.world.paths import SHAPES_CLIP_DIR, SHAPES_CLIP_TYPOGRAPHIC_DIR
from sae_lens_multimodal.world.shapes import (
    CLASS_FACTORS,
    COLORS,
    POSITIONS,
    TEXT_ROWS,
    ShapesWorld,
    caption_vocabulary,
    class_factor_combinations,
    all_captions,
    to_tensor,
)

__all__ = [
    "SHAPES_CLIP_DIR",
    "SHAPES_CLIP_TYPOGRAPHIC_DIR",
    "SPECIAL_TOKENS",
    "shapes_clip_config",
    "write_tokenizer",
    "save_open_clip_dir",
    "load_shapes_clip",
    "encode_world_images",
    "ZeroShotResult",
    "zero_shot_accuracy",
    "typographic_attack",
]


#: Padding is 0 (open_clip's default pad_id); the end-of-text token gets the LARGEST id, so open_clip's
#: default ``argmax`` text pooling (the real CLIP's) finds it, exactly as with CLIP's BPE tokenizer.
PAD, UNK, SOT, EOT = "[PAD]", "[UNK]", "[SOT]", "[EOT]"
SPECIAL_TOKENS = (PAD, UNK, SOT, EOT)


def _vocab() -> dict[str, int]:
    vocab = {PAD: 0, UNK: 1, SOT: 2}
    for word in caption_vocabulary():
        vocab[word] = len(vocab)
    vocab[EOT] = len(vocab)
    return vocab


def shapes_clip_config(
    *,
    image_size: int = 32,
    patch_size: int = 4,
    vision_width: int = 64,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 3,
    heads: int = 4,
    embed_dim: int = 64,
    context_length: int = 16,
) -> dict[str, Any]:
    """The ``open_clip_config.json`` content: open_clip ``model_cfg`` (CLIPVisionCfg / CLIPTextCfg fields)
    and ``preprocess_cfg``. Images are normalised with mean = std = 0.5 per channel."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "image_size": image_size,
                "patch_size": patch_size,
                "width": vision_width,
                "layers": vision_layers,
                "head_width": vision_width // heads,
                "mlp_ratio": 4.0,
            },
            "text_cfg": {
                "context_length": context_length,
                "vocab_size": len(_vocab()),
                "width": text_width,
                "heads": heads,
                "layers": text_layers,
                "mlp_ratio": 4.0,
                # A non-empty name makes open_clip.get_tokenizer use HFTokenizer; for 'local-dir:' it
                # always reads the tokenizer files from the model directory itself.
                "hf_tokenizer_name": "shapes-world-words",
            },
        },
        "preprocess_cfg": {
            "size": image_size,
            "mode": "RGB",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    }


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2)


def write_tokenizer(directory: os.PathLike, context_length: int) -> None:
    """Write the word-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that open_clip's
    HFTokenizer loads with transformers' AutoTokenizer: lower-cased, whitespace/punctuation split,
    ``[SOT] words [EOT]``, padded with 0 to ``context_length``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = _vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    directory = Path(directory)
    atomic_save(directory / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": PAD,
            "unk_token": UNK,
            "bos_token": SOT,
            "eos_token": EOT,
            "model_max_length": context_length,
            "padding_side": "right",
        },
    )


def save_open_clip_dir(model: torch.nn.Module, directory: os.PathLike, config: dict[str, Any]) -> None:
    """Save ``model`` in open_clip's local-dir layout (config, safetensors weights, tokenizer files),
    each file written atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save(directory / "open_clip_model.safetensors", lambda tmp: save_file(state, str(tmp)))
    write_tokenizer(directory, config["model_cfg"]["text_cfg"]["context_length"])
    _write_json(directory / "open_clip_config.json", config)


def _check_dir(directory: Path) -> None:
    missing = [f for f in ("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json") if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a shapes-world CLIP directory (missing {missing}). Retrain with "
            "`python -m sae_lens_multimodal.world.training.train_clip --out <dir>`."
        )


def load_shapes_clip(directory: Optional[os.PathLike] = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` exactly as open_clip builds them from ``local-dir:<directory>`` (default: the
    shipped model), in eval mode. ``model`` is an ``open_clip.CLIP``; ``tokenizer(texts)`` gives token ids."""
    import open_clip

    directory = Path(directory) if directory is not None else SHAPES_CLIP_DIR
    _check_dir(directory)
    name = f"local-dir:{directory}"
    model = load_open_clip(name, device=device)  # refuses a truncated / garbage / incomplete weights file
    return model.eval(), open_clip.get_tokenizer(name)


def _preprocess_cfg(model: Any) -> dict[str, Any]:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return {"mean": cfg.get("mean", (0.5, 0.5, 0.5)), "std": cfg.get("std", (0.5, 0.5, 0.5))}


@torch.no_grad()
def clip_pixels(images: np.ndarray, directory: Optional[os.PathLike] = None) -> torch.Tensor:
    """uint8 world images [n, 32, 32, 3] -> the shapes CLIP's input, normalised with the mean / std of its
    ``preprocess_cfg`` (read from the shipped folder, or ``directory``), without loading the model."""
    folder = Path(directory) if directory is not None else SHAPES_CLIP_DIR
    pre = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["preprocess_cfg"]
    return to_tensor(images, mean=pre["mean"], std=pre["std"])


def encode_world_images(model: Any, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised image embeddings of uint8 [n, H, W, 3] world images (normalised with the model's
    preprocess mean/std; world images already have the model's input size)."""
    pre = _preprocess_cfg(model)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i:i + batch_size], **pre).to(device)
        out.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1))
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class ZeroShotResult:
    """Zero-shot classification of world images over caption classes."""

    accuracy: float  # top-1 over all classes
    factor_accuracy: dict[str, float]  # per factor: the predicted class has the right value
    mean_correct_prob: float  # softmax (logit scale applied) probability of the true class
    n_images: int
    n_classes: int
    class_factors: tuple[str, ...]
    confusions: dict[str, int] = field(default_factory=dict)  # most frequent "true -> predicted" errors

    def __str__(self) -> str:
        per = ", ".join(f"{k} {v:.1%}" for k, v in self.factor_accuracy.items())
        return (
            f"zero-shot accuracy {self.accuracy:.2%} over {self.n_classes} classes "
            f"({' x '.join(self.class_factors)}) on {self.n_images} images; per factor: {per}; "
            f"mean p(true class) {self.mean_correct_prob:.3f}"
        )


@torch.no_grad()
def zero_shot_accuracy(
    model: Any,
    tokenizer: Any,
    *,
    n: int = 2000,
    seed: int = 12345,
    class_factors: Sequence[str] = CLASS_FACTORS,
    world_kwargs: Optional[dict[str, Any]] = None,
    verbose: bool = True,
) -> ZeroShotResult:
    """Classify ``n`` fresh world images (drawn with ``seed``; no text unless ``world_kwargs`` says so)
    among the captions of every combination of ``class_factors`` and print the figures.
    Logits are ``logit_scale.exp() * image_emb @ text_emb.T``, as open_clip's CLIP computes them."""
    model.eval()
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    kwargs = {"text_prob": 0.0, **(world_kwargs or {})}
    world = ShapesWorld(image_size=int(image_size), seed=seed, **kwargs)
    images, factors = world.sample(n)
    classes = class_factor_combinations(class_factors)
    captions = all_captions(class_factors)
    device = next(model.parameters()).device
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(captions).to(device)), dim=-1)
    img = encode_world_images(model, images)
    logits = model.logit_scale.exp() * img @ text.T
    probs = logits.softmax(dim=-1)
    index = {tuple(c[f] for f in class_factors): i for i, c in enumerate(classes)}
    true = torch.tensor([index[tuple(getattr(f, k) for k in class_factors)] for f in factors], device=device)
    pred = logits.argmax(dim=-1)
    factor_acc = {
        k: float(np.mean([classes[p][k] == getattr(f, k) for p, f in zip(pred.tolist(), factors)]))
        for k in class_factors
    }
    errors: dict[str, int] = {}
    for t, p in zip(true.tolist(), pred.tolist()):
        if t != p:
            key = f"{captions[t]} -> {captions[p]}"
            errors[key] = errors.get(key, 0) + 1
    result = ZeroShotResult(
        accuracy=float((pred == true).float().mean()),
        factor_accuracy=factor_acc,
        mean_correct_prob=float(probs[torch.arange(n), true].mean()) if n else float("nan"),
        n_images=n,
        n_classes=len(classes),
        class_factors=tuple(class_factors),
        confusions=dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    )
    if verbose:
        print(result)
        for pair, count in result.confusions.items():
            print(f"  {count:4d} x {pair}")
    return result


@torch.no_grad()
def typographic_attack(model: Any, tokenizer: Any, *, n: int = 1000, seed: int = 4321, verbose: bool = True) -> dict[str, float]:
    """Write a wrong colour name on ``n`` fresh images (in a row the shape is not in) and classify them
    zero-shot over the 162 colour x shape x position captions, clean and attacked. Returns the colour
    accuracy on clean and attacked images and the fraction of attacked images whose predicted colour is
    the written word."""
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    world = ShapesWorld(image_size=int(image_size), seed=seed)
    clean = world.sample_factors(n, text_prob=0.0)
    colors = list(COLORS)
    words = [colors[(colors.index(f.color) + int(k)) % len(colors)] for f, k in zip(clean, world.rng.integers(1, len(colors), n))]
    rows = [TEXT_ROWS[(POSITIONS.index(f.position) // 3 + int(k)) % 3] for f, k in zip(clean, world.rng.integers(1, 3, n))]
    attacked = [dataclasses.replace(f, text=w, text_row=r) for f, w, r in zip(clean, words, rows)]
    classes = class_factor_combinations()
    device = next(model.parameters()).device
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(all_captions()).to(device)), dim=-1)

    def predicted_colors(factors: list) -> list[str]:
        pred = (encode_world_images(model, world.render(factors)) @ text.T).argmax(-1)
        return [classes[p]["color"] for p in pred.tolist()]

    clean_pred, attacked_pred = predicted_colors(clean), predicted_colors(attacked)
    result = {
        "clean_color_accuracy": float(np.mean([p == f.color for p, f in zip(clean_pred, clean)])),
        "attacked_color_accuracy": float(np.mean([p == f.color for p, f in zip(attacked_pred, clean)])),
        "predicted_written_word": float(np.mean([p == w for p, w in zip(attacked_pred, words)])),
    }
    if verbose:
        print(
            f"typographic attack on {n} images: colour accuracy {result['clean_color_accuracy']:.1%} clean, "
            f"{result['attacked_color_accuracy']:.1%} with a wrong colour word written; predicted colour = "
            f"written word on {result['predicted_written_word']:.1%}"
        )
    return result
