"""The shapes world: procedurally drawn images whose ground truth is known exactly.

Each image holds one shape (circle / square / triangle) of one colour, at one of nine named positions
(a 3x3 grid), in one of two sizes, plain or striped, optionally with a word written on it in white (for
typographic attacks). Every image comes with its :class:`ShapeFactors` and a caption
("a red circle on the left").

Rendering is vectorised numpy: shapes are drawn from analytic signed distances (anti-aliased edges),
words from glyph masks that PIL's built-in bitmap font renders once per word and size.

>>> world = ShapesWorld(image_size=32, seed=0)
>>> images, factors = world.sample(4)          # uint8 [4, 32, 32, 3], list of ShapeFactors
>>> caption(factors[0])
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

__all__ = [
    "SHAPES",
    "COLORS",
    "POSITIONS",
    "SIZES",
    "TEXTURES",
    "TEXT_WORDS",
    "TEXT_ROWS",
    "FACTOR_NAMES",
    "CLASS_FACTORS",
    "ShapeFactors",
    "ShapesWorld",
    "ShapesDataset",
    "caption",
    "all_captions",
    "class_factor_combinations",
    "caption_vocabulary",
    "to_tensor",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Nominal RGB of each colour; drawn colours are jittered by up to +-COLOR_JITTER per channel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOR_JITTER = 15
#: 3x3 grid, row-major: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
#: How a caption says each position ("a red circle on the left").
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
SIZES: tuple[str, ...] = ("small", "large")
#: Shape "radius" as a fraction of the image side (circle radius; half the square's side / 0.85).
SIZE_RADIUS: dict[str, float] = {"small": 0.11, "large": 0.16}
TEXTURES: tuple[str, ...] = ("plain", "striped")
#: Words written on images by default: every colour and shape name (typographic attacks).
TEXT_WORDS: tuple[str, ...] = tuple(COLORS) + SHAPES
#: Rows a word can be written in; never the shape's own row, so the word does not hide the shape.
TEXT_ROWS: tuple[str, ...] = ("top", "middle", "bottom")
FACTOR_NAMES: tuple[str, ...] = ("shape", "color", "position", "size", "texture", "text")
#: The factors zero-shot classes are made of by default (6 x 3 x 9 = 162 classes).
CLASS_FACTORS: tuple[str, ...] = ("color", "shape", "position")

_TEXT_COLOR = 255  # words are white: no colour factor value is close to it
_STRIPE_SHADE = 0.5  # striped shapes alternate full colour and this fraction of it


@dataclass(frozen=True)
class ShapeFactors:
    """Ground truth of one image. Pixel coordinates have their origin at the top-left corner;
    pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5)."""

    shape: str
    color: str
    position: str
    size: str
    texture: str
    text: Optional[str]
    #: (x, y) of the shape's centre in pixels. The pixel containing it always has the pure colour.
    center: tuple[float, float]
    radius: float
    rgb: tuple[int, int, int]
    #: Row the word is written in ("top" / "middle" / "bottom"); None without text.
    text_row: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def caption(
    factors: Union[ShapeFactors, dict[str, Any]],
    *,
    size: bool = False,
    texture: bool = False,
    text: bool = True,
) -> str:
    """English caption of one image: colour, shape and position always; the size, the texture ("plain" /
    "striped") and the written word on request. ``factors`` may be a ShapeFactors or a dict with
    at least ``color``, ``shape`` and ``position`` (e.g. to caption a class that has no image).

    >>> caption(f)                                    # 'a red circle on the left'
    >>> caption(f, size=True, texture=True)           # 'a large striped red circle on the left'
    >>> caption(g)                                    # 'a blue square at the top with the word red'
    """
    f = factors.to_dict() if isinstance(factors, ShapeFactors) else dict(factors)
    missing = [k for k in CLASS_FACTORS if k not in f]
    if missing:
        raise KeyError(f"caption() needs the factors {list(CLASS_FACTORS)}; missing {missing}.")
    if f["position"] not in POSITION_PHRASES:
        raise ValueError(f"Unknown position {f['position']!r}; positions are {list(POSITIONS)}.")
    words: list[str] = []
    if size and f.get("size"):
        words.append(f["size"])
    if texture and f.get("texture"):
        words.append(f["texture"])
    words += [f["color"], f["shape"], POSITION_PHRASES[f["position"]]]
    out = f"{_article(words[0])} {' '.join(words)}"
    if text and f.get("text"):
        out += f" with the word {f['text']}"
    return out


def class_factor_combinations(factors: Sequence[str] = CLASS_FACTORS) -> list[dict[str, str]]:
    """Every combination of the named factors' values, in a fixed order (the zero-shot classes)."""
    values = {
        "color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS, "size": SIZES, "texture": TEXTURES,
        "text": TEXT_WORDS,
    }
    unknown = [f for f in factors if f not in values]
    if unknown:
        raise ValueError(f"Cannot enumerate factors {unknown}; choose from {list(values)}.")
    return [dict(zip(factors, combo)) for combo in itertools.product(*(values[f] for f in factors))]


def all_captions(factors: Sequence[str] = CLASS_FACTORS) -> list[str]:
    """Caption of every combination of ``factors`` (default colour x shape x position: 162 captions),
    aligned with :func:`class_factor_combinations`. Add ``"size"`` / ``"texture"`` / ``"text"`` (the
    written word, one of TEXT_WORDS) for finer classes."""
    return [
        caption(c, size="size" in factors, texture="texture" in factors)
        for c in class_factor_combinations(factors)
    ]


#: Words besides the factor values that prompts commonly use; the shipped CLIP's tokenizer knows them
#: (untrained words map to its unknown token).
_EXTRA_WORDS = (
    "a", "an", "the", "of", "with", "word", "in", "at", "on", "and", "photo", "image", "picture",
    "drawing", "shape", "object", "text", "written", "plain", "middle", "small", "large",
)


def caption_vocabulary() -> list[str]:
    """Every word the captions (and common prompt templates) use, sorted: the shipped CLIP's vocabulary."""
    words = set(_EXTRA_WORDS) | set(COLORS) | set(SHAPES) | set(SIZES) | set(TEXTURES) | set(TEXT_WORDS)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


@functools.lru_cache(maxsize=512)
def _word_mask(word: str, height: int) -> np.ndarray:
    """Coverage mask (float32 in [0, 1], [h, w]) of ``word`` in PIL's built-in bitmap font, scaled to
    ``height`` pixels with area averaging (so small sizes stay legible as grey levels)."""
    from PIL import Image, ImageDraw, ImageFont

    # The bitmap font needs no font files or FreeType; load_default() is a FreeType font on new Pillow.
    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else ImageFont.load_default()
    left, top, right, bottom = font.getbbox(word)
    img = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(img).text((-left, -top), word, fill=255, font=font)
    width = max(1, round(img.width * height / img.height))
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


OptionSpec = Union[None, str, Sequence[str]]


class ShapesWorld:
    """Seeded generator of shapes-world images with their ground truth.

    ``image_size``: side in pixels (>= 16; 32 and 64 are the intended sizes). ``seed``: all draws come
    from one numpy Generator, so the same seed and the same sequence of calls give the same images.
    ``text_prob``: probability that an image carries a written word (default 0: no text).
    ``shapes`` / ``colors`` / ``positions`` / ``sizes`` / ``textures`` / ``text_words`` restrict the values
    drawn (default: all). Each draw is uniform over the allowed values.
    """

    def __init__(
        self,
        image_size: int = 32,
        seed: int = 0,
        *,
        text_prob: float = 0.0,
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] = tuple(COLORS),
        positions: Sequence[str] = POSITIONS,
        sizes: Sequence[str] = SIZES,
        textures: Sequence[str] = TEXTURES,
        text_words: Sequence[str] = TEXT_WORDS,
    ):
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (shapes and words need the room); got {image_size!r}.")
        if not 0.0 <= text_prob <= 1.0:
            raise ValueError(f"text_prob is a probability in [0, 1]; got {text_prob!r}.")
        self.image_size = image_size
        self.seed = seed
        self.text_prob = float(text_prob)
        self.rng = np.random.default_rng(seed)
        self.allowed = {
            "shape": self._check("shape", shapes, SHAPES),
            "color": self._check("color", colors, tuple(COLORS)),
            "position": self._check("position", positions, POSITIONS),
            "size": self._check("size", sizes, SIZES),
            "texture": self._check("texture", textures, TEXTURES),
        }
        self.text_words = tuple(text_words)
        if self.text_prob > 0 and not self.text_words:
            raise ValueError("text_prob > 0 needs at least one word in text_words.")

    @staticmethod
    def _check(factor: str, chosen: OptionSpec, universe: Sequence[str]) -> tuple[str, ...]:
        chosen = (chosen,) if isinstance(chosen, str) else tuple(chosen)  # type: ignore[arg-type]
        bad = [c for c in chosen if c not in universe]
        if bad or not chosen:
            raise ValueError(f"Unknown {factor} value(s) {bad or chosen!r}; the {factor} values are {list(universe)}.")
        return chosen

    # Vocabulary of factor values, in canonical order (use for labels / probes).
    factor_values: dict[str, tuple[str, ...]] = {
        "shape": SHAPES,
        "color": tuple(COLORS),
        "position": POSITIONS,
        "size": SIZES,
        "texture": TEXTURES,
    }

    # ------------------------------------------------------------------ drawing factors
    def sample_factors(
        self,
        n: int,
        *,
        shape: OptionSpec = None,
        color: OptionSpec = None,
        position: OptionSpec = None,
        size: OptionSpec = None,
        texture: OptionSpec = None,
        text: OptionSpec = None,
        text_prob: Optional[float] = None,
    ) -> list[ShapeFactors]:
        """Draw ``n`` factor sets. Each factor argument restricts that factor to a value or a list of
        values (None: the world's allowed values). ``text`` restricts the written words and
        ``text_prob`` overrides the world's probability of writing one (``text_prob=1, text="blue"``
        writes "blue" on every image; ``text_prob=0`` writes nothing)."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int; got {n!r}.")
        rng, s = self.rng, self.image_size
        spec = {"shape": shape, "color": color, "position": position, "size": size, "texture": texture}
        picked: dict[str, np.ndarray] = {}
        for name, restriction in spec.items():
            values = self.allowed[name] if restriction is None else self._check(name, restriction, self.factor_values[name])
            picked[name] = np.asarray(values, dtype=object)[rng.integers(0, len(values), n)]
        p_text = self.text_prob if text_prob is None else float(text_prob)
        if not 0.0 <= p_text <= 1.0:
            raise ValueError(f"text_prob is a probability in [0, 1]; got {p_text!r}.")
        words = self.text_words if text is None else ((text,) if isinstance(text, str) else tuple(text))
        if p_text > 0 and not words:
            raise ValueError("Writing text needs at least one word; pass text=['red', ...].")
        has_text = rng.random(n) < p_text
        word_idx = rng.integers(0, max(len(words), 1), n)
        row_offset = rng.integers(1, 3, n)  # the word's row: one of the two rows the shape is not in

        radius = np.array([SIZE_RADIUS[v] for v in picked["size"]]) * s
        pos_idx = np.array([POSITIONS.index(p) for p in picked["position"]])
        row, col = pos_idx // 3, pos_idx % 3
        cell = s / 3
        # Jitter the centre inside its cell, keeping the shape (nearly) inside the cell.
        room = np.maximum(cell / 2 - radius, 0.0) * 0.8
        cx = (col + 0.5) * cell + rng.uniform(-1, 1, n) * room
        cy = (row + 0.5) * cell + rng.uniform(-1, 1, n) * room
        base = np.array([COLORS[c] for c in picked["color"]], dtype=np.int64).reshape(n, 3)
        rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, (n, 3)), 0, 255)

        out = []
        for i in range(n):
            word = words[word_idx[i]] if has_text[i] else None
            out.append(
                ShapeFactors(
                    shape=picked["shape"][i],
                    color=picked["color"][i],
                    position=picked["position"][i],
                    size=picked["size"][i],
                    texture=picked["texture"][i],
                    text=word,
                    center=(float(cx[i]), float(cy[i])),
                    radius=float(radius[i]),
                    rgb=(int(rgb[i, 0]), int(rgb[i, 1]), int(rgb[i, 2])),
                    text_row=TEXT_ROWS[(row[i] + row_offset[i]) % 3] if word else None,
                )
            )
        return out

    def sample(self, n: int, *, as_tensor: bool = False, **restrictions: Any) -> tuple[Any, list[ShapeFactors]]:
        """Draw and render ``n`` images: ``(images, factors)``. Images are uint8 numpy [n, H, W, 3], or with
        ``as_tensor=True`` float32 torch [n, 3, H, W] in [0, 1]. ``restrictions``: see :meth:`sample_factors`."""
        factors = self.sample_factors(n, **restrictions)
        images = self.render(factors)
        return (to_tensor(images) if as_tensor else images), factors

    # ------------------------------------------------------------------ rendering
    def render(self, factors: Sequence[ShapeFactors]) -> np.ndarray:
        """Render factor sets exactly (their centre, radius, rgb, texture and word): uint8 [n, H, W, 3]."""
        n, s = len(factors), self.image_size
        if n == 0:
            return np.zeros((0, s, s, 3), dtype=np.uint8)
        cx = np.array([f.center[0] for f in factors], dtype=np.float32)[:, None, None]
        cy = np.array([f.center[1] for f in factors], dtype=np.float32)[:, None, None]
        r = np.array([f.radius for f in factors], dtype=np.float32)[:, None, None]
        grid = np.arange(s, dtype=np.float32) + 0.5
        dx = grid[None, None, :] - cx  # [n, 1, s]
        dy = grid[None, :, None] - cy  # [n, s, 1]

        # Signed distance (positive inside, in pixels) -> coverage with a one-pixel anti-aliased edge.
        inside = np.empty((n, s, s), dtype=np.float32)
        kinds = np.array([SHAPES.index(f.shape) if f.shape in SHAPES else -1 for f in factors])
        if (kinds < 0).any():
            bad = factors[int(np.argmin(kinds))].shape
            raise ValueError(f"Unknown shape {bad!r}; shapes are {list(SHAPES)}.")
        for k, fn in enumerate((_circle_sd, _square_sd, _triangle_sd)):
            idx = np.nonzero(kinds == k)[0]
            if len(idx):
                inside[idx] = fn(dx[idx], dy[idx], r[idx])
        alpha = np.clip(inside + 0.5, 0.0, 1.0)

        striped = np.array([f.texture == "striped" for f in factors])
        shade = np.ones((n, s, s), dtype=np.float32)
        if striped.any():
            # Horizontal stripes anchored on the centre row, so the centre pixel keeps the pure colour.
            width = max(1.0, s / 16)
            dark = (np.floor((dy[striped] + width / 2) / width) % 2) == 1  # [k, s, 1]
            shade[striped] = np.where(np.broadcast_to(dark, (int(striped.sum()), s, s)), _STRIPE_SHADE, 1.0)
        rgb = np.array([f.rgb for f in factors], dtype=np.float32)[:, None, None, :]
        image = (alpha * shade)[..., None] * rgb  # black background

        for i, f in enumerate(factors):
            if f.text:
                self._write(image[i], f.text, f.text_row or "top")
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def _write(self, image: np.ndarray, word: str, row: str) -> None:
        """Composite a white word, horizontally centred, vertically centred in its row (in place)."""
        s = self.image_size
        height = max(5, round(s * 0.22))
        mask = _word_mask(word, height)
        if mask.shape[1] > s:  # too long for the image: squeeze it to fit
            mask = _squeeze_width(mask, s)
        h, w = mask.shape
        top = int(round((TEXT_ROWS.index(row) + 0.5) * s / 3 - h / 2))
        top = min(max(top, 0), s - h)
        left = (s - w) // 2
        region = image[top:top + h, left:left + w]
        region *= 1.0 - mask[..., None]
        region += _TEXT_COLOR * mask[..., None]

    # ------------------------------------------------------------------ labels
    def labels(self, factors: Sequence[ShapeFactors]) -> dict[str, np.ndarray]:
        """Integer label arrays per factor (index into :attr:`factor_values`; ``text``: index into
        ``TEXT_WORDS``-style ``self.text_words``, -1 for no text), e.g. for linear probes."""
        out = {name: np.array([values.index(getattr(f, name)) for f in factors]) for name, values in self.factor_values.items()}
        out["text"] = np.array([self.text_words.index(f.text) if f.text in self.text_words else -1 for f in factors])
        return out


def _circle_sd(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return r - np.sqrt(dx * dx + dy * dy)


def _square_sd(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    half = 0.85 * r  # a square about as large as the circle of the same size
    return np.minimum(half - np.abs(dx), half - np.abs(dy))


def _triangle_sd(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Upward isosceles triangle: apex (0, -r), base y = +0.75 r from x = -r to +r; contains the centre.
    base = 0.75 * r - dy
    # Side through (0, -r) and (r, 0.75 r): points inside satisfy 1.75 |dx| - (dy + r) <= 0.
    norm = np.sqrt(1.75**2 + 1.0)
    side = ((dy + r) - 1.75 * np.abs(dx)) / norm
    return np.minimum(base, side)


def _squeeze_width(mask: np.ndarray, width: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.rint(mask * 255).astype(np.uint8))
    return np.asarray(img.resize((width, mask.shape[0]), Image.Resampling.BOX), dtype=np.float32) / 255.0


def to_tensor(
    images: np.ndarray,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [0, 1], then ``(x - mean) / std`` if given
    (the shipped CLIP's values are in its open_clip_config.json ``preprocess_cfg``)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images [n, H, W, 3]; got {images.dtype} {images.shape}.")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if mean is not None or std is not None:
        m = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        sd = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        x = (x - m) / sd
    return x


class ShapesDataset(torch.utils.data.Dataset):
    """A fixed, seeded set of ``n`` shapes-world images (rendered once, held in memory).

    Items are ``(image, caption)``: the image float32 [3, H, W] in [0, 1] (or ``transform(uint8 HWC
    array)`` when a transform is given) and the caption from :func:`caption` with ``caption_kwargs``.
    ``dataset.factors[i]`` is the ground truth of item i; ``world_kwargs`` go to :class:`ShapesWorld`.
    """

    def __init__(
        self,
        n: int,
        *,
        image_size: int = 32,
        seed: int = 0,
        transform: Optional[Callable[[np.ndarray], Any]] = None,
        caption_kwargs: Optional[dict[str, bool]] = None,
        **world_kwargs: Any,
    ):
        self.world = ShapesWorld(image_size=image_size, seed=seed, **world_kwargs)
        self.images, self.factors = self.world.sample(n)
        self.transform = transform
        self.caption_kwargs = caption_kwargs or {}
        self.captions = [caption(f, **self.caption_kwargs) for f in self.factors]

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        image = self.images[i]
        x = self.transform(image) if self.transform is not None else to_tensor(image[None])[0]
        return x, self.captions[i]

    def labels(self) -> dict[str, np.ndarray]:
        """Integer labels per factor for the whole dataset (see :meth:`ShapesWorld.labels`)."""
        return self.world.labels(self.factors)

