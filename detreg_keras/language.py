"""Text embeddings of class names, for language guidance (Roth et al., CVPR 2022).

:class:`~detreg_keras.losses.LanguageGuidedLoss` needs one vector per training
class. This module turns what a user has into that ``[C, E]`` table, without
any network access at run time:

* an array ``[C, E]`` (row ``c`` for label ``c``), e.g. precomputed CLIP or
  sentence-encoder embeddings of the class names;
* a mapping ``class name -> vector`` plus the class names in label order;
* any callable ``encode(list[str]) -> [C, E]`` (a sentence-transformers or
  model2vec model's ``encode`` fits) plus the class names;
* the name of a built-in encoder (:data:`ENCODERS`) plus the class names.

The one built-in encoder, :func:`hashed_ngram_embeddings`, needs no weights:
it hashes the character trigrams of each word of a name into a signed bag of
n-grams (the "hashing trick"). It captures *spelling*, not meaning: two names
are similar when they share words or word pieces ("Greek/character05" and
"Greek/character11" share the alphabet), which is all a name like Omniglot's
carries. For semantic guidance (bird species, car models) pass embeddings of
a real language model. No package on the registry ships a sentence encoder
with its weights inside the wheel (spaCy's vector models are not on PyPI;
sentence-transformers and model2vec download their weights from the Hugging
Face hub), so the library offers no such extra: compute the table where the
model is available and pass the array.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ENCODERS", "class_name_embeddings", "hashed_ngram_embeddings"]

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _word_ngrams(name: str, n: int) -> list[list[str]]:
    """Character ``n``-grams of each word of ``name`` (lower case, ``<`` ``>`` mark the word's ends)."""
    grams = []
    for word in _WORD.findall(name.lower()):
        padded = f"<{word}>"
        grams.append([padded[i : i + n] for i in range(max(1, len(padded) - n + 1))])
    return grams


def _hashed_word(grams: list[str], dim: int) -> np.ndarray:
    """The unit signed bag of a word's hashed n-grams."""
    vector = np.zeros(dim, np.float64)
    for gram in grams:
        digest = int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")
        vector[(digest >> 1) % dim] += 1.0 if digest & 1 else -1.0
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def hashed_ngram_embeddings(names: Sequence[str], dim: int = 256, n: int = 3) -> np.ndarray:
    """Unit vectors of the hashed character ``n``-grams of each name (no weights, deterministic).

    A word (a run of letters and digits, lower-cased, its ends marked) is the
    unit vector of its ``n``-grams, each adding ``±1`` to bucket ``h(g) mod dim``
    with sign and bucket from a BLAKE2b digest of the gram (stable across
    processes and machines, unlike Python's ``hash``); a name is the
    L2-normalised sum of its words, so every word weighs the same whatever its
    length.

    Args:
        names: the class names.
        dim: embedding size ``E`` (>= 2).
        n: n-gram length (>= 1).

    Returns:
        ``float32 [len(names), dim]`` unit rows.

    Raises:
        ValueError: ``dim < 2``, ``n < 1``, a name that is not a string or has no word characters.
    """
    if int(dim) < 2 or int(n) < 1:
        raise ValueError(f"hashed_ngram_embeddings needs dim >= 2 and n >= 1, got dim={dim}, n={n}.")
    table = np.zeros((len(names), int(dim)), np.float64)
    for row, name in enumerate(names):
        if not isinstance(name, str):
            raise ValueError(f"class name {row} is {type(name).__name__} {name!r}, not a string.")
        words = _word_ngrams(name, int(n))
        if not words:
            raise ValueError(f"class name {row} ({name!r}) has no letters or digits to embed.")
        table[row] = np.sum([_hashed_word(grams, int(dim)) for grams in words], axis=0)
        norm = np.linalg.norm(table[row])
        table[row] = table[row] / norm if norm > 0 else table[row]
    return table.astype(np.float32)


#: name -> encoder ``f(names) -> [C, E]`` that needs no download.
ENCODERS: dict[str, Callable[[Sequence[str]], np.ndarray]] = {"hashed_ngram": hashed_ngram_embeddings}


def _check_table(table: Any, num_classes: int | None, source: str) -> np.ndarray:
    try:
        table = np.asarray(table, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"class embeddings from {source} are not a numeric array: {err}") from None
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"class embeddings from {source} must be [num_classes, dim], got shape {table.shape}.")
    if num_classes is not None and table.shape[0] != num_classes:
        raise ValueError(
            f"class embeddings from {source} have {table.shape[0]} rows but there are {num_classes} classes; "
            "give one row per training label, in label order."
        )
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad.size:
        raise ValueError(f"class embeddings from {source}: non-finite values in the rows of classes {bad[:10].tolist()}.")
    zero = np.flatnonzero(np.linalg.norm(table, axis=1) == 0)
    if zero.size:
        raise ValueError(f"class embeddings from {source}: all-zero rows (no direction) for classes {zero[:10].tolist()}.")
    return table


def class_name_embeddings(
    source: Any,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """The ``[C, E]`` class-embedding table from an array, a mapping, a callable or an encoder name.

    Args:
        source: an array ``[C, E]``; a mapping ``name -> vector``; a callable
            ``f(list of names) -> [C, E]``; or a key of :data:`ENCODERS`.
        class_names: the training class names in label order (needed for all
            but an array; with an array, only its length is checked).
        num_classes: ``C``, checked against the table's rows when given.

    Returns:
        ``float32 [C, E]``, row ``c`` for label ``c``.

    Raises:
        ValueError: a missing class name (the message names it), names needed but
            not given, duplicate names, an unknown encoder name, a table of the
            wrong shape, non-finite or all-zero rows.
    """
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(set(class_names)) != len(class_names):
            raise ValueError("class_names contains duplicates; each label needs its own name.")
        if num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for {num_classes} classes.")
        num_classes = len(class_names)
    if isinstance(source, np.ndarray) or (isinstance(source, (list, tuple)) and source and not callable(source)):
        return _check_table(source, num_classes, "the array")
    if class_names is None:
        raise ValueError("class_names (in label order) are needed to embed classes with a mapping, callable or encoder.")
    if isinstance(source, Mapping):
        missing = [name for name in class_names if name not in source]
        if missing:
            raise ValueError(f"no text embedding for the classes {missing[:10]} ({len(missing)} missing).")
        return _check_table([np.asarray(source[name]) for name in class_names], num_classes, "the mapping")
    if isinstance(source, str):
        if source not in ENCODERS:
            raise ValueError(f"unknown text encoder {source!r}; built in: {sorted(ENCODERS)} (or pass a callable).")
        return _check_table(ENCODERS[source](class_names), num_classes, f"encoder {source!r}")
    if callable(source):
        return _check_table(source(list(class_names)), num_classes, "the callable")
    raise ValueError(f"cannot make class embeddings from {type(source).__name__}; pass an array, mapping, callable or encoder name.")
