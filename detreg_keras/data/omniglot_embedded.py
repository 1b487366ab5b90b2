"""The embedded Omniglot benchmark: eight alphabets shipped inside the package.

``omniglot_small.npz`` (next to this module, ~0.8 MB) holds the 4,840 images of

* ``train``: the five alphabets of ``images_background_small1`` (Balinese,
  Early_Aramaic, Greek, Korean, Latin): 136 characters;
* ``test``: the three alphabets that only ``images_background_small2`` has
  (Japanese_(katakana), Sanskrit, Tagalog): 106 characters, never seen in
  training (open-set retrieval by alphabet),

20 images per character, exactly the pixels of the original 105x105 binary
PNGs, bit-packed (``numpy.packbits``: 1 = white paper, 0 = ink). Omniglot is
MIT licensed (Lake, Salakhutdinov and Tenenbaum 2015); its notice is
``OMNIGLOT_LICENSE`` next to the data file.

The file is built once from the two zips by
``python scripts/build_omniglot_package_data.py`` (:func:`pack_omniglot`),
which lists them with :func:`~detreg_keras.data.folders.load_omniglot` and
decodes them with the pipeline's :func:`~detreg_keras.data.pipeline.decode_image`;
:func:`load_omniglot_split` reads it back with no network and no ``../shared``.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from detreg_keras.data.records import ImageRecords

#: The package data file.
OMNIGLOT_PACKAGE_DATA = Path(__file__).with_name("omniglot_small.npz")
#: Omniglot's MIT licence notice, shipped next to the data.
OMNIGLOT_LICENSE = Path(__file__).with_name("OMNIGLOT_LICENSE")
#: How to rebuild the package data (quoted in error messages).
BUILD_COMMAND = "python scripts/build_omniglot_package_data.py --data-root ../shared/data/omniglot"
#: Height and width of every Omniglot image.
OMNIGLOT_IMAGE_SIZE = 105
#: Classes and images per split of the embedded benchmark.
EMBEDDED_SPLIT_SIZES: dict[str, tuple[int, int]] = {"train": (136, 2720), "test": (106, 2120)}
_FORMAT_VERSION = 1
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class OmniglotArrays:
    """One split of the embedded Omniglot benchmark as pixel arrays.

    Attributes:
        images: ``uint8 [N, 105, 105, 1]``, 255 = paper, 0 = ink.
        labels: ``int64 [N]`` in ``0..C-1``, indexing ``class_names``.
        class_names: ``"Alphabet/characterNN"``, sorted (the labels of
            :func:`~detreg_keras.data.folders.load_omniglot`).
        paths: where each image came from, ``"<archive>.zip/<member>"``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    paths: tuple[str, ...]

    def to_records(self) -> ImageRecords:
        """The split as in-memory :class:`ImageRecords` (lossless PNGs, ~0.2 s per split).

        The training pipelines read encoded images; these decode to exactly
        :attr:`images` (as RGB), like the records of the original zips.
        """
        from PIL import Image  # noqa: PLC0415

        data = []
        for image in self.images:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] > 127).save(buffer, format="PNG")  # 1-bit, as the originals
            data.append(buffer.getvalue())
        return ImageRecords(paths=list(self.paths), labels=self.labels, class_names=list(self.class_names), data=data)


def _package_error(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"The embedded Omniglot data {path} {problem}. Reinstall the package, or rebuild the "
        f"file from the Omniglot zips with `{BUILD_COMMAND}`."
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decode_binary(records: ImageRecords) -> np.ndarray:
    """``bool [N, 105, 105]`` (True = paper) of Omniglot records, decoded by the pipeline's decoder."""
    from detreg_keras.data.pipeline import decode_image  # noqa: PLC0415  (imports TensorFlow)

    if records.data is None:
        raise ValueError("pack_omniglot needs in-memory records (load_omniglot reads the zips into memory).")
    out = np.empty((len(records), OMNIGLOT_IMAGE_SIZE, OMNIGLOT_IMAGE_SIZE), dtype=bool)
    for i, (data, path) in enumerate(zip(records.data, records.paths, strict=True)):
        pixels = decode_image(data).numpy()[..., 0]
        if pixels.shape != out.shape[1:] or not np.isin(pixels, (0, 255)).all():
            raise ValueError(f"{path}: expected a binary {OMNIGLOT_IMAGE_SIZE}x{OMNIGLOT_IMAGE_SIZE} image, got {pixels.shape}.")
        out[i] = pixels == 255
    return out


def _portable_path(path: str) -> str:
    """``"<archive>.zip/<member>"`` for a zip record's path (no build-machine folders)."""
    archive, sep, member = path.partition(".zip/")
    return f"{Path(archive).name}.zip/{member}" if sep else Path(path).name


def pack_omniglot(
    splits: Mapping[str, ImageRecords],
    path: str | os.PathLike[str] = OMNIGLOT_PACKAGE_DATA,
    sources: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Writes the package data file from the ``train`` and ``test`` records.

    Args:
        splits: ``{"train": records, "test": records}`` as returned by
            :func:`~detreg_keras.data.folders.load_omniglot`.
        path: the ``.npz`` to write.
        sources: archives the records came from; their SHA-256 is stored.

    Returns:
        The written path.
    """
    arrays: dict[str, np.ndarray] = {"format_version": np.array(_FORMAT_VERSION)}
    for split in _SPLITS:
        records = splits[split]
        bits = _decode_binary(records).reshape(len(records), -1)
        arrays[f"{split}_bits"] = np.packbits(bits, axis=1)
        arrays[f"{split}_labels"] = records.labels.astype(np.int16)
        arrays[f"{split}_class_names"] = np.array(records.class_names, dtype=str)
        arrays[f"{split}_paths"] = np.array([_portable_path(p) for p in records.paths], dtype=str)
    digests = [f"{Path(p).name} sha256={_sha256(Path(p))}" for p in (sources or {}).values()]
    arrays["sources"] = np.array(digests, dtype=str)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def _read_package(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"The embedded Omniglot data {path} is missing. Reinstall the package, or rebuild the file "
            f"from the Omniglot zips with `{BUILD_COMMAND}`."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise _package_error(path, f"is damaged ({type(err).__name__}: {err})") from err


def _unpack_split(package: dict[str, np.ndarray], split: str, path: Path) -> OmniglotArrays:
    keys = [f"{split}_{name}" for name in ("bits", "labels", "class_names", "paths")]
    missing = [k for k in keys if k not in package]
    if missing or int(package.get("format_version", -1)) != _FORMAT_VERSION:
        raise _package_error(path, f"is not format version {_FORMAT_VERSION} (missing {missing})")
    bits, labels, names, paths = (package[k] for k in keys)
    pixels = OMNIGLOT_IMAGE_SIZE * OMNIGLOT_IMAGE_SIZE
    num_classes, num_images = EMBEDDED_SPLIT_SIZES[split]
    if (
        bits.shape != (num_images, (pixels + 7) // 8)
        or labels.shape != (num_images,)
        or names.shape != (num_classes,)
        or paths.shape != (num_images,)
        or labels.min() < 0
        or labels.max() >= num_classes
    ):
        raise _package_error(
            path,
            f"has an unexpected {split} split (bits {bits.shape}, labels {labels.shape}, "
            f"{names.shape[0]} classes; expected {num_images} images of {num_classes} classes)",
        )
    flat = np.unpackbits(bits, axis=1, count=pixels)
    images = (flat * np.uint8(255)).reshape(num_images, OMNIGLOT_IMAGE_SIZE, OMNIGLOT_IMAGE_SIZE, 1)
    return OmniglotArrays(images, labels.astype(np.int64), tuple(names.tolist()), tuple(paths.tolist()))


def load_omniglot_split(
    split: Literal["train", "test"] = "train", path: str | os.PathLike[str] | None = None
) -> OmniglotArrays:
    """One split of the embedded Omniglot benchmark (no network, no extra files).

    Args:
        split: ``"train"`` (136 characters of 5 alphabets) or ``"test"`` (106
            characters of 3 other alphabets).
        path: the package data file (default :data:`OMNIGLOT_PACKAGE_DATA`).

    Returns:
        :class:`OmniglotArrays`; ``.to_records()`` gives the
        :class:`ImageRecords` the training pipelines take.

    Raises:
        FileNotFoundError: the file is missing (the message says how to rebuild it).
        ValueError: unknown split, or a damaged file (naming it and how to rebuild it).
    """
    if split not in _SPLITS:
        raise ValueError(f"Omniglot split must be 'train' or 'test', got {split!r}.")
    file = Path(path) if path is not None else OMNIGLOT_PACKAGE_DATA
    return _unpack_split(_read_package(file), split, file)
