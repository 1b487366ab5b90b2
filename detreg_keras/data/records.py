"""`ImageRecords`: a labelled list of encoded images, on disk or in memory.

Every loader of :mod:`detreg_keras.data` that is not backed by tfds returns an
:class:`ImageRecords`. It holds *encoded* images (JPEG/PNG/... bytes), never
decoded pixels, so it is cheap to keep, index and subsample; the tf.data
pipelines of :mod:`detreg_keras.data.pipeline` decode them on the fly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageRecords:
    """Encoded images with integer labels.

    Attributes:
        paths: one identifier per image. For on-disk records this is the file
            path read by the pipeline; for in-memory records (``data`` set) it
            names where the bytes came from, e.g. ``"archive.zip/dir/x.png"``.
        labels: ``int64`` labels, one per image, indexing ``class_names``.
        class_names: name of each class; ``class_names[label]``.
        data: the encoded bytes of each image, or ``None`` when the images are
            read from ``paths`` by the pipeline.
        skipped: number of image files that were left out because they were
            empty, corrupt or in a format TensorFlow cannot decode.
        skipped_files: ``(path, reason)`` for each skipped file.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    data: list[bytes] | None = None
    skipped: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.paths = list(self.paths)
        self.class_names = list(self.class_names)
        if len(self.paths) != len(self.labels):
            raise ValueError(
                f"ImageRecords: {len(self.paths)} paths but {len(self.labels)} labels."
            )
        if self.data is not None:
            self.data = list(self.data)
            if len(self.data) != len(self.paths):
                raise ValueError(
                    f"ImageRecords: {len(self.data)} byte strings but {len(self.paths)} paths."
                )
        if self.labels.size and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise ValueError(
                f"ImageRecords labels must lie in [0, {len(self.class_names)}) "
                f"(one class name per label), got [{self.labels.min()}, {self.labels.max()}]."
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def in_memory(self) -> bool:
        """Whether the encoded bytes are held in memory (``data`` is set)."""
        return self.data is not None

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """Number of images of each class, ``[num_classes]``."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageRecords:
        """The records at ``indices`` (labels and class names unchanged).

        The ``skipped`` bookkeeping is carried over.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageRecords(
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            data=None if self.data is None else [self.data[i] for i in idx],
            skipped=self.skipped,
            skipped_files=list(self.skipped_files),
        )

    def select_classes(self, class_ids: Sequence[int], remap: bool = True) -> ImageRecords:
        """The records of the given classes, e.g. one side of a ``ClassSplit``.

        Args:
            class_ids: labels (of these records) to keep.
            remap: relabel to contiguous ``0..len(class_ids)-1`` in the order of
                ``class_ids`` (``class_names`` follow); with ``False`` the labels
                and ``class_names`` are kept as they are.

        Returns:
            New :class:`ImageRecords`, images in their original order.
        """
        ids = [int(c) for c in class_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("select_classes: class_ids contains duplicates.")
        bad = [c for c in ids if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"select_classes: unknown class ids {bad[:10]}.")
        table = np.full(self.num_classes, -1, dtype=np.int64)
        table[ids] = np.arange(len(ids))
        new = table[self.labels]
        keep = np.flatnonzero(new >= 0)
        out = self.subset(keep)
        if remap:
            out.labels = new[keep]
            out.class_names = [self.class_names[c] for c in ids]
        return out

    def summary(self) -> str:
        """One line: images, classes, per-class min/max and skipped files."""
        counts = self.class_counts()
        lo = int(counts.min()) if counts.size else 0
        hi = int(counts.max()) if counts.size else 0
        where = "in memory" if self.in_memory else "on disk"
        return (
            f"{len(self)} images ({where}), {self.num_classes} classes "
            f"({lo}-{hi} per class), {self.skipped} skipped"
        )


class CorruptImageWarning(UserWarning):
    """Issued when unreadable images are skipped or dropped (never raised)."""
