"""Image-folder loader (directories or zip archives) and Omniglot.

Layout: one folder per class, images anywhere below it::

    root/<class>/.../*.jpg|jpeg|png|bmp|gif            (class_depth=1)
    root/<alphabet>/<character>/*.png                   (class_depth=2)

With ``class_depth=2`` the class of ``root/Greek/character03/x.png`` is named
``"Greek/character03"``. Class names are sorted and numbered ``0..C-1``.
Files whose extension is not an image extension (and hidden files,
``__MACOSX``) are ignored without a word; images that sit above the class level
(fewer than ``class_depth`` folders deep) are ignored too.

**Unreadable images are found at listing time.** Every image is read once and
checked (see :func:`check_image_bytes`: empty file, PIL ``verify()`` and a
whitelist of formats TensorFlow can decode, or a full TensorFlow decode with
``validate="decode"``). Failures are *skipped*, counted in
``records.skipped`` / ``records.skipped_files`` and reported in one
:class:`~detreg_keras.data.records.CorruptImageWarning`; a class left without
images disappears. Whatever slips through (``validate="none"``, or a file that
PIL accepts but TensorFlow does not) is dropped by the tf.data pipelines with
``ignore_errors`` instead of failing mid-epoch.

**Zip archives are read into memory**: the encoded bytes of each image become
``records.data`` (Omniglot's archives are ~1.5 MB); nothing is extracted to
disk. Directories are read from disk by the pipeline unless
``in_memory=True``.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from detreg_keras.data.records import CorruptImageWarning, ImageRecords
from detreg_runtime.imaging import IMAGE_EXTENSIONS  # the one extension list, shared with serving

#: PIL formats that ``tf.io.decode_image`` decodes (TensorFlow >= 2.16 decodes WebP).
_TF_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP"})

ValidateMode = Literal["verify", "decode", "none"]

#: Default location of the Omniglot archives, relative to the working
#: directory (the repository root in this project).
DEFAULT_OMNIGLOT_ROOT = "../shared/data/omniglot"
OMNIGLOT_TRAIN_ARCHIVE = "images_background_small1.zip"
OMNIGLOT_TEST_ARCHIVE = "images_background_small2.zip"
#: The archives of the full dataset: 964 background and 659 evaluation characters.
OMNIGLOT_FULL_ARCHIVES: dict[str, str] = {"train": "images_background.zip", "test": "images_evaluation.zip"}
#: Alphabets of ``images_background_small2`` used as the Omniglot test split
#: (those that do not occur in ``images_background_small1``).
OMNIGLOT_TEST_ALPHABETS: tuple[str, ...] = ("Japanese_(katakana)", "Sanskrit", "Tagalog")


def check_image_bytes(data: bytes, validate: ValidateMode = "verify") -> str | None:
    """Checks that encoded image bytes will decode in the tf.data pipeline.

    Args:
        data: the encoded file content.
        validate: ``"verify"``: non-empty, PIL identifies a format TensorFlow
            decodes (JPEG, PNG, BMP except 1-bit, GIF) and ``Image.verify()``
            passes (header and, for PNG, chunk CRCs; cheap, no pixel decode,
            so e.g. a truncated JPEG passes and is left to the pipeline).
            ``"decode"``: a full ``tf.io.decode_image`` (exact, slower).
            ``"none"``: only the empty-file check.

    Returns:
        ``None`` if the image is fine, else a short reason.
    """
    if not data:
        return "empty file"
    if validate == "none":
        return None
    if validate == "decode":
        import tensorflow as tf  # noqa: PLC0415  (heavy import, only when needed)

        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
            return f"not decodable ({str(err).splitlines()[0][:120]})"
        return None
    if validate != "verify":
        raise ValueError(f"validate must be 'verify', 'decode' or 'none', got {validate!r}.")

    from PIL import Image  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode = img.format, img.mode
                if fmt not in _TF_FORMATS:
                    return f"format {fmt} is not decodable by TensorFlow"
                if fmt == "BMP" and mode == "1":
                    return "1-bit BMP is not decodable by TensorFlow"
                img.verify()
    except Image.DecompressionBombError:
        return None  # huge but valid; TensorFlow decodes it
    except Exception as err:
        return f"corrupt ({type(err).__name__}: {err})"
    return None


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _iter_directory(root: Path) -> Iterator[tuple[tuple[str, ...], str]]:
    """Yields ``(relative parts, path)`` of every file below ``root``, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            yield (*rel, name), os.path.join(dirpath, name)


def _zip_prefix(names: Sequence[str], subdir: str | None) -> str:
    if subdir is not None:
        subdir = subdir.strip("/")
        return f"{subdir}/" if subdir else ""
    files = [n for n in names if not n.endswith("/") and not _is_hidden(n.split("/"))]
    tops = {n.split("/", 1)[0] for n in files}
    if len(tops) == 1 and all("/" in n for n in files):
        return f"{tops.pop()}/"
    return ""


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    class_depth: int = 1,
    subdir: str | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    class_filter: Callable[[str], bool] | None = None,
    validate: ValidateMode = "verify",
    in_memory: bool = False,
) -> ImageRecords:
    """Lists a class-per-folder image collection from a directory or a zip.

    Args:
        root: a directory, or a ``.zip`` archive (read into memory).
        class_depth: how many folder levels name a class (``2`` for
            ``alphabet/character``); images deeper than that belong to the
            class of their first ``class_depth`` folders.
        subdir: folder inside ``root`` that holds the classes. For a zip,
            ``None`` uses the archive's single top-level folder when every file
            lies under one (the usual way datasets are zipped); pass ``""`` to
            use the archive root as is.
        extensions: file extensions of images (others are ignored).
        class_filter: keep only classes for which ``class_filter(name)`` is
            true (``name`` is ``"a/b"`` for ``class_depth=2``).
        validate: how images are checked at listing time, see
            :func:`check_image_bytes`; failures are skipped and counted.
        in_memory: for directories, also keep the encoded bytes in memory
            (zips are always read into memory).

    Returns:
        :class:`ImageRecords`, classes sorted by name and labelled ``0..C-1``,
        images sorted by path within the listing.

    Raises:
        FileNotFoundError: if ``root`` (or ``subdir`` in it) does not exist.
        ValueError: if no image is found.
    """
    if class_depth < 1:
        raise ValueError(f"class_depth must be >= 1, got {class_depth}.")
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"Image folder or archive not found: {root}")

    found: list[tuple[str, str, bytes | None]] = []  # (class, path, bytes)
    skipped: list[tuple[str, str]] = []
    keep_bytes = in_memory

    def consider(
        parts: tuple[str, ...],
        path: str,
        read: Callable[[], bytes],
        size: Callable[[], int] | None = None,
    ) -> None:
        if _is_hidden(parts) or not parts[-1].lower().endswith(exts):
            return
        if len(parts) <= class_depth:
            return  # not inside a class folder
        name = "/".join(parts[:class_depth])
        if class_filter is not None and not class_filter(name):
            return
        try:
            if size is not None and validate == "none" and not keep_bytes:
                # Nothing to inspect but emptiness: don't read the file.
                if size() == 0:
                    skipped.append((path, "empty file"))
                else:
                    found.append((name, path, None))
                return
            data = read()
        except OSError as err:
            skipped.append((path, f"unreadable ({err})"))
            return
        reason = check_image_bytes(data, validate)
        if reason is not None:
            skipped.append((path, reason))
            return
        found.append((name, path, data if keep_bytes else None))

    if root.is_file() and zipfile.is_zipfile(root):
        keep_bytes = True
        with zipfile.ZipFile(root) as archive:
            names = sorted(archive.namelist())
            prefix = _zip_prefix(names, subdir)
            if prefix and not any(n.startswith(prefix) for n in names):
                raise FileNotFoundError(f"Folder {prefix!r} not found in archive {root}")
            for member in names:
                if member.endswith("/") or not member.startswith(prefix):
                    continue
                parts = tuple(member[len(prefix) :].split("/"))
                consider(parts, f"{root}/{member}", lambda m=member: archive.read(m))
    elif root.is_dir():
        base = root / subdir if subdir else root
        if not base.is_dir():
            raise FileNotFoundError(f"Folder not found: {base}")
        for parts, path in _iter_directory(base):
            consider(
                parts,
                path,
                lambda p=path: Path(p).read_bytes(),
                lambda p=path: os.path.getsize(p),
            )
    else:
        raise ValueError(f"{root} is neither a directory nor a zip archive.")

    if skipped:
        shown = "; ".join(f"{p} ({r})" for p, r in skipped[:3])
        warnings.warn(
            f"Skipped {len(skipped)} unreadable image file(s) under {root}: {shown}"
            f"{' ...' if len(skipped) > 3 else ''}. See records.skipped_files.",
            CorruptImageWarning,
            stacklevel=2,
        )
    if not found:
        raise ValueError(
            f"No readable image with extension {exts} found under {root} at class depth "
            f"{class_depth} ({len(skipped)} skipped)."
        )
    class_names = sorted({name for name, _, _ in found})
    index = {name: i for i, name in enumerate(class_names)}
    return ImageRecords(
        paths=[p for _, p, _ in found],
        labels=np.array([index[name] for name, _, _ in found], dtype=np.int64),
        class_names=class_names,
        data=[d for _, _, d in found] if keep_bytes else None,  # type: ignore[misc]
        skipped=len(skipped),
        skipped_files=skipped,
    )


def load_omniglot(
    root: str | os.PathLike[str] = DEFAULT_OMNIGLOT_ROOT,
    split: Literal["train", "test"] = "train",
    *,
    validate: ValidateMode = "verify",
    full: bool = False,
) -> ImageRecords:
    """Omniglot, class-disjoint by alphabet, read from the zips.

    The small background sets (the default; the same images as the embedded
    benchmark, :func:`~detreg_keras.data.omniglot_embedded.load_omniglot_split`):

    * ``"train"``: every alphabet of ``images_background_small1.zip``
      (Balinese, Early_Aramaic, Greek, Korean, Latin): 136 classes.
    * ``"test"``: Japanese_(katakana), Sanskrit and Tagalog from
      ``images_background_small2.zip`` (its Greek and Latin repeat the training
      alphabets and are left out): 106 classes.

    With ``full=True``, the full dataset's standard split: ``"train"`` is
    ``images_background.zip`` (30 alphabets, 964 classes), ``"test"`` is
    ``images_evaluation.zip`` (20 other alphabets, 659 classes).

    A class is one character of one alphabet, named ``"Alphabet/characterNN"``;
    20 binary 105x105 PNGs per class, held in memory as encoded bytes (the
    pipeline's decoder turns them into RGB).

    Args:
        root: folder holding the two archives (relative paths are resolved
            against the current working directory).
        split: ``"train"`` or ``"test"``.
        validate: image check at listing time, see :func:`check_image_bytes`.
        full: read the full dataset's two archives instead of the small ones.

    Returns:
        :class:`ImageRecords` with labels ``0..C-1`` over the split's classes.

    Raises:
        FileNotFoundError: naming the expected archive when it is missing.
        ValueError: for an unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Omniglot split must be 'train' or 'test', got {split!r}.")
    if full:
        archive, keep = OMNIGLOT_FULL_ARCHIVES[split], None
    elif split == "train":
        archive, keep = OMNIGLOT_TRAIN_ARCHIVE, None
    else:
        archive = OMNIGLOT_TEST_ARCHIVE

        def keep(name: str) -> bool:
            return name.split("/", 1)[0] in OMNIGLOT_TEST_ALPHABETS

    path = Path(root) / archive
    if not path.is_file():
        expected = tuple(OMNIGLOT_FULL_ARCHIVES.values()) if full else (OMNIGLOT_TRAIN_ARCHIVE, OMNIGLOT_TEST_ARCHIVE)
        raise FileNotFoundError(
            f"Omniglot archive not found: expected {path} (absolute: {path.resolve()}). "
            f"Pass root= the folder that holds {expected[0]} and {expected[1]}."
        )
    return load_image_folder(path, class_depth=2, class_filter=keep, validate=validate)
