"""Class-disjoint train/test splits and contiguous label maps.

Deep metric learning benchmarks split the *classes*, not the images: the
classic protocol trains on the first half of the classes and evaluates
retrieval on the unseen second half (CUB-200-2011: classes 0-99 / 100-199,
Cars196: 0-97 / 98-195). The helpers here are pure NumPy and deterministic:

* :func:`split_classes` builds a :class:`ClassSplit` from the first-N classes, a
  fraction, explicit lists, or a seeded random draw, and refuses overlapping or
  empty splits.
* :func:`carve_validation_classes` moves a seeded random subset of the training
  classes into a validation split (still class-disjoint).
* :class:`LabelMap` / :func:`remap_labels` turn an arbitrary set of class ids
  into the contiguous ``0..C-1`` labels a proxy-based loss needs, and keep the
  mapping back to the original ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: What a split size may be: a count (``int``), a fraction in ``(0, 1)``
#: (``float``), or an explicit collection of class ids.
SplitSpec = int | float | Iterable[int] | None


@dataclass(frozen=True)
class ClassSplit:
    """A class-disjoint split.

    Attributes:
        train: sorted original class ids of the training split.
        test: sorted original class ids of the test split.
    """

    train: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_disjoint_nonempty({"train": self.train, "test": self.test})


@dataclass(frozen=True)
class LabelMap:
    """Mapping between original class ids and contiguous labels ``0..C-1``.

    New label ``i`` stands for the original class ``class_ids[i]``.

    Attributes:
        class_ids: the original ids, in the order of their new labels.
    """

    class_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(set(self.class_ids)) != len(self.class_ids):
            raise ValueError(f"LabelMap class ids must be unique, got {self.class_ids}.")
        if any(c < 0 for c in self.class_ids):
            raise ValueError("LabelMap class ids must be non-negative integers.")

    @classmethod
    def from_ids(cls, class_ids: Iterable[int]) -> LabelMap:
        """Builds a map over ``class_ids`` in the given order (not re-sorted)."""
        return cls(tuple(int(c) for c in class_ids))

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_ids)

    def encode(self, original: np.ndarray | Sequence[int]) -> np.ndarray:
        """Maps original class ids to contiguous labels.

        Args:
            original: integer array of original class ids.

        Returns:
            ``int64`` array of the same shape with labels in ``[0, C)``.

        Raises:
            ValueError: if an id is not part of the map.
        """
        original = np.asarray(original, dtype=np.int64)
        table = self.dense_table(int(original.max()) + 1 if original.size else 0)
        out = table[original] if original.size else original.copy()
        if original.size and (out < 0).any():
            unknown = sorted(set(original[out < 0].tolist()))
            raise ValueError(f"Class ids {unknown[:10]} are not in this LabelMap.")
        return out.astype(np.int64)

    def decode(self, labels: np.ndarray | Sequence[int]) -> np.ndarray:
        """Maps contiguous labels back to the original class ids."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"Labels must lie in [0, {self.num_classes}).")
        return np.asarray(self.class_ids, dtype=np.int64)[labels]

    def dense_table(self, size: int | None = None) -> np.ndarray:
        """A lookup table ``table[original_id] = label`` (``-1`` where absent).

        Args:
            size: table length; at least ``max(class_ids) + 1`` is used.

        Returns:
            ``int64`` array, suitable for ``tf.gather`` in a tf.data pipeline.
        """
        needed = (max(self.class_ids) + 1) if self.class_ids else 0
        table = np.full(max(needed, size or 0), -1, dtype=np.int64)
        table[list(self.class_ids)] = np.arange(self.num_classes, dtype=np.int64)
        return table


def _normalise_ids(class_ids: int | Iterable[int]) -> list[int]:
    if isinstance(class_ids, (int, np.integer)):
        if class_ids <= 0:
            raise ValueError(f"Number of classes must be positive, got {class_ids}.")
        return list(range(int(class_ids)))
    ids = [int(c) for c in class_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("class_ids contains duplicates.")
    if not ids:
        raise ValueError("class_ids is empty.")
    return sorted(ids)


def _check_disjoint_nonempty(parts: dict[str, Sequence[int]]) -> None:
    for name, ids in parts.items():
        if len(ids) == 0:
            raise ValueError(f"The {name} split is empty.")
        if len(set(ids)) != len(ids):
            raise ValueError(f"The {name} split lists a class more than once.")
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = sorted(set(parts[a]) & set(parts[b]))
            if overlap:
                raise ValueError(
                    f"The {a} and {b} splits overlap on {len(overlap)} class(es): "
                    f"{overlap[:10]}{' ...' if len(overlap) > 10 else ''}."
                )


def _resolve_count(spec: int | float, available: int, name: str) -> int:
    if isinstance(spec, bool):
        raise TypeError(f"{name} must be an int, a float fraction or a list of ids.")
    if isinstance(spec, (float, np.floating)):
        if not 0.0 < spec < 1.0:
            raise ValueError(f"{name} fraction must be in (0, 1), got {spec}.")
        return round(float(spec) * available)
    count = int(spec)
    if count < 0 or count > available:
        raise ValueError(f"{name}={count} classes requested but {available} are available.")
    return count


def split_classes(
    class_ids: int | Iterable[int],
    *,
    train: SplitSpec = None,
    test: SplitSpec = None,
    seed: int | None = None,
) -> ClassSplit:
    """Splits classes into disjoint train and test sets, deterministically.

    ``class_ids`` are sorted first. A split given as a count takes the *first*
    N of the sorted ids (train from the front, test from the back) when
    ``seed`` is ``None``, or a seeded random draw otherwise; a float is a
    fraction of all classes (rounded); an iterable lists the ids explicitly.
    A split left as ``None`` receives every remaining class.

    Examples:
        ``split_classes(200, train=100)`` gives CUB's 0-99 / 100-199;
        ``split_classes(ids, train=[1, 2], test=[3])``;
        ``split_classes(ids, train=0.5, seed=0)`` is a seeded random half.

    Args:
        class_ids: the available classes, or an ``int`` ``n`` for ``range(n)``.
        train: training classes (count, fraction or ids).
        test: test classes (count, fraction or ids).
        seed: ``None`` for first-N splits, an int for seeded random draws.

    Returns:
        The :class:`ClassSplit`.

    Raises:
        ValueError: on unknown ids, overlapping or empty splits, or counts that
            do not fit.
    """
    ids = _normalise_ids(class_ids)
    available = set(ids)
    if train is None and test is None:
        raise ValueError("Give at least one of train= or test=.")

    explicit: dict[str, list[int]] = {}
    for name, spec in (("train", train), ("test", test)):
        if spec is not None and not isinstance(spec, (int, float, np.integer, np.floating)):
            listed = [int(c) for c in spec]
            unknown = sorted(set(listed) - available)
            if unknown:
                raise ValueError(f"{name} lists unknown class ids {unknown[:10]}.")
            explicit[name] = listed
    if len(explicit) == 2:
        _check_disjoint_nonempty(explicit)

    rng = np.random.default_rng(seed) if seed is not None else None
    chosen: dict[str, list[int]] = dict(explicit)
    for name, spec in (("train", train), ("test", test)):
        if spec is None or name in chosen:
            continue
        taken = {c for part in chosen.values() for c in part}
        pool = [c for c in ids if c not in taken]
        count = _resolve_count(spec, len(ids), name)
        if count > len(pool):
            raise ValueError(f"{name}={spec} needs {count} classes but only {len(pool)} are left.")
        if rng is not None:
            chosen[name] = sorted(rng.choice(pool, size=count, replace=False).tolist())
        elif name == "train":
            chosen[name] = pool[:count]
        else:
            chosen[name] = pool[len(pool) - count :]
    for name in ("train", "test"):
        if name not in chosen:
            taken = {c for part in chosen.values() for c in part}
            chosen[name] = [c for c in ids if c not in taken]
    _check_disjoint_nonempty(chosen)
    return ClassSplit(tuple(sorted(chosen["train"])), tuple(sorted(chosen["test"])))


def carve_validation_classes(
    train_classes: Iterable[int],
    num_or_fraction: int | float,
    seed: int = 0,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Moves a seeded random subset of training classes to a validation split.

    Args:
        train_classes: the training class ids.
        num_or_fraction: number of validation classes (``int``) or a fraction
            of the training classes in ``(0, 1)`` (rounded, at least one).
        seed: random seed; the same inputs always give the same split.

    Returns:
        ``(remaining_train, validation)``, both sorted and disjoint.

    Raises:
        ValueError: if either part would be empty or the ids are not unique.
    """
    ids = _normalise_ids(list(train_classes))
    if isinstance(num_or_fraction, (float, np.floating)):
        count = max(1, _resolve_count(num_or_fraction, len(ids), "validation"))
    else:
        count = _resolve_count(num_or_fraction, len(ids), "validation")
    if count == 0:
        raise ValueError("The validation split is empty.")
    if count >= len(ids):
        raise ValueError(
            f"Carving {count} validation classes out of {len(ids)} leaves no training class."
        )
    rng = np.random.default_rng(seed)
    val = sorted(rng.choice(ids, size=count, replace=False).tolist())
    val_set = set(val)
    rest = [c for c in ids if c not in val_set]
    return tuple(rest), tuple(val)


def remap_labels(
    labels: np.ndarray | Sequence[int], class_ids: Iterable[int] | None = None
) -> tuple[np.ndarray, LabelMap]:
    """Remaps labels to contiguous ``0..C-1``.

    Args:
        labels: original integer labels.
        class_ids: the classes, in the order of their new labels; defaults to
            the sorted unique values of ``labels``.

    Returns:
        ``(new_labels, label_map)``.

    Raises:
        ValueError: if a label is not in ``class_ids``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if class_ids is None:
        class_ids = np.unique(labels).tolist()
    label_map = LabelMap.from_ids(class_ids)
    return label_map.encode(labels), label_map
