"""Datasets and input pipelines for deep metric learning.

* :mod:`~detreg_keras.data.splits`: class-disjoint splits, contiguous label maps.
* :mod:`~detreg_keras.data.records`: :class:`ImageRecords`, labelled encoded images.
* :mod:`~detreg_keras.data.folders`: class-per-folder loader (directory or zip),
  Omniglot from its zips (small or full).
* :mod:`~detreg_keras.data.omniglot_embedded`: the Omniglot benchmark shipped
  with the package (:func:`load_omniglot_split`, no download).
* :mod:`~detreg_keras.data.tfds_loaders`: CUB-200-2011, Cars196, SOP (tfds), In-shop.
* :mod:`~detreg_keras.data.sampling`: m-per-class, SPC-R and random batch samplers.
* :mod:`~detreg_keras.data.embedded_sampling`: greedy coreset, DDM and FRD batches
  from the current embeddings (:class:`EmbeddingStore`, :class:`PoolEmbeddingRefresh`).
* :mod:`~detreg_keras.data.pipeline`: decoding, augmentation, tf.data pipelines.
* :mod:`~detreg_keras.data.registry`: datasets by name (:data:`DATASETS`) and
  :func:`load_splits` (a run's class-disjoint splits from its config).
"""

from __future__ import annotations

from detreg_keras.data.digits import load_digits_split
from detreg_keras.data.embedded_sampling import (
    DDMSampler,
    EmbeddingStore,
    FRDSampler,
    GreedyCoresetSampler,
    PoolEmbeddingRefresh,
)
from detreg_keras.data.folders import (
    IMAGE_EXTENSIONS,
    OMNIGLOT_TEST_ALPHABETS,
    check_image_bytes,
    load_image_folder,
    load_omniglot,
)
from detreg_keras.data.omniglot_embedded import (
    OMNIGLOT_PACKAGE_DATA,
    OmniglotArrays,
    load_omniglot_split,
)
from detreg_keras.data.pipeline import (
    DecodeStats,
    decode_image,
    decode_train_transform,
    ensure_rgb,
    eval_transform,
    make_eval_dataset,
    make_train_dataset,
    random_resized_crop_box,
    records_from_dataset,
    train_transform,
)
from detreg_keras.data.records import CorruptImageWarning, ImageRecords
from detreg_keras.data.registry import (
    DATASETS,
    DataSplits,
    check_paths,
    load_splits,
    resolve_data_path,
    select_classes,
    source_labels,
)
from detreg_keras.data.sampling import (
    MPerClassSampler,
    RandomSampler,
    SPCRSampler,
    index_dataset,
    m_per_class_steps,
    spc_r_batch,
)
from detreg_keras.data.splits import (
    ClassSplit,
    LabelMap,
    carve_validation_classes,
    remap_labels,
    split_classes,
)
from detreg_keras.data.tfds_loaders import (
    DMLDatasets,
    InShopRecords,
    load_cars196,
    load_cub200,
    load_inshop,
    load_sop,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "OMNIGLOT_PACKAGE_DATA",
    "OMNIGLOT_TEST_ALPHABETS",
    "ClassSplit",
    "CorruptImageWarning",
    "DDMSampler",
    "DMLDatasets",
    "DataSplits",
    "DecodeStats",
    "EmbeddingStore",
    "FRDSampler",
    "GreedyCoresetSampler",
    "ImageRecords",
    "InShopRecords",
    "LabelMap",
    "MPerClassSampler",
    "OmniglotArrays",
    "PoolEmbeddingRefresh",
    "RandomSampler",
    "SPCRSampler",
    "carve_validation_classes",
    "check_image_bytes",
    "check_paths",
    "decode_image",
    "decode_train_transform",
    "ensure_rgb",
    "eval_transform",
    "index_dataset",
    "load_cars196",
    "load_digits_split",
    "load_cub200",
    "load_image_folder",
    "load_inshop",
    "load_omniglot",
    "load_omniglot_split",
    "load_sop",
    "load_splits",
    "m_per_class_steps",
    "make_eval_dataset",
    "make_train_dataset",
    "random_resized_crop_box",
    "records_from_dataset",
    "remap_labels",
    "resolve_data_path",
    "select_classes",
    "source_labels",
    "spc_r_batch",
    "split_classes",
    "train_transform",
]
