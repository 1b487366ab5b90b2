"""Standard DML benchmarks: CUB-200-2011, Cars196, SOP (tfds) and In-shop.

The tfds builders ship *classification* splits, which share their classes
between ``train`` and ``test``. The deep-metric-learning protocol splits the
classes instead, so:

* :func:`load_cub200` (tfds ``caltech_birds2011``, features ``image``,
  ``label`` in 0..199, plus ``bbox``/``segmentation_mask`` that are not
  decoded) reads the **union** of tfds' ``train`` and ``test`` splits and keeps
  classes 0-99 for training and 100-199 for testing;
* :func:`load_cars196` (tfds ``cars196``, features ``image``, ``label`` in
  0..195, ``bbox``) likewise uses classes 0-97 / 98-195;
* :func:`load_sop` (tfds ``stanford_online_products``, features ``image``,
  ``class_id`` in 0..22633, ``super_class_id`` among 12 product categories)
  keeps tfds' own ``train``/``test`` split, which *is* the class-disjoint
  Ebay_train/Ebay_test split (11,318 / 11,316 classes); the label is
  ``class_id`` and the super class is ignored;
* :func:`load_inshop` reads the official In-shop Clothes Retrieval folder
  (``list_eval_partition.txt``) into train / query / gallery records.

The tfds loaders return :class:`DMLDatasets` whose datasets yield unbatched
``(image, label)``: ``uint8 [H, W, 3]`` RGB images (or the encoded
``tf.string`` with ``decode=False``, cheaper to shuffle or to materialise for
m-per-class sampling) and ``int64`` labels. Images are read encoded and
decoded only after the class filter, so the other split's images are never
decoded; bounding boxes and segmentation masks are not read. Training labels are remapped to contiguous
``0..C-1``; test labels keep their original ids unless ``remap_test=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # typing.Unpack is Python >= 3.11; annotations are strings here
    from typing_extensions import Unpack

import numpy as np

from detreg_keras.data.folders import ValidateMode, check_image_bytes
from detreg_keras.data.records import CorruptImageWarning, ImageRecords
from detreg_keras.data.splits import LabelMap

CUB200_NUM_CLASSES = 200
CARS196_NUM_CLASSES = 196
SOP_NUM_CLASSES = 22634
SOP_NUM_TRAIN_CLASSES = 11318


@dataclass
class DMLDatasets:
    """Class-disjoint train/test datasets of a DML benchmark.

    Attributes:
        train: unbatched ``(image, label)``, labels ``0..num_train_classes-1``.
        test: unbatched ``(image, label)``, original class ids (or
            ``0..num_test_classes-1`` when loaded with ``remap_test=True``).
        train_classes: map between original ids and training labels.
        test_classes: the test classes' original ids (a map to contiguous
            labels if ``remap_test``).
        name: the tfds dataset name.
    """

    train: Any
    test: Any
    train_classes: LabelMap
    test_classes: LabelMap
    name: str

    @property
    def num_train_classes(self) -> int:
        """Number of training classes (proxies)."""
        return self.train_classes.num_classes

    @property
    def num_test_classes(self) -> int:
        """Number of test classes."""
        return self.test_classes.num_classes


def _builder(name: str, data_dir: str | None, download: bool):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    return builder


def _read_split(builder, split: str, label_key: str, shuffle_files: bool):
    """Reads ``image`` (still encoded) and the label; other features are skipped."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    partial = tfds.decode.PartialDecoding(
        {"image": True, label_key: True}, decoders={"image": tfds.decode.SkipDecoding()}
    )
    try:
        return builder.as_dataset(split=split, decoders=partial, shuffle_files=shuffle_files)
    except AssertionError as err:  # tfds' "dataset not prepared" error
        raise FileNotFoundError(
            f"tfds dataset {builder.name!r} is not prepared in {builder.data_dir!r}: {err} "
            "Call with download=True, or prepare it with `tfds build` / manual download."
        ) from err


def _select(ds, label_key: str, label_map: LabelMap, remap: bool, size: int, decode: bool):
    """Keeps the examples of ``label_map``'s classes, then decodes the survivors."""
    import tensorflow as tf  # noqa: PLC0415

    from detreg_keras.data.pipeline import decode_image  # noqa: PLC0415

    table = tf.constant(label_map.dense_table(size))

    def keep(example: dict) -> tf.Tensor:
        return tf.gather(table, tf.cast(example[label_key], tf.int64)) >= 0

    def to_pair(example: dict):
        label = tf.cast(example[label_key], tf.int64)
        if remap:
            label = tf.gather(table, label)
        image = decode_image(example["image"]) if decode else example["image"]
        return image, label

    return ds.filter(keep).map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)


class TfdsOptions(TypedDict, total=False):
    """Keyword arguments of every tfds loader (see :func:`load_cub200`)."""

    remap_test: bool
    decode: bool
    download: bool
    shuffle_files: bool


class ClassSplitOptions(TfdsOptions, total=False):
    """Keyword arguments of the loaders that choose their own class split (CUB-200, Cars196)."""

    train_classes: Iterable[int] | None
    test_classes: Iterable[int] | None


def _dml_datasets(
    name: str,
    train: Any,
    test: Any,
    label_key: str,
    maps: tuple[LabelMap, LabelMap],
    num_classes: int,
    remap_test: bool,
    decode: bool,
) -> DMLDatasets:
    """:class:`DMLDatasets` of the ``maps = (train_map, test_map)`` classes of the ``train`` / ``test`` examples."""
    train_map, test_map = maps
    return DMLDatasets(
        train=_select(train, label_key, train_map, True, num_classes, decode),
        test=_select(test, label_key, test_map, remap_test, num_classes, decode),
        train_classes=train_map,
        test_classes=test_map,
        name=name,
    )


def _load_union_split(
    name: str,
    num_classes: int,
    default_train: int,
    data_dir: str | None,
    *,
    train_classes: Iterable[int] | None = None,
    test_classes: Iterable[int] | None = None,
    remap_test: bool = False,
    decode: bool = True,
    download: bool = False,
    shuffle_files: bool = False,
) -> DMLDatasets:
    train_ids = (
        list(range(default_train)) if train_classes is None else [int(c) for c in train_classes]
    )
    if test_classes is None:
        taken = set(train_ids)
        test_ids = [c for c in range(num_classes) if c not in taken]
    else:
        test_ids = [int(c) for c in test_classes]
    overlap = set(train_ids) & set(test_ids)
    if overlap:
        raise ValueError(f"train and test classes overlap: {sorted(overlap)[:10]}.")
    if not train_ids or not test_ids:
        raise ValueError("train and test classes must both be non-empty.")
    bad = [c for c in train_ids + test_ids if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"{name} class ids must lie in [0, {num_classes}), got {bad[:10]}.")
    train_map = LabelMap.from_ids(train_ids)
    test_map = LabelMap.from_ids(test_ids)

    builder = _builder(name, data_dir, download)
    both = _read_split(builder, "train", "label", shuffle_files).concatenate(
        _read_split(builder, "test", "label", shuffle_files)
    )
    return _dml_datasets(name, both, both, "label", (train_map, test_map), num_classes, remap_test, decode)


def load_cub200(data_dir: str | None = None, **options: Unpack[ClassSplitOptions]) -> DMLDatasets:
    """CUB-200-2011 (tfds ``caltech_birds2011``), DML split 0-99 / 100-199.

    Both tfds splits (5,994 + 5,794 images) are concatenated before the
    classes are separated, so each DML split holds every image of its
    classes (5,864 training / 5,924 test images with the real data).

    Args:
        data_dir: tfds data directory (``None``: tfds' default).
        **options: keyword-only (:class:`ClassSplitOptions`):
            ``train_classes``, training class ids (default ``0..99``), in the
            order of their new labels; ``test_classes``, test class ids
            (default: all the others); ``remap_test`` (False), also relabel
            the test classes to ``0..C_test-1``; ``decode`` (True), ``False``
            yields the encoded JPEG bytes instead of pixels; ``download``
            (False), run ``download_and_prepare`` first; ``shuffle_files``
            (False), forwarded to tfds (file order only).

    Returns:
        :class:`DMLDatasets`.

    Raises:
        FileNotFoundError: if the dataset is not prepared and
            ``download=False``.
    """
    return _load_union_split("caltech_birds2011", CUB200_NUM_CLASSES, 100, data_dir, **options)


def load_cars196(data_dir: str | None = None, **options: Unpack[ClassSplitOptions]) -> DMLDatasets:
    """Cars196 (tfds ``cars196``), DML split 0-97 / 98-195.

    Both tfds splits (8,144 + 8,041 images) are concatenated before the
    classes are separated (8,054 training / 8,131 test images with the real
    data). Arguments as in :func:`load_cub200` (default training classes
    ``0..97``).
    """
    return _load_union_split("cars196", CARS196_NUM_CLASSES, 98, data_dir, **options)


def load_sop(
    data_dir: str | None = None,
    *,
    remap_test: bool = False,
    decode: bool = True,
    download: bool = False,
    shuffle_files: bool = False,
) -> DMLDatasets:
    """Stanford Online Products (tfds ``stanford_online_products``).

    Uses tfds' ``train`` (59,551 images of classes 0..11317) and ``test``
    (60,502 images of classes 11318..22633) splits, which are the official
    class-disjoint split. The label is ``class_id``; ``super_class_id`` (12
    product categories such as bicycle or chair) is not used. Training
    labels stay ``0..11317`` (already contiguous); test labels are the
    original ``class_id`` unless ``remap_test``. Examples whose ``class_id``
    lies outside its split's official range are dropped (none in the real
    data).

    Args: as in :func:`load_cub200`, without class choices (:class:`TfdsOptions`).

    Returns:
        :class:`DMLDatasets`.
    """
    train_map = LabelMap.from_ids(range(SOP_NUM_TRAIN_CLASSES))
    test_map = LabelMap.from_ids(range(SOP_NUM_TRAIN_CLASSES, SOP_NUM_CLASSES))
    builder = _builder("stanford_online_products", data_dir, download)
    train = _read_split(builder, "train", "class_id", shuffle_files)
    test = _read_split(builder, "test", "class_id", shuffle_files)
    maps = (train_map, test_map)
    return _dml_datasets(
        "stanford_online_products", train, test, "class_id", maps, SOP_NUM_CLASSES, remap_test, decode
    )


# ----------------------------------------------------------------------------- In-shop


@dataclass
class InShopRecords:
    """In-shop Clothes Retrieval: training records and query/gallery records.

    Attributes:
        train: 25,882 images of 3,997 items, labels ``0..3996``.
        query: 14,218 query images.
        gallery: 12,612 gallery images. Query and gallery share one label map
            over their 3,985 items (``class_names`` are the item ids), so a
            query and a gallery image of the same item carry the same label.
    """

    train: ImageRecords
    query: ImageRecords
    gallery: ImageRecords


def _find_partition_file(root: Path) -> Path:
    for candidate in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"In-shop partition file not found: expected {root / 'list_eval_partition.txt'} "
        f"or {root / 'Eval' / 'list_eval_partition.txt'}."
    )


def load_inshop(
    root: str | os.PathLike[str],
    *,
    validate: ValidateMode = "verify",
    in_memory: bool = False,
) -> InShopRecords:
    """In-shop Clothes Retrieval from its official folder layout.

    ``list_eval_partition.txt`` (in ``root`` or ``root/Eval``) starts with
    the number of images and a header line, then one
    ``image_name item_id evaluation_status`` row per image, status being
    ``train``, ``query`` or ``gallery``. Image names (``img/...jpg``) are
    resolved against ``root`` or, failing that, ``root/Img`` (the layout of
    the official archive, also used by the Proxy Anchor code).

    Missing or unreadable images are skipped, counted in ``skipped`` of the
    split they belong to and reported in one :class:`CorruptImageWarning`.

    Args:
        root: the dataset folder.
        validate: image check, see
            :func:`~detreg_keras.data.folders.check_image_bytes`.
        in_memory: keep the encoded bytes in memory.

    Returns:
        :class:`InShopRecords`; train labels ``0..C_train-1`` over the train
        items (sorted by item id), query and gallery labels over the sorted
        union of their items.

    Raises:
        FileNotFoundError: if the partition file or the image folder is
            missing.
        ValueError: on a malformed partition file.
    """
    root = Path(root)
    partition = _find_partition_file(root)
    lines = partition.read_text().splitlines()
    rows: list[tuple[str, str, str]] = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2] not in ("train", "query", "gallery"):
            raise ValueError(
                f"{partition}:{number}: expected 'image_name item_id status', got {line!r}."
            )
        rows.append((fields[0], fields[1], fields[2]))
    if not rows:
        raise ValueError(f"{partition} lists no image.")
    try:
        declared = int(lines[0].split()[0])
    except (ValueError, IndexError):
        declared = None
    if declared is not None and declared != len(rows):
        warnings.warn(
            f"{partition} declares {declared} images but lists {len(rows)}.", stacklevel=2
        )

    bases = [root, root / "Img"]
    base = next((b for b in bases if any((b / name).is_file() for name, _, _ in rows[:50])), None)
    if base is None:
        raise FileNotFoundError(
            f"In-shop images not found: {rows[0][0]!r} is neither under {root} nor {root / 'Img'}."
        )

    kept: dict[str, list[tuple[str, str, bytes | None]]] = {"train": [], "query": [], "gallery": []}
    skipped: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    for name, item, status in rows:
        path = base / name
        try:
            data = path.read_bytes()
        except OSError as err:
            skipped[status].append((str(path), f"unreadable ({type(err).__name__})"))
            continue
        reason = check_image_bytes(data, validate)
        if reason is not None:
            skipped[status].append((str(path), reason))
            continue
        kept[status].append((str(path), item, data if in_memory else None))

    total_skipped = sum(len(v) for v in skipped.values())
    if total_skipped:
        first = [f"{p} ({r})" for v in skipped.values() for p, r in v][:3]
        warnings.warn(
            f"Skipped {total_skipped} unreadable In-shop image(s): {'; '.join(first)}"
            f"{' ...' if total_skipped > 3 else ''}.",
            CorruptImageWarning,
            stacklevel=2,
        )

    def build(statuses: tuple[str, ...]) -> list[ImageRecords]:
        items = sorted({item for s in statuses for _, item, _ in kept[s]})
        index = {item: i for i, item in enumerate(items)}
        out = []
        for s in statuses:
            entries = kept[s]
            out.append(
                ImageRecords(
                    paths=[p for p, _, _ in entries],
                    labels=np.array([index[i] for _, i, _ in entries], dtype=np.int64),
                    class_names=items,
                    data=[d for _, _, d in entries] if in_memory else None,  # type: ignore[misc]
                    skipped=len(skipped[s]),
                    skipped_files=skipped[s],
                )
            )
        return out

    (train,) = build(("train",))
    query, gallery = build(("query", "gallery"))
    return InShopRecords(train=train, query=query, gallery=gallery)
