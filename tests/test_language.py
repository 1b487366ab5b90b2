"""Class-name embeddings: the hashed n-gram encoder and the array / mapping / callable inputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from detreg_keras.language import class_name_embeddings, hashed_ngram_embeddings


def _reference_word(word: str, dim: int, n: int = 3) -> np.ndarray:
    padded = f"<{word}>"
    vector = np.zeros(dim)
    for i in range(max(1, len(padded) - n + 1)):
        h = int.from_bytes(hashlib.blake2b(padded[i : i + n].encode(), digest_size=8).digest(), "little")
        vector[(h >> 1) % dim] += 1 if h & 1 else -1
    return vector / np.linalg.norm(vector)


def test_a_name_is_the_normalised_sum_of_its_words():
    got = hashed_ngram_embeddings(["Japanese_(katakana)/character13"], dim=64)[0]
    words = ["japanese", "katakana", "character13"]
    expected = sum(_reference_word(w, 64) for w in words)
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), rtol=1e-6, atol=1e-7)


def test_shared_words_make_names_similar():
    table = hashed_ngram_embeddings(["Greek/character01", "Greek/character02", "Latin/character01", "Korean/x"], 256)
    sims = table @ table.T
    np.testing.assert_allclose(np.diag(sims), 1.0, rtol=1e-6)
    assert sims[0, 1] > sims[0, 2] > sims[0, 3]  # same alphabet > same character number > nothing shared


def test_same_vectors_in_another_process_with_another_hash_seed():
    names = ["Sanskrit/character01", "Tagalog/character07"]
    code = f"from detreg_keras.language import hashed_ngram_embeddings as h; print(h({names!r}, 32).tobytes().hex())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == hashed_ngram_embeddings(names, 32).tobytes().hex()


def test_array_mapping_and_callable_give_the_same_table():
    names = ["b", "a", "c"]
    table = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    mapping = {name: row for name, row in zip(names, table)}
    np.testing.assert_array_equal(class_name_embeddings(table, names), table)
    np.testing.assert_array_equal(class_name_embeddings(mapping, names), table)
    np.testing.assert_array_equal(class_name_embeddings(lambda ns: [mapping[n] for n in ns], names), table)
    np.testing.assert_array_equal(class_name_embeddings("hashed_ngram", names), hashed_ngram_embeddings(names))


@pytest.mark.parametrize(
    "source,names,match",
    [
        ({"a": [1.0]}, None, "class_names .* are needed"),
        (np.ones(3), None, r"must be \[num_classes, dim\]"),
        (np.zeros((2, 2)), None, "all-zero rows"),
        (lambda names: np.ones((1, 4)), ["a", "b"], "from the callable have 1 rows but there are 2 classes"),
        ("hashed_ngram", ["a", "a"], "duplicates"),
        ("hashed_ngram", ["a", "--"], "has no letters or digits"),
        (42, ["a"], "cannot make class embeddings from int"),
    ],
)
def test_bad_input_raises_a_clear_error(source, names, match):
    with pytest.raises(ValueError, match=match):
        class_name_embeddings(source, names)
