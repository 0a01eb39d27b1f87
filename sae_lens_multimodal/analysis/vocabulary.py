"""Concept vocabularies for labelling vision features with text.

The default vocabulary (``sae_lens_multimodal/data/vocabulary.txt``, about 400 concepts in 17 categories:
colours, shapes, textures, positions, sizes, people, clothing, animals, food, objects, vehicles, places,
nature, light, text and symbols, image styles, activities) is written for this project and ships with the
package, so labelling works offline. Any list of words, a text file in the same format, or the default
plus your own words can be used instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Union

__all__ = ["Vocabulary", "default_vocabulary", "load_vocabulary", "VocabularyLike"]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of distinct concepts, each with a category."""

    words: tuple[str, ...]
    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.words) != len(self.categories):
            raise ValueError("words and categories must have the same length.")
        if not self.words:
            raise ValueError("A vocabulary needs at least one word.")
        seen = set()
        for w in self.words:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"Vocabulary entries must be non-empty strings, got {w!r}.")
            if w in seen:
                raise ValueError(f"Duplicate vocabulary entry {w!r}.")
            seen.add(w)

    def __len__(self) -> int:
        return len(self.words)

    def __iter__(self) -> Iterator[str]:
        return iter(self.words)

    def __getitem__(self, i: int) -> str:
        return self.words[i]

    def index(self, word: str) -> int:
        return self.words.index(word)

    @classmethod
    def from_words(cls, words: Iterable[str], category: str = "user") -> "Vocabulary":
        """A vocabulary from words (stripped; later duplicates dropped)."""
        out: dict[str, None] = {}
        for w in words:
            w = str(w).strip()
            if w:
                out.setdefault(w, None)
        return cls(tuple(out), (category,) * len(out))

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Vocabulary":
        """Read the text format: one concept per line, ``## name`` starts a category, ``#`` lines are comments."""
        return cls._parse(Path(path).read_text(encoding="utf-8"), default_category=Path(path).stem)

    @classmethod
    def _parse(cls, text: str, default_category: str) -> "Vocabulary":
        words: dict[str, str] = {}
        category = default_category
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("##"):
                category = line.lstrip("#").strip() or default_category
            elif line and not line.startswith("#"):
                words.setdefault(line, category)
        return cls(tuple(words), tuple(words.values()))

    def __add__(self, other: "Vocabulary") -> "Vocabulary":
        """Both vocabularies, this one first; words already present keep their first category."""
        merged = dict(zip(self.words, self.categories))
        for w, c in zip(other.words, other.categories):
            merged.setdefault(w, c)
        return Vocabulary(tuple(merged), tuple(merged.values()))

    def category_names(self) -> list[str]:
        return list(dict.fromkeys(self.categories))

    def select(self, categories: Sequence[str]) -> "Vocabulary":
        """Only the words of the given categories."""
        unknown = set(categories) - set(self.categories)
        if unknown:
            raise ValueError(f"Unknown categories {sorted(unknown)}; available: {self.category_names()}.")
        keep = [(w, c) for w, c in zip(self.words, self.categories) if c in categories]
        return Vocabulary(tuple(w for w, _ in keep), tuple(c for _, c in keep))


def default_vocabulary(categories: Optional[Sequence[str]] = None) -> Vocabulary:
    """The vocabulary shipped with the package (optionally only some categories)."""
    text = resources.files("sae_lens_multimodal.data").joinpath("vocabulary.txt").read_text(encoding="utf-8")
    vocab = Vocabulary._parse(text, default_category="default")
    return vocab.select(categories) if categories is not None else vocab


VocabularyLike = Union[None, Vocabulary, Sequence[str], str, os.PathLike]


def load_vocabulary(source: VocabularyLike = None, *, include_default: bool = False) -> Vocabulary:
    """A Vocabulary from None (the default), a Vocabulary, a list of words, or a path to a word file.

    ``include_default=True`` appends the given words to the default vocabulary.
    """
    if source is None:
        vocab = default_vocabulary()
        return vocab
    if isinstance(source, Vocabulary):
        vocab = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"Vocabulary file {str(path)!r} does not exist. Pass a list of words for a literal vocabulary "
                "(a single string is read as a file path)."
            )
        vocab = Vocabulary.from_file(path)
    else:
        vocab = Vocabulary.from_words(source)
    return default_vocabulary() + vocab if include_default else vocab
